"""The pure-torch population op set: all P networks in one call per layer. The CPU backend, and the reference
that every kernel is tested against.

Activation layouts (private to this backend; the population code only chains them):
- conv activations: [B, P*C, H, W], so one grouped convolution (groups=P) serves every network with no copies;
- dense activations: [P, B, F].
A `shared` input is one batch seen by every network (evaluation): the first layer then runs as one ordinary
conv or GEMM over the P*Cout output channels instead of P copies of the input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "torch"


def gather_images(x: torch.Tensor, idx: torch.Tensor | None, mean: torch.Tensor, std: torch.Tensor,
                  flat: bool) -> torch.Tensor:
    """Normalized input. x [N, C, H, W] stored dtype; idx int64 [P, B] (each network its own batch) or None (x is
    the shared batch). Returns [B, P*C, H, W] for convs or [P, B, C*H*W] when `flat`; shared: [N, C, H, W] or
    [N, C*H*W]."""
    batch = x if idx is None else (x[idx] if flat else x[idx.T])  # [P, B, C, H, W] or [B, P, C, H, W]
    shape = [1] * (batch.dim() - 3) + [-1, 1, 1]
    batch = (batch.float() - mean.view(shape)) / std.view(shape)
    if flat:
        return batch.flatten(-3)
    return batch if idx is None else batch.flatten(1, 2)


def conv_block(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor, pool: bool, shared: bool) -> torch.Tensor:
    """3x3 conv (padding 1) + bias + ReLU (+ 2x2 max-pool). h [B, P*Cin, H, W] ([B, Cin, H, W] if shared);
    w [P, Cout, Cin, 3, 3]; b [P, Cout]. Returns [B, P*Cout, H', W']."""
    p, cout = w.shape[:2]
    out = F.conv2d(h, w.reshape(p * cout, *w.shape[2:]), b.reshape(-1), padding=1, groups=1 if shared else p)
    out = torch.relu(out)
    return F.max_pool2d(out, 2) if pool else out


def global_avg_pool(h: torch.Tensor, p: int) -> torch.Tensor:
    """[B, P*C, H, W] -> [P, B, C]."""
    return h.mean((2, 3)).view(h.shape[0], p, -1).transpose(0, 1)


def dense(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor, relu: bool, shared: bool) -> torch.Tensor:
    """h [P, B, Fin] ([B, Fin] if shared); w [P, Fout, Fin]; b [P, Fout]. Returns [P, B, Fout]."""
    if shared:
        p, fout, fin = w.shape
        out = torch.addmm(b.reshape(-1), h, w.reshape(p * fout, fin).T).view(-1, p, fout).transpose(0, 1)
    else:
        out = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
    return torch.relu(out) if relu else out


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """logits [P, B, K], y int64 [P, B] or [B] (shared) -> each network's mean cross-entropy, [P]."""
    p, bsz, k = logits.shape
    y = y.expand(p, bsz)
    return F.cross_entropy(logits.reshape(p * bsz, k), y.reshape(-1), reduction="none").view(p, bsz).mean(1)


@torch.no_grad()
def sgd_step(params: torch.Tensor, grads: torch.Tensor, momentum_buf: torch.Tensor, lr: float, momentum: float,
             weight_decay: float) -> None:
    """torch.optim.SGD's update (dampening 0, no Nesterov) over the flat buffers of all networks, in place.
    The op sequence mirrors torch's so the results match it bit for bit."""
    if weight_decay:
        grads.add_(params, alpha=weight_decay)
    momentum_buf.mul_(momentum).add_(grads)
    params.add_(momentum_buf, alpha=-lr)
