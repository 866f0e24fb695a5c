"""numba kernels for the CPU: a whole CNN (3x3 convs with padding 1, ReLU, optional 2x2 max-pool; global average
pool; one linear layer; cross-entropy) per network, forward and backward in training, forward and scoring in
evaluation, networks spread over the cores.

One network's activations for a batch (~200 KB for small-cnn at B = 32, as much again for their gradients) stay in
its core's L2 from the first layer to the last gradient, where the op-by-op torch path streams them through memory
between ops. Inside a network the layout is [C, H, W, B], batch innermost: the inner loops run along rows of B
contiguous floats or more, vectorizable even on 2x2 images; kernel rows that fall in the zero padding are skipped
(padding columns are multiplied, as the zeros of shifted copies).
Measured on the 2-core AVX-512 CPU, small-cnn, B = 32, P = 1000: the kernel alone went 35k (offsets in the
index) -> 154k (slices) -> 350k (vectorized pool backward) -> 535k net-images/s (shifted rows, below).

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
from numba.extending import intrinsic

_FMA = {"contract"}
_DOT = {"contract", "reassoc"}

# Columns of the per-layer table (int64 [L, 11]). Offsets count floats: WOFF/BOFF in the network's parameter row,
# IN/OUT/NEXT/SHIFT in its scratch, where activations and their gradients lie at the same offsets of two arrays:
# IN the conv's input [Cin, H, W, B], OUT its ReLU output [Cout, H, W, B], NEXT the next layer's input (the pooled
# output, or OUT), SHIFT the input shifted left and right [2, Cin, H, W, B]. The head table: dense weight and bias
# offsets, the offset of the pooled features g [C, B], classes, and where the gradient scratch has room for a
# pre-activation gradient shifted left and right (the transposed conv's input).
CIN, COUT, H, W, POOL, WOFF, BOFF, IN, OUT, NEXT, SHIFT = range(11)
HEAD_W, HEAD_B, HEAD_G, HEAD_K, HEAD_SHIFT = range(5)


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
def _shift(src, c, h, w, nb, left, right):
    """Copies of src [c, h, w, nb] moved one pixel along each row: left[x] = src[x - 1], right[x] = src[x + 1],
    zero past the edge. With them a conv's kernel row (three taps) is one pass over whole rows, without splitting
    rows at their edges: 2x faster convs and 1.6x faster weight gradients than per-row passes (small-cnn, B = 32)."""
    row = w * nb
    for b in range(0, c * h * row, row):
        s, sl, sr = src[b:b + row], left[b:b + row], right[b:b + row]
        sl[:nb] = 0
        sl[nb:] = s[:row - nb]
        sr[:row - nb] = s[nb:]
        sr[row - nb:] = 0


@njit(fastmath=_FMA, cache=True, inline="always")
def _taps(d, a, b, c, w0, w1, w2):
    """d += w0 * a + w1 * b + w2 * c: three taps per load and store of the output. Inlined into `_conv`: its
    slice arguments made the call cost 9% of a training step. (Inlining `_dot` instead drops its "reassoc" flag
    and with it the vectorized sum: 3.4x slower.)"""
    for k in range(d.shape[0]):
        d[k] = d[k] + w0 * a[k] + w1 * b[k] + w2 * c[k]


@njit(fastmath=_FMA, cache=True)
def _conv(src, left, right, wgt, transpose, cin, cout, h, w, nb, dst):
    """dst[o] += sum over i and the 3x3 taps of wgt * src[i] shifted, on [C, h, w, nb] blocks; left and right are
    src shifted (`_shift`). Forward (transpose False): wgt is [cout, cin, 3, 3]. Transposed, the input gradient
    of a forward conv with weight wgt [cin, cout, 3, 3] (so i runs over its output channels): taps mirrored."""
    row = w * nb
    n = h * row
    for o in range(cout):
        for i in range(cin):
            k0 = (o * cin + i) * 9 if not transpose else (i * cout + o) * 9
            for ky in range(3):
                dy = ky - 1 if not transpose else 1 - ky
                y0, y1 = max(0, -dy), min(h, h - dy)  # output rows whose input row y + dy exists
                a, b, m = o * n + y0 * row, i * n + (y0 + dy) * row, (y1 - y0) * row
                k = k0 + 3 * ky
                if transpose:
                    _taps(dst[a:a + m], right[b:b + m], src[b:b + m], left[b:b + m], wgt[k], wgt[k + 1], wgt[k + 2])
                else:
                    _taps(dst[a:a + m], left[b:b + m], src[b:b + m], right[b:b + m], wgt[k], wgt[k + 1], wgt[k + 2])


@njit(fastmath=_DOT, cache=True)
def _dot3(d, a, b, c):
    """(d . a, d . b, d . c): three dot products in one pass, d loaded once."""
    s0, s1, s2 = np.float32(0), np.float32(0), np.float32(0)
    for k in range(d.shape[0]):
        s0 += d[k] * a[k]
        s1 += d[k] * b[k]
        s2 += d[k] * c[k]
    return s0, s1, s2


@njit(fastmath=_FMA, cache=True)
def _weight_grad(dz, src, left, right, cin, cout, h, w, nb, gw, gb):
    """gw [cout, cin, 3, 3] = correlation of the pre-activation gradient dz [cout, h, w, nb] with the conv's input
    src [cin, h, w, nb] (left, right: src shifted); gb [cout] = dz summed. A kernel row's three taps are one pass
    of three dot products over whole rows."""
    row = w * nb
    n = h * row
    for o in range(cout):
        gb[o] = _sum(dz[o * n:(o + 1) * n])
        for i in range(cin):
            for ky in range(3):
                dy = ky - 1
                y0, y1 = max(0, -dy), min(h, h - dy)
                a, b, m = o * n + y0 * row, i * n + (y0 + dy) * row, (y1 - y0) * row
                k = ((o * cin + i) * 3 + ky) * 3
                gw[k], gw[k + 1], gw[k + 2] = _dot3(dz[a:a + m], left[b:b + m], src[b:b + m], right[b:b + m])


@njit(fastmath=_FMA, cache=True)
def _relu(v):
    for k in range(v.shape[0]):
        a = v[k]
        v[k] = a if a > 0 or a != a else np.float32(0)


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
def _pool(src, c, h, w, nb, dst):
    """2x2 max-pool (floor) [c, h, w, nb] -> [c, h // 2, w // 2, nb]: the first maximum in scan order, NaN wins,
    as nn.MaxPool2d."""
    h2, w2 = h // 2, w // 2
    for o in range(c):
        for y in range(h2):
            for x in range(w2):
                t = ((o * h + 2 * y) * w + 2 * x) * nb
                a, b = src[t:t + nb], src[t + nb:t + 2 * nb]
                cc, d = src[t + w * nb:t + w * nb + nb], src[t + w * nb + nb:t + w * nb + 2 * nb]
                t2 = ((o * h2 + y) * w2 + x) * nb
                out = dst[t2:t2 + nb]
                for k in range(nb):
                    out[k] = _max4(a[k], b[k], cc[k], d[k])


@njit(fastmath=_FMA, cache=True)
def _unpool_relu(act, dout, c, h, w, nb, dz):
    """Backward of ReLU then 2x2 max-pool: the gradient dout [c, h // 2, w // 2, nb] of the pooled output goes
    to the position the pool took, where the ReLU output act [c, h, w, nb] is positive; dz is the gradient of
    the pre-activation."""
    h2, w2 = h // 2, w // 2
    dz[:c * h * w * nb] = 0  # rows and columns the floor dropped
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
                    left = g[k] if m > 0 else np.float32(0)  # a NaN maximum passes no gradient, as ReLU's
                    za[k] = left if a[k] == m else np.float32(0)
                    left = np.float32(0) if a[k] == m else left
                    zb[k] = left if b[k] == m else np.float32(0)
                    left = np.float32(0) if b[k] == m else left
                    zc[k] = left if cc[k] == m else np.float32(0)
                    zd[k] = np.float32(0) if cc[k] == m else left


@njit(fastmath=_FMA, cache=True)
def _forward(x, idx, mean, std, prm, layers, head, nb, act, logits, gather):
    """One network's forward pass on its batch idx [nb]: activations into act, logits [K, nb]. With gather False
    the input block and its shifted copies in act are already those of idx (the previous network's batch)."""
    if gather:
        c0, h0, w0 = x.shape[1], x.shape[2], x.shape[3]
        for c in range(c0):
            for y in range(h0):
                for xx in range(w0):
                    base = ((c * h0 + y) * w0 + xx) * nb
                    for b in range(nb):
                        act[base + b] = (np.float32(x[idx[b], c, y, xx]) - mean[c]) / std[c]
    for l in range(layers.shape[0]):
        cin, cout, h, w = layers[l, CIN], layers[l, COUT], layers[l, H], layers[l, W]
        n = h * w * nb
        out = act[layers[l, OUT]:layers[l, OUT] + cout * n]
        for o in range(cout):
            out[o * n:(o + 1) * n] = prm[layers[l, BOFF] + o]
        wo, src, sh = layers[l, WOFF], act[layers[l, IN]:layers[l, IN] + cin * n], layers[l, SHIFT]
        left, right = act[sh:sh + cin * n], act[sh + cin * n:sh + 2 * cin * n]
        if gather or l > 0:
            _shift(src, cin, h, w, nb, left, right)
        _conv(src, left, right, prm[wo:wo + cout * cin * 9], False, cin, cout, h, w, nb, out)
        _relu(out)
        if layers[l, POOL]:
            nxt = layers[l, NEXT]
            _pool(out, cout, h, w, nb, act[nxt:nxt + cout * (h // 2) * (w // 2) * nb])
    # global average pool into g [C, nb], then the linear layer
    last = layers.shape[0] - 1
    c, n = layers[last, COUT], layers[last, H] * layers[last, W]
    src = layers[last, NEXT]
    g = act[head[HEAD_G]:head[HEAD_G] + c * nb]
    for o in range(c):
        go = g[o * nb:(o + 1) * nb]
        go[:] = 0
        for p in range(n):
            s = act[src + (o * n + p) * nb:src + (o * n + p + 1) * nb]
            for b in range(nb):
                go[b] += s[b]
        for b in range(nb):
            go[b] /= n
    for k in range(logits.shape[0]):
        lk = logits[k]
        lk[:] = prm[head[HEAD_B] + k]
        for o in range(c):
            wk = prm[head[HEAD_W] + k * c + o]
            go = g[o * nb:(o + 1) * nb]
            for b in range(nb):
                lk[b] += wk * go[b]


@njit(fastmath=_FMA, cache=True)
def _backward(y, prm, layers, head, nb, act, logits, grad, dact):
    """One network's mean cross-entropy over its batch (labels y [nb]), from the activations of `_forward`; its
    gradient into grad (the parameter row's layout). logits [K, nb] are overwritten with the loss's gradient."""
    k_out = logits.shape[0]
    inv = np.float32(1) / nb
    loss = 0.0
    for b in range(nb):
        m, ly = logits[0, b], logits[y[b], b]
        for k in range(1, k_out):
            m = max(m, logits[k, b])
        s = np.float32(0)
        for k in range(k_out):
            e = np.float32(math.exp(logits[k, b] - m))
            logits[k, b] = e
            s += e
        loss += math.log(s) - (ly - m)
        r = inv / s
        for k in range(k_out):
            logits[k, b] *= r
        logits[y[b], b] -= inv
    # the linear layer: dW = dlogits g^T, db = dlogits summed, dg = W^T dlogits; then the average pool and ReLU
    last = layers.shape[0] - 1
    c, n = layers[last, COUT], layers[last, H] * layers[last, W]
    hw, hb, g0 = head[HEAD_W], head[HEAD_B], head[HEAD_G]
    for k in range(k_out):
        grad[hb + k] = _sum(logits[k])
        for o in range(c):
            grad[hw + k * c + o] = _dot(logits[k], act[g0 + o * nb:g0 + (o + 1) * nb])
    out = layers[last, OUT]
    for o in range(c):
        dg = dact[g0 + o * nb:g0 + (o + 1) * nb]
        dg[:] = 0
        for k in range(k_out):
            wk = prm[hw + k * c + o]
            lk = logits[k]
            for b in range(nb):
                dg[b] += wk * lk[b]
        for b in range(nb):
            dg[b] /= n
        for p in range(n):
            t = out + (o * n + p) * nb
            a, dz = act[t:t + nb], dact[t:t + nb]
            for b in range(nb):
                dz[b] = dg[b] if a[b] > 0 else np.float32(0)
    for l in range(last, -1, -1):
        cin, cout, h, w = layers[l, CIN], layers[l, COUT], layers[l, H], layers[l, W]
        n = h * w * nb
        out, src, wo, bo, sh = layers[l, OUT], layers[l, IN], layers[l, WOFF], layers[l, BOFF], layers[l, SHIFT]
        dz = dact[out:out + cout * n]  # the pre-activation gradient
        _weight_grad(dz, act[src:src + cin * n], act[sh:sh + cin * n], act[sh + cin * n:sh + 2 * cin * n], cin,
                     cout, h, w, nb, grad[wo:wo + cout * cin * 9], grad[bo:bo + cout])
        if l == 0:
            break
        din = dact[src:src + cin * n]  # the gradient of this conv's input, the previous layer's (pooled) output
        din[:] = 0
        t = head[HEAD_SHIFT]
        left, right = dact[t:t + cout * n], dact[t + cout * n:t + 2 * cout * n]
        _shift(dz, cout, h, w, nb, left, right)
        _conv(dz, left, right, prm[wo:wo + cout * cin * 9], True, cout, cin, h, w, nb, din)
        po, ph, pw = layers[l - 1, OUT], layers[l - 1, H], layers[l - 1, W]
        pn = cin * ph * pw * nb
        if layers[l - 1, POOL]:
            _unpool_relu(act[po:po + pn], din, cin, ph, pw, nb, dact[po:po + pn])
        else:  # in place: the previous output is this input
            pa, pz = act[po:po + pn], dact[po:po + pn]
            for k in range(pn):
                pz[k] = pz[k] if pa[k] > 0 else np.float32(0)
    return loss / nb


@njit(parallel=True, cache=True)
def train_kernel(x, idx, y, mean, std, params, ptab, lo, layers, head, scratch, grads, loss, threads):
    """Networks lo..lo + n: each one's loss [n] on its batch idx [n, B] with labels y [n, B], and its gradient,
    written into grads. params and grads are the population's flat layer-major buffers; ptab [m, 2] gives each
    parameter tensor's start in them and its size per network. threads: numba.get_num_threads(), passed in
    because a global read inside keeps numba from caching the kernel.

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
        row = np.empty(ptab[:, 1].sum(), np.float32)
        grow = np.empty_like(row)
        for p in range(t, p_all, threads):
            _move_row(params, ptab, lo + p, row, True)
            _forward(x, idx[p], mean, std, row, layers, head, nb, act, logits, True)
            loss[p] = _backward(y[p], row, layers, head, nb, act, logits, grow, dact)
            _move_row(grads, ptab, lo + p, grow, False)


@njit(parallel=True, cache=True)
def score_kernel(x, idx, y, mean, std, params, ptab, layers, head, scratch, bits, byte0, loss, pred, threads):
    """Evaluation of networks 0..n on their batches idx [n, B] with labels y [n, B], as `reference.score_logits`
    on their logits: argmax == y (ties and NaN: the first, as torch.argmax) as bits into bits[:, byte0:] (little
    bit order, a last partial byte zero-padded), the cross-entropy summed over examples with y >= 0 into loss [n],
    the argmax into pred [n, B]. y = -1 marks a class the network was not trained on: wrong, and no loss."""
    nb, k_out, n = idx.shape[1], head[HEAD_K], idx.shape[0]
    for t in prange(threads):
        act = np.empty(scratch, np.float32)
        row = np.empty(ptab[:, 1].sum(), np.float32)
        logits = np.empty((k_out, nb), np.float32)
        right = np.zeros(-(-nb // 8) * 8, np.uint8)
        for p in range(t, n, threads):
            _move_row(params, ptab, p, row, True)
            # evaluation shows every network the same examples: the input layer is gathered once per thread
            # (its gather and shifted copies cost 10% of an evaluation pass)
            gather = p < threads or not np.array_equal(idx[p], idx[p - threads])
            _forward(x, idx[p], mean, std, row, layers, head, nb, act, logits, gather)
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
                if y[p, b] >= 0:
                    total += np.float32(math.log(s)) + m - logits[y[p, b], b]
            loss[p] = total
            for j in range(right.shape[0] // 8):
                v = 0
                for i in range(8):
                    v |= right[8 * j + i] << i
                bits[p, byte0 + j] = v


@njit(cache=True)
def _move_row(flat, ptab, p, row, into_row):
    """Network p's parameters between the flat layer-major buffer and one contiguous row: into the row, or
    (into_row False) back into the buffer."""
    o = 0
    for j in range(ptab.shape[0]):
        base, n = ptab[j, 0] + p * ptab[j, 1], ptab[j, 1]
        if into_row:
            row[o:o + n] = flat[base:base + n]
        else:
            flat[base:base + n] = row[o:o + n]
        o += n


@intrinsic
def _fma(typingctx, a, b, c):
    """a * b + c rounded once (llvm.fma.f32): what torch's add with alpha computes on this CPU."""
    def codegen(context, builder, signature, args):
        f32 = ir.FloatType()
        fn = builder.module.declare_intrinsic("llvm.fma", [f32], ir.FunctionType(f32, [f32, f32, f32]))
        return builder.call(fn, args)

    return types.float32(types.float32, types.float32, types.float32), codegen


@njit(parallel=True, cache=True)
def sgd_kernel(params, grads, momentum_buf, lr, momentum, weight_decay, frozen, threads):
    """torch.optim.SGD's update (dampening 0, no Nesterov) in one pass over the flat buffers, in place; entries
    where frozen (bool, or empty for none) is set get a zero gradient and momentum. The same bits as
    `reference.sgd_step`: fp32 scalars and torch's roundings (its add with alpha is a fused multiply-add, its
    mul_ then add_ are not; no fastmath here, so nothing else is fused). One pass instead of torch's four."""
    n = params.shape[0]
    per = -(-n // threads)
    for t in prange(threads):
        lo, hi = t * per, min(n, (t + 1) * per)
        p, g, m = params[lo:hi], grads[lo:hi], momentum_buf[lo:hi]
        f = frozen[lo:hi] if frozen.shape[0] else frozen
        for k in range(hi - lo):
            gk = _fma(weight_decay, p[k], g[k]) if weight_decay else g[k]
            mk = m[k] * momentum + gk
            if frozen.shape[0] and f[k]:
                gk, mk = np.float32(0), np.float32(0)
            g[k] = gk
            m[k] = mk
            p[k] = _fma(-lr, mk, p[k])
