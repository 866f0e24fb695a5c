"""The residual basic block of the architecture grammar (`rN`, `rNs2`) as a plain nn.Module: the yardstick the
population's residual blocks are tested against, and what `Arch.to_module` builds."""

from __future__ import annotations

import torch
from torch import nn

from .archs import BN_EPS, BN_MOMENTUM


class BasicBlock(nn.Module):
    """conv 3x3 (stride) + BN + ReLU, conv 3x3 + BN, plus the input or its 1x1 conv + BN projection (when
    channels or stride change), then ReLU: He et al. 2016's basic block with torchvision's projection."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.proj = None
        if cin != cout or stride != 1:
            self.proj = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      nn.BatchNorm2d(cout, eps=BN_EPS, momentum=BN_MOMENTUM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.proj is None else self.proj(x)))


def load_network(module: nn.Module, params: torch.Tensor, stats: torch.Tensor | None = None) -> nn.Module:
    """Network k's flat parameters [D] (`Arch.param_shapes` order) and running statistics [S] (`stat_shapes`
    order; None keeps the module's) copied into `module` (from `Arch.to_module`), which is returned."""
    with torch.no_grad():
        start = 0
        for p in module.parameters():
            p.copy_(params[start:start + p.numel()].view_as(p))
            start += p.numel()
        start = 0
        for m in module.modules() if stats is not None else ():
            if isinstance(m, nn.BatchNorm2d):
                for buf in (m.running_mean, m.running_var):
                    buf.copy_(stats[start:start + buf.numel()])
                    start += buf.numel()
    return module
