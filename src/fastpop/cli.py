"""The `fastpop` command. It only parses, calls the library and prints: no logic a Python user could not call.

Bad input ends in one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import errno
import functools
import logging
import re
import sys
from pathlib import Path

from .errors import ResourceError, UsageError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse would print the usage block too)
        raise UsageError(message)


def _int_list(text: str) -> list[int] | None:
    """'3,7,11' (or '5,' for one) as ints; None unless every item is plain ASCII digits (int() also takes
    '+3', ' 3', '3_0' and non-ASCII digits)."""
    items = text.split(",")
    if len(items) > 1 and items[-1] == "":
        items = items[:-1]
    if not all(re.fullmatch(r"[0-9]+", s) for s in items):
        return None
    return [int(s) for s in items]


def parse_classes(text: str) -> list[int]:
    classes = _int_list(text)
    if classes is None:
        raise argparse.ArgumentTypeError(f"classes are comma-separated labels such as 0,1,2, got {text!r}")
    return classes


def parse_seeds(text: str) -> int | list[int]:
    """'1000' is a count; '3,7,11' (or '5,' for one seed) is an explicit list."""
    seeds = _int_list(text)
    if seeds is None:
        raise argparse.ArgumentTypeError(f"a count (1000) or a comma-separated list (3,7,11), got {text!r}")
    return seeds if "," in text else seeds[0]


def parse_grid_item(text: str) -> tuple[str, list]:
    """KEY=V1,V2,... -> (key, values): integers for crop and cutout, numbers otherwise."""
    key, _, values = text.partition("=")
    key = key.strip().replace("-", "_")
    try:
        cast = int if key in ("crop", "cutout") else float
        return key, [cast(v) for v in values.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes KEY=V1,V2 (numbers), got {text!r}") from None


def parse_floats(text: str) -> list[float]:
    """'0.9,0.999' -> [0.9, 0.999]."""
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes comma-separated numbers such as 0.9,0.999, got {text!r}") from None


def parse_names(text: str) -> list[str]:
    """'margin,loss' -> ["margin", "loss"]."""
    return [k for k in text.split(",") if k]


def _chunk(text: str) -> int | str:
    return text if text == "auto" else int(text)


# parsers of the run options; any other takes the type of Config's default (str where that is None)
_TYPES = {"classes": parse_classes, "test_classes": parse_classes, "seeds": parse_seeds, "betas": parse_floats,
          "grid": parse_grid_item, "record": parse_names, "max_nets_per_chunk": _chunk, "superclass": int}
_NARGS = {"grid": "+"}  # --grid lr=0.4,0.1 momentum=0.9,0.8


def _run_flags() -> dict:
    """flag name -> Option for every run option that takes a value (the switches are added apart)."""
    from .options import OPTIONS, default

    return {o.name.replace("_", "-"): o for o in OPTIONS if not isinstance(default(o.name), bool)}


RUN_FLAGS = _run_flags()


class _HelpFormatter(argparse.HelpFormatter):
    """Says every option's default, except where there is none to say or the help says it already."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


