"""Flash attention, forward and backward: softmax(q k^T * sm_scale + mask) v; causal, padded,
grouped-query, with dropout on the attention probabilities.

For batch b, query head h (reading kv head g = h // (Hq // Hkv)) and query row i:

    s_ij  = sm_scale * q_i . k_j             over the keys j that i may see: j <= i when causal,
                                             and attention_mask[b, j] != 0
    lse_i = log sum_j exp(s_ij)
    p_ij  = exp(s_ij - lse_i)
    z_ij  = p_ij * keep_ij / (1 - rate)      dropout (rate > 0 only), keep_ij ~ Bernoulli(1 - rate)
    out_i = sum_j z_ij v_j

Forward (FlashAttention-2): one program owns BLOCK_M query rows of one head and streams the
visible keys in blocks of BLOCK_N. It keeps, per row, the running max m_i of the scores seen so
far, the running sum l_i = sum_j exp(s_ij - m_i) and an unnormalised fp32 accumulator acc_i =
sum_j exp(s_ij - m_i) keep_ij v_j; when a key block raises the max, l_i and acc_i are rescaled by
exp(m_old - m_new) (online softmax), and acc_i / (l_i (1 - rate)) is taken once at the end. l_i
sums the undropped probabilities: lse is dropout's. Scores never reach memory. Everything runs in
base 2: log2(e) is folded into the scale, so m_i is in log2 units and each exponential is one exp2
(a single MUFU instruction on the GPU). Triton 3.6 waits for every wgmma right after issuing it, so
within a program the softmax never overlaps the tensor cores; the two programs per SM overlap each
other instead. On Hopper GPUs the common case (16-bit, head_dim 128, T % 128 == 0, no mask, no
dropout) runs instead in `jtgpt.kernels.attention.hopper`, Gluon kernels that do overlap them
(FlashAttention-3's schedule), with the same outputs; so does the dQ kernel below.

Backward, with dO the cotangent of out (FlashAttention-2: p is recomputed from q, k and the saved
lse, one exp2 per element, and never stored):

    delta_i = dO_i . out_i  (= sum_j p_ij dp_ij)     fp32 [B, Hq, T]      } _attn_bwd_dq_kernel,
    dp_ij   = keep_ij / (1 - rate) * dO_i . v_j                            } launched first
    ds_ij   = p_ij (dp_ij - delta_i)                                       }
    dq_i    = sm_scale * sum_j ds_ij k_j                                   }
    dv_j    = sum_i z_ij dO_i,   dk_j = sm_scale * sum_i ds_ij q_i     _attn_bwd_dkdv_kernel

dk and dv of kv head g sum over the Hq / Hkv query heads of its group: one dK/dV program owns a key
block of one (batch, kv head) and loops over those heads and over the query blocks that see its
keys, so every element is written once by one program (deterministic, no atomics). One dQ program
owns a query block of one (batch, query head), as in the forward, and computes its rows' delta
on the way (it loads their dO anyway) for the dK/dV kernel. Causal: both visit only the blocks on
or below the diagonal, and only blocks on it pay for the elementwise mask. The price of no
atomics: q k^T and dO v^T are computed twice, once per kernel (7 block products, not 5). It is
the cheaper price here: FlashAttention-2's 5-product loop, with dQ added by fp32 atomics inside
the dK/dV kernel, hits the 255-register limit and spills, and measured slower (bench/RESULTS.md).

Layout: qkv is the [B, T, (Hq + 2 Hkv) D] output of the c_attn GEMM, each row [q heads | k heads |
v heads] with each head D contiguous values. The kernels read every head's [T, D] slice in place
through strides; out is [B, T, Hq D], the input of the output-projection GEMM, and the gradient
dqkv comes back packed exactly like qkv, for the c_attn GEMM's backward: the dQ kernel writes its
q heads, and the dK/dV kernel writes the k and v heads into the same buffer (its output aliases
that input), so no concatenation copies it.

lse [B, Hq, T] (natural log, fp32) is saved for the backward. A query row that sees no key at all
(every key it may see is padding) gets out = 0, as in `jtgpt.reference.attention`, and
lse = +inf, so that the backward's exp(s - lse) is 0 on that row rather than NaN: zero gradient.

Differentiation saves qkv, out and lse (and the mask, an input anyway, and with dropout the
kept bits below).

Dropout mask: keep_ij is drawn by Philox from the seed and the counter (j // 8, i, b Hq + h, 0),
whose four 32-bit outputs, cut into eight 16-bit draws, decide keys 8 (j // 8) .. 8 (j // 8) + 7
(jtgpt.kernels.keep_from_philox; the rate is rounded up to a multiple of 2**-16). Each index has
its own 32-bit counter word, so no flat offset b H T T + h T T + i T + j is formed and nothing
overflows at any size (4 x 32 x 4096 x 4096 > 2**31). Under differentiation the forward also
stores the mask as bits, keep [B Hq, T, ceil(T / 8)] uint8 (bit t of byte w in row i: key
8w + t; 25 MB a layer for GPT-2 at B = 16, T = 1024), and both backward kernels read it instead of
drawing it again: at head_dim 64 the draws cost more than the block products, and the backward
would draw the mask twice.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import triton
import triton.language as tl

from jtgpt.call import triton_call
from jtgpt.kernels import dropout_seed, keep_from_philox, kept_draw, packed_qkv_heads
from jtgpt.kernels.attention import hopper
from jtgpt.kernels.attention.common import (MAX_GRID_Y, AttentionConfig, checked_key_mask,
                                            checked_scale, program_in_group, query_program)

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


# ------------------------------------------------------------------------------------- kernels

@triton.jit
def _dropout_words(seed, bh, offs_m, start_n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The four [BLOCK_M, BLOCK_N // 8] Philox words that decide which p_ij of (batch * HQ + head)
    bh, query rows offs_m and keys start_n + [0, BLOCK_N) dropout keeps (keep_from_philox): a
    function of (seed, b, h, i, j) alone (module docstring)."""
    OCTETS: tl.constexpr = BLOCK_N // 8
    octets = tl.broadcast_to((start_n // 8 + tl.arange(0, OCTETS))[None, :], (BLOCK_M, OCTETS))
    rows = tl.broadcast_to(offs_m[:, None], (BLOCK_M, OCTETS))
    zero = rows * 0
    return tl.philox(seed, octets, rows, zero + bh, zero)


@triton.jit
def _kept_bits(r0, r1, r2, r3, DROPOUT_P: tl.constexpr):
    """keep_from_philox's mask packed, from the same words: bit 2i + h of byte j is half h of
    word i, i.e. key 8j + 2i + h. Elementwise on the [rows, COLS // 8] words: no reshape of the
    [rows, COLS] tile (packing that took 64 more registers in the forward)."""
    byte = tl.zeros(r0.shape, tl.int32)
    for i in tl.static_range(4):
        word = r0 if i == 0 else (r1 if i == 1 else (r2 if i == 2 else r3))
        low = kept_draw(word & 0xFFFF, DROPOUT_P)
        high = kept_draw(word >> 16, DROPOUT_P)
        byte |= (low.to(tl.int32) << (2 * i)) | (high.to(tl.int32) << (2 * i + 1))
    return byte.to(tl.uint8)


@triton.jit
def _head_keep(keep_ptr, bh, T: tl.constexpr):
    """Where (batch * HQ + head) bh's kept bits [T, ceil(T / 8)] start in keep [B HQ, T, ...]."""
    return keep_ptr + bh.to(tl.int64) * (T * ((T + 7) // 8))


@triton.jit
def _keep_bytes(keep_ptr, offs_m, start_n, T: tl.constexpr, BLOCK_N: tl.constexpr):
    """(pointers, in-bounds mask) of the [len(offs_m), BLOCK_N // 8] bytes of one head's kept
    bits [T, ceil(T / 8)] that hold query rows offs_m, keys start_n + [0, BLOCK_N)."""
    WIDTH: tl.constexpr = (T + 7) // 8
    byte = start_n // 8 + tl.arange(0, BLOCK_N // 8)
    return (keep_ptr + offs_m[:, None] * WIDTH + byte[None, :],
            (offs_m[:, None] < T) & (byte[None, :] < WIDTH))


@triton.jit
def _load_keep(keep_ptr, offs_m, start_n, T: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """The [BLOCK_M, BLOCK_N] bool tile whose _kept_bits the forward stored (False past T)."""
    ptrs, in_bounds = _keep_bytes(keep_ptr, offs_m, start_n, T, BLOCK_N)
    packed = tl.load(ptrs, mask=in_bounds, other=0).to(tl.int32)
    bits = (packed[:, :, None] >> tl.arange(0, 8)[None, None, :]) & 1  # key 8j + t: bit t
    return bits.reshape(BLOCK_M, BLOCK_N) != 0


@triton.jit
def _mask_scores(x, FILL: tl.constexpr, offs_m, cols, mask_ptrs, T: tl.constexpr,
                 HAS_MASK: tl.constexpr, DIAGONAL: tl.constexpr, KEY_TAIL: tl.constexpr):
    """x [BLOCK_M, BLOCK_N] (scores or probabilities of query rows offs_m and keys cols) with FILL
    wherever the row may not see the key.

    DIAGONAL: the block straddles the causal diagonal (elementwise causal mask). KEY_TAIL: the
    block may run past T (keys >= T are masked unless the causal or padding mask already hides
    them). Blocks left of the diagonal, and the whole blocks of the non-causal case, need neither
    and skip the per-element work.
    """
    if HAS_MASK:
        # Masked load: `other=0` also marks keys >= T as padding.
        key_ok = tl.load(mask_ptrs + cols, mask=cols < T, other=0) != 0
    if DIAGONAL:
        # Rows >= T are never stored, so the causal test alone also hides keys >= T.
        keep = offs_m[:, None] >= cols[None, :]
        if HAS_MASK:
            keep = keep & key_ok[None, :]
        x = tl.where(keep, x, FILL)
    elif HAS_MASK:
        x = tl.where(key_ok[None, :], x, FILL)
    elif KEY_TAIL:
        x = tl.where((cols < T)[None, :], x, FILL)
    return x


@triton.jit
def _attn_fwd_block_loop(acc, l_i, m_i, q, k_ptrs, v_ptrs, mask_ptrs, seed, keep_ptr, bh, offs_m,
                         offs_n, lo, hi, T: tl.constexpr, ROW: tl.constexpr,
                         QK_SCALE: tl.constexpr, HAS_MASK: tl.constexpr, DIAGONAL: tl.constexpr,
                         KEY_TAIL: tl.constexpr, DROPOUT_P: tl.constexpr, STORE_KEEP: tl.constexpr,
                         PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Fold the key blocks [lo, hi) into (acc, l_i, m_i); DIAGONAL, KEY_TAIL: see _mask_scores.
    STORE_KEEP: also store the dropout mask's bits at keep_ptr (this head's)."""
    k_ptrs += lo * ROW
    v_ptrs += lo * ROW
    for start_n in range(lo, hi, BLOCK_N):
        in_seq = start_n + offs_n < T
        if KEY_TAIL:
            k = tl.load(k_ptrs, mask=in_seq[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        s = _mask_scores(s, float("-inf"), offs_m, start_n + offs_n, mask_ptrs, T, HAS_MASK,
                         DIAGONAL, KEY_TAIL)

        m_new = tl.maximum(m_i, tl.max(s, 1) * QK_SCALE)
        p = tl.math.exp2(s * QK_SCALE - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)  # undropped: lse is the softmax's
        if DROPOUT_P > 0.0:
            r0, r1, r2, r3 = _dropout_words(seed, bh, offs_m, start_n, BLOCK_M, BLOCK_N)
            if STORE_KEEP:
                ptrs, in_bounds = _keep_bytes(keep_ptr, offs_m, start_n, T, BLOCK_N)
                tl.store(ptrs, _kept_bits(r0, r1, r2, r3, DROPOUT_P), mask=in_bounds)
            p = tl.where(keep_from_philox(r0, r1, r2, r3, DROPOUT_P, BLOCK_M, BLOCK_N), p, 0.0)
        if KEY_TAIL:
            # other=0, not garbage: masked-out keys have p = 0, but 0 * NaN would still be NaN.
            v = tl.load(v_ptrs, mask=in_seq[:, None], other=0.0)
        else:
            v = tl.load(v_ptrs)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
        k_ptrs += BLOCK_N * ROW
        v_ptrs += BLOCK_N * ROW
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, seed_ptr, out_ptr, lse_ptr, keep_ptr,
                     T: tl.constexpr, HQ: tl.constexpr, HKV: tl.constexpr, HEAD_DIM: tl.constexpr,
                     QK_SCALE: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
                     DROPOUT_P: tl.constexpr, STORE_KEEP: tl.constexpr, PRECISION: tl.constexpr,
                     HEAD_GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: BLOCK_M query rows of one (batch, query head). Grid (cdiv(T, BLOCK_M), B * HQ).

    q_ptr, k_ptr and v_ptr all point at the packed qkv [B, T, (HQ + 2 HKV) HEAD_DIM]; mask_ptr at
    the int32 attention mask [B, T] (unread unless HAS_MASK); seed_ptr at the int32 dropout seed
    (unread unless DROPOUT_P > 0); out_ptr at [B, T, HQ HEAD_DIM]; lse_ptr at fp32 [B, HQ, T];
    keep_ptr at the dropout mask's bits [B HQ, T, ceil(T / 8)] (written only if STORE_KEEP).
    """
    ROW: tl.constexpr = (HQ + 2 * HKV) * HEAD_DIM  # stride of one token in qkv
    OUT_ROW: tl.constexpr = HQ * HEAD_DIM
    start_m, pid_bh, b, h, g = query_program(HQ, HKV, CAUSAL, HEAD_GROUP)

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    # int64 batch offsets: B * T * ROW can pass 2**31 (64 x 8192 x 6144 for Llama-3-8B); offsets
    # inside one sequence stay int32.
    qkv_b = b.to(tl.int64) * (T * ROW)
    q_ptrs = q_ptr + qkv_b + h * HEAD_DIM + offs_m[:, None] * ROW + offs_d[None, :]
    k_ptrs = k_ptr + qkv_b + (HQ + g) * HEAD_DIM + offs_n[:, None] * ROW + offs_d[None, :]
    v_ptrs = v_ptr + qkv_b + (HQ + HKV + g) * HEAD_DIM + offs_n[:, None] * ROW + offs_d[None, :]
    mask_ptrs = mask_ptr + b * T
    keep_ptr = _head_keep(keep_ptr, pid_bh, T)
    seed = 0
    if DROPOUT_P > 0.0:
        seed = tl.load(seed_ptr)

    q = tl.load(q_ptrs, mask=offs_m[:, None] < T, other=0.0)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    # A finite floor rather than -inf: while every key a row has seen is masked, its scores are
    # -inf and exp2(-inf - floor) = 0, where -inf - (-inf) would be NaN. No branch needed.
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)

    if CAUSAL:
        # Key blocks right of the diagonal are skipped by the loop bounds, blocks left of it are
        # fully visible, and only those on it (at most BLOCK_M // BLOCK_N) pay for the mask.
        diag = start_m * BLOCK_M
        acc, l_i, m_i = _attn_fwd_block_loop(
            acc, l_i, m_i, q, k_ptrs, v_ptrs, mask_ptrs, seed, keep_ptr, pid_bh, offs_m, offs_n,
            0, diag, T, ROW, QK_SCALE, HAS_MASK, DIAGONAL=False, KEY_TAIL=False,
            DROPOUT_P=DROPOUT_P, STORE_KEEP=STORE_KEEP, PRECISION=PRECISION, BLOCK_M=BLOCK_M,
            BLOCK_N=BLOCK_N)
        diag_end = tl.minimum(diag + BLOCK_M, T)
        acc, l_i, m_i = _attn_fwd_block_loop(
            acc, l_i, m_i, q, k_ptrs, v_ptrs, mask_ptrs, seed, keep_ptr, pid_bh, offs_m, offs_n,
            diag, diag_end, T, ROW, QK_SCALE, HAS_MASK, DIAGONAL=True, KEY_TAIL=True,
            DROPOUT_P=DROPOUT_P, STORE_KEEP=STORE_KEEP, PRECISION=PRECISION, BLOCK_M=BLOCK_M,
            BLOCK_N=BLOCK_N)
    else:
        FULL: tl.constexpr = T // BLOCK_N * BLOCK_N
        acc, l_i, m_i = _attn_fwd_block_loop(
            acc, l_i, m_i, q, k_ptrs, v_ptrs, mask_ptrs, seed, keep_ptr, pid_bh, offs_m, offs_n,
            0, FULL, T, ROW, QK_SCALE, HAS_MASK, DIAGONAL=False, KEY_TAIL=False,
            DROPOUT_P=DROPOUT_P, STORE_KEEP=STORE_KEEP, PRECISION=PRECISION, BLOCK_M=BLOCK_M,
            BLOCK_N=BLOCK_N)
        if FULL < T:
            acc, l_i, m_i = _attn_fwd_block_loop(
                acc, l_i, m_i, q, k_ptrs, v_ptrs, mask_ptrs, seed, keep_ptr, pid_bh, offs_m,
                offs_n, FULL, T, T, ROW, QK_SCALE, HAS_MASK, DIAGONAL=False, KEY_TAIL=True,
                DROPOUT_P=DROPOUT_P, STORE_KEEP=STORE_KEEP, PRECISION=PRECISION,
                BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)

    # l_i = 0 exactly when the row saw no key (then acc = 0 too): out 0 and lse +inf. m_i is in
    # log2 units, so m_i * ln(2) is the row's natural-log max.
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc * ((1.0 / (1.0 - DROPOUT_P)) / l_safe)[:, None]
    lse = tl.where(seen, m_i * LN2 + tl.log(l_safe), float("inf"))

    row_ok = offs_m < T
    out_ptrs = (out_ptr + b.to(tl.int64) * (T * OUT_ROW) + h * HEAD_DIM
                + offs_m[:, None] * OUT_ROW + offs_d[None, :])
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    tl.store(lse_ptr + pid_bh * T + offs_m, lse, mask=row_ok)


@triton.jit
def _attn_bwd_dkdv_loop(dk, dv, k, v, qt_ptrs, do_ptrs, lse_ptrs, delta_ptrs, keep_ptr, start_n,
                        lo, hi, T: tl.constexpr, ROW: tl.constexpr, OUT_ROW: tl.constexpr,
                        QK_SCALE: tl.constexpr, DIAGONAL: tl.constexpr, DROPOUT_P: tl.constexpr,
                        PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Add the query blocks [lo, hi) of one head to (dk, dv) of the keys start_n + [0, BLOCK_N).

    Works on transposed tiles ([keys, queries]), so that every product has the key block as its
    row operand and no register tile needs a transpose. Rows >= T load q = dO = 0 and lse = +inf,
    so their p and ds are 0: no elementwise mask needed off the diagonal.
    """
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        if T % BLOCK_M == 0:  # no partial block: no predicates, no selects
            qt = tl.load(qt_ptrs + start_m * ROW)  # [HEAD_DIM, M]
            do = tl.load(do_ptrs + start_m * OUT_ROW)
            lse2 = tl.load(lse_ptrs + rows) * LOG2E
            delta = tl.load(delta_ptrs + rows)
        else:
            row_ok = rows < T
            qt = tl.load(qt_ptrs + start_m * ROW, mask=row_ok[None, :], other=0.0)
            do = tl.load(do_ptrs + start_m * OUT_ROW, mask=row_ok[:, None], other=0.0)
            lse2 = tl.load(lse_ptrs + rows, mask=row_ok, other=float("inf")) * LOG2E
            delta = tl.load(delta_ptrs + rows, mask=row_ok, other=0.0)

        pt = tl.math.exp2(tl.dot(k, qt, input_precision=PRECISION) * QK_SCALE - lse2[None, :])
        if DIAGONAL:
            pt = tl.where(rows[None, :] >= offs_n[:, None], pt, 0.0)
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        if DROPOUT_P > 0.0:
            keep = tl.trans(_load_keep(keep_ptr, rows, start_n, T, BLOCK_M, BLOCK_N))
            zt = tl.where(keep, pt * (1.0 / (1.0 - DROPOUT_P)), 0.0)
            dpt = tl.where(keep, dpt * (1.0 / (1.0 - DROPOUT_P)), 0.0)
        else:
            zt = pt
        dv = tl.dot(zt.to(do.dtype), do, dv, input_precision=PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(qkv_ptr, do_ptr, lse_ptr, delta_ptr, mask_ptr, keep_ptr, dq_ptr,
                          dqkv_ptr, T: tl.constexpr, HQ: tl.constexpr, HKV: tl.constexpr,
                          HEAD_DIM: tl.constexpr, QK_SCALE: tl.constexpr, SM_SCALE: tl.constexpr,
                          CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT_P: tl.constexpr,
                          PRECISION: tl.constexpr, HEAD_GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr):
    """One program: dK, dV of BLOCK_N keys of one (batch, kv head), summed over the query heads
    of its group. Grid (cdiv(T, BLOCK_N), B * HKV).

    qkv_ptr: [B, T, (HQ + 2 HKV) HEAD_DIM]; do_ptr: dO [B, T, HQ HEAD_DIM]; lse_ptr, delta_ptr:
    fp32 [B, HQ, T]; mask_ptr as in the forward; keep_ptr: the bits of the dropout mask the
    forward stored (unread unless DROPOUT_P > 0); dq_ptr and dqkv_ptr: one buffer packed
    like qkv (the output aliases the input), whose q heads the dQ kernel has written; this kernel
    writes its k and v heads. Causal needs BLOCK_N % BLOCK_M == 0 (the diagonal is
    BLOCK_N // BLOCK_M query blocks).
    """
    ROW: tl.constexpr = (HQ + 2 * HKV) * HEAD_DIM
    OUT_ROW: tl.constexpr = HQ * HEAD_DIM
    GROUP: tl.constexpr = HQ // HKV
    if CAUSAL:
        rank, bg = program_in_group(HEAD_GROUP)  # key block 0 sees the most queries
    else:
        rank, bg = tl.program_id(0), tl.program_id(1)
    start_n = rank * BLOCK_N
    b = bg // HKV
    g = bg % HKV

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    in_seq = offs_n < T
    qkv_b = qkv_ptr + b.to(tl.int64) * (T * ROW)
    kv_ptrs = qkv_b + offs_n[:, None] * ROW + offs_d[None, :]
    k = tl.load(kv_ptrs + (HQ + g) * HEAD_DIM, mask=in_seq[:, None], other=0.0)
    v = tl.load(kv_ptrs + (HQ + HKV + g) * HEAD_DIM, mask=in_seq[:, None], other=0.0)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    for i in range(GROUP):
        h = g * GROUP + i
        bh = b * HQ + h
        keep_h = _head_keep(keep_ptr, bh, T)
        qt_ptrs = qkv_b + h * HEAD_DIM + offs_m[None, :] * ROW + offs_d[:, None]  # q^T
        do_ptrs = (do_ptr + b.to(tl.int64) * (T * OUT_ROW) + h * HEAD_DIM
                   + offs_m[:, None] * OUT_ROW + offs_d[None, :])
        if CAUSAL:
            # Queries above the diagonal never see these keys: start on it.
            dk, dv = _attn_bwd_dkdv_loop(
                dk, dv, k, v, qt_ptrs, do_ptrs, lse_ptr + bh * T, delta_ptr + bh * T, keep_h,
                start_n, start_n, tl.minimum(start_n + BLOCK_N, T), T, ROW, OUT_ROW, QK_SCALE,
                DIAGONAL=True, DROPOUT_P=DROPOUT_P, PRECISION=PRECISION, BLOCK_M=BLOCK_M,
                BLOCK_N=BLOCK_N)
            lo = start_n + BLOCK_N
        else:
            lo = 0
        dk, dv = _attn_bwd_dkdv_loop(
            dk, dv, k, v, qt_ptrs, do_ptrs, lse_ptr + bh * T, delta_ptr + bh * T, keep_h,
            start_n, lo, T, T, ROW, OUT_ROW, QK_SCALE, DIAGONAL=False, DROPOUT_P=DROPOUT_P,
            PRECISION=PRECISION, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)

    if HAS_MASK:
        # A padded key has p = 0 on every row, hence dk = dv = 0; its rows were computed unmasked
        # (they may hold inf or NaN) and are replaced here, once, instead of masking every tile.
        key_ok = tl.load(mask_ptr + b * T + offs_n, mask=in_seq, other=0) != 0
        dk = tl.where(key_ok[:, None], dk, 0.0)
        dv = tl.where(key_ok[:, None], dv, 0.0)
    dk_ptrs = (dqkv_ptr + b.to(tl.int64) * (T * ROW) + (HQ + g) * HEAD_DIM
               + offs_n[:, None] * ROW + offs_d[None, :])
    tl.store(dk_ptrs, (dk * SM_SCALE).to(dqkv_ptr.dtype.element_ty), mask=in_seq[:, None])
    tl.store(dk_ptrs + HKV * HEAD_DIM, dv.to(dqkv_ptr.dtype.element_ty), mask=in_seq[:, None])


@triton.jit
def _attn_bwd_dq_loop(dq, q, do, lse2, delta, k_ptrs, v_ptrs, mask_ptrs, keep_ptr, offs_m, offs_n,
                      lo, hi, T: tl.constexpr, ROW: tl.constexpr, QK_SCALE: tl.constexpr,
                      HAS_MASK: tl.constexpr, DIAGONAL: tl.constexpr, KEY_TAIL: tl.constexpr,
                      DROPOUT_P: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    """Add the key blocks [lo, hi) to dq of the query rows offs_m; DIAGONAL, KEY_TAIL: see
    _mask_scores."""
    k_ptrs += lo * ROW
    v_ptrs += lo * ROW
    for start_n in range(lo, hi, BLOCK_N):
        if KEY_TAIL:
            # other=0: ds = 0 there, and 0 * garbage could be NaN.
            in_seq = start_n + offs_n < T
            k = tl.load(k_ptrs, mask=in_seq[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=in_seq[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * QK_SCALE
                         - lse2[:, None])
        p = _mask_scores(p, 0.0, offs_m, start_n + offs_n, mask_ptrs, T, HAS_MASK, DIAGONAL,
                         KEY_TAIL)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        if DROPOUT_P > 0.0:
            keep = _load_keep(keep_ptr, offs_m, start_n, T, BLOCK_M, BLOCK_N)
            dp = tl.where(keep, dp * (1.0 / (1.0 - DROPOUT_P)), 0.0)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
        k_ptrs += BLOCK_N * ROW
        v_ptrs += BLOCK_N * ROW
    return dq


@triton.jit
def _attn_bwd_dq_kernel(qkv_ptr, out_ptr, do_ptr, lse_ptr, mask_ptr, keep_ptr, dqkv_ptr,
                        delta_ptr, T: tl.constexpr, HQ: tl.constexpr, HKV: tl.constexpr,
                        HEAD_DIM: tl.constexpr, QK_SCALE: tl.constexpr, SM_SCALE: tl.constexpr,
                        CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT_P: tl.constexpr,
                        PRECISION: tl.constexpr, HEAD_GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr):
    """One program: delta and dQ of BLOCK_M query rows of one (batch, query head), over the key
    blocks they see, as the forward. Grid (cdiv(T, BLOCK_M), B * HQ). Arguments as
    _attn_bwd_dkdv_kernel's, plus out_ptr: out [B, T, HQ HEAD_DIM]; it writes the q heads of
    dqkv_ptr (packed like qkv; the dK/dV kernel fills the rest) and delta_ptr, fp32 [B, HQ, T],
    for the dK/dV kernel. Causal needs BLOCK_M % BLOCK_N == 0."""
    ROW: tl.constexpr = (HQ + 2 * HKV) * HEAD_DIM
    OUT_ROW: tl.constexpr = HQ * HEAD_DIM
    start_m, pid_bh, b, h, g = query_program(HQ, HKV, CAUSAL, HEAD_GROUP)

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    batch = b.to(tl.int64) * (T * ROW)
    qkv_b = qkv_ptr + batch
    q = tl.load(qkv_b + h * HEAD_DIM + offs_m[:, None] * ROW + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    out_offsets = (b.to(tl.int64) * (T * OUT_ROW) + h * HEAD_DIM + offs_m[:, None] * OUT_ROW
                   + offs_d[None, :])
    do = tl.load(do_ptr + out_offsets, mask=row_ok[:, None], other=0.0)
    out = tl.load(out_ptr + out_offsets, mask=row_ok[:, None], other=0.0)
    delta = tl.sum(do.to(tl.float32) * out.to(tl.float32), 1)
    tl.store(delta_ptr + pid_bh * T + offs_m, delta, mask=row_ok)
    # Rows with no visible key have lse = +inf: p = exp2(-inf) = 0, so dq = 0 there.
    lse2 = tl.load(lse_ptr + pid_bh * T + offs_m, mask=row_ok, other=float("inf")) * LOG2E
    k_ptrs = qkv_b + (HQ + g) * HEAD_DIM + offs_n[:, None] * ROW + offs_d[None, :]
    v_ptrs = qkv_b + (HQ + HKV + g) * HEAD_DIM + offs_n[:, None] * ROW + offs_d[None, :]
    mask_ptrs = mask_ptr + b * T
    keep_ptr = _head_keep(keep_ptr, pid_bh, T)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if CAUSAL:
        diag = start_m * BLOCK_M
        dq = _attn_bwd_dq_loop(
            dq, q, do, lse2, delta, k_ptrs, v_ptrs, mask_ptrs, keep_ptr, offs_m, offs_n, 0,
            diag, T, ROW, QK_SCALE, HAS_MASK, DIAGONAL=False, KEY_TAIL=False, DROPOUT_P=DROPOUT_P,
            PRECISION=PRECISION, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
        dq = _attn_bwd_dq_loop(
            dq, q, do, lse2, delta, k_ptrs, v_ptrs, mask_ptrs, keep_ptr, offs_m, offs_n, diag,
            tl.minimum(diag + BLOCK_M, T), T, ROW, QK_SCALE, HAS_MASK, DIAGONAL=True,
            KEY_TAIL=True, DROPOUT_P=DROPOUT_P, PRECISION=PRECISION, BLOCK_M=BLOCK_M,
            BLOCK_N=BLOCK_N)
    else:
        FULL: tl.constexpr = T // BLOCK_N * BLOCK_N
        dq = _attn_bwd_dq_loop(
            dq, q, do, lse2, delta, k_ptrs, v_ptrs, mask_ptrs, keep_ptr, offs_m, offs_n, 0,
            FULL, T, ROW, QK_SCALE, HAS_MASK, DIAGONAL=False, KEY_TAIL=False, DROPOUT_P=DROPOUT_P,
            PRECISION=PRECISION, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
        if FULL < T:
            dq = _attn_bwd_dq_loop(
                dq, q, do, lse2, delta, k_ptrs, v_ptrs, mask_ptrs, keep_ptr, offs_m, offs_n,
                FULL, T, T, ROW, QK_SCALE, HAS_MASK, DIAGONAL=False, KEY_TAIL=True,
                DROPOUT_P=DROPOUT_P, PRECISION=PRECISION, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
    dq_ptrs = dqkv_ptr + batch + h * HEAD_DIM + offs_m[:, None] * ROW + offs_d[None, :]
    tl.store(dq_ptrs, (dq * SM_SCALE).to(dqkv_ptr.dtype.element_ty), mask=row_ok[:, None])


# ----------------------------------------------------------------------------------- launchers

def _block_config(head_dim: int, dtype, precision: str,
                  masked_dropout: bool = False) -> tuple[int, int, int, int]:
    """Forward (BLOCK_M, BLOCK_N, num_warps, num_stages) for an H100.

    16-bit, D <= 128: timed on an H100 (`bench/attention.py --sweep`; bench/RESULTS.md): one
    warpgroup of 64 query rows per program, two or more programs per SM, beat 128-row programs of
    two warpgroups at every shape tried (GPT-2 inference and training, (4, 32, 4096, 128)). The rest were chosen by compiling every variant for sm_90a on CPU: the largest
    tiles for which ptxas reports no register spills and no serialized wgmma (C7515: with
    128 x 128 tiles the causal masked variant hits it at D = 64). BLOCK_M must be a multiple of
    BLOCK_N (the causal diagonal is BLOCK_M // BLOCK_N key blocks). Each pipeline stage holds one
    K and one V tile in shared memory, 2 * BLOCK_N * head_dim * itemsize bytes.
    masked_dropout (a padding mask and dropout, both): with 64-row programs ptxas serializes that
    variant's wgmma (C7515), so it keeps two warpgroups of 64 rows.
    """
    if jnp.dtype(dtype).itemsize == 2:
        if head_dim <= 128:
            return (128, 64, 8, 3) if masked_dropout else (64, 64, 4, 3)
        return 128, 32, 8, 2
    if precision == "tf32x3":
        # Each dot's operands split in two: twice tf32's operand registers. The largest tiles that
        # build for sm_90 without spills (compile_only sweep of the causal, padded + dropout and
        # non-causal variants); at D = 256 every tiling tried spills, as IEEE fp32's do.
        return (128, 64, 8, 2) if head_dim <= 64 else (16, 16, 4, 1)
    if precision == "tf32":
        # tf32 tensor cores too, with fp32 K and V tiles twice the bytes of 16-bit ones.
        if head_dim <= 64:
            return 128, 64, 8, 3
        if head_dim == 128:
            return 128, 32, 8, 2
        return 64, 16, 8, 2
    # True fp32 has no tensor-core path: Triton's FMA dot holds whole operand rows in registers,
    # and even these small tiles spill a little in the non-causal variant.
    if head_dim <= 64:
        return 64, 32, 8, 2
    return 32, 16, 8, 2


def _bwd_block_config(head_dim: int, dtype, precision: str) -> tuple[tuple[int, ...], ...]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the dK/dV kernel, then of the dQ kernel, for
    an H100.

    dK/dV holds two fp32 [BLOCK_N, head_dim] accumulators and streams BLOCK_M query rows; dQ one
    [BLOCK_M, head_dim] accumulator and streams BLOCK_N keys. The held block is every product's
    row operand: with 8 warps, 64 rows per warpgroup. dK/dV needs BLOCK_N % BLOCK_M == 0, dQ
    BLOCK_M % BLOCK_N == 0 (the causal diagonal).
    16-bit, D = 64 and 128: timed on an H100 (`bench/attention.py --sweep`, causal; D = 64 at
    GPT-2 training's shape with dropout, D = 128 at (4, 32, 4096); bench/RESULTS.md). The winning
    dK/dV tiles spill a little (8 bytes at D = 64 with dropout, up to 168 at D = 128) and still
    beat every tiling that does not. The rest were chosen by compiling for sm_90a on CPU (causal,
    padded, dropout variants): the largest tiles without spills or serialized wgmma (C7515); at
    D = 256 (16-bit) the dropout variant of dK/dV spills 64 bytes; fp32 at D >= 128 spills a
    little in every tiling tried.
    """
    if jnp.dtype(dtype).itemsize == 2:
        if head_dim <= 64:
            return (64, 64, 4, 3), (64, 32, 4, 3)
        if head_dim == 128:
            return (64, 128, 8, 3), (128, 64, 8, 3)
        return (16, 64, 8, 2), (64, 32, 8, 2)
    if precision == "tf32x3":  # as in _block_config
        return ((16, 32, 4, 1), (128, 32, 8, 2)) if head_dim <= 64 else ((16, 16, 4, 1),) * 2
    if precision == "tf32":
        if head_dim <= 64:
            return (32, 128, 8, 2), (128, 64, 8, 2)
        if head_dim == 128:
            return (32, 128, 8, 2), (128, 32, 8, 2)
        return (16, 32, 4, 1), (32, 16, 4, 1)
    # True fp32: FMA dots (see _block_config), small tiles.
    if head_dim <= 64:
        return (32, 32, 4, 1), (32, 32, 4, 1)
    return (16, 16, 4, 1), (16, 16, 4, 1)


def _forward(qkv, mask, seed, cfg: AttentionConfig, store_keep: bool = False):
    """(out, lse, keep): keep, the dropout mask's bits (module docstring), only with store_keep
    and dropout, else None."""
    if hopper.supported(qkv, mask, cfg):
        return (*hopper.forward(qkv, cfg), None)
    B, T, _ = qkv.shape
    block_m, block_n, num_warps, num_stages = _block_config(
        cfg.head_dim, qkv.dtype, cfg.precision, mask is not None and cfg.dropout_rate > 0)
    store_keep = store_keep and cfg.dropout_rate > 0
    keep_shape = (B * cfg.num_heads, T, triton.cdiv(T, 8)) if store_keep else (1,)
    out_shapes = (jax.ShapeDtypeStruct((B, T, cfg.num_heads * cfg.head_dim), qkv.dtype),
                  jax.ShapeDtypeStruct((B, cfg.num_heads, T), jnp.float32),
                  jax.ShapeDtypeStruct(keep_shape, jnp.uint8))
    # Without a mask, qkv stands in for the mask pointer (HAS_MASK off: never read), so no
    # placeholder array is made.
    out, lse, keep = triton_call(
        qkv, qkv, qkv, qkv if mask is None else mask, seed,
        kernel=_attn_fwd_kernel, out_shape=out_shapes,
        grid=(triton.cdiv(T, block_m), B * cfg.num_heads), num_warps=num_warps,
        num_stages=num_stages, **cfg.constexprs(T, mask is not None), STORE_KEEP=store_keep,
        BLOCK_M=block_m, BLOCK_N=block_n)
    return out, lse, keep if store_keep else None


def _dq_and_delta(qkv, mask, keep, out, lse, dout, cfg: AttentionConfig):
    """(dqkv with its q heads written, delta [B, Hq, T] fp32) for the dK/dV kernel to complete:
    `hopper.backward_dq` where it applies, _attn_bwd_dq_kernel otherwise."""
    if hopper.supported(qkv, mask, cfg):
        return hopper.backward_dq(qkv, out, dout, lse, cfg)
    B, T, _ = qkv.shape
    block_m, block_n, num_warps, num_stages = _bwd_block_config(cfg.head_dim, qkv.dtype,
                                                                cfg.precision)[1]
    # Without a mask or dropout qkv stands in for them (HAS_MASK off, DROPOUT_P 0: unread).
    return triton_call(
        qkv, out, dout, lse, qkv if mask is None else mask, qkv if keep is None else keep,
        kernel=_attn_bwd_dq_kernel,
        out_shape=(jax.ShapeDtypeStruct(qkv.shape, qkv.dtype),
                   jax.ShapeDtypeStruct((B, cfg.num_heads, T), jnp.float32)),
        grid=(triton.cdiv(T, block_m), B * cfg.num_heads), num_warps=num_warps,
        num_stages=num_stages, **cfg.constexprs(T, mask is not None), SM_SCALE=cfg.sm_scale,
        BLOCK_M=block_m, BLOCK_N=block_n)


def _backward(qkv, mask, keep, out, lse, dout, cfg: AttentionConfig):
    """dqkv [B, T, (Hq + 2 Hkv) D] in qkv.dtype: the dQ kernel (which also makes delta) writes its
    q heads, then the dK/dV kernel its k and v heads, in place (module docstring)."""
    B, T, _ = qkv.shape
    dq, delta = _dq_and_delta(qkv, mask, keep, out, lse, dout, cfg)
    block_m, block_n, num_warps, num_stages = _bwd_block_config(cfg.head_dim, qkv.dtype,
                                                                cfg.precision)[0]
    return triton_call(
        qkv, dout, lse, delta, qkv if mask is None else mask, qkv if keep is None else keep, dq,
        kernel=_attn_bwd_dkdv_kernel, out_shape=jax.ShapeDtypeStruct(qkv.shape, qkv.dtype),
        input_output_aliases={6: 0}, grid=(triton.cdiv(T, block_n), B * cfg.num_kv_heads),
        num_warps=num_warps, num_stages=num_stages, **cfg.constexprs(T, mask is not None),
        SM_SCALE=cfg.sm_scale, BLOCK_M=block_m, BLOCK_N=block_n)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _flash_attention(qkv, mask, seed, cfg: AttentionConfig):
    return _forward(qkv, mask, seed, cfg)[0]


def _flash_attention_fwd(qkv, mask, seed, cfg):
    out, lse, keep = _forward(qkv, mask, seed, cfg, store_keep=True)
    return out, (qkv, mask, keep, out, lse)


def _flash_attention_bwd(cfg, saved, dout):
    qkv, mask, keep, out, lse = saved
    dqkv = _backward(qkv, mask, keep, out, lse, dout, cfg)
    # The mask and the seed (a scalar) are integer arrays: their cotangents are float0 zeros.
    dmask = None if mask is None else np.zeros(mask.shape, jax.dtypes.float0)
    return dqkv, dmask, np.zeros((), jax.dtypes.float0)


_flash_attention.defvjp(_flash_attention_fwd, _flash_attention_bwd)


# -------------------------------------------------------------------------------------- public

def _checked(qkv, num_heads, num_kv_heads, attention_mask, causal, sm_scale, precision,
             dropout_rate, seed):
    """(qkv, int32 mask or None, int32 seed, AttentionConfig) after checking every argument."""
    num_kv_heads, head_dim = packed_qkv_heads(qkv, num_heads, num_kv_heads)
    B, T, _ = qkv.shape
    sm_scale = checked_scale(head_dim, precision, sm_scale)
    if B * num_heads > MAX_GRID_Y:
        raise ValueError(f"batch * num_heads = {B} * {num_heads} exceeds {MAX_GRID_Y}: split the "
                         f"batch into chunks of at most {MAX_GRID_Y // num_heads}")
    attention_mask = checked_key_mask("attention_mask", attention_mask, (B, T))
    seed = dropout_seed(dropout_rate, seed)
    cfg = AttentionConfig(num_heads, num_kv_heads, head_dim, bool(causal), sm_scale, precision,
                  float(dropout_rate))
    return qkv, attention_mask, seed, cfg


def attention_forward(qkv, *, num_heads, num_kv_heads=None, attention_mask=None, causal=True,
                      sm_scale=None, precision="ieee", dropout_rate=0.0, seed=None):
    """Attention over packed qkv; returns (out, lse). See `flash_attention` for the arguments.
    Not differentiable (flash_attention is).

    lse [B, num_heads, T] fp32 is the natural-log log-sum-exp of each query row's scaled, masked
    scores (+inf on rows that see no key), kept for the backward.
    """
    return _forward(*_checked(qkv, num_heads, num_kv_heads, attention_mask, causal, sm_scale,
                              precision, dropout_rate, seed))[:2]


def flash_attention(qkv, *, num_heads, num_kv_heads=None, attention_mask=None, causal=True,
                    sm_scale=None, precision="ieee", dropout_rate=0.0, seed=None):
    """Multi-head (or grouped-query) attention straight from the packed qkv projection.

    qkv [B, T, (Hq + 2 * Hkv) * D] packed as [q heads | k heads | v heads], each [H, D] row-major
    (exactly the output of GPT-2's c_attn GEMM reshaped nowhere). Returns [B, T, Hq * D] in
    qkv.dtype (ready for the output projection GEMM, no transpose).

    num_heads: Hq. num_kv_heads: Hkv (default Hq); Hq must be a multiple, and query head h reads
    kv head h // (Hq // Hkv). D must be one of common.HEAD_DIMS; dtype float32, float16 or bfloat16.
    attention_mask: [B, T] int or bool, 1 = token, 0 = padding; it masks keys, as in Hugging Face
    GPT-2, and a query row whose visible keys are all padding returns zeros. causal: query i sees
    keys j <= i. sm_scale: default D ** -0.5. precision: tl.dot's input precision for float32
    inputs, "ieee" (true fp32), "tf32x3" (three tf32 tensor-core products: about fp32's error)
    or "tf32" (one: ~1e-3 relative error); 16-bit inputs ignore it.
    dropout_rate in [0, 1): drops attention probabilities (GPT-2's attn_pdrop); above 0, seed (an
    integer array of shape (), traced or not: a new seed does not recompile) is required.
    Softmax statistics and accumulation are fp32 whatever the dtype.

    Differentiable wrt qkv (dqkv packed like qkv, in its dtype; Triton kernels only); the forward
    saves qkv, out, the fp32 lse [B, Hq, T] and with dropout the mask's bits (module docstring).
    """
    return _flash_attention(*_checked(qkv, num_heads, num_kv_heads, attention_mask, causal,
                                      sm_scale, precision, dropout_rate, seed))
