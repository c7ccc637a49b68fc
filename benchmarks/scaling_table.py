"""The scaling table of docs/scaling.md: every (model, TPU topology) row AOT-compiled on this machine.

Each row is one `depthlab compile EXPERIMENT --topology T --preset P --json --config...` in its own
subprocess (its own process group, killed after --timeout seconds), run one after another, cheapest
first. Every step time, MFU and throughput is the compiler-derived ESTIMATE of train/aot.py (a roofline
over the compiled step's FLOPs, bytes and collectives), never a measurement. Prints a Markdown table
and writes the rows (each with its command, the report or the reason it has none) as JSON.

Run it holding one CPU slot (the rows run one at a time):
    .venv/bin/python benchmarks/scaling_table.py --json scaling_table.json
    .venv/bin/python benchmarks/scaling_table.py --only gpt2-xl --only v5p --timeout 600
    .venv/bin/python benchmarks/scaling_table.py --list          # the rows and their commands
    .venv/bin/python benchmarks/scaling_table.py --from-json scaling_table.json   # re-print a table
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

# Topologies: (label, --topology, chips).
TOPOLOGIES = [
    ("Colab v5e-1", "v5e:1x1", 1),
    ("Colab v6e-1", "v6e:1x1", 1),
    ("v5e-8", "v5e:2x4", 8),
    ("v6e-8", "v6e:2x4", 8),
    ("v4-32", "v4:2x2x4", 16),
    ("v5p-128", "v5p:4x4x4", 64),
    ("v5e-256", "v5e:16x16", 256),
]

FSDP = {"mesh.strategy": "fsdp", "mesh.fsdp": -1, "mesh.data": 1}


@dataclasses.dataclass(frozen=True)
class Model:
    """One model of the table: an experiment and preset, how its global batch grows with the chips, and
    its mesh. cost orders the rows (cheapest compile first)."""
    label: str
    experiment: str
    preset: str | None
    per_chip_batch: int | None = None        # None: the experiment's own batch (when the chips divide it)
    overrides: tuple = ()
    fsdp: bool = False
    eval: bool = True                        # compile the eval step too (big models: train step only)
    cost: int = 0
    key: str = ""                            # a short name for --row (the preset otherwise)


MODELS = [
    Model("vision/digits_cnn (default)", "vision/digits_cnn", None, cost=0),
    Model("generative/vae_mnist (default)", "generative/vae_mnist", None, cost=1),
    Model("language/char_gpt (default)", "language/char_gpt", None, cost=2),
    Model("GPT-2 small 124M", "language/gpt_pretrain", "gpt2", 8, fsdp=True, eval=False, cost=3),
    Model("ResNet-50 224x224", "vision/imagenet_resnet", "resnet50", 32, eval=False, cost=4),
    Model("GPT-2 medium 355M", "language/gpt_pretrain", "gpt2-medium", 8, fsdp=True, eval=False, cost=5),
    Model("GPT-2 large 774M", "language/gpt_pretrain", "gpt2-large", 8, fsdp=True, eval=False, cost=6),
    Model("GPT-2 XL 1.5B", "language/gpt_pretrain", "gpt2-xl", 8, fsdp=True, eval=False, cost=7),
    Model("7B decoder (32 x 4096, ctx 2048)", "language/gpt_pretrain", "7b", 4, fsdp=True, eval=False, cost=8),
    # Data parallel (state replicated), for the models whose whole state fits one chip: the comparison that
    # shows what FSDP's activation layout costs (docs/scaling.md).
    Model("GPT-2 small 124M, data parallel", "language/gpt_pretrain", "gpt2", 8, eval=False, cost=3,
          overrides=(("mesh.strategy", "replicated"), ("mesh.data", -1), ("mesh.fsdp", 1)), key="gpt2-dp"),
    Model("GPT-2 XL 1.5B, data parallel", "language/gpt_pretrain", "gpt2-xl", 8, eval=False, cost=7,
          overrides=(("mesh.strategy", "replicated"), ("mesh.data", -1), ("mesh.fsdp", 1)), key="gpt2-xl-dp"),
    # Hybrid FSDP x data parallel: GPT-2 XL's widths (1600, 4800, 6400, 50257) divide 64 but not 256, so FSDP over
    # 64 chips inside data-parallel groups splits every matrix (the recommended mesh for v5e-256, docs/scaling.md).
    Model("GPT-2 XL 1.5B, fsdp=64 x data", "language/gpt_pretrain", "gpt2-xl", 8, eval=False, cost=7,
          overrides=(("mesh.strategy", "fsdp"), ("mesh.fsdp", 64), ("mesh.data", -1)), key="gpt2-xl-hybrid"),
]

# The rows issue 26's targets name come first inside each cost class.
PRIORITY = [("GPT-2 XL 1.5B", "v5p-128"), ("GPT-2 XL 1.5B", "v5e-256"), ("7B decoder (32 x 4096, ctx 2048)", "v5p-128"),
            ("7B decoder (32 x 4096, ctx 2048)", "v5e-256")]


def row_overrides(model: Model, chips: int) -> dict:
    """--config.KEY=VALUE of one row: the mesh (FSDP over every chip for the big models; data parallel
    otherwise) and the global batch (per-chip batch x chips)."""
    out = dict(model.overrides)
    if model.fsdp and chips > 1:
        out.update(FSDP)
    if model.per_chip_batch is not None:
        out["data.batch_size"] = model.per_chip_batch * chips
    if not model.eval and chips > 1:
        # The eval step is skipped to halve compile time: an eval batch of 1 row does not divide the
        # data shards, and compile_for_topology then compiles the train step only (and says so).
        out["data.eval_batch_size"] = 1
    return out


def row_command(model: Model, topology: str, chips: int, python: str = sys.executable) -> list[str]:
    cmd = [python, "-m", "depthlab.research", "compile", model.experiment, "--topology", topology, "--json"]
    if model.preset:
        cmd += ["--preset", model.preset]
    cmd += [f"--config.{k}={v}" for k, v in row_overrides(model, chips).items()]
    return cmd


def all_rows() -> list[tuple[Model, str, str, int]]:
    # A model with a fixed mesh.fsdp has rows only on slices with more chips than that (the rest is data parallel).
    rows = [(m, label, topo, chips) for m in MODELS for label, topo, chips in TOPOLOGIES
            if int(dict(m.overrides).get("mesh.fsdp", 1)) in (-1, 1) or chips > int(dict(m.overrides)["mesh.fsdp"])]
    first = {key: i for i, key in enumerate(PRIORITY)}
    return sorted(rows, key=lambda r: (r[0].cost, first.get((r[0].label, r[1]), len(first)), r[3]))


def run_row(cmd: list[str], timeout: float) -> dict:
    """One compile in its own process group; killed (the whole group) after `timeout` seconds."""
    env = {**os.environ, "ALLOW_MULTIPLE_LIBTPU_LOAD": "1", "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"),
           "DEPTHLAB_COMPILATION_CACHE": "off"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {"status": "timeout", "wall_seconds": time.perf_counter() - t0,
                "reason": f"not compiled within {timeout:.0f} s on this host"}
    wall = time.perf_counter() - t0
    report = None
    if out.strip():
        try:
            report = json.loads(out[out.index("{"):])
        except ValueError:
            report = None
    last = (err.strip().splitlines() or [""])[-1]
    if proc.returncode == 0 and report is not None:
        return {"status": "ok", "wall_seconds": wall, "report": report}
    if proc.returncode == 2 and "does not fit" in err:
        return {"status": "does not fit", "wall_seconds": wall, "report": report, "reason": last}
    return {"status": "error", "wall_seconds": wall, "report": report, "reason": last[:400]}


# ----------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------

GiB, MiB = 1024 ** 3, 1024 ** 2


def _bytes(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.1f} MiB"


def _ms(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 10 else f"{s:.1f} s"


def _collectives(report: dict) -> str:
    kinds = {"all-gather": "AG", "reduce-scatter": "RS", "all-reduce": "AR", "all-to-all": "A2A",
             "collective-permute": "CP"}
    parts = [f"{kinds.get(k, k)} {v['count']}x {_bytes(v['bytes'])}"
             for k, v in report["train"]["collectives"].items() if v["count"]]
    return ", ".join(parts) or "none"


def _mesh(report: dict) -> str:
    mesh = " ".join(f"{k}={v}" for k, v in report["mesh"].items() if v > 1) or "1 device"
    return mesh


def fsdp_ratio(report: dict) -> float | None:
    """State bytes per device x devices / the whole state: 1.0 = a perfect 1/N split (target <= 1.1)."""
    if report["num_devices"] < 2 or not report["state_bytes"]:
        return None
    return report["state_bytes_per_device"] * report["num_devices"] / report["state_bytes"]


HEADER = ("| model | slice (`--topology`) | mesh | params | memory / chip (of HBM) | state / chip (x N / whole) "
          "| step time (estimate), bound | MFU (estimate) | tokens or images / s (estimate) | collectives per train step "
          "| compile on this host |\n|---|---|---|---|---|---|---|---|---|---|---|")


def format_row(row: dict) -> str:
    head = f"| {row['model']} | {row['slice']} (`{row['topology']}`) |"
    r = row.get("report")
    if row["status"] != "ok" and (r is None or row["status"] != "does not fit"):
        reason = row.get("reason", "").split("does not fit: ", 1)[-1]     # the command's prefix is in the status
        return f"{head} | | | **{row['status']}**: {reason} | | | | | | {row['wall_seconds']:.0f} s (wall) |"
    est, mem, chip = r["estimate"], r["memory"], r["chip"]
    ratio = fsdp_ratio(r)
    fits = "" if r["fits"] else " **DOES NOT FIT**"
    item = "tok" if r["item_name"] == "tokens" else "img"
    mfu_src = "" if "nanoGPT" in r["model_flops_source"] else " (XLA count)"
    compile_s = r["train"]["lower_seconds"] + r["train"]["compile_seconds"]
    eval_s = f" + eval {r['eval']['compile_seconds']:.0f} s" if r.get("eval") else ""
    return (f"{head} {_mesh(r)} | {r['num_params'] / 1e6:,.1f}M | {_bytes(mem.get('total', 0))} "
            f"({100 * mem.get('total', 0) / chip['hbm_bytes']:.0f}% of {chip['hbm_bytes'] / GiB:.0f} GiB){fits} | "
            f"{_bytes(r['state_bytes_per_device'])}" + (f" ({ratio:.2f})" if ratio is not None else "") + " | "
            f"{_ms(est['step_seconds'])}, {est['bound']} | {100 * est['mfu']:.1f}%{mfu_src} | "
            f"{est['items_per_second']:,.0f} {item}/s | {_collectives(r)} | {compile_s:.0f} s{eval_s} |")


def format_table(rows: list[dict]) -> str:
    return "\n".join([HEADER] + [format_row(r) for r in rows])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", action="append", default=[],
                   help="keep rows whose model label, preset or slice contains this (repeat: all must match)")
    p.add_argument("--skip", action="append", default=[], help="drop rows whose model or slice contains this")
    p.add_argument("--row", action="append", default=[],
                   help="MODEL@SLICE, e.g. gpt2-xl@v5p-128 or digits_cnn@'Colab v5e-1' (a word of the model's label or "
                        "its preset, the slice's label): run exactly these rows in this order (repeat)")
    p.add_argument("--timeout", type=float, default=420, help="seconds per row (default 420)")
    p.add_argument("--budget", type=float, default=1500,
                   help="stop starting rows after this many seconds in all (default 1500); the rest are listed as skipped")
    p.add_argument("--json", default="scaling_table.json", help="where the rows go (rewritten after every row)")
    p.add_argument("--list", action="store_true", help="print the rows' commands and exit")
    p.add_argument("--from-json", default=None, help="print the table of a JSON file written before, and exit")
    args = p.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            print(format_table(json.load(f)["rows"]))
        return 0

    def keep(m: Model, label: str, topo: str) -> bool:
        text = f"{m.label} {m.preset or ''} {m.experiment} {label} {topo}".lower()
        return all(o.lower() in text for o in args.only) and not any(s.lower() in text for s in args.skip)

    rows = [r for r in all_rows() if keep(r[0], r[1], r[2])]
    if args.row:      # exactly these rows, in the order given
        picked = []
        for spec in args.row:
            model, _, slice_ = spec.partition("@")
            picked += [r for r in rows if r not in picked and model.lower() in (r[0].key.split() if r[0].key else f"{r[0].label} {r[0].preset}".lower().split())
                       and slice_.lower() == r[1].lower()]
        rows = picked
    if args.list:
        for m, label, topo, chips in rows:
            print(f"{m.label} on {label}: " + " ".join(row_command(m, topo, chips, "python")))
        return 0
    started, done = time.perf_counter(), []
    uptime = lambda: open("/proc/loadavg").read().split()[:3]  # noqa: E731
    for m, label, topo, chips in rows:
        cmd = row_command(m, topo, chips, "python")
        entry = {"model": m.label, "slice": label, "topology": topo, "chips": chips,
                 "command": " ".join(["depthlab"] + cmd[3:]), "load_before": uptime()}
        if time.perf_counter() - started > args.budget:
            entry.update(status="skipped", wall_seconds=0.0, reason=f"the table's {args.budget:.0f} s compile budget was spent")
        else:
            entry.update(run_row(row_command(m, topo, chips), args.timeout))
        entry["load_after"] = uptime()
        done.append(entry)
        print(format_row(entry), flush=True)
        with open(args.json, "w") as f:
            json.dump({"note": "every step time, MFU and throughput is a compiler-derived ESTIMATE", "rows": done},
                      f, indent=1, default=str)
    print()
    print(format_table(done))
    return 0


if __name__ == "__main__":
    sys.exit(main())
