"""The dense layers' product on rows of floats, register-blocked: `gemm_rows` computes a dense layer's forward, its
input gradient and its weight gradient.

numba has no vector types, and LLVM keeps a loop's outputs in memory when its innermost loop runs along them (a
load and a store per multiply-add pair). So the inner block is written in LLVM IR (`_tile`): ROWS output rows of
VECS x 16 floats held in vector registers over the whole sum, one fused multiply-add per term in the order of j,
the same operations per float as the plain loop (`_rows_plain`) that takes the lanes left over. Its bits do not
depend on the tile shape, on where a lane falls, or on the machine's vector width beyond fp32 rounding of fma.
One core of the 2-core AVX-512 CPU, 64 x 64 weights, B = 32, hot in cache: 51 GFLOP/s (the plain loop, four rows
and two inputs per pass) -> 256 (8 rows x 32 floats).
"""

from __future__ import annotations

from llvmlite import binding as llvm
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils, config
from numba.extending import intrinsic

_FMA = {"contract"}
LANES = 16  # floats per vector of the tile (one AVX-512 register, two AVX2 ones)


def _wide() -> bool:
    """Whether numba compiles for AVX-512 (32 vector registers): the tile then holds 8 rows x 2 vectors; with
    AVX2's 16 registers of 8 floats, 4 rows x 1 vector (8 registers) so that nothing spills."""
    features = config.CPU_FEATURES if config.CPU_FEATURES is not None else llvm.get_host_cpu_features().flatten()
    return "+avx512f" in features.split(",")


ROWS, VECS = (8, 2) if _wide() else (4, 1)