class _VersionAction(argparse.Action):
    """--version: fastpop's version, and its commit when it runs from a checkout (looked up only when asked)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from . import __version__
        from .machine import source_commit

        commit = source_commit()
        print(f"fastpop {__version__}" + (f" (commit {commit})" if commit else ""))
        parser.exit()


def _add_run_options(run: argparse.ArgumentParser) -> None:
    from .options import GROUPS, OPTIONS, default, default_text, flag

    groups = {g: run.add_argument_group(f"{g} options") for g in GROUPS}
    for o in OPTIONS:
        text = f"{o.help} (default: {default_text(o)})".replace("%", "%%")
        value = default(o.name)
        if isinstance(value, bool):  # a switch: --name turns on a default-false one, --no-name off a default-true one
            groups[o.group].add_argument(flag(o), dest=o.name, action="store_const", const=not value, default=None,
                                         help=text)
        else:
            typ = _TYPES.get(o.name) or (type(value) if value is not None else str)
            groups[o.group].add_argument(flag(o), dest=o.name, type=typ, nargs=_NARGS.get(o.name), default=None,
                                         metavar=o.metavar, help=text)


def build_parser() -> argparse.ArgumentParser:
    from .config import Config

    parser = _Parser(prog="fastpop", description="Train populations of small networks and study their agreement.",
                     formatter_class=_HelpFormatter)
    parser.add_argument("--version", action=_VersionAction, help="print fastpop's version (and commit) and exit")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sub.add_parser = functools.partial(sub.add_parser, formatter_class=_HelpFormatter)

    run = sub.add_parser("run", help="train a population into a new run directory")
    control = run.add_argument_group("config file, resuming and display")
    control.add_argument("--config", metavar="FILE.toml", help="config file; flags given here override it (default: "
                         "none)")
    control.add_argument("--resume", metavar="RUN", help="continue an interrupted run directory, or train a "
                         "finished one on to more --epochs (no other options but those, --add-seeds and --max-nets-per-chunk)")
    control.add_argument("--add-seeds", type=int, metavar="K", help="with --resume RUN: add K networks (the seeds "
                         "after the population's last) to a complete run")
    control.add_argument("--quiet", action="store_true", help="no progress display (a bar on a terminal, else a "
                         "plain line per checkpoint and every 30 s)")
    _add_run_options(run)

    verify = sub.add_parser("verify", help="check a run directory: shapes, manifest, checksums, state")
    verify.add_argument("run", metavar="RUN")

    merge = sub.add_parser("merge", help="join the shard run directories of one population")
    merge.add_argument("shards", metavar="SHARD", nargs="+")
    merge.add_argument("--out", required=True, help="new run directory (required)")
    merge.add_argument("--allow-mixed-machines", action="store_true", help="join shards trained on different "
                       "instruction sets, GPU models, kinds of device or backends (their last bits may differ)")

    archs = sub.add_parser("archs", help="list architectures with their size and cost")
    archs.add_argument("--input-shape", default="1x8x8", help="C x H x W (default: digits, 1x8x8)")
    archs.add_argument("--classes", type=int, default=10, help="classes of the classifier")
    archs.add_argument("--arch", help="a spec (e.g. c16k5-mp-c32-gap-d64) or preset to size instead of the presets")

    analyze = sub.add_parser("analyze", help="agreement and learning-order metrics of a run directory")
    analyze.add_argument("run", metavar="RUN")
    analyze.add_argument("--split", default="test", choices=("test", "train"))
    analyze.add_argument("--checkpoint", type=int, default=-1, help="checkpoint of the table (default: last)")
    analyze.add_argument("--out", help="folder for {split}.metrics.json and the per-example arrays (default: none "
                         "written)")
    analyze.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    analyze.add_argument("--group", type=int, help="a grid run: only this group (default: each group in turn, "
                         "saved under OUT/group-G)")
    _bootstrap_options(analyze)

    report = sub.add_parser("report", help="figures and report.html (reuses a current analysis)")
    report.add_argument("run", metavar="RUN")
    report.add_argument("--split", default="test", choices=("test", "train"))
    report.add_argument("--checkpoint", type=int, default=-1, help="checkpoint of the table (default: last)")
    report.add_argument("--out", help="folder for the report (default report-NAME-SPLIT-HASH here)")
    report.add_argument("--json", action="store_true", help="print the analysis and the paths as JSON")

    experiment = sub.add_parser("experiment", help="reproduce a study end to end")
    experiment.add_argument("name", choices=["paper"])
    experiment.add_argument("--out", required=True, help="folder for the populations and the report")
    experiment.add_argument("--dataset", default="digits", help="digits, or cifar10 for the full-scale version")
    experiment.add_argument("--nets", type=int, default=100, help="networks per population")
    experiment.add_argument("--epochs", type=int, default=None, help="epochs per population (default: "
                            f"{Config.epochs}, as fastpop run)")
    experiment.add_argument("--data-dir", default=None, help="folder with the data files (default: $FASTPOP_DATA or "
                            "./data)")
    experiment.add_argument("--random-label-epochs", type=int, default=None, help="epochs of the random-label "
                            "population (default: 10x --epochs, so that it fits its random train labels)")
    experiment.add_argument("--quiet", action="store_true", help="no progress display")
    _bootstrap_options(experiment)

    cscore = sub.add_parser("cscore", help="C-score per train example from runs with --subset-fraction")
    cscore.add_argument("runs", metavar="RUN", nargs="+")
    cscore.add_argument("--out", required=True, help="file for the float64 [N] C-scores: .npy, or .csv (index,cscore)")

    export = sub.add_parser("export", help="one row per example: accessibility, learned-at epoch, forgetting, TPA, "
                            "C-score, plurality prediction, margin scores")
    export.add_argument("run", metavar="RUN")
    export.add_argument("--split", default="test", choices=("test", "train"))
    export.add_argument("--format", choices=("csv", "parquet", "npz"), help="default: from --out's suffix")
    export.add_argument("--out", required=True, help="the file to write (.csv, .parquet or .npz)")

    compare = sub.add_parser("compare", help="learning order of two or more populations on the same examples")
    compare.add_argument("runs", metavar="RUN", nargs="+", help="two or more run directories, or one grid run "
                         "(its groups are compared)")
    compare.add_argument("--split", default="test", choices=("test", "train"))
    compare.add_argument("--threshold", type=float, default=0.5, help="final TPA at which an example counts as learned")
    compare.add_argument("--out", help="folder for compare.json and the figures (default compare-NAMES-HASH here)")
    compare.add_argument("--json", action="store_true", help="print the result as JSON")
    _bootstrap_options(compare)

    bench = sub.add_parser("bench", help="training throughput: fastpop vs torch.func vmap, a grouped conv and a "
                           "loop of modules")
    bench.add_argument("--nets", default="10,100,1000", help="population sizes, comma-separated")
    bench.add_argument("--steps", type=int, default=20, help="timed steps per provider and size")
    bench.add_argument("--arch", default="small-cnn", help="a preset or spec")
    bench.add_argument("--batch-size", type=int, default=32, help="examples per network per step")
    bench.add_argument("--loop-max-nets", type=int, default=1000, help="skip the module loop above this P")
    bench.add_argument("--input-shape", help="random images of this C x H x W (e.g. 3x32x32) instead of digits")
    bench.add_argument("--rounds", type=int, default=1, help="the providers take turns this many times; each "
                       "keeps its best rate")
    for command in sub.choices.values():
        for action in command._actions:  # a default nobody described is still said
            if action.help is None and action.option_strings and action.default not in (None, False):
                action.help = "(default: %(default)s)"
    return parser


def main(argv: list[str] | None = None) -> int:
    handler = logging.StreamHandler(sys.stderr)  # the library's warnings (its info goes to the progress display)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("fastpop: %(message)s"))
    logging.getLogger("fastpop").addHandler(handler)
    try:
        return _main(argv)
    finally:
        logging.getLogger("fastpop").removeHandler(handler)


def _main(argv: list[str] | None) -> int:
    args = None
    try:
        args = build_parser().parse_args(argv)
        commands = {"run": _run, "archs": _archs, "bench": _bench, "analyze": _analyze, "report": _report,
                    "compare": _compare, "export": _export, "verify": _verify, "merge": _merge,
                    "cscore": _cscore, "experiment": _experiment}
        return commands[args.command](args)
    except UsageError as e:
        print(f"fastpop: error: {' '.join(str(e).split())}", file=sys.stderr)  # always one line
        return 2
    except KeyboardInterrupt:
        print("fastpop: interrupted", file=sys.stderr)
        return 130
    except (ResourceError, MemoryError) as e:
        print(f"fastpop: error: {' '.join(str(e).split()) or 'out of memory'}", file=sys.stderr)
        return 1
    except OSError as e:
        return _os_error(e, args.command if args else "")


# errors of the input (a path that cannot be read or written as asked) rather than of the machine
_INPUT_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT, errno.ENOTDIR, errno.EISDIR,
                 errno.EEXIST, errno.ENAMETOOLONG, errno.ELOOP}


def _os_error(e: OSError, command: str) -> int:
    """A failed read or write: exit 2 when the path is the problem, 1 when the machine is (a full disk, an I/O
    error); only `run` owns a run directory that --resume can continue."""
    where = f": {e.filename}" if e.filename else ""
    if e.errno in _INPUT_ERRNOS:
        print(f"fastpop: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    advice = "; the run directory keeps its last complete checkpoint (fastpop run --resume RUN)" \
        if command == "run" else ""
    print(f"fastpop: error: {e.strerror or e}{where}{advice}", file=sys.stderr)
    return 1


def _run(args) -> int:
    import signal

    from .config import Config
    from .console import print_summary, progress_display
    from .distributed import run_torchrun, torchrun_world
    from .options import OPTIONS
    from .trainer import Interrupted, resume, train

    overrides = {o.name: getattr(args, o.name) for o in OPTIONS if getattr(args, o.name) is not None}
    if args.grid:
        overrides["grid"] = dict(args.grid)
    if args.resume and (set(overrides) - {"max_nets_per_chunk", "epochs"} or args.config):
        raise UsageError("--resume takes no other options but --max-nets-per-chunk and --epochs: the run directory "
                         "holds its config")
    config = None
    if not args.resume:
        config = Config.from_toml(args.config, **overrides) if args.config else Config(**overrides)

    stop = []  # SIGINT/SIGTERM ask the trainer to stop at the next step boundary and save
    handlers = {sig: signal.signal(sig, lambda *_: stop.append(True)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with progress_display(args.quiet) as bar:
            if torchrun_world():
                run = run_torchrun(config, Path(args.resume) if args.resume else None, bar.update, lambda: bool(stop))
            elif args.resume and args.add_seeds is not None:
                from .distributed import add_seeds

                run = add_seeds(args.resume, args.add_seeds, bar.update, lambda: bool(stop))
            elif args.resume:
                run = resume(args.resume, bar.update, lambda: bool(stop), overrides.get("max_nets_per_chunk"),
                             epochs=overrides.get("epochs"))
            else:
                run = train(config, bar.update, lambda: bool(stop))
    except Interrupted as e:
        print(f"fastpop: {e}", file=sys.stderr)
        return 130
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    if run is not None:
        print_summary(run)
    return 0


def _verify(args) -> int:
    from .verify import verify

    run, problems, notes = verify(args.run)
    for note in notes:
        print(f"note: {note}")
    if problems:
        raise UsageError(f"{run.path}: {len(problems)} problem(s): " + "; ".join(problems))
    print(f"{run.path}: ok ({len(run.checkpoints)} of {len(run.manifest['checkpoints'])} checkpoints, "
          f"status {run.status})")
    return 0


def _merge(args) -> int:
    from .console import print_summary
    from .distributed import merge

    print_summary(merge(args.shards, args.out, allow_mixed_machines=args.allow_mixed_machines))
    return 0


def _archs(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from .archs import PRESETS, build_arch

    shape = _input_shape(args.input_shape)
    if args.classes < 2:
        raise UsageError("--classes must be at least 2")
    table = Table(title=f"architectures for input {'x'.join(map(str, shape))}, {args.classes} classes")
    archs = {args.arch: None} if args.arch is not None else {name: text for name, (_, text) in PRESETS.items()}
    rows = []
    for name, text in archs.items():
        arch = build_arch(name, shape, args.classes)
        rows.append((str(arch), arch.spec, f"{arch.params_per_network():,}", f"{arch.flops_per_example():,}",
                     text or arch.describe()))
    for i, col in enumerate(("arch", "spec", "params/network", "forward FLOPs/example", "layers")):
        # every column but the description as wide as its longest entry: names and specs are copied from here
        width = None if col == "layers" else max(len(col) if "/" not in col else 0, *(len(r[i]) for r in rows))
        table.add_column(col, justify="right" if "/" in col else "left", no_wrap=col != "layers", min_width=width)
    for row in rows:
        table.add_row(*row)
    console = Console()
    (console if console.is_terminal else Console(width=200)).print(table)  # piped: never cut a spec
    return 0


def _input_shape(text: str) -> tuple[int, int, int]:
    try:
        shape = tuple(int(v) for v in text.lower().split("x"))
        assert len(shape) == 3 and min(shape) > 0
    except (ValueError, AssertionError):
        raise UsageError(f"--input-shape takes CxHxW such as 3x32x32, got {text!r}") from None
    return shape


def _bench(args) -> int:
    from .benchmark import print_table, run_benchmark

    try:
        nets = [int(v) for v in args.nets.split(",")]
    except ValueError:
        raise UsageError(f"--nets takes comma-separated population sizes, got {args.nets!r}") from None
    if min(nets) < 1 or args.steps < 1 or args.batch_size < 1 or args.rounds < 1:
        raise UsageError("--nets, --steps, --batch-size and --rounds must be positive")
    shape = None if args.input_shape is None else _input_shape(args.input_shape)
    print_table(run_benchmark(nets, args.steps, args.arch, args.batch_size, args.loop_max_nets, shape,
                              rounds=args.rounds), args.batch_size)
    return 0


def _bootstrap_options(parser) -> None:
    parser.add_argument("--draws", type=int, default=1000, help="bootstrap draws of the 95%% intervals (0: none)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and the random splits")


def _check_bootstrap(args) -> None:
    if not 0 <= args.draws <= 100_000:
        raise UsageError(f"--draws must be in 0..100,000, got {args.draws}")
    if args.seed < 0:
        raise UsageError(f"--seed must be non-negative, got {args.seed}")


def _analyze(args) -> int:
    from .analysis import analyze
    from .run import load_run

    _check_bootstrap(args)
    run = load_run(args.run)
    groups = [args.group] if args.group is not None else list(range(len(run.groups))) if run.groups else [None]
    # all computed before anything is written
    results = [analyze(run, args.split, args.checkpoint, g, args.draws, args.seed) for g in groups]
    written = []
    for g, result in zip(groups, results):
        folder = None if not args.out else Path(args.out) / f"group-{g}" if g is not None else args.out
        written.append(result.save(folder) if folder else [])
    if args.json:
        docs = [dict(r.to_json(), written=[str(p) for p in w]) for r, w in zip(results, written)]
        _print_json(docs[0] if len(docs) == 1 else docs)
        return 0
    from .console import print_analysis

    for result, paths in zip(results, written):
        print_analysis(result)
        if paths:
            print(f"wrote {paths[-1]} and {len(paths) - 1} per-example arrays")
    return 0


def _report(args) -> int:
    from .report import write_report
    from .run import load_run

    path, reused = write_report(load_run(args.run), args.split, args.out, args.checkpoint)
    if args.json:
        from .analysis import Analysis

        _print_json({"report": str(path), "reused_analysis": reused,
                     "analysis": Analysis.load(path.parent, args.split).to_json()})
        return 0
    print(f"wrote {path}" + (" (reused the current analysis)" if reused else ""))
    return 0


def _export(args) -> int:
    from .export import export
    from .run import load_run

    print(f"wrote {export(load_run(args.run), args.split, args.out, args.format)}")
    return 0


def _compare(args) -> int:
    from .analysis import compare, default_compare_out
    from .run import load_run

    if not 0 < args.threshold <= 1:
        raise UsageError("--threshold must be in (0, 1]")
    _check_bootstrap(args)
    runs = [load_run(p) for p in args.runs]
    result = compare(runs, args.split, args.threshold, args.draws, args.seed)
    out = Path(args.out) if args.out else default_compare_out(runs)
    from .report import write_compare_figure

    figures = write_compare_figure(result, out)
    saved = result.save(out)
    if args.json:
        _print_json(dict(result.to_json(), written=[str(saved), *(str(out / f) for f in figures)]))
        return 0
    from .console import print_comparison

    print_comparison(result)
    print(f"wrote {saved} and {len(figures)} figure(s) in {out}")
    return 0


def _print_json(obj: dict) -> None:
    """Strict JSON on stdout (NaN and infinities as null), for jq and other parsers."""
    import json

    print(json.dumps(_strict(obj), indent=1, allow_nan=False))


def _strict(v):
    import math

    import numpy as np

    if isinstance(v, dict):
        return {k: _strict(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_strict(x) for x in v]
    if isinstance(v, np.generic):
        v = v.item()
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _cscore(args) -> int:
    import numpy as np

    from .analysis import combined_cscore
    from .run import load_run

    out = Path(args.out)
    if out.suffix not in (".npy", ".csv"):
        raise UsageError(f"--out takes a .npy or .csv file name, got {args.out!r}")
    scores, fractions = combined_cscore([load_run(p) for p in args.runs])
    write_scores(out, scores)
    print(f"C-score over subset fractions {fractions}: mean {np.nanmean(scores):.4f}, "
          f"{int(np.isnan(scores).sum())} examples seen by every network; wrote {out}")
    return 0


def write_scores(out: Path, scores) -> None:
    """float64 [N] scores at exactly `out` (np.save would append .npy to any other name): .npy, or .csv with a
    header and one `index,cscore` row per example (NaN where no network was held out)."""
    import io

    import numpy as np

    from .rundir import atomic_write

    buf = io.BytesIO()
    if out.suffix == ".csv":
        np.savetxt(buf, np.column_stack([np.arange(len(scores)), scores]), fmt=["%d", "%.17g"], delimiter=",",
                   header="index,cscore", comments="")
    else:
        np.save(buf, scores)
    atomic_write(out, buf.getvalue())


def _experiment(args) -> int:
    import json

    from .console import progress_display
    from .experiment import paper

    if args.nets < 2:
        raise UsageError("--nets must be at least 2")
    _check_bootstrap(args)
    with progress_display(args.quiet, per_run=True) as bar:
        path = paper(args.out, args.dataset, args.nets, args.epochs, args.data_dir, bar.update,
                     args.random_label_epochs, args.draws, args.seed)
    summary = json.loads((path.parent / "summary.json").read_text())
    ci = lambda iv: f" [{iv[0]:.3f}, {iv[1]:.3f}]" if iv and None not in iv else ""  # noqa: E731
    for name, row in summary["populations"].items():
        null = row["mass1_class_null"] if row.get("mass1_class_null") is not None else row["mass1_null"]
        print(f"{name:40s} acc {row['mean_accuracy']:.3f}  TPA=1 {row['mass1']:.3f}{ci(row['mass1_ci_examples'])} "
              f"(class-conditional null {null:.2g})  rho {row['rho']:.3f}{ci(row['rho_ci_networks'])}"
              + (f"  within-class rho {row['rho_within_class']:.3f}" if row.get("rho_within_class") is not None
                 else ""))
    for name, row in summary["cross_architecture"].items():
        spearman = row["spearman_accessibility"]
        print(f"{name:40s} Spearman {spearman:.3f}{ci(row['spearman_accessibility_ci_examples'])}  "
              f"containment {row['weak_learned_also_by_strong']:.3f} (independent overlap "
              f"{row['containment_expected']:.3f})")
    print(f"wrote {path}")
    return 0
