"""The `fastpop` command. It only parses, calls the library and prints: no logic a Python user could not call.

Bad input ends in one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import errno
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


RUN_FLAGS = {  # flag -> (type, help); each maps onto the Config field of the same name
    "arch": (str, "a preset (small-cnn, wide-cnn, mlp), a spec such as c8-mp-c16-mp-c16-gap, or "
                  "module:package.module:function (see `fastpop archs`)"),
    "dataset": (str, "digits, mnist, fashion-mnist, cifar10, cifar100, gaussian, npz:PATH or hf:PATH (a saved "
                     "Hugging Face dataset)"),
    "data-dir": (str, "folder with the data files (default $FASTPOP_DATA or ./data)"),
    "image-column": (str, "hf:PATH data sets: the image column"),
    "label-column": (str, "hf:PATH data sets: the label column"),
    "classes": (parse_classes, "train (and test) only on these classes, e.g. 0,1,2,3,4"),
    "test-dataset": (str, "test on another data set's test split, or noise"),
    "test-classes": (parse_classes, "test only on these classes; unseen ones record predictions"),
    "labels": (str, "true, or random: train labels permuted once (fixed seed)"),
    "pixels": (str, "natural, or shuffled: one fixed pixel permutation for all images"),
    "separation": (float, "class separation of --dataset gaussian"),
    "superclass": (int, "CIFAR-100 superclass to keep (16: small mammals)"),
    "subset-fraction": (float, "each network trains on its own random subset of this fraction"),
    "seeds": (parse_seeds, "a count (1000) or a list (3,7,11)"),
    "seed-offset": (int, "first seed when --seeds is a count"),
    "vary": (str, "what differs between networks: both, init or order"),
    "shared-seed": (int, "seed of what --vary keeps the same for all networks"),
    "epochs": (int, "epochs"),
    "batch-size": (int, "examples per network per step"),
    "optimizer": (str, "sgd, adam or adamw"),
    "lr": (float, "peak learning rate"),
    "momentum": (float, "SGD momentum"),
    "betas": (lambda v: [float(b) for b in v.split(",")], "Adam's beta1,beta2 (0.9,0.999)"),
    "eps": (float, "Adam's epsilon"),
    "weight-decay": (float, "weight decay (adamw: decoupled)"),
    "label-smoothing": (float, "label smoothing of the cross-entropy, as F.cross_entropy's"),
    "augment": (str, "augmentation drawn per network, example and epoch: flip, crop:N, cutout:N (comma-separated)"),
    "schedule": (str, "learning-rate schedule: constant, step or cosine"),
    "warmup-epochs": (float, "linear warm-up length in epochs"),
    "record-every": (int, "also record every this many steps (0: once per epoch)"),
    "record": (lambda v: [k for k in v.split(",") if k], "per-example arrays to store besides the bits: any of "
                                                         "margin, loss, pred (comma-separated)"),
    "save-every": (int, "also save the training state every this many steps"),
    "max-nets-per-chunk": (lambda v: v if v == "auto" else int(v), "networks per forward/backward pass, or auto"),
    "shard": (str, "i/n: train only the i-th of n blocks of the seeds (join with fastpop merge)"),
    "device": (str, "auto, cpu, cuda or cuda:N"),
    "backend": (str, "auto (numba on the CPU, triton on CUDA), numba, torch (the reference), triton, or "
                     "torch.func (module archs)"),
    "out": (str, "new run directory (default runs/ARCH-DATASET-PN-TIME)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastpop", description="Train populations of small networks and study their agreement.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="train a population into a new run directory")
    run.add_argument("--config", metavar="FILE.toml", help="config file; flags given here override it")
    for flag, (typ, text) in RUN_FLAGS.items():
        run.add_argument(f"--{flag}", type=typ, default=None, help=text)
    run.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_const", const=False, default=None,
                     help="run the training step eagerly on CUDA instead of replaying a captured graph")
    run.add_argument("--nesterov", action="store_const", const=True, default=None, help="Nesterov momentum (sgd)")
    run.add_argument("--add-seeds", type=int, metavar="K", help="with --resume RUN: add K networks (the seeds after "
                     "the population's last) to a complete run")
    run.add_argument("--grid", nargs="+", type=parse_grid_item, metavar="KEY=V1,V2",
                     help="train every combination (lr, momentum, weight-decay, label-smoothing, crop, cutout) with "
                          "--seeds networks each, e.g. --grid lr=0.4,0.1 weight-decay=5e-4,0")
    run.add_argument("--record-predictions", action="store_const", const=True, default=None,
                     help="store predicted test labels [T, P, N]")
    run.add_argument("--resume", metavar="RUN", help="continue an interrupted run directory (no other options)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")

    verify = sub.add_parser("verify", help="check a run directory: shapes, manifest, checksums, state")
    verify.add_argument("run", metavar="RUN")

    merge = sub.add_parser("merge", help="join the shard run directories of one population")
    merge.add_argument("shards", metavar="SHARD", nargs="+")
    merge.add_argument("--out", required=True, help="new run directory")

    archs = sub.add_parser("archs", help="list architectures with their size and cost")
    archs.add_argument("--input-shape", default="1x8x8", help="C x H x W (default: digits, 1x8x8)")
    archs.add_argument("--classes", type=int, default=10)
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

    report = sub.add_parser("report", help="figures and report.html (reuses a current analysis)")
    report.add_argument("run", metavar="RUN")
    report.add_argument("--split", default="test", choices=("test", "train"))
    report.add_argument("--checkpoint", type=int, default=-1, help="checkpoint of the table (default: last)")
    report.add_argument("--out", help="folder for the report (default report-NAME-SPLIT-HASH here)")
    report.add_argument("--json", action="store_true", help="print the analysis and the paths as JSON")

    experiment = sub.add_parser("experiment", help="reproduce a study end to end")
    experiment.add_argument("name", choices=["paper"])
    experiment.add_argument("--out", required=True, help="folder for the populations and the report")
    experiment.add_argument("--dataset", default="digits")
    experiment.add_argument("--nets", type=int, default=100, help="networks per population")
    experiment.add_argument("--epochs", type=int, default=None)
    experiment.add_argument("--data-dir", default=None)
    experiment.add_argument("--quiet", action="store_true")

    cscore = sub.add_parser("cscore", help="C-score per train example from runs with --subset-fraction")
    cscore.add_argument("runs", metavar="RUN", nargs="+")
    cscore.add_argument("--out", required=True, help="file for the float64 [N] C-scores (.npy)")

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

    bench = sub.add_parser("bench", help="training throughput: fastpop vs torch.func vmap, a grouped conv and a "
                           "loop of modules")
    bench.add_argument("--nets", default="10,100,1000", help="population sizes, comma-separated")
    bench.add_argument("--steps", type=int, default=20, help="timed steps per provider and size")
    bench.add_argument("--arch", default="small-cnn", help="a preset or spec")
    bench.add_argument("--batch-size", type=int, default=32)
    bench.add_argument("--loop-max-nets", type=int, default=1000, help="skip the module loop above this P")
    return parser


def main(argv: list[str] | None = None) -> int:
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
    from .console import ProgressBar, print_summary
    from .distributed import run_torchrun, torchrun_world
    from .trainer import Interrupted, resume, train

    names = [k.replace("-", "_") for k in [*RUN_FLAGS, "nesterov", "record-predictions", "cuda-graphs"]]
    overrides = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
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
        with ProgressBar(enabled=not args.quiet) as bar:
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

    print_summary(merge(args.shards, args.out))
    return 0


def _archs(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from .archs import PRESETS, build_arch

    try:
        shape = tuple(int(v) for v in args.input_shape.lower().split("x"))
        assert len(shape) == 3 and min(shape) > 0
    except (ValueError, AssertionError):
        raise UsageError(f"--input-shape takes CxHxW such as 3x32x32, got {args.input_shape!r}") from None
    if args.classes < 2:
        raise UsageError("--classes must be at least 2")
    table = Table(title=f"architectures for input {'x'.join(map(str, shape))}, {args.classes} classes")
    for col in ("arch", "spec", "params/network", "forward FLOPs/example", "layers"):
        table.add_column(col, justify="right" if "/" in col else "left", no_wrap=col != "layers")
    archs = {args.arch: None} if args.arch is not None else {name: text for name, (_, text) in PRESETS.items()}
    for name, text in archs.items():
        arch = build_arch(name, shape, args.classes)
        text = text or arch.describe()
        table.add_row(str(arch), arch.spec, f"{arch.params_per_network():,}", f"{arch.flops_per_example():,}", text)
    Console().print(table)
    return 0


def _bench(args) -> int:
    from .benchmark import print_table, run_benchmark

    try:
        nets = [int(v) for v in args.nets.split(",")]
    except ValueError:
        raise UsageError(f"--nets takes comma-separated population sizes, got {args.nets!r}") from None
    if min(nets) < 1 or args.steps < 1 or args.batch_size < 1:
        raise UsageError("--nets, --steps and --batch-size must be positive")
    print_table(run_benchmark(nets, args.steps, args.arch, args.batch_size, args.loop_max_nets), args.batch_size)
    return 0


def _analyze(args) -> int:
    from .analysis import analyze
    from .run import load_run

    run = load_run(args.run)
    groups = [args.group] if args.group is not None else list(range(len(run.groups))) if run.groups else [None]
    results = [analyze(run, args.split, args.checkpoint, g) for g in groups]  # all computed before anything is written
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
    runs = [load_run(p) for p in args.runs]
    result = compare(runs, args.split, args.threshold)
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

    scores, fractions = combined_cscore([load_run(p) for p in args.runs])
    np.save(args.out, scores)
    print(f"C-score over subset fractions {fractions}: mean {np.nanmean(scores):.4f}, "
          f"{int(np.isnan(scores).sum())} examples seen by every network; wrote {args.out}")
    return 0


def _experiment(args) -> int:
    import json

    from .console import ProgressBar
    from .experiment import paper

    if args.nets < 2:
        raise UsageError("--nets must be at least 2")
    with ProgressBar(enabled=not args.quiet, per_run=True) as bar:
        path = paper(args.out, args.dataset, args.nets, args.epochs, args.data_dir, bar.update)
    summary = json.loads((path.parent / "summary.json").read_text())
    for name, row in summary["populations"].items():
        print(f"{name:26s} acc {row['mean_accuracy']:.3f}  TPA=1 {row['mass1']:.3f} (null {row['mass1_null']:.2g})"
              f"  rho {row['rho']:.3f}")
    for name, row in summary["cross_architecture"].items():
        print(f"{name:26s} Spearman {row['spearman_accessibility']:.3f}  containment "
              f"{row['weak_learned_also_by_strong']:.3f} / {row['strong_learned_also_by_weak']:.3f}")
    print(f"wrote {path}")
    return 0
