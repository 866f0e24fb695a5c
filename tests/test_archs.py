"""The architecture grammar: specs parse to the layers they name and back, presets are specs, bad specs get one
line naming the token (exit 2, nothing written), the spec is stored in run.json and every reader rebuilds the
network from it in a fresh process, and the presets' records did not change when they became specs."""

import hashlib
import json
import os
import subprocess
import sys
import tempfile

import llvmlite.binding as llvm
import numpy as np
import pytest
import torch

import fastpop
from fastpop.archs import PRESETS, Conv, Dense, Flatten, GlobalAvgPool, Pool, build_arch, parse_arch
from fastpop.cli import main


@pytest.mark.parametrize("spec, layers", [
    ("c8-mp-c16-mp-c16-gap", (Conv(8), Pool("max"), Conv(16), Pool("max"), Conv(16), GlobalAvgPool())),
    ("c16k5-ap-c3k1-flat-d64", (Conv(16, 5), Pool("avg"), Conv(3, 1), Flatten(), Dense(64))),
    ("d64-d64", (Dense(64), Dense(64))),
    ("flat", (Flatten(),)),
])
def test_specs_parse_and_print_back(spec, layers):
    arch = parse_arch(spec)
    assert arch.layers == layers and arch.spec == spec
    assert fastpop.Arch(layers).spec == spec
    assert fastpop.Config(arch=fastpop.Arch(layers)).arch == spec


def test_presets_are_specs():
    for name, (spec, _) in PRESETS.items():
        preset, same = build_arch(name, (1, 8, 8), 10), build_arch(spec, (1, 8, 8), 10)
        assert preset.ops == same.ops and preset.spec == spec and str(preset) == name
    assert build_arch("small-cnn", (1, 8, 8), 10).params_per_network() == 3738


@pytest.mark.parametrize("spec", ["small-cnn", "mlp", "c5k5-ap-c4k1-mp-flat-d9-d7", "gap-d5", "c3k7-mp-mp-gap"])
def test_module_matches_param_shapes_and_output(spec):
    arch = build_arch(spec, (2, 9, 7), 6)
    module = arch.to_module()
    assert [(n, tuple(p.shape)) for (n, _), p in zip(arch.param_shapes(), module.parameters())] == \
        [(n, s) for n, s in arch.param_shapes()]
    assert len(list(module.parameters())) == len(arch.param_shapes())
    assert module(torch.zeros(3, 2, 9, 7)).shape == (3, 6)


