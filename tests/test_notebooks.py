"""Every notebook in colab/ runs top to bottom on CPU with its small settings (DEPTHLAB_SMOKE=1) and shows
what a person would see: each cell tagged "plot" (cell metadata `"tags": ["plot"]`) must output a PNG image.

The kernel runs with the backend it chooses itself (ipykernel: matplotlib's inline backend), not a forced
MPLBACKEND=Agg, so a library call that switched the global backend off inline would fail here.
"""
import glob
import os

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "colab", "*.ipynb")))
IDS = [os.path.basename(p) for p in NOTEBOOKS]


def code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def test_quickstart_exists():
    assert os.path.join(ROOT, "colab", "quickstart.ipynb") in NOTEBOOKS


def test_every_notebook_opens_with_the_same_install_and_device_cells():
    """One install cell (installs nothing where depthlab is importable) and one device report, everywhere;
    the first markdown cell says how long the full settings take on a CPU and on a Colab TPU."""
    notebooks = {os.path.basename(p): nbformat.read(p, as_version=4) for p in NOTEBOOKS}
    first = {name: tuple(c.source for c in code_cells(nb)[:2]) for name, nb in notebooks.items()}
    install, devices = first["quickstart.ipynb"]
    assert 'find_spec("depthlab") is None' in install and "depthlab[notebook,vision,language]" in install
    assert "jax.devices()" in devices
    # The cell's default repository is the project's home as pyproject.toml declares it (one place to change).
    import tomllib
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        home = tomllib.load(f)["project"]["urls"]["Repository"]
    assert f'os.environ.get("DEPTHLAB_REPO", "git+{home}")' in install
    for name, nb in notebooks.items():
        assert first[name] == (install, devices), f"{name} does not open with quickstart's install and device cells"
        intro = nb.cells[0]
        assert intro.cell_type == "markdown" and "CPU" in intro.source and "TPU" in intro.source, name
        assert any("plot" in c.metadata.get("tags", []) for c in code_cells(nb)), f"{name} tags no plot cell"


# The theory and RL notebooks each run a minute of studies and agents (their experiments have fast tests of
# their own): they run with the slow tests, so the fast suite stays under 10 minutes on 2 cores.
SLOW_NOTEBOOKS = ("theory.ipynb", "rl.ipynb")


@pytest.mark.parametrize("path", [pytest.param(p, marks=pytest.mark.slow) if os.path.basename(p) in SLOW_NOTEBOOKS
                                  else p for p in NOTEBOOKS], ids=IDS)
def test_notebook_runs_and_shows_its_figures(path, tmp_path, monkeypatch):
    monkeypatch.setenv("DEPTHLAB_SMOKE", "1")
    monkeypatch.delenv("MPLBACKEND", raising=False)   # the kernel picks its own (inline) backend
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    cells = code_cells(nb)
    errors = [(i, o.get("ename"), o.get("evalue")) for i, c in enumerate(cells) for o in c.get("outputs", [])
              if o.output_type == "error"]
    assert not errors
    blank = [i for i, c in enumerate(cells) if "plot" in c.metadata.get("tags", [])
             and not any("image/png" in o.get("data", {}) for o in c.get("outputs", []))]
    assert not blank, f"code cells {blank} (0-based) are tagged 'plot' but show no image"
    # A progress bar renders as one widget (tqdm.auto + ipywidgets), not as text redrawn with carriage returns.
    text_bars = [i for i, c in enumerate(cells) for o in c.get("outputs", [])
                 if o.output_type == "stream" and "\r" in o.get("text", "")]
    assert not text_bars, f"code cells {text_bars} print text progress bars (is ipywidgets installed?)"
