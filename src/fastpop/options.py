"""The options of a run, once: each Config field's flag, group and meaning. The CLI builds `fastpop run`'s flags
and help from this table, defaults come from Config itself, and README.md's option table is `markdown_table()`
(tests check that the three agree). `python -m fastpop.options` prints the table for the README.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .config import Config


@dataclass(frozen=True)
class Option:
    name: str  # the Config field
    group: str
    help: str
    metavar: str | None = None
    default_text: str | None = None  # the default in words, where Config's value does not say it (None, a switch)


GROUPS = ("architecture and data", "population", "training recipe", "recording", "execution and output")

OPTIONS = (
    Option("arch", GROUPS[0], "a preset (small-cnn, wide-cnn, mlp, resnet8, resnet20, vgg-small), a spec such as "
           "c8-mp-c16-mp-c16-gap, or module:package.module:function (see `fastpop archs`)", "ARCH"),
    Option("dataset", GROUPS[0], "digits, mnist, fashion-mnist, cifar10, cifar100, gaussian, npz:PATH or hf:PATH "
           "(a saved Hugging Face dataset)", "NAME"),
    Option("image_column", GROUPS[0], "hf:PATH data sets: the image column", "NAME"),
    Option("label_column", GROUPS[0], "hf:PATH data sets: the label column", "NAME"),
    Option("data_dir", GROUPS[0], "folder with the data files", "DIR", "$FASTPOP_DATA or ./data"),
    Option("classes", GROUPS[0], "train (and test) only on these classes, e.g. 0,1,2,3,4", "LIST", "all"),
    Option("test_dataset", GROUPS[0], "test on another data set's test split, or on noise", "NAME",
           "the training data set"),
    Option("test_classes", GROUPS[0], "test only on these classes; unseen ones record predictions", "LIST",
           "the training classes"),
    Option("labels", GROUPS[0], "true, or random: train labels permuted once (fixed seed)"),
    Option("pixels", GROUPS[0], "natural, or shuffled: one fixed pixel permutation for all images"),
    Option("separation", GROUPS[0], "class separation of --dataset gaussian", "S"),
    Option("superclass", GROUPS[0], "CIFAR-100 superclass to keep (16: small mammals)", "K", "all"),
    Option("seeds", GROUPS[1], "a count N (seeds offset ... offset+N-1) or a list 3,7,11; one seed is written 5, "
           "(5 alone means five networks)", "N|LIST"),
    Option("seed_offset", GROUPS[1], "first seed when --seeds is a count", "S"),
    Option("vary", GROUPS[1], "what differs between networks: both, init or order"),
    Option("shared_seed", GROUPS[1], "seed of what --vary keeps the same for all networks", "S"),
    Option("subset_fraction", GROUPS[1], "each network trains on its own random subset of this fraction "
           "(C-scores)", "F"),
    Option("grid", GROUPS[1], "train every combination (lr, momentum, weight-decay, label-smoothing, crop, cutout) "
           "with --seeds networks each, e.g. --grid lr=0.4,0.1 weight-decay=5e-4,0", "KEY=V1,V2"),
    Option("epochs", GROUPS[2], "epochs", "E"),
    Option("batch_size", GROUPS[2], "examples per network per step", "B"),
    Option("optimizer", GROUPS[2], "sgd, adam or adamw"),
    Option("lr", GROUPS[2], "peak learning rate"),
    Option("momentum", GROUPS[2], "SGD momentum"),
    Option("nesterov", GROUPS[2], "Nesterov momentum (sgd)"),
    Option("betas", GROUPS[2], "Adam's beta1,beta2", "B1,B2", "0.9,0.999"),
    Option("eps", GROUPS[2], "Adam's epsilon"),
    Option("weight_decay", GROUPS[2], "weight decay (sgd and adam: added to the gradient; adamw: decoupled)"),
    Option("label_smoothing", GROUPS[2], "label smoothing of the cross-entropy, as F.cross_entropy's"),
    Option("augment", GROUPS[2], "augmentation drawn per network, example and epoch: flip, crop:N, cutout:N "
           "(comma-separated)", "LIST"),
    Option("schedule", GROUPS[2], "learning-rate schedule: constant, step (x0.1 at 50% and 75%) or cosine"),
    Option("warmup_epochs", GROUPS[2], "linear warm-up length in epochs", "E"),
    Option("record_every", GROUPS[3], "also record every this many steps (0: once per epoch)", "STEPS"),
    Option("record", GROUPS[3], "per-example arrays to store besides the bits: any of margin, loss, pred "
           "(comma-separated)", "LIST"),
    Option("record_predictions", GROUPS[3], "store predicted test labels [T, P, N]"),
    Option("save_every", GROUPS[3], "also save the training state every this many steps (0: at checkpoints only)",
           "STEPS"),
    Option("device", GROUPS[4], "auto, cpu, cuda or cuda:N"),
    Option("backend", GROUPS[4], "auto (numba on the CPU, triton on CUDA), numba, torch (the reference), triton "
           "or torch.func"),
    Option("max_nets_per_chunk", GROUPS[4], "networks per forward/backward pass, or auto", "N|auto"),
    Option("cuda_graphs", GROUPS[4], "run the training step eagerly on CUDA instead of replaying a captured CUDA "
           "graph (cuda_graphs = false in a config file)", default_text="graphs on"),
    Option("shard", GROUPS[4], "train only the i-th of n blocks of the seeds (join them with fastpop merge)", "i/n",
           "all seeds"),
    Option("out", GROUPS[4], "new run directory", "DIR", "runs/ARCH-DATASET-PN-TIME"),
)

BY_NAME = {o.name: o for o in OPTIONS}
# Config fields with no flag: they concern what a Python caller passes (fastpop.train(data=...))
LIBRARY_ONLY = ("save_data",)


def config_fields() -> list[str]:
    return [f.name for f in dataclasses.fields(Config) if f.name != "extra"]


def default(name: str):
    field = {f.name: f for f in dataclasses.fields(Config)}[name]
    return field.default_factory() if field.default is dataclasses.MISSING else field.default


def default_text(option: Option) -> str:
    """Config's default as a user writes it, or in words where the Option gives them."""
    value = default(option.name)
    if option.default_text is not None:
        return option.default_text
    if value is None or value is False or value in ("", []):
        return "off" if value is False else "none"
    return str(value)


def flag(option: Option) -> str:
    """The command-line flag; a switch that defaults to true is turned off by --no-NAME."""
    name = option.name.replace("_", "-")
    return f"--no-{name}" if default(option.name) is True else f"--{name}"


def markdown_table() -> str:
    rows = ["| option | default | meaning |", "|---|---|---|"]
    for group in GROUPS:
        rows.append(f"| **{group}** | | |")
        for o in (o for o in OPTIONS if o.group == group):
            words = o.default_text is not None or default(o.name) in (None, False, "")  # said, not a value
            rows.append(f"| `{flag(o)}` | {default_text(o) if words else f'`{default_text(o)}`'} | {o.help} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