@pytest.mark.parametrize("spec, message", [
    ("c8-x3-gap", "unknown token 'x3'"),
    ("c0-gap", "token 'c0' has width 0"),
    ("c8k4-gap", "kernel size 4"),
    ("c8-mp-mp-mp-mp-gap", "mp would pool 1x1 below 1x1"),
    ("c8-flat-c8-gap", "c8 after gap/flat"),
    ("c8-d10", "d10 follows a conv"),
    ("c8-mp", "end the convs with gap or flat"),
    ("c4096-c4096-gap", "parameters per network"),
    ("", "empty"),
    ("-".join(["d8"] * 70), "at most 64"),
])
def test_bad_specs_get_one_line_and_write_nothing(tmp_path, capsys, spec, message):
    out = tmp_path / "run"
    assert main(["run", "--arch", spec, "--seeds", "2", "--epochs", "1", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not out.exists()
    assert main(["archs", "--arch", spec]) == 2


def test_archs_lists_presets_and_sizes_any_spec(capsys):
    assert main(["archs"]) == 0
    out = capsys.readouterr().out
    assert all(name in out and spec in out for name, (spec, _) in PRESETS.items())
    assert main(["archs", "--arch", "c16k5-ap-c8k1-flat-d64", "--input-shape", "3x9x9"]) == 0
    arch = build_arch("c16k5-ap-c8k1-flat-d64", (3, 9, 9), 10)
    assert f"{arch.params_per_network():,}" in capsys.readouterr().out


READERS = """
import json, sys
import numpy as np
from fastpop.cli import main
import fastpop
runs = sys.argv[1]
run = fastpop.load_run(runs + "/a")
assert run.arch.spec == "c6k5-ap-c4k1-flat-d12", run.arch.spec
assert run.weights().shape == (3, run.arch.params_per_network())
for args in (["verify", "a"], ["run", "--resume", "b"], ["analyze", "a"], ["report", "a", "--out", "rep"],
             ["compare", "a", "b", "--out", "cmp"], ["cscore", "a", "--out", "c.npy"],
             ["merge", "s0", "s1", "--out", "m"]):
    args = [runs + "/" + a if a in ("a", "b", "s0", "s1", "m", "cmp", "rep", "c.npy") else a for a in args]
    assert main([*args, "--quiet"] if args[0] == "run" else args) == 0, args
assert fastpop.load_run(runs + "/b").status == "complete"
np.testing.assert_array_equal(fastpop.load_run(runs + "/m").bits("test"), run.bits("test"))
"""


def test_custom_spec_is_rebuilt_by_every_reader_in_a_fresh_process(tmp_path):
    spec = "c6k5-ap-c4k1-flat-d12"
    common = dict(arch=spec, seeds=3, epochs=1, batch_size=256, subset_fraction=0.5)
    fastpop.train(fastpop.Config(out=str(tmp_path / "a"), **common))
    for i in range(2):
        fastpop.train(fastpop.Config(out=str(tmp_path / f"s{i}"), shard=f"{i}/2", **common))
    steps = []
    with pytest.raises(fastpop.Interrupted):
        fastpop.train(fastpop.Config(out=str(tmp_path / "b"), **common), progress=lambda p: steps.append(1),
                      should_stop=lambda: len(steps) == 1)
    assert json.loads((tmp_path / "a" / "run.json").read_text())["arch"]["spec"] == spec
    proc = subprocess.run([sys.executable, "-c", READERS, str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


# Records of the presets before they became specs (commit 09b66e6), on the machine that recorded them: a digest of
# every record array and the final weights of `_digest`'s run. Bits differ across instruction sets (never compare
# them across machines), so the check runs where the goldens were made. The numba goldens were recorded again when
# its dense weight gradient became an outer product summed in example order (the same results within fp32
# rounding, as the reference tests check; the mlp's added then), and the CNNs' again when the conv weight gradient
# went band by band of the planes, four outputs at a time (sums split differently; forwards unchanged).
GOLDEN_HOST = "znver5"
GOLDEN = {"small-cnn/numba": "e214f7ccd3e67fec", "wide-cnn/numba": "f4b855bd85107176", "mlp/numba": "593333404964141b",
          "small-cnn/torch": "8f2bc2b4c213d25d", "mlp/torch": "c3f505fc24e7fbde"}


def _digest(arch, backend):
    with tempfile.TemporaryDirectory() as d:
        run = fastpop.train(fastpop.Config(arch=arch, seeds=3, epochs=1, batch_size=128, record_every=5,
                                           backend=backend, out=d + "/r"))
        h = hashlib.sha256()
        for split in ("train", "test"):
            for a in (run.bits(split), run.loss(split), run.accuracy(split)):
                h.update(np.ascontiguousarray(a).tobytes())
        h.update(run.weights().numpy().tobytes())
        return h.hexdigest()[:16]


def _golden_machine() -> bool:
    """The CPU the goldens were recorded on, with numba and torch using its whole instruction set."""
    return (llvm.get_host_cpu_name() == GOLDEN_HOST and not os.environ.get("NUMBA_CPU_NAME")
            and torch.backends.cpu.get_cpu_capability() == "AVX512")


@pytest.mark.skipif(not _golden_machine(),
                    reason=f"preset goldens were recorded on {GOLDEN_HOST} (AVX-512); bits differ across CPUs")
@pytest.mark.parametrize("case", sorted(GOLDEN))
def test_presets_records_are_unchanged_by_the_grammar(case):
    arch, backend = case.split("/")
    assert _digest(arch, backend) == GOLDEN[case]
