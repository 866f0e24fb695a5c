"""Fused optimizer updates over the flat parameter buffer of all networks, one launch each: SGD (momentum,
Nesterov) and Adam/AdamW, in place.

SGD is torch.optim.SGD's update (dampening 0) with torch's roundings: g = fma(wd, p, g); m = m * momentum + g
(rounded twice); p = fma(-lr, m, p), or with Nesterov p = fma(-lr, fma(momentum, m, g), p). Adam(W) is
torch.optim.Adam(W)'s update within fp32 rounding (torch's lerp and addcdiv round in their own order). The kernels
run with fp fusion off, so nothing but the explicit fmas is fused on a GPU.

Scalars come one per block (BLOCKS): block j of blocks [m, 2] = [start, end) of the flat buffers has its own
learning rate and weight decay (and momentum), so the groups of a grid update in one launch; blocks are grid axis
1, programs past their block's end do nothing. Without BLOCKS the whole buffer is one block whose lr comes from a
device tensor (the CUDA-graph path refills it) and the other scalars are arguments. Entries marked frozen
(diverged networks) keep their parameters and get zero gradient, momentum and moments.
"""

import triton
import triton.language as tl


@triton.jit
def _span(blocks_ptr, n, BLOCKS: tl.constexpr, BLOCK: tl.constexpr):
    """(offsets, mask, block index j) of this program's elements."""
    j = tl.program_id(1)
    if BLOCKS:
        start = tl.load(blocks_ptr + 2 * j)
        end = tl.load(blocks_ptr + 2 * j + 1)
    else:
        start = tl.zeros((), tl.int64)
        end = n + start
    offs = start + tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < end, j


@triton.jit
def _sgd_kernel(p_ptr,  # fp32 [n] parameters, updated in place
                g_ptr,  # fp32 [n] gradients (weight decay added in place, as torch)
                m_ptr,  # fp32 [n] momentum, updated in place
                frozen_ptr,  # bool [n] (HAS_FROZEN)
                blocks_ptr,  # int64 [m, 2] block starts and ends (BLOCKS)
                lr_ptr,  # fp32 [m] (or [1] without BLOCKS)
                mo_ptr, wd_ptr,  # fp32 [m] momentum and weight decay per block (BLOCKS)
                n, momentum, weight_decay,  # without BLOCKS
                HAS_FROZEN: tl.constexpr, NESTEROV: tl.constexpr, BLOCKS: tl.constexpr, BLOCK: tl.constexpr):
    offs, ok, j = _span(blocks_ptr, n, BLOCKS, BLOCK)
    if BLOCKS:
        mo = tl.load(mo_ptr + j)
        wd = tl.load(wd_ptr + j)
    else:
        mo = momentum
        wd = weight_decay
    lr = tl.load(lr_ptr + j)
    p = tl.load(p_ptr + offs, mask=ok)
    g = tl.load(g_ptr + offs, mask=ok)
    g = tl.where(wd != 0, tl.fma(wd + tl.zeros_like(p), p, g), g)  # torch skips a zero decay (0 * inf is NaN)
    m = tl.load(m_ptr + offs, mask=ok)
    if HAS_FROZEN:
        frozen = tl.load(frozen_ptr + offs, mask=ok, other=0) != 0
        g = tl.where(frozen, 0.0, g)
        m = tl.where(frozen, 0.0, m)
    m = m * mo + g
    if NESTEROV:
        step = tl.fma(mo + tl.zeros_like(m), m, g)
    else:
        step = m
    tl.store(g_ptr + offs, g, mask=ok)
    tl.store(m_ptr + offs, m, mask=ok)
    tl.store(p_ptr + offs, tl.fma(-lr + tl.zeros_like(p), step, p), mask=ok)


@triton.jit
def _adam_kernel(p_ptr,  # fp32 [n] parameters, updated in place
                 g_ptr,  # fp32 [n] gradients (weight decay added in place when not DECOUPLED)
                 m_ptr, v_ptr,  # fp32 [n] first and second moments, updated in place
                 frozen_ptr,  # bool [n] (HAS_FROZEN)
                 blocks_ptr,  # int64 [m, 2] (BLOCKS)
                 decay_ptr,  # fp32 [m] 1 - lr * wd per block (DECOUPLED)
                 wd_ptr,  # fp32 [m] weight decay per block (added to the gradient unless DECOUPLED)
                 ss_ptr,  # fp32 [m] step size lr / (1 - beta1^t) per block
                 n, beta1, beta2, eps, bc2_sqrt,  # bc2_sqrt = sqrt(1 - beta2^t)
                 HAS_FROZEN: tl.constexpr, DECOUPLED: tl.constexpr, BLOCKS: tl.constexpr, BLOCK: tl.constexpr):
    offs, ok, j = _span(blocks_ptr, n, BLOCKS, BLOCK)
    p = tl.load(p_ptr + offs, mask=ok)
    g = tl.load(g_ptr + offs, mask=ok)
    if DECOUPLED:
        p_new = p * tl.load(decay_ptr + j)
    else:
        p_new = p
        wd = tl.load(wd_ptr + j)
        g = tl.where(wd != 0, tl.fma(wd + tl.zeros_like(p), p, g), g)
    m = tl.load(m_ptr + offs, mask=ok)
    v = tl.load(v_ptr + offs, mask=ok)
    m = m + (1.0 - beta1) * (g - m)
    v = v * beta2 + (1.0 - beta2) * g * g
    denom = tl.sqrt_rn(v) / bc2_sqrt + eps
    p_new = p_new - tl.load(ss_ptr + j) * (m / denom)
    if HAS_FROZEN:
        frozen = tl.load(frozen_ptr + offs, mask=ok, other=0) != 0
        g = tl.where(frozen, 0.0, g)
        m = tl.where(frozen, 0.0, m)
        v = tl.where(frozen, 0.0, v)
        p_new = tl.where(frozen, p, p_new)
    tl.store(g_ptr + offs, g, mask=ok)
    tl.store(m_ptr + offs, m, mask=ok)
    tl.store(v_ptr + offs, v, mask=ok)
    tl.store(p_ptr + offs, p_new, mask=ok)


