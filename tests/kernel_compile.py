"""Compile a representative set of the Triton kernels' constexpr variants to PTX for sm_90 with the real compiler:
no GPU needed. The interpreter runs kernels as numpy and accepts code that the compiler rejects (it did: a helper
with two differently typed returns). Every kernel is compiled at least once, and every constexpr flag both ways
in some kernel; kernel sizes 1, 3, 5 and 7 and strides 1 and 2 across the conv kernels. Run in a process without
TRITON_INTERPRET; tests/test_kernels.py does. Prints one line per compiled variant."""

import os
import sys
import time

assert os.environ.get("TRITON_INTERPRET") != "1", "run without TRITON_INTERPRET"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastpop.kernels.triton import augment, batchnorm, conv, dense, head, loss, optim, pool, reduce  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
POINTERS = {"idx_ptr": "*i64", "y_ptr": "*i64", "pred_ptr": "*i64", "arg_ptr": "*i8", "bits_ptr": "*u8",
            "frozen_ptr": "*i1", "aug_ptr": "*i32", "draws_ptr": "*i32", "seeds_ptr": "*i64",
            "blocks_ptr": "*i64"}  # every other pointer is fp32
FLOATS = {"momentum", "weight_decay", "smoothing", "beta1", "beta2", "eps", "bc2_sqrt",
          "unbias"}  # other scalars are i32
BLOCKS = {"BLOCK_M": 64, "BLOCK_K": 16, "BLOCK_N": 16, "BLOCK_B": 64, "BLOCK_C": 16, "BLOCK": 1024}
MAX, AVG = conv.POOLS["max"], conv.POOLS["avg"]

