"""Architectures as data: a spec string such as "c8-mp-c16-mp-c16-gap" <-> `Arch`.

Grammar: tokens joined by "-", read left to right from the image to the classifier.
  cN, cNkK  conv with N output channels and a K x K kernel (K odd, 1 to 7; default 3), padding K // 2, then ReLU
  cNs2      the same conv with stride 2 (output ceil(H / 2) x ceil(W / 2)); combines with kK: c16k5s2
  cNb       conv (no bias) + BatchNorm + ReLU, as nn.Conv2d(bias=False), nn.BatchNorm2d, nn.ReLU; c16k5s2b
  rN, rNs2  residual basic block (He et al. 2016) with N channels: conv 3x3 (stride 1 or 2) + BN + ReLU, conv 3x3
            + BN, plus the block's input (a 1x1 conv + BN projection when channels or stride change), then ReLU
  mp, ap    2x2 max / average pool, stride 2 (floor, as nn.MaxPool2d(2) and nn.AvgPool2d(2))
  gap       global average pool: [C, H, W] -> [C]
  flat      flatten: [C, H, W] -> [C*H*W], nn.Flatten's order
  dN        dense layer with N outputs, then ReLU
Convs and pools come first, then gap or flat (required after a conv or pool), then dense layers. A spec without
convs or pools starts from the flattened image ("d64-d64" is the mlp). The classifier, a dense layer to the data
set's classes without ReLU, is appended. The spec is stored whole in run.json, so any process rebuilds the network.

An `Arch` is plain data: the tokens, and once resolved against a data set (`resolve`), the image shape and class
count that size every layer. Backends run it for P networks at once (`fastpop.ops`); `to_module` builds the same
network as a plain `nn.Module`, the yardstick the tests compare against.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .errors import UsageError

MAX_WIDTH = 4096  # channels or units of one layer
MAX_PARAMS = 50_000_000  # per network
MAX_LAYERS = 64
KERNEL_SIZES = (1, 3, 5, 7)


STRIDES = (1, 2)
BN_MOMENTUM, BN_EPS = 0.1, 1e-5  # nn.BatchNorm2d's defaults


@dataclass(frozen=True)
class Conv:
    out: int
    k: int = 3
    stride: int = 1
    bn: bool = False  # BatchNorm after it (and no bias)

    def __str__(self) -> str:
        return (f"c{self.out}" + (f"k{self.k}" if self.k != 3 else "") + (f"s{self.stride}" if self.stride != 1 else "")
                + ("b" if self.bn else ""))


@dataclass(frozen=True)
class Residual:
    """A basic block: conv 3x3 (stride) + BN + ReLU, conv 3x3 + BN, plus the input (or its 1x1 conv + BN
    projection when channels or stride change), ReLU."""

    out: int
    stride: int = 1

    def __str__(self) -> str:
        return f"r{self.out}" + (f"s{self.stride}" if self.stride != 1 else "")


@dataclass(frozen=True)
class Pool:
    kind: str = "max"  # "max" or "avg"

    def __str__(self) -> str:
        return "mp" if self.kind == "max" else "ap"


@dataclass(frozen=True)
class GlobalAvgPool:
    def __str__(self) -> str:
        return "gap"


@dataclass(frozen=True)
class Flatten:
    def __str__(self) -> str:
        return "flat"


@dataclass(frozen=True)
class Dense:
    out: int

    def __str__(self) -> str:
        return f"d{self.out}"


Layer = Conv | Residual | Pool | GlobalAvgPool | Flatten | Dense


@dataclass(frozen=True)
class Op:
    """One resolved layer of a network. kind: conv, res (a residual basic block), maxpool, avgpool, gap, flat or
    dense. (c, h, w): its input shape (dense: c features, h = w = 1); out: output channels or features; k: kernel
    size; relu: ReLU after it; stride: a conv's or block's; bn: BatchNorm after the conv (a block always has)."""

    kind: str
    c: int
    h: int
    w: int
    out: int
    k: int = 0
    relu: bool = False
    stride: int = 1
    bn: bool = False

    @property
    def out_hw(self) -> tuple[int, int]:
        if self.kind in ("maxpool", "avgpool"):
            return self.h // 2, self.w // 2
        if self.kind in ("conv", "res"):
            return -(-self.h // self.stride), -(-self.w // self.stride)
        return 1, 1

    @property
    def tensors(self) -> tuple[int, int]:
        """(parameter tensors, running-statistics tensors) of this layer, in `Arch.param_shapes` and
        `Arch.stat_shapes` order: what a backend takes from the population's lists for it."""
        if self.kind == "conv":
            return (3, 2) if self.bn else (2, 0)
        if self.kind == "res":
            return (9, 6) if self.projects else (6, 4)
        return (2, 0) if self.kind == "dense" else (0, 0)

    @property
    def projects(self) -> bool:
        """A residual block whose skip is a 1x1 conv + BN (channels or stride change), not the identity."""
        return self.kind == "res" and (self.c != self.out or self.stride != 1)

    @property
    def in_size(self) -> int:
        return self.c * self.h * self.w

    @property
    def out_size(self) -> int:
        h, w = self.out_hw
        return self.out * h * w


