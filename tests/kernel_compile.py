"""Compile every Triton kernel, every constexpr variant, to PTX for sm_90 with the real compiler: no GPU needed.
The interpreter runs kernels as numpy and accepts code that the compiler rejects (it did: a helper with two
differently typed returns). Run in a process without TRITON_INTERPRET; tests/test_kernels.py does. Prints one
line per compiled variant."""

import os

assert os.environ.get("TRITON_INTERPRET") != "1", "run without TRITON_INTERPRET"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastpop.kernels.triton import conv, head, optim  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
POINTERS = {"idx_ptr": "*i64", "y_ptr": "*i64", "pred_ptr": "*i64", "arg_ptr": "*i8", "bits_ptr": "*u8",
            "frozen_ptr": "*i1"}  # every other pointer is fp32
FLOATS = {"momentum", "weight_decay"}  # every other scalar is i32
BLOCKS = {"BLOCK_M": 64, "BLOCK_K": 16, "BLOCK_N": 16, "BLOCK_B": 64, "BLOCK_C": 16, "BLOCK": 1024}


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
    for gather in (False, True):
        for pool in (False, True):
            x = "*u8" if gather else "*fp32"
            print("conv fwd", gather, pool, compile_variant(conv._conv_fwd_kernel, x, GATHER=gather, POOL=pool,
                                                            WINDOW=4 if pool else 1))
            print("conv bwd weight", gather, pool,
                  compile_variant(conv._conv_bwd_weight_kernel, x, GATHER=gather, POOL=pool))
    for pool in (False, True):
        print("conv bwd input", pool, compile_variant(conv._conv_bwd_input_kernel, POOL=pool))
    for evaluating in (False, True):
        print("head fwd", evaluating, compile_variant(head._head_fwd_kernel, EVAL=evaluating, BLOCK_K=16))
    print("head bwd", compile_variant(head._head_bwd_kernel, BLOCK_K=16))
    for frozen in (False, True):
        print("sgd", frozen, compile_variant(optim._sgd_kernel, HAS_FROZEN=frozen))


if __name__ == "__main__":
    main()
