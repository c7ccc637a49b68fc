"""The `depthlab` command (also `python -m depthlab.research`).

    depthlab list                                     # every experiment, one line each
    depthlab run vision/digits_cnn --workdir runs/a   # defaults; resumes if runs/a has a checkpoint
    depthlab run vision/digits_cnn --config.optim.name=sgd --config.train.steps=2000
    depthlab sweep vision/digits_cnn --sweep optim.name=sgd,adam,rmsprop --sweep seed=0,1,2
    depthlab report runs/                             # table of final metrics + PNG plots
    depthlab eval rl/ppo_cartpole --workdir runs/ppo  # evaluate a trained checkpoint
    depthlab data convert photos/ --out data/photos    # an image folder, a .npz or a text file -> streaming files
    depthlab compile language/char_gpt --topology v5e:2x2  # AOT-compile for a TPU slice: memory, FLOPs, collectives
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys

# Only the standard library at the top: `depthlab --help` and `depthlab list` never import JAX. Each
# sub-command imports what it needs.


def _split_overrides(extra: list[str]) -> list[str]:
    """`--config.a.b=v` or `--config.a.b v` -> ["a.b=v"]; anything else is an error."""
    overrides, i = [], 0
    while i < len(extra):
        arg = extra[i]
        if not arg.startswith("--config."):
            raise SystemExit(f"depthlab: unrecognised argument {arg!r}; config overrides look like "
                             f"--config.train.steps=100")
        body = arg[len("--config."):]
        if "=" not in body:
            if i + 1 >= len(extra):
                raise SystemExit(f"depthlab: {arg} needs a value, e.g. {arg}=100")
            body = f"{body}={extra[i + 1]}"
            i += 1
        overrides.append(body)
        i += 1
    return overrides


def _print_result(result: dict) -> int:
    """Prints the result line; returns the exit code (128 + the signal's number for a preempted run)."""
    step = result["metrics"].get("step")
    if result.get("preempted"):
        print(f"\n{result['name']} preempted at step {step} by {result['preempted']} ({result['seconds']:.1f} s); "
              f"its checkpoint is in {result['workdir']}: run the same command to resume.")
        return 128 + int(getattr(signal, result["preempted"]))
    if result.get("already_finished"):   # run_experiment printed the one line
        return 0
    if result.get("kind") != "fit":   # fit printed its own result line
        from depthlab.train.metric_writers import result_line
        where = f" at step {step}" if step is not None else ""
        print(f"\nResult of {result['name']}{where} ({result['seconds']:.1f} s): {result_line(result['metrics'])}")
    for key, value in (result.get("summary") or {}).items():
        if isinstance(value, (int, float, str)) and key != "plot":
            print(f"  {key}: {value}")
    files = sorted(f for f in os.listdir(result["workdir"]) if not f.startswith("."))
    print(f"Run directory: {result['workdir']} ({', '.join(files)})")
    return 0


def _experiment_help(name: str) -> str:
    """What `depthlab run EXP --help` adds: the experiment's description, its presets and its config keys."""
    from depthlab.research import registry

    module = registry.load_experiment(name)
    config = module.get_config()
    presets = ", ".join(sorted(getattr(module, "PRESETS", {}))) or "none"
    lines = [f"\n{name}: {(module.__doc__ or '').strip().splitlines()[0] if module.__doc__ else ''}",
             f"presets (--preset NAME): {presets}",
             "config overrides: --config.KEY=VALUE (or --config.KEY VALUE), e.g. --config.train.steps=100 (each key's "
             "allowed values: --print-schema); keys:"]
    for section, value in config.items():
        if hasattr(value, "keys"):
            lines.append(f"  {section}: " + ", ".join(f"{k}={v!r}" for k, v in value.items()))
        else:
            lines.append(f"  {section}={value!r}")
    return "\n".join(lines)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-h", "--help", action="store_true", help="show this help (with the experiment's presets "
                   "and config keys when one is named) and exit")
    p.add_argument("experiment", nargs="?", help="field/name, e.g. vision/digits_cnn (see `depthlab list`), the "
                   "path of your own .py file (get_config and make_experiment or run), or an installed entry point")
    p.add_argument("--workdir", default=None, help="run directory (default runs/<field>_<name>)")
    p.add_argument("--preset", default=None, help="a named config preset of the experiment")


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The `depthlab` parser and its sub-command parsers by name."""
    parser = argparse.ArgumentParser(prog="depthlab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {"list": sub.add_parser("list", help="list every experiment (depthlab's and installed packages'), "
                                       "or the experiment files in the given files or folders")}
    commands["list"].add_argument("paths", nargs="*", help="experiment files or folders of them (default: "
                                  "depthlab's experiments and the `depthlab.experiments` entry points)")
    p_run = commands["run"] = sub.add_parser("run", help="train an experiment (resumes from the run directory)",
                                             add_help=False)
    _common(p_run)
    p_run.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p_run.add_argument("--print-schema", action="store_true",
                       help="print every config key's allowed values (its declared domain) and exit")
    p_sweep = commands["sweep"] = sub.add_parser("sweep", help="run the cartesian product of --sweep key=v1,v2 "
                                                 "settings (and random --sample trials), or one shard of them",
                                                 add_help=False)
    _common(p_sweep)
    p_sweep.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                         help="a config key and its values; repeat for a grid")
    p_sweep.add_argument("--sample", action="append", default=[], metavar="KEY=DIST",
                         help="random search: KEY=loguniform:LOW:HIGH, KEY=uniform:LOW:HIGH or KEY=choice:A,B; "
                         "repeat for several keys; each of --trials draws crossed with the --sweep grid")
    p_sweep.add_argument("--trials", type=int, default=0, help="random search: the number of draws")
    p_sweep.add_argument("--sample-seed", type=int, default=0, help="random search: the seed of the draws")
    p_sweep.add_argument("--shard", default=None, metavar="INDEX/COUNT",
                         help="run only the points i with i %% COUNT == INDEX (default: from SLURM_ARRAY_TASK_ID/"
                         "SLURM_ARRAY_TASK_COUNT, or JOB_COMPLETION_INDEX/DEPTHLAB_SHARD_COUNT, when set; "
                         "0/1 = every point); docs/sweeps.md")
    p_sweep.add_argument("--print", action="store_true", dest="print_points",
                         help="list the points (index, run directory, status) without running them")
    p_sweep.add_argument("--together", nargs="?", const="auto", default=False, choices=("auto", "vmap", "map", "unroll"),
                         help="train the points that differ only in seed and optimizer scalars (learning rate, "
                         "weight decay, ...) as one compiled program with a member axis, each member still its own "
                         "run directory: vmap (vectorised), map or unroll (members one after the other inside the "
                         "program: a separate run's arithmetic) or auto (default: vmap; on CPU, a step with "
                         "convolutions runs its points one after the other, which is faster there); docs/sweeps.md")
    p_report = commands["report"] = sub.add_parser("report", help="table of final metrics and PNG plots of the "
                                                   "runs below a folder")
    p_report.add_argument("root", help="a run directory or a folder of them")
    p_report.add_argument("--out", default=None, help="where to write the plots (default ROOT/report)")
    p_report.add_argument("--cost", action="store_true",
                          help="add parameter and FLOP counts (they compile the train step once per distinct "
                          "config: seconds each; without it the report only reads the runs' files)")
    p_report.add_argument("--no-cost", action="store_true", help=argparse.SUPPRESS)   # the default now
    p_eval = commands["eval"] = sub.add_parser("eval", help="evaluate the checkpoint in a run directory")
    p_eval.add_argument("experiment", nargs="?", default=None,
                        help="field/name or an experiment file (optional: the run directory records its experiment)")
    p_eval.add_argument("--workdir", default=None, help="the run directory")
    p_eval.add_argument("--preset", default=None, help="a named config preset of the experiment")

    p_compile = commands["compile"] = sub.add_parser(
        "compile", help="AOT-compile an experiment's train and eval steps for a TPU topology (no TPU needed): memory "
        "per chip, FLOPs, collectives, an estimated step time (docs/scaling.md)")
    p_compile.add_argument("experiment", help="field/name, e.g. language/char_gpt (see `depthlab list`)")
    p_compile.add_argument("--topology", required=True,
                           help="a TPU slice GEN:SHAPE or accelerator type, e.g. v5e:2x2, v5e:16x16, v4:2x2x2, "
                           "v5p-128, v6e-8, v5e:1x1 (Colab's one-chip host)")
    p_compile.add_argument("--preset", default=None, help="a named config preset of the experiment")
    p_compile.add_argument("--num-slices", type=int, default=1, help="slices joined over the data-centre network")
    p_compile.add_argument("--members", type=int, default=None, metavar="N",
                           help="compile N seeds (the config's seed + 0..N-1) as the one program of `depthlab sweep "
                           "--together`: memory per member, member-steps/s (estimates); docs/sweeps.md")
    p_compile.add_argument("--json", action="store_true", help="print the report as JSON")

    p_data = commands["data"] = sub.add_parser("data", help="dataset tools: `depthlab data convert SRC --out DIR`")
    data_sub = p_data.add_subparsers(dest="data_command", required=True)
    p_convert = data_sub.add_parser(
        "convert", help="an image folder (one sub-folder per class), a .npz or a text file -> ArrayRecord shards "
        "or token .bin files for --config.data.source (docs/data.md)")
    p_convert.add_argument("source", help="a folder of class folders, a .npz (x_train, y_train, x_test, y_test) "
                           "or a UTF-8 text file")
    p_convert.add_argument("--out", required=True, help="output folder")
    p_convert.add_argument("--kind", choices=("images", "npz", "text"), default=None,
                           help="what SOURCE is (default: from the path)")
    p_convert.add_argument("--shards", type=int, default=1, help="ArrayRecord files of the train split")
    p_convert.add_argument("--size", default=None, help="resize every image to HxW (e.g. 32x32)")
    p_convert.add_argument("--test-fraction", type=float, default=0.1,
                           help="held-out share of an image folder without train/ and test/ folders")
    p_convert.add_argument("--tokenizer", choices=("char", "subword"), default="char", help="text: the tokenizer")
    p_convert.add_argument("--vocab-size", type=int, default=1000, help="text: the subword vocabulary size")
    p_convert.add_argument("--val-fraction", type=float, default=0.1, help="text: the validation share (the end)")
    return parser, commands


def main(argv: list[str] | None = None) -> int:
    parser, commands = build_parser()
    args, extra = parser.parse_known_args(argv)
    run = {"list": _list, "run": _run, "sweep": _sweep, "eval": _eval, "report": _report, "data": _data,
           "compile": _compile}[args.command]
    if getattr(args, "experiment", None) and args.experiment.endswith(".py") and os.path.isfile(args.experiment):
        # as `python my_experiment.py` would: the experiment file's own folder is importable (its helpers)
        sys.path.insert(0, os.path.dirname(os.path.abspath(args.experiment)))
    if args.command in ("run", "sweep", "eval", "report"):
        quiet_libtpu_off_tpu()     # never for `compile`: it targets TPU topologies through libtpu
    if args.command in ("run", "sweep", "eval"):
        # The command (not the library) keeps compiled steps across runs: a second run starts in seconds.
        # DEPTHLAB_COMPILATION_CACHE=off switches it off; another path moves it.
        os.environ.setdefault("DEPTHLAB_COMPILATION_CACHE", os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "depthlab", "xla"))
    try:
        return run(args, extra, commands[args.command])
    except Exception as e:
        if not _is_user_error(e):
            raise
        print(f"depthlab: error: {e}", file=sys.stderr)
        return 2


def quiet_libtpu_off_tpu() -> bool:
    """With libtpu installed (the [tpu] extra, for `depthlab compile`) on a machine without TPU chips and no
    GPU plugin, JAX would still start the TPU backend for a run and libtpu would print half a dozen warnings
    (no TPU accelerator type, no worker hostnames) before falling back to the CPU. The command then asks JAX
    for the CPU alone. A TPU VM (/dev/accel*, /dev/vfio/N), a GPU plugin or a JAX_PLATFORMS the user set are
    left alone. Returns True when it set JAX_PLATFORMS."""
    import glob
    import importlib.util

    if "JAX_PLATFORMS" in os.environ or importlib.util.find_spec("libtpu") is None:
        return False
    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
        return False
    if any(importlib.util.find_spec(m) is not None for m in ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin")):
        return False
    os.environ["JAX_PLATFORMS"] = "cpu"
    return True


def _is_user_error(e: Exception) -> bool:
    """The errors printed as one line (a bad value, a missing file, a locked run, a bad checkpoint); anything
    else is a bug and keeps its traceback."""
    from depthlab.train.checkpoint import CheckpointError
    from depthlab.train.rundir import RunLockedError

    return isinstance(e, (ValueError, KeyError, FileNotFoundError, PermissionError, OSError, FloatingPointError,
                          RunLockedError, CheckpointError, ImportError))


def _initialize_distributed() -> None:
    """One process of a multi-process job (env DEPTHLAB_COORDINATOR, ...) joins it."""
    from depthlab.train.parallel import maybe_initialize_distributed

    maybe_initialize_distributed()


def _list(args, extra: list[str], parser) -> int:
    from depthlab.research import registry

    experiments = registry.list_experiments(args.paths)
    if args.paths and not experiments:
        raise FileNotFoundError(f"no experiment files in {', '.join(args.paths)} (a .py file that defines "
                                f"get_config and make_experiment or run)")
    width = max(map(len, experiments), default=0)
    for name, description in experiments.items():
        print(f"{name.ljust(width)}  {description}")
    return 0


def _help(args, parser) -> int | None:
    """`depthlab run|sweep [EXP] --help` (or no experiment): the usage, with the experiment's presets and keys."""
    if args.help or not args.experiment:
        print(parser.format_help() + (_experiment_help(args.experiment) if args.experiment else ""))
        return 0 if args.help else 2
    return None


def _run(args, extra: list[str], parser) -> int:
    if (code := _help(args, parser)) is not None:
        return code
    from depthlab.research import runner

    overrides = _split_overrides(extra)
    if args.print_config:
        print(runner.build_config(args.experiment, args.preset, overrides))
        return 0
    if args.print_schema:
        from depthlab.research.config_schema import describe_schema
        for key, (domain, source) in describe_schema(args.experiment, args.preset).items():
            print(f"{key}: {domain}" + ("" if source == "inferred" else f"  [{source}]"))
        return 0
    # run_experiment joins a multi-process job itself, after its check for a finished run (files only, no JAX)
    return _print_result(runner.run_experiment(args.experiment, overrides=overrides, workdir=args.workdir,
                                               preset=args.preset))


def _sweep(args, extra: list[str], parser) -> int:
    if (code := _help(args, parser)) is not None:
        return code
    from depthlab.research import runner
    from depthlab.research.report import format_runs_table, format_settings_table

    overrides = _split_overrides(extra)
    if not (args.sweep or args.sample):
        raise SystemExit("depthlab sweep: give at least one --sweep key=v1,v2 (or --sample key=DIST --trials N)")
    shard, where = (runner.parse_shard(args.shard), "--shard") if args.shard else (None, None)
    if shard is None and (found := runner.shard_from_environment()):
        shard, where = found[:2], found[2]
    sampling = {"samples": args.sample, "trials": args.trials, "sample_seed": args.sample_seed}
    if args.print_points:
        points = runner.sweep_points(args.experiment, args.sweep, workdir=args.workdir, **sampling)
        configs = {p.index: runner.build_config(args.experiment, args.preset, {   # a typo fails here too
            **dict(o.split("=", 1) for o in overrides), **p.overrides}) for p in points}
        mine = runner.shard_points(points, shard)
        if shard:
            print(f"shard {shard[0]}/{shard[1]} (from {where}): {len(mine)} of {len(points)} points")
        width = len(str(points[-1].index))
        for p in mine:
            print(f"{str(p.index).rjust(width)}  {runner.point_status(p.workdir):8}  {p.workdir}")
        if args.together:   # and how they would train
            from depthlab.research.together import plan_groups, plan_lines
            print("\n".join(plan_lines(plan_groups(mine, configs))))
        return 0
    _initialize_distributed()
    if shard and where != "--shard":
        print(f"Sweep shard {shard[0]}/{shard[1]} from {where}.")
    records = runner.run_sweep(args.experiment, args.sweep, preset=args.preset, overrides=overrides,
                               workdir=args.workdir, shard=shard, together=args.together, **sampling)
    rows = [{"run": r["point"], "metrics": r["metrics"], "status": r["status"]} for r in records]
    print("\n" + format_runs_table(rows))
    if grouped := format_settings_table(rows):
        print("\n" + grouped)
    counts = {}
    for r in records:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    print("\nSweep: " + ", ".join(f"{n} {status}" for status, n in counts.items()) +
          f" (records in {runner.sweep_record_path(os.path.dirname(records[0]['workdir']), shard)})"
          if records else "\nSweep: no points in this shard.")
    code = runner.sweep_exit_code(records)
    if code > 128:
        print(f"Stopped by {next(r['signal'] for r in records if r.get('signal'))}: run the same command to resume "
              f"(finished points are kept, the interrupted one resumes from its checkpoint).")
    failed = [r for r in records if r["status"] == "failed"]
    if failed:
        print(f"depthlab sweep: {len(failed)} of {len(records)} points failed:", file=sys.stderr)
        for r in failed:
            print(f"  #{r['index']} {r['point']}: {r['error']}", file=sys.stderr)
    return code


def _eval(args, extra: list[str], parser) -> int:
    from depthlab.research import runner
    from depthlab.research.evaluation import evaluate_run

    _initialize_distributed()
    overrides = _split_overrides(extra)
    if args.experiment and args.workdir is None and not args.experiment.endswith(".py") and (
            "/" not in args.experiment or os.path.isfile(os.path.join(args.experiment, "config.json"))):
        args.experiment, args.workdir = None, args.experiment   # `depthlab eval RUN_DIR`
    if not (args.experiment or args.workdir):
        raise SystemExit("depthlab eval: give a run directory (--workdir DIR) or an experiment name")
    workdir = args.workdir or runner.default_workdir(args.experiment)
    out = evaluate_run(args.experiment, workdir, preset=args.preset, overrides=overrides)
    print(json.dumps(out, indent=2, default=float))
    return 0


def _compile(args, extra: list[str], parser) -> int:
    from depthlab.research import aot

    return aot.command(args, _split_overrides(extra))


def _data(args, extra: list[str], parser) -> int:
    from depthlab.research.datasets import convert

    if extra:
        raise SystemExit(f"depthlab data convert: unrecognised arguments {' '.join(extra)}")
    convert.convert(args.source, args.out, kind=args.kind, shards=args.shards, size=convert.parse_size(args.size),
                    test_fraction=args.test_fraction, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                    val_fraction=args.val_fraction)
    return 0


def _report(args, extra: list[str], parser) -> int:
    from depthlab.research.report import collect_runs, format_runs_table, format_settings_table, plot_runs, run_cost

    if not os.path.exists(args.root):
        raise FileNotFoundError(f"no such run directory {args.root!r}")
    rows = collect_runs(args.root)
    if not rows:
        raise FileNotFoundError(f"no run directories (with metrics.jsonl) below {args.root!r}")
    if args.cost and not args.no_cost:
        _initialize_distributed()
        costs: dict = {}   # one compilation per distinct config: the seeds of a sweep share theirs
        for row in rows:
            try:
                row["metrics"].update(run_cost(row["path"], cache=costs))
            except Exception as e:  # the table must not fail on one odd run
                print(f"(no cost figures for {row['run']}: {type(e).__name__}: {e})")
    print(format_runs_table(rows))
    if grouped := format_settings_table(rows):
        print("\n" + grouped)
    out = args.out or os.path.join(args.root, "report")
    paths = plot_runs(rows, out)
    print(f"\n{len(paths)} plots written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