_TOKEN = re.compile(r"c(\d+)(?:k(\d+))?(?:s(\d+))?(b)?|r(\d+)(?:s(\d+))?|d(\d+)|mp|ap|gap|flat")


def parse_layers(spec: str) -> tuple[Layer, ...]:
    """The layers of a spec string, checked for syntax and order (sizes are checked by `Arch.resolve`)."""
    if not isinstance(spec, str) or not spec.strip():
        raise UsageError("arch spec is empty")
    tokens = spec.strip().lower().split("-")
    if len(tokens) > MAX_LAYERS:
        raise UsageError(f"arch spec has {len(tokens)} layers; at most {MAX_LAYERS}")
    layers: list[Layer] = []
    for tok in tokens:
        m = _TOKEN.fullmatch(tok)
        if m is None:
            raise UsageError(f"arch spec {spec!r}: unknown token {tok!r} (cN[kK][s2][b], rN[s2], mp, ap, gap, flat, "
                             "dN)")
        if m.group(1):
            out, k = int(m.group(1)), int(m.group(2) or 3)
            if k not in KERNEL_SIZES:
                raise UsageError(f"arch spec {spec!r}: token {tok!r} has kernel size {k}; valid: "
                                 f"{', '.join(map(str, KERNEL_SIZES))}")
            layers.append(Conv(_width(spec, tok, out), k, _stride(spec, tok, m.group(3)), bool(m.group(4))))
        elif m.group(5):
            layers.append(Residual(_width(spec, tok, int(m.group(5))), _stride(spec, tok, m.group(6))))
        elif m.group(7):
            layers.append(Dense(_width(spec, tok, int(m.group(7)))))
        else:
            layers.append({"mp": Pool("max"), "ap": Pool("avg"), "gap": GlobalAvgPool(), "flat": Flatten()}[tok])
    _check_order(spec, layers)
    return tuple(layers)


def _width(spec: str, tok: str, n: int) -> int:
    if not 1 <= n <= MAX_WIDTH:
        raise UsageError(f"arch spec {spec!r}: token {tok!r} has width {n}; valid: 1 to {MAX_WIDTH}")
    return n


def _stride(spec: str, tok: str, s: str | None) -> int:
    if s is not None and int(s) not in STRIDES:
        raise UsageError(f"arch spec {spec!r}: token {tok!r} has stride {s}; valid: 1, 2")
    return int(s or 1)