# (kernel, x_ptr type, constexpr flags): uint8 images where the kernel gathers them
VARIANTS = [
    (conv._conv_fwd_kernel, "*u8", dict(GATHER=True, AUG=False, POOL=MAX, KS=3, STRIDE=1, BIAS=True, RELU=True,
                                        WINDOW=4)),
    (conv._conv_fwd_kernel, "*u8", dict(GATHER=True, AUG=True, POOL=AVG, KS=5, STRIDE=2, BIAS=True, RELU=True,
                                        WINDOW=4)),
    (conv._conv_fwd_kernel, "*fp32", dict(GATHER=False, AUG=False, POOL=AVG, KS=5, STRIDE=1, BIAS=True, RELU=True,
                                          WINDOW=4)),
    (conv._conv_fwd_kernel, "*fp32", dict(GATHER=False, AUG=False, POOL=0, KS=7, STRIDE=1, BIAS=True, RELU=True,
                                          WINDOW=1)),
    (conv._conv_fwd_kernel, "*fp32", dict(GATHER=False, AUG=False, POOL=0, KS=3, STRIDE=2, BIAS=False, RELU=False,
                                          WINDOW=1)),
    (conv._conv_fwd_kernel, "*u8", dict(GATHER=True, AUG=True, POOL=0, KS=1, STRIDE=2, BIAS=False, RELU=False,
                                        WINDOW=1)),
    (conv._conv_bwd_input_kernel, "*fp32", dict(POOL=MAX, KS=3, STRIDE=1, RELU=True)),
    (conv._conv_bwd_input_kernel, "*fp32", dict(POOL=AVG, KS=1, STRIDE=2, RELU=True)),
    (conv._conv_bwd_input_kernel, "*fp32", dict(POOL=0, KS=5, STRIDE=1, RELU=True)),
    (conv._conv_bwd_input_kernel, "*fp32", dict(POOL=0, KS=3, STRIDE=2, RELU=False)),
    (conv._conv_bwd_weight_kernel, "*u8", dict(GATHER=True, AUG=False, POOL=AVG, KS=5, STRIDE=1, BIAS=True,
                                               RELU=True)),
    (conv._conv_bwd_weight_kernel, "*u8", dict(GATHER=True, AUG=True, POOL=MAX, KS=3, STRIDE=2, BIAS=True,
                                               RELU=True)),
    (conv._conv_bwd_weight_kernel, "*fp32", dict(GATHER=False, AUG=False, POOL=MAX, KS=3, STRIDE=1, BIAS=True,
                                                 RELU=True)),
    (conv._conv_bwd_weight_kernel, "*fp32", dict(GATHER=False, AUG=False, POOL=0, KS=1, STRIDE=1, BIAS=True,
                                                 RELU=True)),
    (conv._conv_bwd_weight_kernel, "*fp32", dict(GATHER=False, AUG=False, POOL=0, KS=3, STRIDE=2, BIAS=False,
                                                 RELU=False)),
    (conv._conv_bwd_weight_kernel, "*u8", dict(GATHER=True, AUG=True, POOL=0, KS=1, STRIDE=2, BIAS=False,
                                               RELU=False)),
    (batchnorm._bn_partial_kernel, "*fp32", dict(CENTER=False)),
    (batchnorm._bn_partial_kernel, "*fp32", dict(CENTER=True)),
    (batchnorm._bn_finalize_kernel, "*fp32", dict(TRAIN=True)),
    (batchnorm._bn_finalize_kernel, "*fp32", dict(TRAIN=False)),
    (batchnorm._bn_apply_kernel, "*fp32", dict(SKIP=0, GATHER=False, AUG=False, RELU=True, POOL=MAX, WINDOW=4)),
    (batchnorm._bn_apply_kernel, "*fp32", dict(SKIP=0, GATHER=False, AUG=False, RELU=True, POOL=AVG, WINDOW=4)),
    (batchnorm._bn_apply_kernel, "*fp32", dict(SKIP=1, GATHER=False, AUG=False, RELU=True, POOL=0, WINDOW=1)),
    (batchnorm._bn_apply_kernel, "*u8", dict(SKIP=1, GATHER=True, AUG=True, RELU=True, POOL=0, WINDOW=1)),
    (batchnorm._bn_apply_kernel, "*fp32", dict(SKIP=2, GATHER=False, AUG=False, RELU=False, POOL=0, WINDOW=1)),
    (batchnorm._bn_bwd_partial_kernel, "*fp32", dict(POOL=MAX, RELU=True)),
    (batchnorm._bn_bwd_partial_kernel, "*fp32", dict(POOL=0, RELU=False)),
    # the GPU's block sizes for 16 channels: a 2-D accumulator at these sizes crashed LLVM
    (batchnorm._bn_bwd_partial_kernel, "*fp32", dict(POOL=0, RELU=True, BLOCK_M=256, BLOCK_C=16)),
    (batchnorm._bn_partial_kernel, "*fp32", dict(CENTER=True, BLOCK_M=256, BLOCK_C=16)),
    (batchnorm._bn_bwd_apply_kernel, "*fp32", dict(TRAIN=True, POOL=AVG, RELU=True, SKIP_GRAD=False)),
    (batchnorm._bn_bwd_apply_kernel, "*fp32", dict(TRAIN=False, POOL=0, RELU=True, SKIP_GRAD=True)),
    (pool._pool_fwd_kernel, "*u8", dict(GATHER=True, AUG=False, POOL=MAX)),
    (pool._pool_fwd_kernel, "*u8", dict(GATHER=True, AUG=True, POOL=MAX)),
    (pool._pool_fwd_kernel, "*fp32", dict(GATHER=False, AUG=False, POOL=AVG)),
    (pool._pool_bwd_kernel, "*fp32", dict(POOL=MAX)),
    (pool._pool_bwd_kernel, "*fp32", dict(POOL=AVG)),
    (pool._gap_fwd_kernel, "*u8", dict(GATHER=True, AUG=False)),
    (pool._gap_fwd_kernel, "*u8", dict(GATHER=True, AUG=True)),
    (pool._gap_fwd_kernel, "*fp32", dict(GATHER=False, AUG=False)),
    (pool._gap_bwd_kernel, "*fp32", {}),
    (dense._dense_fwd_kernel, "*u8", dict(GATHER=True, AUG=False, RELU=True)),
    (dense._dense_fwd_kernel, "*u8", dict(GATHER=True, AUG=True, RELU=True)),
    (dense._dense_fwd_kernel, "*fp32", dict(GATHER=False, AUG=False, RELU=False)),
    (dense._dense_bwd_input_kernel, "*fp32", dict(RELU=True)),
    (dense._dense_bwd_weight_kernel, "*u8", dict(GATHER=True, AUG=False, RELU=True)),
    (dense._dense_bwd_weight_kernel, "*u8", dict(GATHER=True, AUG=True, RELU=False)),
    (dense._dense_bwd_weight_kernel, "*fp32", dict(GATHER=False, AUG=False, RELU=False)),
    (dense._flatten_kernel, "*fp32", dict(TO_FLAT=True)),
    (dense._flatten_kernel, "*fp32", dict(TO_FLAT=False)),
    (loss._ce_fwd_kernel, "*fp32", dict(EVAL=False, PER_EXAMPLE=False)),
    (loss._ce_fwd_kernel, "*fp32", dict(EVAL=True, PER_EXAMPLE=True)),
    (loss._ce_bwd_kernel, "*fp32", {}),
    (head._head_fwd_kernel, "*fp32", dict(EVAL=False, PER_EXAMPLE=False)),
    (head._head_fwd_kernel, "*fp32", dict(EVAL=True, PER_EXAMPLE=True)),
    (head._head_bwd_kernel, "*fp32", {}),
    (augment._draws_kernel, "*fp32", dict(FLIP=True)),
    (augment._draws_kernel, "*fp32", dict(FLIP=False)),
    (optim._sgd_kernel, "*fp32", dict(HAS_FROZEN=False, NESTEROV=False, BLOCKS=False)),
    (optim._sgd_kernel, "*fp32", dict(HAS_FROZEN=True, NESTEROV=True, BLOCKS=True)),
    (optim._adam_kernel, "*fp32", dict(HAS_FROZEN=False, DECOUPLED=True, BLOCKS=False)),
    (optim._adam_kernel, "*fp32", dict(HAS_FROZEN=True, DECOUPLED=False, BLOCKS=True)),
    (reduce._sum_splits_kernel, "*fp32", {}),
]


def compile_variant(fn, x_ptr="*fp32", **flags) -> int:
    """Compile `fn` with its signature derived from its argument names; returns the PTX size."""
    signature, constexprs = {}, {}
    for param in fn.params:
        name = param.name
        if param.is_constexpr:
            signature[name] = "constexpr"
            constexprs[name] = flags[name] if name in flags else BLOCKS[name]
        elif name.endswith("_ptr"):
            signature[name] = x_ptr if name == "x_ptr" else POINTERS.get(name, "*fp32")
        else:
            signature[name] = "fp32" if name in FLOATS else "i32"
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=TARGET)
    return len(kernel.asm["ptx"])


def main() -> None:
    for fn, x_ptr, flags in VARIANTS:
        start = time.perf_counter()
        size = compile_variant(fn, x_ptr, **flags)
        print(fn.__name__, flags, size, f"{time.perf_counter() - start:.1f}s", file=sys.stderr)
        print(fn.__name__, flags, size)


if __name__ == "__main__":
    main()