MAX_BLOCKS = 65535  # blocks are grid axis 1, which CUDA caps: more are launched in slices


def _block(interpret: bool) -> int:
    return 1 << 16 if interpret else 1024


def _launches(n, blocks, block):
    """(grid, slice of the blocks or None) per launch: programs per block (the longest block's) x blocks."""
    if blocks is None:
        return [((triton.cdiv(n, block), 1), None)]
    longest = int((blocks[:, 1] - blocks[:, 0]).max()) if len(blocks) else 0
    return [((max(1, triton.cdiv(longest, block)), min(MAX_BLOCKS, len(blocks) - j)), slice(j, j + MAX_BLOCKS))
            for j in range(0, len(blocks), MAX_BLOCKS)]


def sgd(params, grads, momentum_buf, lr, momentum, weight_decay, frozen, interpret, nesterov=False, blocks=None):
    """Without blocks: lr a float or a one-element fp32 device tensor, momentum and weight_decay floats. With
    blocks (int64 [m, 2] on the host; its rows [start, end)): lr, momentum, weight_decay sequences of m floats."""
    import torch

    dev = params.device
    n = params.numel()
    block = _block(interpret)
    if blocks is None:
        lr_t = lr if torch.is_tensor(lr) else torch.tensor([lr], dtype=torch.float32, device=dev)
        mo_t = wd_t = blocks_t = lr_t
    else:
        lr_t, mo_t, wd_t = (torch.tensor(list(v), dtype=torch.float32).to(dev) for v in (lr, momentum, weight_decay))
        blocks_t = torch.as_tensor(blocks, dtype=torch.int64).to(dev)
        momentum = weight_decay = 0.0
    for grid, part in _launches(n, blocks, block):
        scalars = (blocks_t, lr_t, mo_t, wd_t)
        if part is not None:
            scalars = tuple(t[part] for t in scalars)
        _sgd_kernel[grid](params, grads, momentum_buf, params if frozen is None else frozen, *scalars, n,
                          float(momentum), float(weight_decay), HAS_FROZEN=frozen is not None, NESTEROV=nesterov,
                          BLOCKS=blocks is not None, BLOCK=block, enable_fp_fusion=False)


def adam(params, grads, exp_avg, exp_avg_sq, lr, betas, eps, weight_decay, decoupled, step, frozen, interpret,
         blocks=None):
    """step: the number of updates so far including this one. lr and weight_decay: floats, or with blocks (int64
    [m, 2] on the host) sequences of m floats. Scalars derived from them are rounded to fp32 once, on the host,
    from their float64 values (as torch derives its Python scalars)."""
    import numpy as np
    import torch

    dev = params.device
    n = params.numel()
    m = 1 if blocks is None else len(blocks)
    lr64 = np.broadcast_to(np.asarray(lr, np.float64), m)
    wd64 = np.broadcast_to(np.asarray(weight_decay, np.float64), m)
    beta1, beta2 = betas
    f32 = [torch.tensor(v.astype(np.float32)).to(dev) for v in (1 - lr64 * wd64, wd64, lr64 / (1 - beta1**step))]
    blocks_t = f32[0] if blocks is None else torch.as_tensor(blocks, dtype=torch.int64).to(dev)
    block = _block(interpret)
    for grid, part in _launches(n, blocks, block):
        scalars = (blocks_t, *f32) if part is None else (blocks_t[part], *(t[part] for t in f32))
        _adam_kernel[grid](params, grads, exp_avg, exp_avg_sq, params if frozen is None else frozen, *scalars, n,
                           float(beta1), float(beta2), float(eps), float((1 - beta2**step) ** 0.5),
                           HAS_FROZEN=frozen is not None, DECOUPLED=decoupled, BLOCKS=blocks is not None, BLOCK=block,
                           enable_fp_fusion=False)