def _check_order(spec: str, layers) -> None:
    spatial, reduced = False, False  # a conv or pool seen; gap or flat seen
    for layer in layers:
        if isinstance(layer, (Conv, Residual, Pool)):
            if reduced:
                raise UsageError(f"arch spec {spec!r}: {layer} after gap/flat or a dense layer; convs and pools "
                                 "come first")
            spatial = True
        elif isinstance(layer, (GlobalAvgPool, Flatten)):
            if reduced:
                raise UsageError(f"arch spec {spec!r}: {layer} after gap/flat or a dense layer")
            reduced = True
        else:
            if spatial and not reduced:
                raise UsageError(f"arch spec {spec!r}: {layer} follows a conv or pool; put gap or flat between")
            reduced = True
    if spatial and not reduced:
        raise UsageError(f"arch spec {spec!r} ends with a conv or pool; end the convs with gap or flat")


@dataclass(frozen=True)
class Arch:
    """A network architecture: its layers (the classifier excluded), and once resolved the image shape (C, H, W)
    and class count. `Arch.parse("c8-mp-c16-mp-c16-gap")` or `Arch((Conv(8), Pool("max"), ...))`."""

    layers: tuple[Layer, ...]
    in_shape: tuple[int, int, int] | None = None
    classes: int | None = None
    name: str | None = None  # the preset's name, where it is one

    @classmethod
    def parse(cls, spec: str, name: str | None = None) -> "Arch":
        return cls(parse_layers(spec), name=name)

    @property
    def spec(self) -> str:
        return "-".join(map(str, self.layers))

    def __str__(self) -> str:
        return self.name or self.spec

    def resolve(self, in_shape, classes: int) -> "Arch":
        """This architecture sized for images of in_shape (C, H, W) and `classes` classes; checks that every layer
        fits (no pooling below 1x1, at most MAX_PARAMS parameters)."""
        _check_order(self.spec, self.layers)
        arch = Arch(tuple(self.layers), tuple(int(s) for s in in_shape), int(classes), self.name)
        arch.ops  # noqa: B018 (sizes every layer; raises on a misfit)
        if arch.params_per_network() > MAX_PARAMS:
            raise UsageError(f"arch {arch} has {arch.params_per_network():,} parameters per network on "
                             f"{'x'.join(map(str, arch.in_shape))} images; at most {MAX_PARAMS:,}")
        return arch

    @property
    def ops(self) -> tuple[Op, ...]:
        """The resolved layers in order, the classifier last."""
        if self.in_shape is None:
            raise ValueError("an unresolved Arch has no sizes: call resolve(in_shape, classes)")
        c, h, w = self.in_shape
        ops: list[Op] = []
        if self.flat_input:  # dense layers on the flattened image
            c, h, w = c * h * w, 1, 1
        for layer in self.layers:
            if isinstance(layer, (Conv, Residual)):
                if isinstance(layer, Conv):
                    ops.append(Op("conv", c, h, w, layer.out, layer.k, True, layer.stride, layer.bn))
                else:
                    ops.append(Op("res", c, h, w, layer.out, 3, True, layer.stride, True))
                c, (h, w) = layer.out, ops[-1].out_hw
            elif isinstance(layer, Pool):
                if h < 2 or w < 2:
                    raise UsageError(f"arch {self}: {layer} would pool {h}x{w} below 1x1 (images "
                                     f"{'x'.join(map(str, self.in_shape))})")
                ops.append(Op(layer.kind + "pool", c, h, w, c))
                h, w = h // 2, w // 2
            elif isinstance(layer, GlobalAvgPool):
                ops.append(Op("gap", c, h, w, c))
                h = w = 1
            elif isinstance(layer, Flatten):
                ops.append(Op("flat", c, h, w, c * h * w))
                c, h, w = c * h * w, 1, 1
            else:
                ops.append(Op("dense", c, 1, 1, layer.out, relu=True))
                c = layer.out
        ops.append(Op("dense", c, 1, 1, self.classes))
        return tuple(ops)

    @property
    def convs(self) -> list[Op]:
        return [op for op in self.ops if op.kind == "conv"]

    @property
    def dense(self) -> list[Op]:
        return [op for op in self.ops if op.kind == "dense"]

    @property
    def flat_input(self) -> bool:
        """Whether the first layer is dense, on the flattened image."""
        return isinstance(self.layers[0], Dense)

    def param_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """Names and shapes of one network's parameters, in the order nn.Module lists them (layer by layer)."""
        return [(n, s) for n, s, _ in self._tensors() if not n.endswith(("running_mean", "running_var"))]

    def stat_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """Names and shapes of one network's BatchNorm running statistics (mean, then variance, layer by layer):
        training state beside the parameters; empty without BatchNorm."""
        return [(n, s) for n, s, _ in self._tensors() if n.endswith(("running_mean", "running_var"))]

    @property
    def batchnorm(self) -> bool:
        return any(op.bn for op in self.ops)

    def _tensors(self):
        """(name, shape, op index) of every parameter and running statistic in order."""
        out, convs, blocks, dense = [], 0, 0, 0

        def conv(name, i, cout, cin, k, bias):
            out.append((f"{name}.weight", (cout, cin, k, k), i))
            if bias:
                out.append((f"{name}.bias", (cout,), i))

        def bn(name, i, ch):
            out.extend([(f"{name}.weight", (ch,), i), (f"{name}.bias", (ch,), i),
                        (f"{name}.running_mean", (ch,), i), (f"{name}.running_var", (ch,), i)])

        for i, op in enumerate(self.ops):
            if op.kind == "conv":
                conv(f"conv{convs}", i, op.out, op.c, op.k, not op.bn)
                if op.bn:
                    bn(f"bn{convs}", i, op.out)
                convs += 1
            elif op.kind == "res":
                r = f"res{blocks}"
                conv(f"{r}.conv1", i, op.out, op.c, 3, False)
                bn(f"{r}.bn1", i, op.out)
                conv(f"{r}.conv2", i, op.out, op.out, 3, False)
                bn(f"{r}.bn2", i, op.out)
                if op.projects:
                    conv(f"{r}.proj", i, op.out, op.c, 1, False)
                    bn(f"{r}.projbn", i, op.out)
                blocks += 1
            elif op.kind == "dense":
                out += [(f"dense{dense}.weight", (op.out, op.c), i), (f"dense{dense}.bias", (op.out,), i)]
                dense += 1
        return out

    def params_per_network(self) -> int:
        return sum(math.prod(s) for _, s in self.param_shapes())

    def flops_per_example(self) -> int:
        """Forward multiply-adds times 2 (bias, ReLU, pooling and softmax not counted); a training step is ~3x."""
        flops = 0
        for op in self.ops:
            oh, ow = op.out_hw
            if op.kind == "conv":
                flops += 2 * op.k * op.k * op.c * op.out * oh * ow
            elif op.kind == "res":
                flops += 2 * 9 * (op.c + op.out) * op.out * oh * ow
                flops += 2 * op.c * op.out * oh * ow if op.projects else 0
            elif op.kind == "dense":
                flops += 2 * op.c * op.out
        return flops

    def activations_per_example(self) -> int:
        """Floats of the largest activation of one network on one example (sizes evaluation chunks)."""
        return max([self.in_shape[0] * self.in_shape[1] * self.in_shape[2]] + [op.out_size for op in self.ops])

    def train_floats_per_example(self) -> int:
        """Floats one network keeps per example through a training step (im2col columns, pre-activation,
        ReLU and pool outputs, their gradients): sizes --max-nets-per-chunk auto."""
        total = self.in_shape[0] * self.in_shape[1] * self.in_shape[2]
        for op in self.ops:
            oh, ow = op.out_hw
            total += op.out_size * (2 if op.relu else 1)
            if op.kind == "conv":
                total += (op.k * op.k * op.c + 1) * oh * ow + (4 if op.bn else 2) * op.out_size
            elif op.kind == "res":  # two convs' columns, six BN-sized activations, the projection's
                total += (9 * (op.c + op.out) + op.c) * oh * ow + 10 * op.out_size
        return 2 * total

    def describe(self) -> str:
        """The resolved layers in words: "conv 5x5 16, avg pool, flatten 144, dense 64, linear 10"."""
        words = {"maxpool": "max pool", "avgpool": "avg pool", "gap": "global avg pool"}
        parts = []
        for op in self.ops:
            stride = f" stride {op.stride}" if op.stride != 1 else ""
            if op.kind == "conv":
                parts.append(f"conv {op.k}x{op.k} {op.out}{stride}" + (" bn" if op.bn else ""))
            elif op.kind == "res":
                parts.append(f"res block {op.out}{stride}" + (" (projection)" if op.projects else ""))
            elif op.kind == "flat":
                parts.append(f"flatten {op.out}")
            elif op.kind == "dense":
                parts.append(f"{'dense' if op.relu else 'linear'} {op.out}")
            else:
                parts.append(words[op.kind])
        return ", ".join(parts)

    def to_module(self):
        """The same network as a plain nn.Module, parameters in `param_shapes` order."""
        from torch import nn

        from .blocks import BasicBlock

        layers: list = [nn.Flatten()] if self.flat_input else []
        for op in self.ops:
            if op.kind == "conv":
                layers.append(nn.Conv2d(op.c, op.out, op.k, op.stride, padding=op.k // 2, bias=not op.bn))
                if op.bn:
                    layers.append(nn.BatchNorm2d(op.out, eps=BN_EPS, momentum=BN_MOMENTUM))
                layers.append(nn.ReLU())
            elif op.kind == "res":
                layers.append(BasicBlock(op.c, op.out, op.stride))
            elif op.kind == "maxpool":
                layers.append(nn.MaxPool2d(2))
            elif op.kind == "avgpool":
                layers.append(nn.AvgPool2d(2))
            elif op.kind == "gap":
                layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
            elif op.kind == "flat":
                layers.append(nn.Flatten())
            else:
                layers.append(nn.Linear(op.c, op.out))
                if op.relu:
                    layers.append(nn.ReLU())
        return nn.Sequential(*layers)


# name -> (spec, one-line description)
PRESETS = {
    "small-cnn": ("c8-mp-c16-mp-c16-gap", "conv 8-16-16 (3x3, ReLU, pool after the first two), global avg pool, linear"),
    "wide-cnn": ("c32-mp-c64-mp-c64-gap", "small-cnn with 4x the channels: conv 32-64-64"),
    "mlp": ("d64-d64", "two hidden layers of 64 with ReLU on the flattened image"),
    "resnet8": ("c16b-r16-r32s2-r64s2-gap", "CIFAR ResNet-8 (He et al. 2016, with 1x1 projection shortcuts, their "
                "option B): conv 16 + BN, one basic block per stage at 16-32-64 channels, global avg pool, linear"),
    "resnet20": ("c16b-r16-r16-r16-r32s2-r32-r32-r64s2-r64-r64-gap", "CIFAR ResNet-20: three basic blocks per stage "
                 "at 16-32-64 channels, projection shortcuts"),
    "vgg-small": ("c32b-c32b-mp-c64b-c64b-mp-c128b-c128b-mp-gap", "VGG-style: pairs of 3x3 conv + BN + ReLU at "
                  "32-64-128 channels, a max pool after each pair, global avg pool, linear"),
}

MODULE_PREFIX = "module:"  # --arch module:package.module:function, any nn.Module (the torch.func backend)


def parse_arch(arch: "str | Arch") -> Arch:
    """A preset name, a spec string or an Arch -> an unresolved Arch; raises UsageError naming a bad token."""
    if isinstance(arch, Arch):
        return Arch(tuple(arch.layers), name=arch.name)
    if not isinstance(arch, str):
        raise UsageError(f"arch must be a preset name, a spec string or a fastpop.Arch, got {type(arch).__name__}")
    if arch in PRESETS:
        return Arch.parse(PRESETS[arch][0], name=arch)
    return Arch.parse(arch)


def build_arch(arch: "str | Arch", in_shape, classes: int) -> Arch:
    """A preset name, spec or Arch resolved for images of in_shape (C, H, W) and `classes` classes."""
    return parse_arch(arch).resolve(in_shape, classes)
