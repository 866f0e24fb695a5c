"""What operating fastpop needs: progress off a terminal, the logger and the progress callback's metrics, the
CLI's version, defaults and option table (one source for Config, CLI and README), short errors, the machine in
run.json and merge's refusal of mixed machines, packaging, and the faults of cscore --out and Run.correct."""

import io
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fastpop
from fastpop import machine, options
from fastpop.cli import build_parser, main
from fastpop.console import ProgressLines, progress_display
from fastpop.rundir import write_manifest
from fastpop.trainer import Progress

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--arch", "mlp", "--seeds", "4", "--epochs", "1", "--batch-size", "256", "--quiet"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny run, trained through the library with the logger and a progress callback listening."""
    out = tmp_path_factory.mktemp("ops") / "run"
    seen, records = [], []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    logging.getLogger("fastpop").addHandler(handler)
    old_level = logging.getLogger("fastpop").level
    logging.getLogger("fastpop").setLevel(logging.INFO)
    try:
        run = fastpop.train(fastpop.Config(arch="mlp", seeds=4, epochs=1, batch_size=256, record_every=2,
                                           out=str(out)), progress=seen.append)
    finally:
        logging.getLogger("fastpop").removeHandler(handler)
        logging.getLogger("fastpop").setLevel(old_level)
    return run, seen, [r.getMessage() for r in records]


def test_progress_callback_gets_each_checkpoints_per_network_accuracy_and_loss(tiny_run):
    run, seen, _ = tiny_run
    at = [p for p in seen if p.checkpoint is not None]
    assert [p.checkpoint for p in at] == list(range(len(run.checkpoints)))
    assert [p.step for p in at] == [c["step"] for c in run.checkpoints]
    for p in at:
        for split in ("train", "test"):
            np.testing.assert_array_equal(p.accuracy[split], run.accuracy(split)[p.checkpoint])
            np.testing.assert_array_equal(p.loss[split], run.loss(split)[p.checkpoint])
    between = [p for p in seen if p.checkpoint is None]
    assert all(p.accuracy is None and p.loss is None for p in between)
    assert seen[-1].eta_s == 0 and all(p.eta_s >= 0 for p in seen) and seen[-1].run_dir == str(run.path)


def test_library_logs_start_checkpoints_and_end(tiny_run):
    run, _, messages = tiny_run
    assert "training 4 networks" in messages[0] and "complete in" in messages[-1]
    assert sum("checkpoint" in m for m in messages) == len(run.checkpoints)


def test_library_prints_nothing_by_default(tmp_path):
    """The fastpop logger has a NullHandler: no handler of Python's last resort prints its messages."""
    assert any(isinstance(h, logging.NullHandler) for h in logging.getLogger("fastpop").handlers)


def test_summary_says_which_seeds(tiny_run):
    from rich.console import Console

    from fastpop.console import print_summary, seeds_text

    console = Console(file=io.StringIO(), width=200)
    print_summary(tiny_run[0], console)
    text = console.file.getvalue()
    assert "4 networks (seeds 0 to 3)" in text and "machine: " in text
    assert seeds_text([5]) == "seed 5" and seeds_text([3, 7, 11]) == "seeds 3, 7, 11"


def _progress(step, checkpoint=None):
    return Progress(step, 100, step / 10, 1234.5, 0.5, 60.0 * (100 - step) / 100, "RUN", checkpoint)


