"""SGD with momentum and weight decay over the flat parameter buffer of all networks: one launch.

The same update as torch.optim.SGD (dampening 0, no Nesterov): g += wd * p; m = momentum * m + g; p -= lr * m.
Entries marked frozen (diverged networks) keep their parameters and get zero momentum. The learning rate comes
from a device tensor so the step can be captured in a CUDA graph.
"""

import triton
import triton.language as tl


@triton.jit
def _sgd_kernel(p_ptr,  # fp32 [n] parameters, updated in place
                g_ptr,  # fp32 [n] gradients
                m_ptr,  # fp32 [n] momentum, updated in place
                frozen_ptr,  # bool [n] (HAS_FROZEN)
                lr_ptr,  # fp32 [1]
                n, momentum, weight_decay,
                HAS_FROZEN: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    p = tl.load(p_ptr + offs, mask=ok)
    g = tl.load(g_ptr + offs, mask=ok) + weight_decay * p
    m = tl.load(m_ptr + offs, mask=ok)
    if HAS_FROZEN:
        frozen = tl.load(frozen_ptr + offs, mask=ok, other=0) != 0
        g = tl.where(frozen, 0.0, g)
        m = tl.where(frozen, 0.0, m)
    m = momentum * m + g
    tl.store(m_ptr + offs, m, mask=ok)
    tl.store(p_ptr + offs, p - tl.load(lr_ptr) * m, mask=ok)


def sgd(params, grads, momentum_buf, lr, momentum, weight_decay, frozen, interpret):
    """lr: a float or a one-element fp32 device tensor."""
    import torch

    n = params.numel()
    if not torch.is_tensor(lr):
        lr = torch.tensor([lr], dtype=torch.float32, device=params.device)
    block = 1 << 16 if interpret else 1024
    _sgd_kernel[(triton.cdiv(n, block),)](params, grads, momentum_buf, frozen if frozen is not None else params,
                                          lr, n, momentum, weight_decay, HAS_FROZEN=frozen is not None,
                                          BLOCK=block)
