"""Compile every Triton kernel, every constexpr variant, to PTX for sm_90 with the real compiler: no GPU needed.
The interpreter runs kernels as numpy and accepts code that the compiler rejects (it did: a helper with two
differently typed returns). Run in a process without TRITON_INTERPRET; tests/test_kernels.py does."""
import os
assert os.environ.get("TRITON_INTERPRET") != "1", "run without TRITON_INTERPRET"
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastpop.kernels import conv, head, optim

target = GPUTarget("cuda", 90, 32)


def comp(fn, sig, consts):
    src = ASTSource(fn=fn, signature=sig, constexprs=consts)
    k = triton.compile(src, target=target)
    return len(k.asm["ptx"])


P = "*fp32"
for gather in (False, True):
    for pool in (False, True):
        sig = {"x_ptr": "*u8" if gather else P, "idx_ptr": "*i64", "mean_ptr": P, "std_ptr": P, "w_ptr": P, "b_ptr": P,
               "out_ptr": P, "arg_ptr": "*i8", "B": "i32", "H": "i32", "W": "i32", "HO": "i32", "WO": "i32",
               "CIN": "i32", "COUT": "i32", "GATHER": "constexpr", "POOL": "constexpr", "WINDOW": "constexpr",
               "BLOCK_M": "constexpr", "BLOCK_K": "constexpr", "BLOCK_N": "constexpr"}
        n = comp(conv._conv_fwd_kernel, sig, {"GATHER": gather, "POOL": pool, "WINDOW": 4 if pool else 1,
                                              "BLOCK_M": 64, "BLOCK_K": 16, "BLOCK_N": 16})
        print("conv fwd", gather, pool, "ptx", n)
        sigw = {"x_ptr": "*u8" if gather else P, "idx_ptr": "*i64", "mean_ptr": P, "std_ptr": P, "dout_ptr": P,
                "out_ptr": P, "arg_ptr": "*i8", "dw_ptr": P, "db_ptr": P, "B": "i32", "H": "i32", "W": "i32",
                "HO": "i32", "WO": "i32", "CIN": "i32", "COUT": "i32", "ROWS_PER_SPLIT": "i32", "SPLITS": "i32",
                "GATHER": "constexpr", "POOL": "constexpr", "BLOCK_M": "constexpr", "BLOCK_K": "constexpr",
                "BLOCK_N": "constexpr"}
        n = comp(conv._conv_bwd_weight_kernel, sigw, {"GATHER": gather, "POOL": pool, "BLOCK_M": 64, "BLOCK_K": 16,
                                                      "BLOCK_N": 16})
        print("conv bwd weight", gather, pool, "ptx", n)
for pool in (False, True):
    sig = {"dout_ptr": P, "out_ptr": P, "arg_ptr": "*i8", "w_ptr": P, "dx_ptr": P, "B": "i32", "H": "i32",
           "W": "i32", "HO": "i32", "WO": "i32", "CIN": "i32", "COUT": "i32", "POOL": "constexpr",
           "BLOCK_M": "constexpr", "BLOCK_K": "constexpr", "BLOCK_N": "constexpr"}
    print("conv bwd input", pool, comp(conv._conv_bwd_input_kernel, sig, {"POOL": pool, "BLOCK_M": 64, "BLOCK_K": 16, "BLOCK_N": 16}))
for ev in (False, True):
    sig = {"h_ptr": P, "w_ptr": P, "b_ptr": P, "y_ptr": "*i64", "g_ptr": P, "logits_ptr": P, "loss_ptr": P,
           "bits_ptr": "*u8", "pred_ptr": "*i64", "B": "i32", "S": "i32", "C": "i32", "K": "i32", "ROW_BYTES": "i32",
           "BIT_OFFSET": "i32", "EVAL": "constexpr", "BLOCK_B": "constexpr", "BLOCK_C": "constexpr", "BLOCK_K": "constexpr"}
    print("head fwd", ev, comp(head._head_fwd_kernel, sig, {"EVAL": ev, "BLOCK_B": 64, "BLOCK_C": 16, "BLOCK_K": 16}))
sig = {"g_ptr": P, "logits_ptr": P, "y_ptr": "*i64", "w_ptr": P, "dloss_ptr": P, "dh_ptr": P, "dw_ptr": P, "db_ptr": P,
       "B": "i32", "S": "i32", "C": "i32", "K": "i32", "BLOCK_B": "constexpr", "BLOCK_C": "constexpr", "BLOCK_K": "constexpr"}
print("head bwd", comp(head._head_bwd_kernel, sig, {"BLOCK_B": 64, "BLOCK_C": 16, "BLOCK_K": 16}))
for fr in (False, True):
    sig = {"p_ptr": P, "g_ptr": P, "m_ptr": P, "frozen_ptr": "*i1", "lr_ptr": P, "n": "i32", "momentum": "fp32",
           "weight_decay": "fp32", "HAS_FROZEN": "constexpr", "BLOCK": "constexpr"}
    print("sgd", fr, comp(optim._sgd_kernel, sig, {"HAS_FROZEN": fr, "BLOCK": 1024}))