def test_progress_lines_at_the_first_step_every_checkpoint_and_every_30_s():
    now = [0.0]
    stream = io.StringIO()
    lines = ProgressLines(stream, every_s=30, clock=lambda: now[0])
    for step in range(1, 101):
        now[0] = step * 1.0  # one step a second
        lines.update(_progress(step, checkpoint=step // 50 - 1 if step % 50 == 0 else None))
    out = stream.getvalue().splitlines()
    steps = [int(line.split("step ")[1].split("/")[0]) for line in out]
    assert steps == [1, 31, 50, 80, 100]  # first step, 30 s later, checkpoint, 30 s after it, checkpoint
    assert out[2] == "RUN: step 50/100 epoch 5.00/10 1,234 net-img/s ETA 0:00:30 mean test acc 0.5000 (checkpoint 1)"


def test_plain_lines_off_a_terminal_bar_on_one():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert isinstance(progress_display(False, stream=io.StringIO()), ProgressLines)
    assert not isinstance(progress_display(False, stream=Tty()), ProgressLines)
    assert not isinstance(progress_display(True, stream=io.StringIO()), ProgressLines)


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith(f"fastpop {fastpop.__version__}")


def _subcommands():
    parser = build_parser()
    sub = next(a for a in parser._actions if hasattr(a, "choices") and isinstance(a.choices, dict))
    return parser, sub.choices


CONTROL = ("resume", "quiet", "add_seeds")  # run's flags that are no Config field and have no default to say


def test_every_option_with_a_default_says_it_in_help():
    parser, commands = _subcommands()
    for name, command in [("fastpop", parser), *commands.items()]:
        formatter = command._get_formatter()
        for action in command._actions:
            if not action.option_strings or action.dest in ("help", "version"):
                continue
            text = formatter._expand_help(action) if action.help else ""
            if action.default not in (None, False) or name == "run" and action.dest not in CONTROL:
                assert "default" in text, (name, action.option_strings, text)


def test_run_flags_are_grouped_and_are_exactly_configs_fields():
    _, commands = _subcommands()
    run = commands["run"]
    groups = {g.title: [a.dest for a in g._group_actions] for g in run._action_groups}
    for group in options.GROUPS:
        assert groups[f"{group} options"] == [o.name for o in options.OPTIONS if o.group == group]
    assert sorted([*(o.name for o in options.OPTIONS), *options.LIBRARY_ONLY]) == sorted(options.config_fields())
    flags = {s for a in run._actions for s in a.option_strings} - {"-h", "--help"}
    flags -= {f"--{name.replace('_', '-')}" for name in ("config", *CONTROL)}
    assert flags == {options.flag(o) for o in options.OPTIONS}


def test_run_help_shows_configs_own_defaults():
    _, commands = _subcommands()
    text = commands["run"].format_help()
    for o in options.OPTIONS:
        assert f"(default: {options.default_text(o)})" in " ".join(text.split()), o.name
    assert "(default: 10)" in text and "(default: small-cnn)" in text and fastpop.Config().epochs == 10


def test_readme_option_table_is_the_option_table():
    """Regenerate it with `python -m fastpop.options` when an option changes."""
    assert options.markdown_table() in (ROOT / "README.md").read_text()


def test_flags_reach_config_unchanged(tmp_path):
    """Every value-taking flag lands in the Config field of its name (the table, not a list in cli, decides)."""
    args = build_parser().parse_args(["run", "--seeds", "5,", "--no-cuda-graphs", "--record-predictions",
                                      "--weight-decay", "0.001", "--max-nets-per-chunk", "7"])
    assert (args.seeds, args.cuda_graphs, args.record_predictions, args.weight_decay,
            args.max_nets_per_chunk) == ([5], False, True, 0.001, 7)


ARRAY = np.zeros((1000, 8, 8), np.float32)


@pytest.mark.parametrize("field", ["dataset", "test_dataset", "seeds", "lr", "epochs", "shard", "vary", "arch",
                                   "max_nets_per_chunk", "classes", "device", "out"])
@pytest.mark.parametrize("value", [ARRAY, (ARRAY, ARRAY[:, 0, 0]), list(range(500)), {"x": ARRAY}])
def test_errors_never_print_whole_arrays_or_objects(field, value):
    if field in ("seeds", "classes") and isinstance(value, list):
        value = value + [-1]  # a valid list otherwise
    with pytest.raises(fastpop.UsageError) as e:
        fastpop.Config(**{field: value})
    text = str(e.value)
    assert len(text) < 250 and "\n" not in text and "array(" not in text and "0, 1, 2, 3" not in text, text


def test_shown_keeps_short_values_and_paths():
    from fastpop.errors import shown

    assert shown("npz:/data/x.npz") == "'npz:/data/x.npz'" and shown(3) == "3" and shown([1, 2]) == "[1, 2]"
    assert shown(ARRAY) == "<ndarray float32 [1000, 8, 8]>" and shown(list(range(100))) == "<list of 100>"


CPUINFO = {
    "x86-64-v4": "model name\t: AMD EPYC 9R14\nflags\t\t: fpu cx16 lahf_lm popcnt sse4_1 sse4_2 ssse3 avx avx2 bmi1 "
                 "bmi2 f16c fma abm movbe xsave avx512f avx512bw avx512cd avx512dq avx512vl\n",
    "x86-64-v3": "model name\t: Intel(R) Xeon(R) E5-2686 v4\nflags\t\t: cx16 lahf_lm popcnt sse4_1 sse4_2 ssse3 avx "
                 "avx2 bmi1 bmi2 f16c fma abm movbe xsave\n",
    "x86-64-v2": "model name\t: Old\nflags\t\t: cx16 lahf_lm popcnt sse4_1 sse4_2 ssse3 avx512f\n",
    "x86-64": "model name\t: Older\nflags\t\t: fpu sse2\n",
}


@pytest.mark.parametrize("level", list(CPUINFO))
def test_isa_level_from_cpuinfo(level):
    model, flags = machine.cpu_flags(CPUINFO[level])
    assert machine.isa_level("x86_64", flags) == level and model
    assert machine.isa_level("aarch64", machine.cpu_flags("Features\t: fp asimd sve\n")[1]) == "aarch64+asimd+sve"


def test_run_json_names_the_machine(tiny_run):
    host = tiny_run[0].manifest["host"]
    model, flags = machine.cpu_flags()
    assert host["isa"] == machine.isa_level(host["machine"], flags) and host["cpu_model"]
    assert host["threads"]["torch"] >= 1 and host["threads"]["logical_cpus"] >= 1
    assert host["device_kind"] == "cpu" and host["gpu"] is None
    assert host["fastpop"] == fastpop.__version__ and host["command"]
    assert host["commit"] is None or len(host["commit"].split("-")[0]) == 40
    assert tiny_run[0].manifest["backend"] and tiny_run[0].manifest["arch"]["spec"]  # the lead's keys stay


def test_gpu_facts_name_capability_runtime_and_driver(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA H200")
    monkeypatch.setattr(machine, "nvidia_driver", lambda: "570.86.15")
    facts = machine.gpu_facts(torch.device("cuda:0"))
    assert facts == {"name": "NVIDIA H200", "capability": "9.0", "cuda_runtime": torch.version.cuda,
                     "driver": "570.86.15"}
    assert machine.gpu_facts(torch.device("cpu")) is None
    assert "NVIDIA H200 (sm 9.0" in machine.describe({"isa": "x86-64-v4", "gpu": facts})
    text = "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 22:23:56 UTC 2024\nGCC version: 12"
    assert machine.driver_version(text) == "550.54.15"


def test_a_resumed_run_names_the_machine_of_each_session(tmp_path):
    config = fastpop.Config(arch="mlp", seeds=2, epochs=1, batch_size=256, record_every=2, out=str(tmp_path / "r"))
    with pytest.raises(fastpop.Interrupted):
        fastpop.train(config, should_stop=lambda: True)
    assert "resumed_on" not in fastpop.load_run(tmp_path / "r").manifest
    run = fastpop.resume(tmp_path / "r")
    assert [h["isa"] for h in run.manifest["resumed_on"]] == [run.manifest["host"]["isa"]]


def test_bench_names_its_machine(capsys):
    from fastpop.benchmark import print_table

    print_table([], 32)
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith("machine: ") and machine.machine_facts()["isa"] in line and fastpop.__version__ in line


def _edit_manifest(path, **host):
    m = json.loads((path / "run.json").read_text())
    m["host"].update(host)
    write_manifest(path, m)  # sealed: as if that shard had been trained there


def test_merge_refuses_shards_from_different_machines_unless_allowed(tmp_path, capsys):
    shards = [tmp_path / "s0", tmp_path / "s1"]
    for i, s in enumerate(shards):
        assert main(["run", *TINY, "--shard", f"{i}/2", "--out", str(s)]) == 0
    _edit_manifest(shards[1], isa="x86-64-v3")
    assert main(["merge", *map(str, shards), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "ISA x86-64-v3" in err and "--allow-mixed-machines" in err and err.count("\n") == 1
    assert not (tmp_path / "m").exists()
    assert main(["merge", *map(str, shards), "--out", str(tmp_path / "m"), "--allow-mixed-machines"]) == 0
    merged = fastpop.load_run(tmp_path / "m")
    assert [[h["isa"] for h in s] for s in merged.manifest["shard_hosts"]] == [[machine.machine_facts()["isa"]],
                                                                                ["x86-64-v3"]]


@pytest.mark.parametrize("change, why", [({"device_kind": "cuda"}, "device kind cuda"),
                                         ({"backend": "torch"}, "backend torch"),
                                         ({"isa": "x86-64-v3"}, "ISA x86-64-v3"), ({}, None)])
def test_machine_mismatch_names_what_differs(change, why):
    host = {"device_kind": "cpu", "isa": "x86-64-v4", "gpu": None}
    other = dict(host, **{k: v for k, v in change.items() if k != "backend"})
    a = {"host": host, "backend": "numba"}
    b = {"host": other, "backend": change.get("backend", "numba")}
    reason = machine.machine_mismatch([("a", a), ("b", b)])
    assert reason is None if why is None else why in reason and reason.startswith("b was trained with")
    # a session that resumed a run elsewhere counts as its own machine
    reason = machine.machine_mismatch([("a", a), ("c", dict(a, resumed_on=[b["host"]]))])
    assert reason is None if why is None or "backend" in why else reason.startswith("c (resumed) was trained with")


def test_pyproject_one_version_a_license_and_a_build_requirement_that_reads_it(tmp_path):
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in meta["project"] and "version" in meta["project"]["dynamic"]
    assert meta["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "fastpop.__version__"}
    assert isinstance(meta["project"]["license"], str)  # PEP 639 expression: setuptools 77 reads it
    req = next(r for r in meta["build-system"]["requires"] if r.startswith("setuptools"))
    assert int(req.split(">=")[1].split(".")[0]) >= 77, req
    def dotted(root, prefix):
        return {".".join((*prefix, *p.parent.relative_to(root).parts)) for p in root.rglob("__init__.py")}

    packages = {p for p in dotted(ROOT / "src" / "fastpop", ("fastpop",)) if not p.startswith("fastpop.kernels")}
    packages |= dotted(ROOT / "kernels", ("fastpop", "kernels"))
    assert set(meta["tool"]["setuptools"]["packages"]) == packages  # no sub-package left out of the wheel
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License") and "Copyright (c) 2026 the fastpop authors" in text
    # the metadata a build writes: the version from fastpop.__version__, the license as an SPDX expression
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "kernels", tmp_path / "kernels")
    shutil.copytree(Path(fastpop.__file__).parent, tmp_path / "src" / "fastpop", ignore=shutil.ignore_patterns(
        "kernels", "__pycache__"))
    proc = subprocess.run([sys.executable, "-c", "from setuptools import build_meta as b; "
                           "print(b.prepare_metadata_for_build_wheel('.'))"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    metadata = (tmp_path / proc.stdout.split()[-1] / "METADATA").read_text()
    assert f"Version: {fastpop.__version__}\n" in metadata and "License-Expression: MIT\n" in metadata


def test_cscore_out_is_written_at_the_name_given(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["run", *TINY, "--subset-fraction", "0.5", "--out", str(run)]) == 0
    for name in ("cs.csv", "cs.npy"):
        assert main(["cscore", str(run), "--out", str(tmp_path / name)]) == 0
        assert f"wrote {tmp_path / name}" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.glob("cs*")) == ["cs.csv", "cs.npy"]
    scores = np.load(tmp_path / "cs.npy")
    table = np.genfromtxt(tmp_path / "cs.csv", delimiter=",", names=True)
    np.testing.assert_array_equal(table["index"], np.arange(len(scores)))
    np.testing.assert_array_equal(table["cscore"], scores)
    assert main(["cscore", str(run), "--out", str(tmp_path / "cs.txt")]) == 2
    assert ".npy or .csv" in capsys.readouterr().err and not (tmp_path / "cs.txt").exists()


def test_correct_at_a_checkpoint_out_of_range_is_a_usage_error(tiny_run):
    run = tiny_run[0]
    t = len(run.checkpoints)
    assert run.correct("test", t - 1).shape == (4, run.n("test"))
    np.testing.assert_array_equal(run.correct("test", -t), run.correct("test", 0))
    for bad in (t, -t - 1, 7, 1.0, True):
        with pytest.raises(fastpop.UsageError, match="out of range"):
            run.correct("test", bad)
    with pytest.raises(fastpop.UsageError, match=r"<ndarray int64 \[1000\]> is out of range"):
        run.correct("test", np.arange(1000))
    with pytest.raises(fastpop.UsageError, match=r"unknown split <ndarray"):
        run.correct(ARRAY)
