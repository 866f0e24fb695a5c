"""Architecture specs: the layers of one network, its parameter shapes, and its cost.

A spec is plain data. The population code runs it for P networks at once through a backend (`fastpop.ops`);
`to_module` builds the same network as a plain `nn.Module`, the yardstick the tests compare against.

Every conv is 3x3 with padding 1, then ReLU, then an optional 2x2 max-pool (floor, as nn.MaxPool2d). After the
convs comes a global average pool; an arch without convs flattens the image instead. Dense layers follow, all
but the last with ReLU.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .errors import UsageError

KERNEL = 3


@dataclass(frozen=True)
class Conv:
    cin: int
    cout: int
    pool: bool


@dataclass(frozen=True)
class Dense:
    fin: int
    fout: int
    relu: bool


@dataclass(frozen=True)
class Arch:
    name: str
    in_shape: tuple[int, int, int]  # C, H, W
    convs: tuple[Conv, ...]
    dense: tuple[Dense, ...]

    @property
    def classes(self) -> int:
        return self.dense[-1].fout

    def param_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """Names and shapes of one network's parameters, in the order nn.Module lists them."""
        shapes = []
        for i, c in enumerate(self.convs):
            shapes += [(f"conv{i}.weight", (c.cout, c.cin, KERNEL, KERNEL)), (f"conv{i}.bias", (c.cout,))]
        for i, d in enumerate(self.dense):
            shapes += [(f"dense{i}.weight", (d.fout, d.fin)), (f"dense{i}.bias", (d.fout,))]
        return shapes

    def params_per_network(self) -> int:
        return sum(_numel(s) for _, s in self.param_shapes())

    def conv_sizes(self) -> list[tuple[int, int]]:
        """(H, W) at the input of each conv, then the size after the last one."""
        h, w = self.in_shape[1:]
        sizes = [(h, w)]
        for c in self.convs:
            if c.pool:
                h, w = h // 2, w // 2
            sizes.append((h, w))
        return sizes

    def flops_per_example(self) -> int:
        """Forward multiply-adds times 2 (bias, ReLU, pooling and softmax not counted); a training step is ~3x."""
        flops = 0
        for c, (h, w) in zip(self.convs, self.conv_sizes()):
            flops += 2 * KERNEL * KERNEL * c.cin * c.cout * h * w
        return flops + sum(2 * d.fin * d.fout for d in self.dense)

    def activations_per_example(self) -> int:
        """Floats of the largest activation of one network on one example (sizes evaluation chunks)."""
        sizes = [self.in_shape[0] * self.in_shape[1] * self.in_shape[2]]
        sizes += [c.cout * h * w for c, (h, w) in zip(self.convs, self.conv_sizes())]
        return max(sizes + [d.fout for d in self.dense])

    def train_floats_per_example(self) -> int:
        """Floats one network keeps per example through a training step (im2col columns, pre-activation,
        ReLU and pool outputs, their gradients): sizes --max-nets-per-chunk auto."""
        total = self.in_shape[0] * self.in_shape[1] * self.in_shape[2]
        for c, (h, w) in zip(self.convs, self.conv_sizes()):
            total += (KERNEL * KERNEL * c.cin + 1) * h * w + 4 * c.cout * h * w
        return 2 * total + sum(3 * d.fout for d in self.dense)

    def to_module(self) -> nn.Sequential:
        """The same network as a plain nn.Module, parameters in `param_shapes` order."""
        layers: list[nn.Module] = []
        for c in self.convs:
            layers += [nn.Conv2d(c.cin, c.cout, KERNEL, padding=KERNEL // 2), nn.ReLU()]
            if c.pool:
                layers.append(nn.MaxPool2d(2))
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()] if self.convs else [nn.Flatten()]
        for d in self.dense:
            layers.append(nn.Linear(d.fin, d.fout))
            if d.relu:
                layers.append(nn.ReLU())
        return nn.Sequential(*layers)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _cnn(name: str, widths: tuple[int, int, int], in_shape, classes: int) -> Arch:
    c, h, w = in_shape
    if h < 4 or w < 4:
        raise UsageError(f"{name} pools twice and needs images of at least 4x4, got {h}x{w}")
    convs = (Conv(c, widths[0], True), Conv(widths[0], widths[1], True), Conv(widths[1], widths[2], False))
    return Arch(name, in_shape, convs, (Dense(widths[2], classes, False),))


def _mlp(name: str, hidden: tuple[int, ...], in_shape, classes: int) -> Arch:
    sizes = (in_shape[0] * in_shape[1] * in_shape[2],) + hidden + (classes,)
    dense = tuple(Dense(a, b, i < len(hidden)) for i, (a, b) in enumerate(zip(sizes, sizes[1:])))
    return Arch(name, in_shape, (), dense)


# name -> (builder, widths, one-line description)
ARCHS = {
    "small-cnn": (_cnn, (8, 16, 16), "conv 8-16-16 (3x3, ReLU, pool after the first two), global avg pool, linear"),
    "wide-cnn": (_cnn, (32, 64, 64), "small-cnn with 4x the channels: conv 32-64-64"),
    "mlp": (_mlp, (64, 64), "two hidden layers of 64 with ReLU on the flattened image"),
}


def build_arch(name: str, in_shape: tuple[int, int, int], classes: int) -> Arch:
    if name not in ARCHS:
        raise UsageError(f"unknown arch {name!r}; valid: {', '.join(ARCHS)}")
    builder, widths, _ = ARCHS[name]
    return builder(name, widths, tuple(in_shape), classes)