def _tile_intrinsic(rows: int, vecs: int):
    """An intrinsic tile(dst, d0, src, s0, stride, w, w0, so, sj, nin): for r < rows and the vecs * LANES floats
    from d0 + r * stride of dst (from s0 of src), dst[d0 + r * stride + i] += w[w0 + r * so + j * sj] *
    src[s0 + j * stride + i] for j = 0..nin - 1 in order, each a fused multiply-add."""
    f32 = types.Array(types.float32, 1, "C")

    @intrinsic
    def tile(typingctx, dst, d0, src, s0, stride, w, w0, so, sj, nin):
        if not all(a == f32 for a in (dst, src, w)):
            return None
        sig = types.void(f32, types.intp, f32, types.intp, types.intp, f32, types.intp, types.intp, types.intp,
                         types.intp)

        def codegen(context, builder, signature, args):
            dst_, d0_, src_, s0_, stride_, w_, w0_, so_, sj_, nin_ = args
            vec = ir.VectorType(ir.FloatType(), LANES)
            i64, i32 = ir.IntType(64), ir.IntType(32)
            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec] * 3),
                                                 f"llvm.fma.v{LANES}f32")
            dptr, sptr, wptr = (context.make_array(f32)(context, builder, a).data for a in (dst_, src_, w_))

            def at(ptr, i):  # a vector of LANES floats from ptr[i] (any alignment)
                return builder.bitcast(builder.gep(ptr, [i]), vec.as_pointer())

            def plus(a, k):
                return builder.add(a, ir.Constant(i64, k))

            accs = []  # (register slot, where it goes back in dst); SROA keeps the slots in registers
            for r in range(rows):
                row = builder.add(d0_, builder.mul(ir.Constant(i64, r), stride_))
                for v in range(vecs):
                    slot = cgutils.alloca_once(builder, vec)
                    builder.store(builder.load(at(dptr, plus(row, LANES * v)), align=4), slot)
                    accs.append((slot, plus(row, LANES * v)))
            undef, splat = ir.Constant(vec, ir.Undefined), ir.Constant(ir.VectorType(i32, LANES), [0] * LANES)
            with cgutils.for_range(builder, nin_) as loop:
                j = loop.index
                srow = builder.add(s0_, builder.mul(j, stride_))
                s = [builder.load(at(sptr, plus(srow, LANES * v)), align=4) for v in range(vecs)]
                wj = builder.add(w0_, builder.mul(j, sj_))
                for r in range(rows):
                    a = builder.load(builder.gep(wptr, [builder.add(wj, builder.mul(ir.Constant(i64, r), so_))]))
                    a = builder.shuffle_vector(builder.insert_element(undef, a, ir.Constant(i32, 0)), undef, splat)
                    for v in range(vecs):
                        slot = accs[r * vecs + v][0]
                        builder.store(builder.call(fma, [a, s[v], builder.load(slot)]), slot)
            for slot, i in accs:
                builder.store(builder.load(slot), at(dptr, i), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return tile


_block = _tile_intrinsic(ROWS, VECS)
_block1 = _tile_intrinsic(ROWS, 1)
_row = _tile_intrinsic(1, VECS)
_row1 = _tile_intrinsic(1, 1)


@njit(fastmath=_FMA, cache=True)
def gemm_rows(w, so, sj, src, nin, nout, nb, dst):
    """dst[o] += sum over j of w[o * so + j * sj] * src[j], on rows of nb floats, dst [nout, nb] and src [nin, nb];
    the terms added in the order of j, one fused multiply-add each, as a loop over j would. A dense layer's forward,
    its input gradient (W transposed: so = 1) and its weight gradient (w the output gradient, src the input
    transposed to [B, F]) are all this one loop."""
    o = 0
    while o < nout:
        rows = ROWS if o + ROWS <= nout else 1  # whole tiles, then the rows left one at a time
        k = 0
        while k + VECS * LANES <= nb:
            if rows == ROWS:
                _block(dst, o * nb + k, src, k, nb, w, o * so, so, sj, nin)
            else:
                _row(dst, o * nb + k, src, k, nb, w, o * so, so, sj, nin)
            k += VECS * LANES
        while k + LANES <= nb:
            if rows == ROWS:
                _block1(dst, o * nb + k, src, k, nb, w, o * so, so, sj, nin)
            else:
                _row1(dst, o * nb + k, src, k, nb, w, o * so, so, sj, nin)
            k += LANES
        _rows_plain(w, so, sj, src, nin, o, o + rows, nb, k, dst)
        o += rows


@njit(fastmath=_FMA, cache=True)
def _rows_plain(w, so, sj, src, nin, o0, o1, nb, k0, dst):
    """`gemm_rows` for rows o0..o1 on lanes k0..nb (fewer than LANES): four rows per pass over the inputs, two
    inputs per step, each row loaded serving 4 or 8 multiply-adds."""
    if k0 >= nb:
        return
    o = o0
    while o + 4 <= o1:
        d0, d1 = dst[o * nb + k0:(o + 1) * nb], dst[(o + 1) * nb + k0:(o + 2) * nb]
        d2, d3 = dst[(o + 2) * nb + k0:(o + 3) * nb], dst[(o + 3) * nb + k0:(o + 4) * nb]
        w0, w1, w2, w3 = o * so, (o + 1) * so, (o + 2) * so, (o + 3) * so
        j = 0
        while j + 2 <= nin:
            s0, s1 = src[j * nb + k0:(j + 1) * nb], src[(j + 1) * nb + k0:(j + 2) * nb]
            a, b = j * sj, (j + 1) * sj
            a0, a1, a2, a3 = w[w0 + a], w[w1 + a], w[w2 + a], w[w3 + a]
            b0, b1, b2, b3 = w[w0 + b], w[w1 + b], w[w2 + b], w[w3 + b]
            for k in range(nb - k0):
                x, y = s0[k], s1[k]
                d0[k] = d0[k] + a0 * x + b0 * y
                d1[k] = d1[k] + a1 * x + b1 * y
                d2[k] = d2[k] + a2 * x + b2 * y
                d3[k] = d3[k] + a3 * x + b3 * y
            j += 2
        if j < nin:
            s0 = src[j * nb + k0:(j + 1) * nb]
            a = j * sj
            a0, a1, a2, a3 = w[w0 + a], w[w1 + a], w[w2 + a], w[w3 + a]
            for k in range(nb - k0):
                x = s0[k]
                d0[k] = d0[k] + a0 * x
                d1[k] = d1[k] + a1 * x
                d2[k] = d2[k] + a2 * x
                d3[k] = d3[k] + a3 * x
        o += 4
    for o in range(o, o1):
        d0 = dst[o * nb + k0:(o + 1) * nb]
        for j in range(nin):
            s0, a = src[j * nb + k0:(j + 1) * nb], w[o * so + j * sj]
            for k in range(nb - k0):
                d0[k] = d0[k] + a * s0[k]
