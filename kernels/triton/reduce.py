"""The fixed-order reduction of per-program partial weight gradients: part [P, SPLITS, N] -> [P, N], summing the
splits one after another for every element. Its own kernel rather than torch.sum, whose CUDA reduction strategy
may change with the tensor's shape, and so with P: network k's gradient must not depend on its company.
"""

import triton
import triton.language as tl


@triton.jit
def _sum_splits_kernel(part_ptr,  # fp32 [P, SPLITS, N]
                       out_ptr,  # fp32 [P, N]
                       N, SPLITS,
                       BLOCK: tl.constexpr):
    p = tl.program_id(1).to(tl.int64)
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = e < N
    acc = tl.zeros((BLOCK,), tl.float32)
    for s in range(0, SPLITS):  # split 0 first, then 1, ...: the same order for any P
        acc += tl.load(part_ptr + (p * SPLITS + s) * N + e, mask=ok, other=0.0)
    tl.store(out_ptr + p * N + e, acc, mask=ok)


def sum_splits(part, interpret):
    """part [P, SPLITS, *shape] -> [P, *shape], the splits summed in order."""
    import torch

    p, splits = part.shape[:2]
    out = torch.empty(p, *part.shape[2:], device=part.device, dtype=torch.float32)
    n = out[0].numel()
    block = min(1 << 16, triton.next_power_of_2(n)) if interpret else 1024
    _sum_splits_kernel[(triton.cdiv(n, block), p)](part, out, n, splits, BLOCK=block)
    return out


def rows_per_split(rows: int, block: int, interpret: bool, target: int) -> int:
    """Rows of the reduction each program takes: about `target` (a multiple of `block`), whatever P is, so the
    summation order of network k's gradient depends on its own shapes only; all rows in one program under the
    interpreter (it pays per program)."""
    if interpret:
        return triton.cdiv(rows, block) * block
    return min(triton.cdiv(rows, block), max(1, target // block)) * block
