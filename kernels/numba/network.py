"""numba kernels for the CPU: a whole network of any spec of the architecture grammar (K x K convs with padding
K // 2, stride 1 or 2, with a bias or BatchNorm, and ReLU; residual basic blocks; 2x2 max and average pools, global
average pool, flatten, dense layers; cross-entropy) per network, forward and backward in training, forward and
scoring in evaluation, networks spread over the cores.

BatchNorm as nn.BatchNorm2d: in training each network normalizes with its batch's statistics over (B, H, W) per
channel and moves its running statistics (a row of the population's stats, updated in place); in evaluation it
normalizes with them. A residual block is three conv rows of the table (conv1, the projection, conv2 adding the
skip before its ReLU); gradients meeting at the block's input are added in a fixed order.

A network is an op table (one row per layer, columns below) that the kernels interpret in order. One network's
activations for a batch (~200 KB for small-cnn at B = 32, as much again for their gradients) stay in its core's L2
from the first layer to the last gradient, where the op-by-op torch path streams them through memory between ops.
Inside a network the layout is [C, H, W, B], batch innermost (a dense layer's [F, B] is the same with H = W = 1,
and flatten is free: [C, H, W, B] read as [C*H*W, B] is nn.Flatten's order): the inner loops run along rows of B
contiguous floats or more, vectorizable even on 2x2 images; kernel rows that fall in the zero padding are skipped
(padding columns are multiplied, as the zeros of shifted copies).
Measured on the 2-core AVX-512 CPU, small-cnn, B = 32, P = 1000: the kernel alone went 35k (offsets in the
index) -> 154k (slices) -> 350k (vectorized pool backward) -> 535k net-images/s (shifted rows, below).
At 32x32 a network's activations (32 MB for wide-cnn at B = 32, with their gradients) leave L2, so the convs go
band by band of each plane and four output channels at a time (`BAND`): one core, CPU time, 3x32x32, B = 32,
wide-cnn 1.42x and ResNet-8 1.46x faster than whole planes; strided convs read column copies of their input
rather than computing at stride 1 and subsampling: ResNet-8 1.31x more.

Every network is computed by the same sequential code on its own slice, so its result does not depend on which
other networks run, on P or on the thread. Multiply-adds may be fused (fastmath "contract"); only dot products
and sums may be reassociated ("reassoc": vectorized, in an order that depends on the length alone). NaNs
propagate: a diverged network's loss is NaN. Inner loops index slices, not offsets into one array: with offsets
in the index LLVM left them scalar (4.4x slower).
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils, config
from numba.core.codegen import get_host_cpu_features
from numba.extending import intrinsic

_FMA = {"contract"}
_DOT = {"contract", "reassoc"}

# The op table (int64 [L, 21]), one row per layer. KIND: one of the kinds below. (C, H, W): the layer's input shape
# (dense: C features, H = W = 1); OUTC its output channels or features; K the conv's kernel size; RELU: ReLU after
# it. Offsets count floats: WOFF/BOFF in the network's parameter row (`_point` moves them to its place in the
# population's buffers); IN and OUT in its scratch, where activations and their gradients lie at the same offsets
# of two arrays (the last layer's OUT is -1: its output is the logits array); SHIFT: a conv's input shifted along
# rows, 2 (K // 2) copies of [C, H, W, B] (a strided conv's: its K column copies, `_columns`). DIN: whether the
# gradient of the layer's input is needed (a layer with parameters comes before it). A conv's further columns:
# STRIDE (1 or 2: `_conv_s2`); BN: BatchNorm after it (no bias; BOFF is then BatchNorm's weight and BETA its bias),
# with XHAT the normalized output [OUTC, H', W', B] in the scratch followed by OUTC inverse standard deviations and
# OUTC floats of room, and SOFF and SVAR the running mean and variance in the network's statistics row (`_point`
# moves them too); SKIP: the offset of a tensor added before the ReLU (a residual block's skip) or -1; ACC: the
# input gradient is added to what a later layer (in the forward order) already wrote there, not set. The head
# array: where the gradient scratch has room for a pre-activation gradient shifted along rows (a transposed conv's
# input), a dense layer's input transposed or a strided conv's column copies' gradients, and the classes.
KIND, C, H, W, OUTC, K, RELU, WOFF, BOFF, IN, OUT, SHIFT, DIN = range(13)
STRIDE, BN, XHAT, SOFF, SKIP, ACC, BETA, SVAR = range(13, 21)
CONV, MAXPOOL, AVGPOOL, GAP, FLAT, DENSE = range(6)
HEAD_WORK, HEAD_K = range(2)
BN_EPS, BN_MOMENTUM = 1e-5, 0.1  # nn.BatchNorm2d's defaults (`fastpop.archs`)
# Floats of a plane per band of a conv: four output bands (16 KB) and three input bands stay in a 48 KB L1. The
# weight gradient's sums stay in registers: longer bands there mean fewer horizontal sums of its twelve (wide-cnn
# at 3x32x32, one core: 1.18x over bands of 1024)
BAND = 1024
WBAND = 16384
# Floats of the fused SGD step between two requests for the next network's weights and momentum: spread over the
# update, the requests overlap it (asked for all at once, before the network, they stalled on the memory system's
# queue: the mlp at P = 1000, 2 threads, 9.4 -> 8.3 us per network)
PIECE = 256


@njit(fastmath=_DOT, cache=True)
def _dot(u, v):
    s = np.float32(0)
    for k in range(u.shape[0]):
        s += u[k] * v[k]
    return s


@njit(fastmath=_DOT, cache=True)
def _sum(u):
    s = np.float32(0)
    for k in range(u.shape[0]):
        s += u[k]
    return s


@njit(fastmath=_FMA, cache=True)
def _shift(src, c, h, w, nb, r, out):
    """Copies of src [c, h, w, nb] moved along each row by d = -r..-1, 1..r pixels, one after the other in out:
    copy[x] = src[x + d], zero past the edge. With them a conv's kernel row is one pass over whole rows, without
    splitting rows at their edges: 2x faster convs and 1.6x faster weight gradients than per-row passes
    (small-cnn, B = 32)."""
    row, size = w * nb, c * h * w * nb
    for j in range(2 * r):
        d = j - r if j < r else j - r + 1
        m = min(abs(d), w) * nb
        dst = out[j * size:(j + 1) * size]
        for b in range(0, size, row):
            s, sd = src[b:b + row], dst[b:b + row]
            if d < 0:
                sd[:m] = 0
                sd[m:] = s[:row - m]
            else:
                sd[:row - m] = s[m:]
                sd[row - m:] = 0


@njit(inline="always")
def _tap_src(src, shifted, size, b, m, r, d):
    """Rows b..b + m of src moved by d pixels along its rows (d = 0: src itself; else a copy from `_shift`)."""
    if d == 0:
        return src[b:b + m]
    j = d + r if d < 0 else d + r - 1
    return shifted[j * size + b:j * size + b + m]


@njit(fastmath=_FMA, cache=True, inline="always")
def _taps(d, a, b, c, w0, w1, w2):
    """d += w0 * a + w1 * b + w2 * c: three taps per load and store of the output. Inlined into `_conv`: its
    slice arguments made the call cost 9% of a training step. (Inlining `_dot` instead drops its "reassoc" flag
    and with it the vectorized sum: 3.4x slower.)"""
    for k in range(d.shape[0]):
        d[k] = d[k] + w0 * a[k] + w1 * b[k] + w2 * c[k]


@njit(fastmath=_FMA, cache=True, inline="always")
def _taps2(d, a, b, w0, w1):
    for k in range(d.shape[0]):
        d[k] = d[k] + w0 * a[k] + w1 * b[k]


@njit(fastmath=_FMA, cache=True, inline="always")
def _tap1(d, a, w0):
    for k in range(d.shape[0]):
        d[k] = d[k] + w0 * a[k]


@njit(fastmath=_FMA, cache=True, inline="always")
def _taps4(d0, d1, d2, d3, a, b, c, w):
    """d_j += w[3j] * a + w[3j + 1] * b + w[3j + 2] * c for four outputs j: each load of a, b, c serves twelve
    multiply-adds. w: the twelve weights (a tuple)."""
    for k in range(d0.shape[0]):
        ak, bk, ck = a[k], b[k], c[k]
        d0[k] = d0[k] + w[0] * ak + w[1] * bk + w[2] * ck
        d1[k] = d1[k] + w[3] * ak + w[4] * bk + w[5] * ck
        d2[k] = d2[k] + w[6] * ak + w[7] * bk + w[8] * ck
        d3[k] = d3[k] + w[9] * ak + w[10] * bk + w[11] * ck


@njit(inline="always")
def _w12(wgt, k0, k1, k2, k3):
    """The three taps of a kernel row at k0..k3 (one per output), as one tuple."""
    return (wgt[k0], wgt[k0 + 1], wgt[k0 + 2], wgt[k1], wgt[k1 + 1], wgt[k1 + 2],
            wgt[k2], wgt[k2 + 1], wgt[k2 + 2], wgt[k3], wgt[k3 + 1], wgt[k3 + 2])


@njit(inline="always")
def _span(p0, p1, h, row, dy):
    """The positions [q0, q1) of the band [p0, p1) of an output plane (h rows of `row` floats) whose input row,
    dy rows away, exists."""
    return max(p0, max(0, -dy) * row), min(p1, min(h, h - dy) * row)


@njit(fastmath=_FMA, cache=True)
def _conv(src, shifted, wgt, transpose, cin, cout, h, w, nb, ks, dst):
    """dst[o] += sum over i and the ks x ks taps of wgt * src[i] shifted, on [C, h, w, nb] blocks; `shifted` holds
    src moved along its rows (`_shift`). Forward (transpose False): wgt is [cout, cin, ks, ks]. Transposed, the
    input gradient of a forward conv with weight wgt [cin, cout, ks, ks] (so i runs over its output channels): taps
    mirrored. A kernel row's taps go three at a time; 3 x 3 kernels four outputs at a time. The planes go in bands
    of BAND floats, so that the outputs' band stays in L1 over all inputs and taps (the same sums in the same order
    as without bands)."""
    row = w * nb
    n = h * row
    r = ks // 2
    size = cin * n
    sg = 1 if not transpose else -1
    kk2 = ks * ks
    for p0 in range(0, n, BAND):
        p1 = min(n, p0 + BAND)
        for o0 in range(0, cout, 4):
            quad = ks == 3 and o0 + 4 <= cout
            for i in range(cin):
                for ky in range(ks):
                    dy = sg * (ky - r)
                    q0, q1 = _span(p0, p1, h, row, dy)
                    if q1 <= q0:
                        continue
                    b, m = i * n + q0 + dy * row, q1 - q0
                    if quad:
                        lo, hi = shifted[b:b + m], shifted[size + b:size + b + m]
                        if transpose:
                            lo, hi = hi, lo
                            k0 = (i * cout + o0) * kk2 + 3 * ky
                            ws = _w12(wgt, k0, k0 + kk2, k0 + 2 * kk2, k0 + 3 * kk2)
                        else:
                            k0 = (o0 * cin + i) * kk2 + 3 * ky
                            ws = _w12(wgt, k0, k0 + cin * kk2, k0 + 2 * cin * kk2, k0 + 3 * cin * kk2)
                        _taps4(dst[o0 * n + q0:o0 * n + q1], dst[(o0 + 1) * n + q0:(o0 + 1) * n + q1],
                               dst[(o0 + 2) * n + q0:(o0 + 2) * n + q1], dst[(o0 + 3) * n + q0:(o0 + 3) * n + q1],
                               lo, src[b:b + m], hi, ws)
                        continue
                    for o in range(o0, min(cout, o0 + 4)):
                        kk = ((o * cin + i) * kk2 if not transpose else (i * cout + o) * kk2) + ks * ky
                        out = dst[o * n + q0:o * n + q1]
                        if ks == 3:
                            lo, hi = shifted[b:b + m], shifted[size + b:size + b + m]
                            if transpose:
                                _taps(out, hi, src[b:b + m], lo, wgt[kk], wgt[kk + 1], wgt[kk + 2])
                            else:
                                _taps(out, lo, src[b:b + m], hi, wgt[kk], wgt[kk + 1], wgt[kk + 2])
                            continue
                        for kx in range(0, ks, 3):
                            left = ks - kx
                            if left >= 3:
                                _taps(out, _tap_src(src, shifted, size, b, m, r, sg * (kx - r)),
                                      _tap_src(src, shifted, size, b, m, r, sg * (kx + 1 - r)),
                                      _tap_src(src, shifted, size, b, m, r, sg * (kx + 2 - r)),
                                      wgt[kk + kx], wgt[kk + kx + 1], wgt[kk + kx + 2])
                            elif left == 2:
                                _taps2(out, _tap_src(src, shifted, size, b, m, r, sg * (kx - r)),
                                       _tap_src(src, shifted, size, b, m, r, sg * (kx + 1 - r)), wgt[kk + kx],
                                       wgt[kk + kx + 1])
                            else:
                                _tap1(out, _tap_src(src, shifted, size, b, m, r, sg * (kx - r)), wgt[kk + kx])


@njit(fastmath=_DOT, cache=True)
def _dot3(d, a, b, c):
    """(d . a, d . b, d . c): three dot products in one pass, d loaded once."""
    s0, s1, s2 = np.float32(0), np.float32(0), np.float32(0)
    for k in range(d.shape[0]):
        s0 += d[k] * a[k]
        s1 += d[k] * b[k]
        s2 += d[k] * c[k]
    return s0, s1, s2


@njit(fastmath=_DOT, cache=True)
def _dot12(g0, g1, g2, g3, a, b, c, gw, k0, step):
    """gw[k0 + j * step + t] += g_j . (a, b, c)[t] for four outputs j and three taps t: twelve dot products in one
    pass, each load serving three or four of them."""
    s0, s1, s2, s3, s4, s5 = np.float32(0), np.float32(0), np.float32(0), np.float32(0), np.float32(0), np.float32(0)
    s6, s7, s8, s9, s10, s11 = np.float32(0), np.float32(0), np.float32(0), np.float32(0), np.float32(0), np.float32(0)
    for k in range(g0.shape[0]):
        ak, bk, ck = a[k], b[k], c[k]
        s0 += g0[k] * ak
        s1 += g0[k] * bk
        s2 += g0[k] * ck
        s3 += g1[k] * ak
        s4 += g1[k] * bk
        s5 += g1[k] * ck
        s6 += g2[k] * ak
        s7 += g2[k] * bk
        s8 += g2[k] * ck
        s9 += g3[k] * ak
        s10 += g3[k] * bk
        s11 += g3[k] * ck
    gw[k0] += s0
    gw[k0 + 1] += s1
    gw[k0 + 2] += s2
    gw[k0 + step] += s3
    gw[k0 + step + 1] += s4
    gw[k0 + step + 2] += s5
    gw[k0 + 2 * step] += s6
    gw[k0 + 2 * step + 1] += s7
    gw[k0 + 2 * step + 2] += s8
    gw[k0 + 3 * step] += s9
    gw[k0 + 3 * step + 1] += s10
    gw[k0 + 3 * step + 2] += s11


@njit(fastmath=_FMA, cache=True)
def _weight_grad(dz, src, shifted, cin, cout, h, w, nb, ks, gw, gb):
    """gw [cout, cin, ks, ks] = correlation of the pre-activation gradient dz [cout, h, w, nb] with the conv's
    input src [cin, h, w, nb] (`shifted`: src moved along its rows); gb [cout] = dz summed. A kernel row's taps are
    one pass of three dot products, 3 x 3 kernels four outputs at a time (twelve dot products), band by band of
    WBAND floats of the planes (each band's sums added in band order)."""
    row = w * nb
    n = h * row
    r = ks // 2
    size = cin * n
    kk2 = ks * ks
    for o in range(cout):
        gb[o] = _sum(dz[o * n:(o + 1) * n])
    gw[:cout * cin * kk2] = 0
    for p0 in range(0, n, WBAND):
        p1 = min(n, p0 + WBAND)
        for o0 in range(0, cout, 4):
            quad = ks == 3 and o0 + 4 <= cout
            for i in range(cin):
                for ky in range(ks):
                    dy = ky - r
                    q0, q1 = _span(p0, p1, h, row, dy)
                    if q1 <= q0:
                        continue
                    b, m = i * n + q0 + dy * row, q1 - q0
                    if quad:
                        _dot12(dz[o0 * n + q0:o0 * n + q1], dz[(o0 + 1) * n + q0:(o0 + 1) * n + q1],
                               dz[(o0 + 2) * n + q0:(o0 + 2) * n + q1], dz[(o0 + 3) * n + q0:(o0 + 3) * n + q1],
                               shifted[b:b + m], src[b:b + m], shifted[size + b:size + b + m], gw,
                               (o0 * cin + i) * kk2 + 3 * ky, cin * kk2)
                        continue
                    for o in range(o0, min(cout, o0 + 4)):
                        k = (o * cin + i) * kk2 + ks * ky
                        g = dz[o * n + q0:o * n + q1]
                        if ks == 3:  # sliced directly: through _tap_src the dots ran 3x slower
                            s0, s1, s2 = _dot3(g, shifted[b:b + m], src[b:b + m], shifted[size + b:size + b + m])
                            gw[k] += s0
                            gw[k + 1] += s1
                            gw[k + 2] += s2
                            continue
                        for kx in range(0, ks, 3):
                            if ks - kx >= 3:
                                s0, s1, s2 = _dot3(g, _tap_src(src, shifted, size, b, m, r, kx - r),
                                                   _tap_src(src, shifted, size, b, m, r, kx + 1 - r),
                                                   _tap_src(src, shifted, size, b, m, r, kx + 2 - r))
                                gw[k + kx] += s0
                                gw[k + kx + 1] += s1
                                gw[k + kx + 2] += s2
                            else:
                                for t in range(kx, ks):
                                    gw[k + t] += _dot(g, _tap_src(src, shifted, size, b, m, r, t - r))


@njit(fastmath=_FMA, cache=True)
def _relu(v):
    for k in range(v.shape[0]):
        a = v[k]
        v[k] = a if a > 0 or a != a else np.float32(0)


@njit(fastmath=_FMA, cache=True)
def _relu_grad(act, d):
    """d *= (act > 0) in place: the gradient at the pre-activation from the one at the ReLU output act."""
    for k in range(d.shape[0]):
        d[k] = d[k] if act[k] > 0 else np.float32(0)


@njit(inline="always")
def _max4(a, b, c, d):
    """The maximum of a 2x2 window in scan order as nn.MaxPool2d takes it: a NaN wins."""
    m = a
    if b > m or b != b:
        m = b
    if c > m or c != c:
        m = c
    if d > m or d != d:
        m = d
    return m


@njit(fastmath=_FMA, cache=True)
def _pool(src, c, h, w, nb, avg, dst):
    """2x2 max-pool (floor) [c, h, w, nb] -> [c, h // 2, w // 2, nb]: the first maximum in scan order, NaN wins,
    as nn.MaxPool2d; with avg, the window's mean as nn.AvgPool2d (summed in scan order, then divided by 4)."""
    h2, w2 = h // 2, w // 2
    for o in range(c):
        for y in range(h2):
            for x in range(w2):
                t = ((o * h + 2 * y) * w + 2 * x) * nb
                a, b = src[t:t + nb], src[t + nb:t + 2 * nb]
                cc, d = src[t + w * nb:t + w * nb + nb], src[t + w * nb + nb:t + w * nb + 2 * nb]
                t2 = ((o * h2 + y) * w2 + x) * nb
                out = dst[t2:t2 + nb]
                if avg:
                    for k in range(nb):
                        out[k] = (a[k] + b[k] + cc[k] + d[k]) / np.float32(4)
                else:
                    for k in range(nb):
                        out[k] = _max4(a[k], b[k], cc[k], d[k])


@njit(fastmath=_FMA, cache=True)
def _unpool(act, dout, c, h, w, nb, avg, dz):
    """Backward of a 2x2 pool: the gradient dout [c, h // 2, w // 2, nb] of the pooled output, as the gradient dz
    [c, h, w, nb] of its input act: max: all to the position the pool took (none where the maximum is NaN or not
    positive: the ReLU before the pool passes nothing there either); avg: a quarter to each."""
    dz[:c * h * w * nb] = 0  # rows and columns the floor dropped
    if avg:
        _unpool_avg(dout, c, h, w, nb, dz)
    else:
        _unpool_max(act, dout, c, h, w, nb, dz)


@njit(fastmath=_FMA, cache=True)
def _unpool_avg(dout, c, h, w, nb, dz):
    h2, w2 = h // 2, w // 2
    for o in range(c):
        for y in range(h2):
            for x in range(w2):
                t = ((o * h + 2 * y) * w + 2 * x) * nb
                u = t + w * nb
                za, zb, zc, zd = dz[t:t + nb], dz[t + nb:t + 2 * nb], dz[u:u + nb], dz[u + nb:u + 2 * nb]
                t2 = ((o * h2 + y) * w2 + x) * nb
                g = dout[t2:t2 + nb]
                for k in range(nb):
                    q = g[k] / np.float32(4)
                    za[k], zb[k], zc[k], zd[k] = q, q, q, q


@njit(fastmath=_FMA, cache=True)
def _unpool_max(act, dout, c, h, w, nb, dz):
    h2, w2 = h // 2, w // 2
    for o in range(c):
        for y in range(h2):
            for x in range(w2):
                t = ((o * h + 2 * y) * w + 2 * x) * nb
                u = t + w * nb
                a, b, cc, d = act[t:t + nb], act[t + nb:t + 2 * nb], act[u:u + nb], act[u + nb:u + 2 * nb]
                za, zb, zc, zd = dz[t:t + nb], dz[t + nb:t + 2 * nb], dz[u:u + nb], dz[u + nb:u + 2 * nb]
                t2 = ((o * h2 + y) * w2 + x) * nb
                g = dout[t2:t2 + nb]
                for k in range(nb):  # branch-free, so that it vectorizes
                    m = _max4(a[k], b[k], cc[k], d[k])
                    left = g[k] if m > 0 else np.float32(0)
                    za[k] = left if a[k] == m else np.float32(0)
                    left = np.float32(0) if a[k] == m else left
                    zb[k] = left if b[k] == m else np.float32(0)
                    left = np.float32(0) if b[k] == m else left
                    zc[k] = left if cc[k] == m else np.float32(0)
                    zd[k] = np.float32(0) if cc[k] == m else left


@njit(fastmath=_FMA, cache=True)
def _columns(src, c, h, w, nb, ks, out):
    """What a stride-2 conv reads, as ks copies of src [c, h, w, nb] with every second column: copy kx
    [c, h, ceil(w / 2), nb] holds src's columns 2 x2 + kx - ks // 2 (zero past the edge), so that each kernel tap
    of an output row is one pass over a whole row of a copy."""
    w2 = (w + 1) // 2
    r = ks // 2
    size = c * h * w2 * nb
    for kx in range(ks):
        for i in range(c):
            for y in range(h):
                to, frm = kx * size + (i * h + y) * w2 * nb, (i * h + y) * w * nb
                for x2 in range(w2):
                    x = 2 * x2 + kx - r
                    d = out[to + x2 * nb:to + (x2 + 1) * nb]
                    if 0 <= x < w:
                        d[:] = src[frm + x * nb:frm + (x + 1) * nb]
                    else:
                        d[:] = 0


@njit(fastmath=_FMA, cache=True)
def _conv_s2(cols, wgt, cin, cout, h, w, nb, ks, dst):
    """dst [cout, ceil(h / 2), ceil(w / 2), nb] += the stride-2 conv (weight wgt [cout, cin, ks, ks], padding
    ks // 2) of the input whose column copies are cols (`_columns`): output row by output row (each stays in L1
    over all inputs and taps), 3 x 3 kernels four outputs at a time."""
    h2 = (h + 1) // 2
    m = (w + 1) // 2 * nb  # one row of the output or of a copy
    n2, size, kk2, r = h2 * m, cin * h * m, ks * ks, ks // 2
    for y2 in range(h2):
        a = y2 * m
        for o0 in range(0, cout, 4):
            quad = ks == 3 and o0 + 4 <= cout
            for i in range(cin):
                for ky in range(ks):
                    y = 2 * y2 + ky - r
                    if y < 0 or y >= h:
                        continue
                    b = (i * h + y) * m
                    if quad:
                        k0 = (o0 * cin + i) * kk2 + 3 * ky
                        _taps4(dst[o0 * n2 + a:o0 * n2 + a + m], dst[(o0 + 1) * n2 + a:(o0 + 1) * n2 + a + m],
                               dst[(o0 + 2) * n2 + a:(o0 + 2) * n2 + a + m],
                               dst[(o0 + 3) * n2 + a:(o0 + 3) * n2 + a + m], cols[b:b + m],
                               cols[size + b:size + b + m], cols[2 * size + b:2 * size + b + m],
                               _w12(wgt, k0, k0 + cin * kk2, k0 + 2 * cin * kk2, k0 + 3 * cin * kk2))
                        continue
                    for o in range(o0, min(cout, o0 + 4)):
                        kk = (o * cin + i) * kk2 + ks * ky
                        out = dst[o * n2 + a:o * n2 + a + m]
                        for kx in range(0, ks, 3):
                            c0 = kx * size + b
                            if ks - kx >= 3:
                                _taps(out, cols[c0:c0 + m], cols[c0 + size:c0 + size + m],
                                      cols[c0 + 2 * size:c0 + 2 * size + m], wgt[kk + kx], wgt[kk + kx + 1],
                                      wgt[kk + kx + 2])
                            elif ks - kx == 2:
                                _taps2(out, cols[c0:c0 + m], cols[c0 + size:c0 + size + m], wgt[kk + kx],
                                       wgt[kk + kx + 1])
                            else:
                                _tap1(out, cols[c0:c0 + m], wgt[kk + kx])


@njit(fastmath=_FMA, cache=True)
def _weight_grad_s2(dz, cols, cin, cout, h, w, nb, ks, gw, gb):
    """The weight gradient gw [cout, cin, ks, ks] of `_conv_s2` from its output gradient dz and its input's
    column copies cols, row by row of the output (sums added in row order); gb [cout] = dz summed."""
    h2 = (h + 1) // 2
    m = (w + 1) // 2 * nb
    n2, size, kk2, r = h2 * m, cin * h * m, ks * ks, ks // 2
    for o in range(cout):
        gb[o] = _sum(dz[o * n2:(o + 1) * n2])
    gw[:cout * cin * kk2] = 0
    for y2 in range(h2):
        a = y2 * m
        for o0 in range(0, cout, 4):
            quad = ks == 3 and o0 + 4 <= cout
            for i in range(cin):
                for ky in range(ks):
                    y = 2 * y2 + ky - r
                    if y < 0 or y >= h:
                        continue
                    b = (i * h + y) * m
                    if quad:
                        _dot12(dz[o0 * n2 + a:o0 * n2 + a + m], dz[(o0 + 1) * n2 + a:(o0 + 1) * n2 + a + m],
                               dz[(o0 + 2) * n2 + a:(o0 + 2) * n2 + a + m],
                               dz[(o0 + 3) * n2 + a:(o0 + 3) * n2 + a + m], cols[b:b + m],
                               cols[size + b:size + b + m], cols[2 * size + b:2 * size + b + m], gw,
                               (o0 * cin + i) * kk2 + 3 * ky, cin * kk2)
                        continue
                    for o in range(o0, min(cout, o0 + 4)):
                        k = (o * cin + i) * kk2 + ks * ky
                        g = dz[o * n2 + a:o * n2 + a + m]
                        for kx in range(ks):
                            gw[k + kx] += _dot(g, cols[kx * size + b:kx * size + b + m])


@njit(fastmath=_FMA, cache=True, inline="always")
def _taps_t4(d0, d1, d2, g0, g1, g2, g3, w):
    """d_t += w[t] g0 + w[3 + t] g1 + w[6 + t] g2 + w[9 + t] g3 for three taps t: a transposed kernel row of four
    outputs' gradients."""
    for k in range(d0.shape[0]):
        a, b, c, e = g0[k], g1[k], g2[k], g3[k]
        d0[k] = d0[k] + w[0] * a + w[3] * b + w[6] * c + w[9] * e
        d1[k] = d1[k] + w[1] * a + w[4] * b + w[7] * c + w[10] * e
        d2[k] = d2[k] + w[2] * a + w[5] * b + w[8] * c + w[11] * e


@njit(fastmath=_FMA, cache=True)
def _conv_s2_input_grad(dz, wgt, cin, cout, h, w, nb, ks, dcols, din):
    """din [cin, h, w, nb] += the input gradient of `_conv_s2` (weight wgt [cout, cin, ks, ks]) from its output
    gradient dz: first the gradient of the column copies into dcols (room for ks copies), then each copy's columns
    added where they came from."""
    h2, w2 = (h + 1) // 2, (w + 1) // 2
    m = w2 * nb
    n2, size, kk2, r = h2 * m, cin * h * m, ks * ks, ks // 2
    dcols[:ks * size] = 0
    for y2 in range(h2):
        a = y2 * m
        for o0 in range(0, cout, 4):
            quad = ks == 3 and o0 + 4 <= cout
            for i in range(cin):
                for ky in range(ks):
                    y = 2 * y2 + ky - r
                    if y < 0 or y >= h:
                        continue
                    b = (i * h + y) * m
                    if quad:
                        k0 = (o0 * cin + i) * kk2 + 3 * ky
                        _taps_t4(dcols[b:b + m], dcols[size + b:size + b + m], dcols[2 * size + b:2 * size + b + m],
                                 dz[o0 * n2 + a:o0 * n2 + a + m], dz[(o0 + 1) * n2 + a:(o0 + 1) * n2 + a + m],
                                 dz[(o0 + 2) * n2 + a:(o0 + 2) * n2 + a + m],
                                 dz[(o0 + 3) * n2 + a:(o0 + 3) * n2 + a + m],
                                 _w12(wgt, k0, k0 + cin * kk2, k0 + 2 * cin * kk2, k0 + 3 * cin * kk2))
                        continue
                    for o in range(o0, min(cout, o0 + 4)):
                        kk = (o * cin + i) * kk2 + ks * ky
                        g = dz[o * n2 + a:o * n2 + a + m]
                        for kx in range(ks):
                            _tap1(dcols[kx * size + b:kx * size + b + m], g, wgt[kk + kx])
    for kx in range(ks):
        for i in range(cin):
            for y in range(h):
                frm, to = kx * size + (i * h + y) * m, (i * h + y) * w * nb
                for x2 in range(w2):
                    x = 2 * x2 + kx - r
                    if 0 <= x < w:
                        d, s = din[to + x * nb:to + (x + 1) * nb], dcols[frm + x2 * nb:frm + (x2 + 1) * nb]
                        for k in range(nb):
                            d[k] += s[k]


@njit(fastmath=_DOT, cache=True)
def _sq_dev(u, m):
    """sum((u - m)^2)."""
    s = np.float32(0)
    for k in range(u.shape[0]):
        d = u[k] - m
        s += d * d
    return s


@njit(fastmath=_FMA, cache=True)
def _batch_norm(z, cout, n, stats, smean, svar, invstd):
    """Training-mode BatchNorm's statistics: each channel of z [cout, n] (n = H * W * B) normalized in place with
    its batch mean and biased variance, the inverse standard deviations into invstd [cout]; the running mean and
    (unbiased) variance at stats[smean:] and stats[svar:] moved by BN_MOMENTUM, rounded as torch's mul_ then add_
    with alpha."""
    keep, mom = np.float32(1 - BN_MOMENTUM), np.float32(BN_MOMENTUM)
    unbias = np.float32(n / max(n - 1, 1))
    for o in range(cout):
        zo = z[o * n:(o + 1) * n]
        mean = _sum(zo) / np.float32(n)
        var = _sq_dev(zo, mean) / np.float32(n)
        inv = np.float32(1) / np.sqrt(var + np.float32(BN_EPS))
        invstd[o] = inv
        for k in range(n):
            zo[k] = (zo[k] - mean) * inv
        stats[smean + o] = _fma(mom, mean, stats[smean + o] * keep)
        stats[svar + o] = _fma(mom, var * unbias, stats[svar + o] * keep)


@njit(fastmath=_FMA, cache=True)
def _scale_shift(z, scale, shift, skip, out):
    """out = z * scale + shift (+ skip when it is not empty)."""
    if skip.shape[0]:
        for k in range(out.shape[0]):
            out[k] = z[k] * scale + shift + skip[k]
    else:
        for k in range(out.shape[0]):
            out[k] = z[k] * scale + shift


@njit(fastmath=_FMA, cache=True)
def _batch_norm_grad(d, xhat, gamma, invstd, n):
    """Backward of z -> gamma * xhat + beta for one channel (xhat from the batch statistics, n entries): d, the
    gradient of the output, becomes the gradient of z in place. Returns (d gamma, d beta)."""
    dbeta = _sum(d)
    dgamma = _dot(d, xhat)
    scale = gamma * invstd / np.float32(n)
    fn = np.float32(n)
    for k in range(d.shape[0]):
        d[k] = scale * (fn * d[k] - dbeta - xhat[k] * dgamma)
    return dgamma, dbeta


# The dense layers' product on rows of floats, register-blocked: `gemm_rows` computes a dense layer's forward, its
# input gradient and its weight gradient. numba has no vector types, and LLVM keeps a loop's outputs in memory when
# its innermost loop runs along them (a load and a store per multiply-add pair), so the inner block is written in
# LLVM IR (`_tile_intrinsic`): ROWS output rows of VECS x LANES floats held in vector registers over the whole sum,
# one fused multiply-add per term in the order of j, the same operations per float as the plain loop
# (`_rows_plain`) that takes the lanes left over: the same bits whatever the tile shape or where a lane falls.
# One core of the 2-core AVX-512 CPU, 64 x 64 weights, B = 32, hot in cache: 51 GFLOP/s (the plain loop, four rows
# and two inputs per pass) -> 256 (8 rows x 32 floats). It lives in this file because numba's cache checks only
# the file of the function it caches: a kernel here would keep running an old product from another file.
LANES = 16  # floats per vector of the tile (one AVX-512 register, two AVX2 ones)


def _wide() -> bool:
    """Whether numba compiles for AVX-512 (32 vector registers): the tile then holds 8 rows x 2 vectors; with
    AVX2's 16 registers of 8 floats, 4 rows x 1 vector (8 registers) so that nothing spills."""
    features = config.CPU_FEATURES if config.CPU_FEATURES is not None else get_host_cpu_features()
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


@njit(fastmath=_FMA, cache=True)
def _dense(src, prm, wo, bo, fin, fout, nb, dst):
    """dst [fout, nb] = W src + b for src [fin, nb], W [fout, fin] at prm[wo:], b at prm[bo:]."""
    for k in range(fout):
        dst[k * nb:(k + 1) * nb] = prm[bo + k]
    gemm_rows(prm[wo:wo + fout * fin], fin, 1, src, fin, fout, nb, dst)


@njit(fastmath=_FMA, cache=True)
def _dense_weight_grad(dout, src, fin, fout, nb, tr, gw):
    """gw [fout, fin] = dout [fout, nb] src^T for a dense layer's input src [fin, nb]: src transposed into tr
    [nb, fin], then an outer product per example, added in example order (one fused multiply-add each: the sum's
    order depends on nb alone). 2.2x a dot product per weight (64 x 64, B = 32), whose horizontal sums dominated."""
    for b in range(nb):  # contiguous writes: 1.5x the contiguous reads' order (64 x 32)
        t = tr[b * fin:(b + 1) * fin]
        for i in range(fin):
            t[i] = src[i * nb + b]
    gw[:] = 0
    gemm_rows(dout, nb, 1, tr, nb, fout, fin, gw)


_M31 = 0x7FFFFFFF
_MIX = 0x45D9F3B


@njit(inline="always")
def _mix(h):
    h = ((h ^ (h >> 16)) * _MIX) & _M31
    h = ((h ^ (h >> 16)) * _MIX) & _M31
    return h ^ (h >> 16)


@njit(cache=True)
def _draw(seed, epoch, n, which):
    """Draw `which` (0..4) of example n for a network with order seed `seed` in `epoch`: `augment.hash5`."""
    h = _mix(((n * 8 + which) & _M31) ^ _mix(epoch & _M31))
    h = _mix(h ^ ((seed >> 31) & _M31))
    return _mix(h ^ (seed & _M31))


@njit(fastmath=_FMA, cache=True)
def _gather_augmented(x, idx, mean, std, nb, aug, seed, act):
    """The input block [C, H, W, nb] of batch idx, each example transformed as `fastpop.data.augment.apply` by its
    own draws. aug: (flip, crop, cutout, epoch)."""
    c0, h0, w0 = x.shape[1], x.shape[2], x.shape[3]
    flip_on, crop, cut, epoch = aug[0], aug[1], aug[2], aug[3]
    for b in range(nb):
        n = idx[b]
        flip = _draw(seed, epoch, n, 0) & 1 if flip_on else 0
        dy = _draw(seed, epoch, n, 1) % (2 * crop + 1) - crop
        dx = _draw(seed, epoch, n, 2) % (2 * crop + 1) - crop
        top = _draw(seed, epoch, n, 3) % h0 - cut // 2
        left = _draw(seed, epoch, n, 4) % w0 - cut // 2
        for c in range(c0):
            for y in range(h0):
                sy = y + dy
                for xx in range(w0):
                    v = np.float32(0)
                    cutout = cut > 0 and top <= y < top + cut and left <= xx < left + cut
                    sx = (w0 - 1 - xx if flip else xx) + dx
                    if not cutout and 0 <= sy < h0 and 0 <= sx < w0:
                        v = (np.float32(x[n, c, sy, sx]) - mean[c]) / std[c]
                    act[((c * h0 + y) * w0 + xx) * nb + b] = v


@njit(fastmath=_FMA, cache=True)
def _forward(x, idx, mean, std, lut, prm, ops, head, nb, act, logits, gather, aug, seed, stats, training):
    """One network's forward pass on its batch idx [nb]: activations into act, logits [K, nb]. With gather False
    the input block (and a first conv's shifted copies) in act are already those of idx (the previous network's
    batch). aug: (flip, crop, cutout, epoch), all zero for none; seed: the network's order seed. stats: the
    BatchNorm running statistics (where ops points), which BatchNorm normalizes with when not training, and which
    training updates in place. lut [C * 256]: for 8-bit images, every value normalized ((v - mean) / std, the same
    bits), else empty: a lookup instead of a division per pixel made the mlp's gather 2.4x faster."""
    if gather and (aug[0] or aug[1] or aug[2]):
        _gather_augmented(x, idx, mean, std, nb, aug, seed, act)
    elif gather and lut.shape[0]:
        c0, h0, w0 = x.shape[1], x.shape[2], x.shape[3]
        for c in range(c0):
            table = lut[c * 256:(c + 1) * 256]
            for y in range(h0):
                for xx in range(w0):
                    a = act[((c * h0 + y) * w0 + xx) * nb:((c * h0 + y) * w0 + xx + 1) * nb]
                    for b in range(nb):
                        a[b] = table[np.intp(x[idx[b], c, y, xx])]  # typed for any x; taken for uint8
    elif gather:
        c0, h0, w0 = x.shape[1], x.shape[2], x.shape[3]
        for c in range(c0):
            for y in range(h0):
                for xx in range(w0):
                    base = ((c * h0 + y) * w0 + xx) * nb
                    for b in range(nb):
                        act[base + b] = (np.float32(x[idx[b], c, y, xx]) - mean[c]) / std[c]
    last = ops.shape[0] - 1
    for l in range(ops.shape[0]):
        kind, c, h, w, cout = ops[l, KIND], ops[l, C], ops[l, H], ops[l, W], ops[l, OUTC]
        n = h * w * nb
        src = act[ops[l, IN]:ops[l, IN] + c * n]
        if kind == CONV:
            ks, stride, bn, bo = ops[l, K], ops[l, STRIDE], ops[l, BN], ops[l, BOFF]
            n2 = ((h + stride - 1) // stride) * ((w + stride - 1) // stride) * nb  # output pixels times nb
            out = act[ops[l, OUT]:ops[l, OUT] + cout * n2]
            z = act[ops[l, XHAT]:ops[l, XHAT] + cout * n2] if bn else out  # the conv's own output
            for o in range(cout):
                z[o * n2:(o + 1) * n2] = 0 if bn else prm[bo + o]
            sh, wo = ops[l, SHIFT], ops[l, WOFF]
            if stride != 1:
                cols = act[sh:sh + ks * c * h * ((w + 1) // 2) * nb]
                if gather or l > 0:
                    _columns(src, c, h, w, nb, ks, cols)
                _conv_s2(cols, prm[wo:wo + cout * c * ks * ks], c, cout, h, w, nb, ks, z)
            else:
                shifted = act[sh:sh + (ks - 1) * c * n]
                if ks > 1 and (gather or l > 0):
                    _shift(src, c, h, w, nb, ks // 2, shifted)
                _conv(src, shifted, prm[wo:wo + cout * c * ks * ks], False, c, cout, h, w, nb, ks, z)
            skip = act[ops[l, SKIP]:ops[l, SKIP] + cout * n2] if ops[l, SKIP] >= 0 else act[:0]
            if bn:
                so, sv, be = ops[l, SOFF], ops[l, SVAR], ops[l, BETA]
                if training:
                    _batch_norm(z, cout, n2, stats, so, sv, act[ops[l, XHAT] + cout * n2:])
                for o in range(cout):
                    if training:
                        scale, shift = prm[bo + o], prm[be + o]
                    else:
                        scale = prm[bo + o] / np.sqrt(stats[sv + o] + np.float32(BN_EPS))  # as the reference
                        shift = prm[be + o] - stats[so + o] * scale
                    _scale_shift(z[o * n2:(o + 1) * n2], scale, shift, skip[o * n2:(o + 1) * n2] if skip.shape[0]
                                 else skip, out[o * n2:(o + 1) * n2])
            elif skip.shape[0]:
                for k in range(cout * n2):
                    out[k] += skip[k]
            if ops[l, RELU]:
                _relu(out)
        elif kind == MAXPOOL or kind == AVGPOOL:
            o = ops[l, OUT]
            _pool(src, c, h, w, nb, kind == AVGPOOL, act[o:o + c * (h // 2) * (w // 2) * nb])
        elif kind == GAP:
            g = act[ops[l, OUT]:ops[l, OUT] + c * nb]
            hw = h * w
            for o in range(c):
                go = g[o * nb:(o + 1) * nb]
                go[:] = 0
                for p in range(hw):
                    s = src[(o * hw + p) * nb:(o * hw + p + 1) * nb]
                    for b in range(nb):
                        go[b] += s[b]
                for b in range(nb):
                    go[b] /= hw
        elif kind == DENSE:
            if l == last:
                _dense(src, prm, ops[l, WOFF], ops[l, BOFF], c, cout, nb, logits.reshape(-1))
            else:
                out = act[ops[l, OUT]:ops[l, OUT] + cout * nb]
                _dense(src, prm, ops[l, WOFF], ops[l, BOFF], c, cout, nb, out)
                if ops[l, RELU]:
                    _relu(out)
        # FLAT: [C, H, W, nb] is already [C*H*W, nb]


@njit(fastmath=_FMA, cache=True)
def _backward(y, prm, ops, head, nb, act, logits, grad, gops, dact, smoothing):
    """One network's mean cross-entropy over its batch (labels y [nb]; label smoothing as F.cross_entropy's),
    from the activations of `_forward`; its gradient into grad, at the parameter offsets of the op table gops (ops
    itself, or the offsets in one network's own row). logits [K, nb] are overwritten with the loss's gradient."""
    k_out = logits.shape[0]
    inv = np.float32(1) / nb
    loss = 0.0
    for b in range(nb):
        m, ly = logits[0, b], logits[y[b], b]
        for k in range(1, k_out):
            m = max(m, logits[k, b])
        s = np.float32(0)
        mean_z = 0.0
        for k in range(k_out):
            mean_z += logits[k, b]
            e = np.float32(math.exp(logits[k, b] - m))
            logits[k, b] = e
            s += e
        if smoothing > 0:  # (1 - e) * nll + e * the mean over classes of -log p_k
            lse = math.log(s) + m
            loss += (1 - smoothing) * (lse - ly) + smoothing * (lse - mean_z / k_out)
        else:
            loss += math.log(s) - (ly - m)
        r = inv / s
        for k in range(k_out):
            logits[k, b] *= r
        if smoothing > 0:
            off = inv * np.float32(smoothing) / k_out
            for k in range(k_out):
                logits[k, b] -= off
            logits[y[b], b] -= inv * np.float32(1 - smoothing)
        else:
            logits[y[b], b] -= inv
    last = ops.shape[0] - 1
    dlogits = logits.reshape(-1)
    masked = False  # the gradient at this layer's output already carries its ReLU's mask (set by the next layer)
    for l in range(last, -1, -1):
        kind, c, h, w, cout = ops[l, KIND], ops[l, C], ops[l, H], ops[l, W], ops[l, OUTC]
        n = h * w * nb
        i0, need_din = ops[l, IN], ops[l, DIN]
        relu_in = l > 0 and ops[l - 1, KIND] == CONV and ops[l - 1, RELU]  # its input is a conv's ReLU output
        mask_out = masked
        masked = False
        if kind == DENSE:
            dout = dlogits if l == last else dact[ops[l, OUT]:ops[l, OUT] + cout * nb]
            if ops[l, RELU]:
                _relu_grad(act[ops[l, OUT]:ops[l, OUT] + cout * nb], dout)
            wo, bo = ops[l, WOFF], ops[l, BOFF]
            for k in range(cout):
                grad[gops[l, BOFF] + k] = _sum(dout[k * nb:(k + 1) * nb])
            t = head[HEAD_WORK]
            _dense_weight_grad(dout, act[i0:i0 + c * nb], c, cout, nb, dact[t:t + c * nb],
                               grad[gops[l, WOFF]:gops[l, WOFF] + cout * c])
            if need_din:  # W^T dout: input i's weight from output k at W[k, i]
                din = dact[i0:i0 + c * nb]
                din[:] = 0
                gemm_rows(prm[wo:wo + cout * c], 1, c, dout, cout, c, nb, din)
        elif kind == GAP:
            if need_din:
                hw = h * w
                for o in range(c):
                    dg = dact[ops[l, OUT] + o * nb:ops[l, OUT] + (o + 1) * nb]
                    for b in range(nb):
                        dg[b] /= hw
                    for p in range(hw):
                        a = act[i0 + (o * hw + p) * nb:i0 + (o * hw + p + 1) * nb]
                        dz = dact[i0 + (o * hw + p) * nb:i0 + (o * hw + p + 1) * nb]
                        for b in range(nb):  # the conv's ReLU mask, applied here in the same pass
                            dz[b] = dg[b] if not relu_in or a[b] > 0 else np.float32(0)
                masked = relu_in
        elif kind == MAXPOOL or kind == AVGPOOL:
            if need_din:
                o = ops[l, OUT]
                _unpool(act[i0:i0 + c * n], dact[o:o + c * (h // 2) * (w // 2) * nb], c, h, w, nb, kind == AVGPOOL,
                        dact[i0:i0 + c * n])
                masked = kind == MAXPOOL and relu_in  # only a positive maximum passes a gradient
        elif kind == CONV:
            ks, out, wo, bo, sh = ops[l, K], ops[l, OUT], ops[l, WOFF], ops[l, BOFF], ops[l, SHIFT]
            stride, bn, xo = ops[l, STRIDE], ops[l, BN], ops[l, XHAT]
            n2 = ((h + stride - 1) // stride) * ((w + stride - 1) // stride) * nb
            dz = dact[out:out + cout * n2]
            if ops[l, RELU] and not mask_out:
                _relu_grad(act[out:out + cout * n2], dz)  # the pre-activation gradient
            if ops[l, SKIP] >= 0:  # the skip's gradient is the same; it is the first to write there
                dact[ops[l, SKIP]:ops[l, SKIP] + cout * n2] = dz
            if bn:
                for o in range(cout):
                    grad[gops[l, BOFF] + o], grad[gops[l, BETA] + o] = _batch_norm_grad(
                        dz[o * n2:(o + 1) * n2], act[xo + o * n2:xo + (o + 1) * n2], prm[bo + o],
                        act[xo + cout * n2 + o], n2)
            # a conv before BatchNorm has no bias: its sums go to room after the inverse standard deviations
            gb = act[xo + cout * n2 + cout:xo + cout * n2 + 2 * cout] if bn else \
                grad[gops[l, BOFF]:gops[l, BOFF] + cout]
            if stride != 1:
                cols = ks * c * h * ((w + 1) // 2) * nb
                _weight_grad_s2(dz, act[sh:sh + cols], c, cout, h, w, nb, ks,
                                grad[gops[l, WOFF]:gops[l, WOFF] + cout * c * ks * ks], gb)
                if need_din:
                    din = dact[i0:i0 + c * n]
                    if not ops[l, ACC]:
                        din[:] = 0
                    t = head[HEAD_WORK]
                    _conv_s2_input_grad(dz, prm[wo:wo + cout * c * ks * ks], c, cout, h, w, nb, ks,
                                        dact[t:t + cols], din)
                continue
            _weight_grad(dz, act[i0:i0 + c * n], act[sh:sh + (ks - 1) * c * n], c, cout, h, w, nb, ks,
                         grad[gops[l, WOFF]:gops[l, WOFF] + cout * c * ks * ks], gb)
            if need_din:
                din = dact[i0:i0 + c * n]  # the gradient of this conv's input
                if not ops[l, ACC]:
                    din[:] = 0
                t = head[HEAD_WORK]
                shifted = dact[t:t + (ks - 1) * cout * n]
                if ks > 1:
                    _shift(dz, cout, h, w, nb, ks // 2, shifted)
                _conv(dz, shifted, prm[wo:wo + cout * c * ks * ks], True, cout, c, h, w, nb, ks, din)
        # FLAT: the gradient already lies where its input's does
    return loss / nb


@njit(parallel=True, cache=True)
def train_kernel(x, idx, y, mean, std, params, ptab, lo, ops, head, scratch, grads, loss, threads, aug, seeds,
                 smoothing, stats, stab, momentum_buf, lr, momentum, weight_decay, nesterov, frozen, lut):
    """Networks lo..lo + n: each one's loss [n] on its batch idx [n, B] with labels y [n, B], and its gradient,
    written into grads. params and grads are the population's flat layer-major buffers; ptab [m, 2] gives each
    parameter tensor's start in them and its size per network. aug (flip, crop, cutout, epoch) and seeds [n] (the
    networks' order seeds) draw each example's augmentation; smoothing: label smoothing. stats: the population's
    BatchNorm running statistics, flat layer-major as params (stab its ptab; empty without BatchNorm), updated in
    place with each network's batch statistics. threads:
    numba.get_num_threads(), passed in because a global read inside keeps numba from caching the kernel.

    With lr, momentum and weight_decay [n] (else empty), each network then takes its SGD step (`sgd_kernel`'s
    update, bit for bit) while its weights and gradient are still in cache; the gradient goes to a row of the
    thread's, not to grads, and nothing passes over the population's buffers again; the step asks for the
    thread's next network's weights and momentum as it goes (`PIECE`). A network frozen[p] (diverged before), or
    whose loss or running statistics are not finite (diverging now), is frozen as `sgd_kernel` freezes it: momentum
    zero, weights unmoved.

    The three parallel kernels here are cached, against the house rule (HOUSE.md: no cache on parallel=True,
    after a crash seen elsewhere when the thread count changed), because the alternatives cost too much: uncached
    they compiled for 11 s in every process (also with the per-thread work in cached serial functions, which the
    parallel body compiles again), and Python threads over nogil kernels ran 7-10% slower, likely because torch's
    OpenMP threads spin after its ops (with OMP_WAIT_POLICY=PASSIVE they matched prange). The cached kernels ran under
    NUMBA_NUM_THREADS 1 to 4, and a test runs them under a thread count other than the one that compiled them."""
    nb, k_out, p_all = idx.shape[1], head[HEAD_K], idx.shape[0]
    for t in prange(threads):  # one scratch per thread, networks t, t + threads, ...
        act = np.empty(scratch, np.float32)
        dact = np.empty(scratch, np.float32)
        logits = np.empty((k_out, nb), np.float32)
        own = ops.copy()
        fused = lr.shape[0] > 0
        row = np.empty(ptab[:, 1].sum() if fused else 0, np.float32)  # the gradient, in cache until the update
        for p in range(t, p_all, threads):
            _point(ops, ptab, stab, lo + p, own)
            _forward(x, idx[p], mean, std, lut, params, own, head, nb, act, logits, True, aug,
                     seeds[p] if seeds.shape[0] else 0, stats, True)
            if not fused:
                loss[p] = _backward(y[p], params, own, head, nb, act, logits, grads, own, dact, smoothing)
                continue
            loss[p] = _backward(y[p], params, own, head, nb, act, logits, row, ops, dact, smoothing)
            dead = frozen[p] or not math.isfinite(loss[p]) or not _finite_rows(stats, stab, lo + p)
            r = 0
            for j in range(ptab.shape[0]):
                a, n = ptab[j, 0] + (lo + p) * ptab[j, 1], ptab[j, 1]
                if dead:
                    momentum_buf[a:a + n] = 0
                else:  # in pieces, each followed by asking for the same piece of this thread's next network
                    ahead = threads * n if p + threads < p_all else 0
                    for c in range(a, a + n, PIECE):
                        e = min(a + n, c + PIECE)
                        _sgd(params[c:e], row[r + c - a:r + e - a], momentum_buf[c:e], frozen[:0], lr[p],
                             momentum[p], weight_decay[p], nesterov)
                        if ahead:
                            for k in range(c + ahead, e + ahead, 16):  # a cache line each
                                _prefetch(params, k)
                                _prefetch(momentum_buf, k)
                r += n


@njit(parallel=True, cache=True)
def score_kernel(x, idx, y, mean, std, params, ptab, ops, head, scratch, bits, byte0, loss, pred, threads, margin,
                 xent, stats, stab, lut):
    """Evaluation of networks 0..n on their batches idx [n, B] with labels y [n, B], as `reference.score_logits`
    on their logits: argmax == y (ties and NaN: the first, as torch.argmax) as bits into bits[:, byte0:] (little
    bit order, a last partial byte zero-padded), the cross-entropy summed over examples with y >= 0 into loss [n],
    the argmax into pred [n, B]. y = -1 marks a class the network was not trained on: wrong, and no loss. When
    margin and xent are [n, B] (not empty): each example's true-class logit minus the largest other, and its
    cross-entropy (NaN where y = -1). stats (stab its ptab): the networks' BatchNorm running statistics, which
    BatchNorm normalizes with."""
    per_example = margin.shape[0] > 0
    nb, k_out, n = idx.shape[1], head[HEAD_K], idx.shape[0]
    for t in prange(threads):
        act = np.empty(scratch, np.float32)
        own = ops.copy()
        logits = np.empty((k_out, nb), np.float32)
        right = np.zeros(-(-nb // 8) * 8, np.uint8)
        no_aug = np.zeros(4, np.int64)  # evaluation never augments
        for p in range(t, n, threads):
            _point(ops, ptab, stab, p, own)
            # evaluation shows every network the same examples: the input layer is gathered once per thread
            # (its gather and shifted copies cost 10% of an evaluation pass)
            gather = p < threads or not np.array_equal(idx[p], idx[p - threads])
            _forward(x, idx[p], mean, std, lut, params, own, head, nb, act, logits, gather, no_aug, 0, stats,
                     False)
            total = np.float32(0)
            for b in range(nb):
                best, at, m = logits[0, b], 0, logits[0, b]
                for k in range(1, k_out):
                    v = logits[k, b]
                    if (v > best or v != v) and best == best:
                        best, at = v, k
                    m = max(m, v)
                s = np.float32(0)
                for k in range(k_out):
                    s += np.float32(math.exp(logits[k, b] - m))
                pred[p, b] = at
                right[b] = at == y[p, b]
                yb = y[p, b]
                ce = np.float32(0)
                if yb >= 0:
                    ce = np.float32(math.log(s)) + m - logits[yb, b]
                    total += ce
                if per_example:
                    other = -np.inf
                    for k in range(k_out):
                        if k != yb:
                            other = max(other, logits[k, b])
                    margin[p, b] = logits[yb, b] - other if yb >= 0 else np.nan
                    xent[p, b] = ce if yb >= 0 else np.nan
            loss[p] = total
            for j in range(right.shape[0] // 8):
                v = 0
                for i in range(8):
                    v |= right[8 * j + i] << i
                bits[p, byte0 + j] = v


@njit(cache=True)
def _point(ops, ptab, stab, p, own):
    """own: the op table ops with its parameter offsets (WOFF, BOFF, BETA: into one network's parameter row) moved
    to where network p's parameters lie in a population's flat buffers, whose tensor j starts at ptab[j, 0] and
    holds ptab[j, 1] floats per network, network after network; its running statistics' offsets (SOFF, SVAR) the
    same way by stab. The kernels then read the weights and write the gradients in place: copying each network's
    row in and its gradient out cost 20% of the mlp's training kernel."""
    for l in range(ops.shape[0]):
        for col in (WOFF, BOFF, BETA, SOFF, SVAR):
            tab = stab if col == SOFF or col == SVAR else ptab
            off, start = ops[l, col], 0
            for j in range(tab.shape[0]):
                if off < start + tab[j, 1]:
                    own[l, col] = tab[j, 0] + p * tab[j, 1] + off - start
                    break
                start += tab[j, 1]


@intrinsic
def _prefetch(typingctx, a, i):
    """Ask for the cache line of a[i] (llvm.prefetch, read, into L2): the next network's weights and momentum come
    in while this one computes."""
    sig = types.void(a, types.intp)

    def codegen(context, builder, signature, args):
        ptr = builder.gep(context.make_array(signature.args[0])(context, builder, args[0]).data, [args[1]])
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        fn = builder.module.declare_intrinsic("llvm.prefetch", [i8p], ir.FunctionType(ir.VoidType(),
                                                                                      [i8p, i32, i32, i32]))
        builder.call(fn, [builder.bitcast(ptr, i8p), ir.Constant(i32, 0), ir.Constant(i32, 2), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _fma(typingctx, a, b, c):
    """a * b + c rounded once (llvm.fma.f32): what torch's add with alpha computes on this CPU."""
    def codegen(context, builder, signature, args):
        f32 = ir.FloatType()
        fn = builder.module.declare_intrinsic("llvm.fma", [f32], ir.FunctionType(f32, [f32, f32, f32]))
        return builder.call(fn, args)

    return types.float32(types.float32, types.float32, types.float32), codegen


@njit(inline="always")
def _overlap(blocks, j, lo, hi):
    """The part [a, b) of block j that lies in [lo, hi) (a >= b when none)."""
    return max(blocks[j, 0], lo), min(blocks[j, 1], hi)


@njit(parallel=True, cache=True)
def sgd_kernel(params, grads, momentum_buf, blocks, lr, momentum, weight_decay, frozen, threads, nesterov):
    """torch.optim.SGD's update (dampening 0) in one pass over the flat buffers, in place: block j [start, end)
    with its own scalars lr[j], momentum[j], weight_decay[j] (the groups of a grid; one block without). Entries
    where frozen (bool, or empty for none) is set get a zero gradient and momentum. The same bits as
    `reference.sgd_step`: fp32 scalars and torch's roundings (its add with alpha is a fused multiply-add, its mul_
    then add_ are not; no fastmath here, so nothing else is fused). One pass instead of torch's four."""
    n = params.shape[0]
    per = -(-n // threads)
    for t in prange(threads):
        for j in range(blocks.shape[0]):
            lo, hi = _overlap(blocks, j, t * per, min(n, (t + 1) * per))
            if lo >= hi:
                continue
            _sgd(params[lo:hi], grads[lo:hi], momentum_buf[lo:hi], frozen[lo:hi] if frozen.shape[0] else frozen,
                 lr[j], momentum[j], weight_decay[j], nesterov)


@njit(cache=True)
def _sgd(p, g, m, f, lr, mo, wd, nesterov):
    """SGD's update of entries p with gradients g and momentum m in place (see `sgd_kernel`); where the mask f (or
    nothing, when empty) is set, gradient and momentum zero and the weight unmoved."""
    for k in range(p.shape[0]):
        gk = _fma(wd, p[k], g[k]) if wd else g[k]
        mk = m[k] * mo + gk
        if f.shape[0] and f[k]:
            gk, mk = np.float32(0), np.float32(0)
        g[k] = gk
        m[k] = mk
        p[k] = _fma(-lr, _fma(mo, mk, gk) if nesterov else mk, p[k])


@njit(cache=True)
def _finite_rows(stats, stab, p):
    """Whether network p's running statistics (rows of a flat layer-major buffer, stab its ptab) are all finite."""
    for j in range(stab.shape[0]):
        a = stab[j, 0] + p * stab[j, 1]
        for k in range(a, a + stab[j, 1]):
            if not math.isfinite(stats[k]):
                return False
    return True


@njit(parallel=True, cache=True)
def adam_kernel(params, grads, exp_avg, exp_avg_sq, blocks, lr, beta1, beta2, eps, weight_decay, decoupled,
                step_size, bc2_sqrt, frozen, threads):
    """torch.optim.Adam's update (AdamW's with decoupled) in one pass, in place, block j with its own scalars (see
    `sgd_kernel`), within fp32 rounding of `reference.adam_step` (torch's lerp and addcdiv round in their own
    order); step_size[j] = lr[j] / (1 - beta1^t), bc2_sqrt = sqrt(1 - beta2^t). Frozen entries do not move."""
    n = params.shape[0]
    per = -(-n // threads)
    one = np.float32(1)
    for t in prange(threads):
        for j in range(blocks.shape[0]):
            lo, hi = _overlap(blocks, j, t * per, min(n, (t + 1) * per))
            if lo >= hi:
                continue
            lr_j, wd, ss = lr[j], weight_decay[j], step_size[j]
            p, g, m, v = params[lo:hi], grads[lo:hi], exp_avg[lo:hi], exp_avg_sq[lo:hi]
            f = frozen[lo:hi] if frozen.shape[0] else frozen
            for k in range(hi - lo):
                if frozen.shape[0] and f[k]:
                    g[k], m[k], v[k] = np.float32(0), np.float32(0), np.float32(0)
                    continue
                pk = p[k]
                gk = g[k]
                if wd and decoupled:
                    pk = pk * (one - lr_j * wd)
                elif wd:
                    gk = _fma(wd, pk, gk)
                mk = m[k] + (one - beta1) * (gk - m[k])
                vk = v[k] * beta2 + (one - beta2) * gk * gk
                g[k], m[k], v[k] = gk, mk, vk
                p[k] = pk - ss * mk / (math.sqrt(vk) / bc2_sqrt + eps)
