"""Test setup: 4 fake CPU devices for every test (multi-device code paths run on CPU).

4 devices show every sharding bug that 8 do (data x fsdp and data x tensor meshes of 2 x 2), at half the
per-step cost on 2 cores; tests/test_multiprocess.py starts its own processes with 8 devices in all.
XLA's own log lines are left on: a native abort prints why.
"""
import os

# Must be set before jax is imported anywhere.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The non-partitionable threefry compiles random initialisers several times faster on XLA:CPU (jax 0.10).
# It draws other random numbers than the default: a test that depends on the default's bits asks for them
# with the default_threefry fixture below.
os.environ.setdefault("JAX_THREEFRY_PARTITIONABLE", "0")
# One persistent compilation cache for the whole run: the xdist workers, the CLI subprocesses and the notebook
# kernels inherit it, so a program compiled by one test (a smoke experiment's step) is loaded by the next.
# The controller sets it before the workers start; a fresh folder per run, so no stale entry carries over.
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile
    _OWN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="depthlab-tests-xla-")

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def single_device_mesh():
    from depthlab.train.parallel import make_mesh
    return make_mesh({"data": 1}, devices=jax.devices()[:1])


@pytest.fixture
def default_threefry():
    """JAX's default, partitionable threefry, for tests that depend on the random bits themselves (a row's
    draws not changing with the batch size) or on figures from one seed's draw."""
    with jax.threefry_partitionable(True):
        yield


def pytest_sessionfinish(session, exitstatus):
    """The process that made the run's compilation cache (the controller) removes it at the end."""
    if _OWN_CACHE and "PYTEST_XDIST_WORKER" not in os.environ:
        import shutil
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)

