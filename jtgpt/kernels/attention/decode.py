"""Decode-time attention (flash-decoding): one new token per batch row against its KV cache.

For batch row b with L_b = lengths[b] slots (the new token's is L_b - 1), query head h reading
kv head g = h // (Hq // Hkv), and the row's visible keys J_b = {j < L_b - 1 : key_mask[b, j] !=
0} + {L_b - 1} (the token always sees itself):

    s_j   = sm_scale * q_h . k_gj                   j in J_b
    out_h = sum_j exp(s_j - lse) v_gj,   lse = log sum_j exp(s_j)

Split: the row's keys [0, L_b) are cut into NUM_SPLITS chunks of c_b = BLOCK_N ceil(ceil(L_b /
NUM_SPLITS) / BLOCK_N) keys (whole blocks; the last chunks may be short or empty), split s taking
[s c_b, min((s + 1) c_b, L_b)). The chunks follow the runtime length, not the capacity S, so a
short row's work is spread over its first splits, not left to one program. Each split computes
over its own keys J_s, exactly as flash.py's forward does over a whole row (online softmax in
fp32, base 2: log2(e) is folded into the scale and every exponential is one exp2):

    lse_s = log sum_{j in J_s} exp(s_j)             (-inf if J_s is empty)
    o_s   = sum_{j in J_s} exp(s_j - lse_s) v_gj    (0 if J_s is empty)

and the merge kernel combines the splits, with M = max_s lse_s:

    out_h = sum_s exp(lse_s - M) o_s / sum_s exp(lse_s - M)

exact, since exp(lse_s - M) o_s = sum_{j in J_s} exp(s_j - M) v_gj. Empty splits weigh
exp(-inf) = 0 (a row's splits are never all empty: one holds the new token; M = -inf would be
taken as 0, so that no -inf - (-inf) = NaN arises). lse is kept in log2 units throughout (an
internal value).
With NUM_SPLITS = 1 the split's o_s is already out_h: the split kernel writes it in qkv's dtype
and no merge kernel runs (one launch instead of two: a decode step runs ~100 kernels per token,
and at batch 1 each launch costs about as much as a short row's attention).

Programs: one per (split, batch row, kv head). It loads the GROUP = Hq / Hkv query heads of its
kv head as one [BLOCK_H, D] tile (BLOCK_H = max(16, next_power_of_2(GROUP)): tl.dot needs 16
rows; the rows past GROUP are zeros and never stored), so each K and V tile is read from memory
once for the whole group and q k^T runs as one tl.dot. The kernel is memory-bound: its cost is
reading the cache's L_b * 2 Hkv D values of each row once at full bandwidth. The partials (fp32 o_s
[B, Hq, NUM_SPLITS, D] and lse_s [B, Hq, NUM_SPLITS]) are Hq NUM_SPLITS (D + 1) values a row,
written and read once: small next to the cache.

Nothing at or past a row's length, nor at a masked slot, reaches the result: those keys and
values are not loaded at all (masked loads, other=0), so a slot holding NaN or garbage there
(padding never written, stale values past the length) changes nothing.

The new token's own key and value (slot L_b - 1) come from qkv, not from the cache: the program
whose split holds that slot puts them into its K and V tiles in place of the slot's row, and
stores them into the slot (the cache is aliased to an output). No program reads the slot, so
none reads what another is writing.

Layout: qkv [B, 1, (Hq + 2 Hkv) D] is the new token's packed projection (as flash.py reads it),
read in place through strides. kv_cache [B, S, 2 Hkv D]: row s of batch b is
slot s's [k heads | v heads], the k|v tail of the packed qkv layout. out [B, 1, Hq D] (the
output projection's input) has the memory layout of [B, Hq, 1, D], so the split kernel's store
serves both its partial output and, with one split, the final one.

Inference only: there is no custom_vjp (no gradient through the cache).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import triton
import triton.language as tl

from jtgpt.call import on_gpu, triton_call
from jtgpt.kernels import packed_qkv_heads
from jtgpt.kernels.attention.common import (MAX_GRID_Y, check_split_options,
                                            checked_key_mask, checked_scale)
from jtgpt.kernels.matmul import NUM_SMS

PROGRAMS_PER_SM = 2     # split-kernel programs to aim for per SM (two hide each other's loads)
MIN_SPLIT_KEYS = 256    # each split of a full cache streams at least this many keys
MAX_SPLITS = 32         # bounds the merge's [splits, D] tile and the partials


# ------------------------------------------------------------------------------------- kernels

@triton.jit
def _decode_split_kernel(qkv_ptr, kv_ptr, len_ptr, mask_ptr, out_ptr, lse_ptr, kv_out_ptr,
                         S: tl.constexpr, HQ: tl.constexpr, HKV: tl.constexpr,
                         HEAD_DIM: tl.constexpr, QK_SCALE: tl.constexpr, HAS_MASK: tl.constexpr,
                         PRECISION: tl.constexpr, NUM_SPLITS: tl.constexpr,
                         BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: split program_id(0) of the keys of one (batch row, kv head), for the GROUP
    query heads of that kv head. Grid (NUM_SPLITS, B * HKV).

    qkv_ptr: [B, 1, (HQ + 2 HKV) HEAD_DIM]; kv_ptr: [B, S, 2 HKV HEAD_DIM]; len_ptr: int32 [B];
    mask_ptr: int32 key mask [B, S] (unread unless HAS_MASK); out_ptr: [B, HQ, NUM_SPLITS,
    HEAD_DIM], fp32 partials, or the final output in qkv's dtype when NUM_SPLITS = 1; lse_ptr:
    fp32 [B, HQ, NUM_SPLITS], log2 units; kv_out_ptr: kv_ptr's buffer (aliased), where the
    program whose split holds slot length - 1 stores the new token's k and v heads of its kv head.
    """
    GROUP: tl.constexpr = HQ // HKV
    QKV_ROW: tl.constexpr = (HQ + 2 * HKV) * HEAD_DIM
    KV_ROW: tl.constexpr = 2 * HKV * HEAD_DIM
    split = tl.program_id(0)
    pid = tl.program_id(1)
    b = pid // HKV
    g = pid % HKV

    # Under jax.jit a length outside [1, S] cannot be refused: the row reads and writes nothing
    # and its output is NaN (also through the merge: its partials are NaN), never a plausible value.
    length = tl.load(len_ptr + b)
    valid = (length >= 1) & (length <= S)
    length = tl.where(valid, length, 0)
    chunk = tl.cdiv(tl.cdiv(length, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, length)  # lo >= hi: an empty split, the loop does not run
    new_slot = length - 1  # the new token's: its k and v come from qkv, not from the cache

    rows = tl.arange(0, BLOCK_H)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = rows < GROUP
    heads = g * GROUP + rows
    q = tl.load(qkv_ptr + b * QKV_ROW + heads[:, None] * HEAD_DIM + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    # int64 batch offset: B * S * KV_ROW can pass 2**31 (Llama-3-8B: 2048 values a slot).
    k_ptrs = (kv_ptr + b.to(tl.int64) * (S * KV_ROW) + g * HEAD_DIM
              + offs_n[:, None] * KV_ROW + offs_d[None, :])
    v_ptrs = k_ptrs + HKV * HEAD_DIM
    mask_ptrs = mask_ptr + b * S
    k_new = tl.load(qkv_ptr + b * QKV_ROW + (HQ + g) * HEAD_DIM + offs_d)
    v_new = tl.load(qkv_ptr + b * QKV_ROW + (HQ + HKV + g) * HEAD_DIM + offs_d)

    acc = tl.zeros([BLOCK_H, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    # A finite floor, as in flash.py: while every key seen is masked, exp2(-inf - floor) = 0.
    m_i = tl.full([BLOCK_H], -1.0e30, dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        is_new = cols == new_slot  # always visible: the token's own key
        keep = cols < hi
        if HAS_MASK:
            keep = keep & ((tl.load(mask_ptrs + cols, mask=keep, other=0) != 0) | is_new)
        # Keys and values that are not kept are not read (other=0): a NaN there cannot leak
        # into acc through 0 * NaN. The new token's slot is not read either: another program
        # may be writing it.
        cached = keep & ~is_new
        k = tl.load(k_ptrs + start_n * KV_ROW, mask=cached[:, None], other=0.0)
        k = tl.where(is_new[:, None], k_new[None, :], k)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        s = tl.where(keep[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * QK_SCALE)
        p = tl.math.exp2(s * QK_SCALE - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptrs + start_n * KV_ROW, mask=cached[:, None], other=0.0)
        v = tl.where(is_new[:, None], v_new[None, :], v)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new

    # The split that holds the new token's slot stores its k and v heads there.
    owns_new = valid & (lo <= new_slot) & (new_slot < hi)
    slot_ptr = kv_out_ptr + b.to(tl.int64) * (S * KV_ROW) + new_slot * KV_ROW + g * HEAD_DIM
    tl.store(slot_ptr + offs_d, k_new, mask=owns_new)
    tl.store(slot_ptr + HKV * HEAD_DIM + offs_d, v_new, mask=owns_new)

    # l_i = 0 exactly when the split saw no key (then acc = 0): o_s = 0 and lse_s = -inf.
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    out = tl.where(valid, acc / l_safe[:, None], float("nan"))
    lse = tl.where(valid, tl.where(seen, m_i + tl.log2(l_safe), float("-inf")), float("nan"))
    bh = b * HQ + heads
    out_ptrs = out_ptr + (bh[:, None] * NUM_SPLITS + split) * HEAD_DIM + offs_d[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    tl.store(lse_ptr + bh * NUM_SPLITS + split, lse, mask=row_ok)


@triton.jit
def _decode_merge_kernel(part_ptr, lse_ptr, out_ptr, NUM_SPLITS: tl.constexpr,
                         HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr):
    """One program: the output of one (batch row, query head), b * HQ + h = program_id(0), from
    its NUM_SPLITS partials (module docstring). part_ptr: fp32 [B, HQ, NUM_SPLITS, HEAD_DIM];
    lse_ptr: fp32 [B, HQ, NUM_SPLITS] (log2 units); out_ptr: [B, HQ, HEAD_DIM] in qkv's dtype."""
    bh = tl.program_id(0)
    splits = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = splits < NUM_SPLITS
    lse = tl.load(lse_ptr + bh * NUM_SPLITS + splits, mask=ok, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # every split empty: all weights exp2(-inf) = 0
    w = tl.math.exp2(lse - m)
    part = tl.load(part_ptr + (bh * NUM_SPLITS + splits)[:, None] * HEAD_DIM + offs_d[None, :],
                   mask=ok[:, None], other=0.0)
    total = tl.sum(w, 0)
    out = tl.sum(w[:, None] * part, 0) / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + bh * HEAD_DIM + offs_d, out.to(out_ptr.dtype.element_ty))


# ----------------------------------------------------------------------------------- launchers

def _block_config(head_dim: int, dtype, precision: str) -> tuple[int, int, int]:
    """Split kernel (BLOCK_N, num_warps, num_stages) for an H100/H200.

    Memory-bound: each pipeline stage holds one K and one V tile in shared memory (2 BLOCK_N
    head_dim itemsize bytes: 16 KB for bf16 at D = 64, BLOCK_N = 64), and three stages keep
    enough loads in flight per program. Not yet timed on the GPU. In the interpreter: the
    smallest block tl.dot takes (16), so that short test caches cross block boundaries.
    """
    if not on_gpu():
        return 16, 4, 1
    if jnp.dtype(dtype).itemsize == 2:
        return (64, 4, 3) if head_dim <= 128 else (32, 4, 3)
    if precision != "ieee":  # tf32 or tf32x3: tensor cores
        return (32, 4, 3) if head_dim <= 128 else (16, 4, 2)
    # True fp32 dots run on FMA units, holding whole operand rows in registers: small tiles.
    return (32, 4, 2) if head_dim <= 64 else (16, 4, 2)


def _num_splits(batch: int, num_kv_heads: int, capacity: int) -> int:
    """How many splits the keys of each (batch row, kv head) are cut into (paged.py's query
    tiles too: batch is then the tiles, capacity a table's positions); static: a function of
    the shapes only, so a new length never recompiles.

    Enough programs for PROGRAMS_PER_SM per SM (FlashAttention-2's split heuristic also aims for
    two blocks per SM), but no split shorter than MIN_SPLIT_KEYS keys of a full cache (a short
    split is mostly launch and merge overhead: below 2 MIN_SPLIT_KEYS slots, one split and a
    single launch), and at most MAX_SPLITS. Large batches (B Hkv >= 2 NUM_SMS) get one split.
    In the interpreter, which runs programs one at a time, one split.
    """
    if not on_gpu():
        return 1
    wanted = triton.cdiv(PROGRAMS_PER_SM * NUM_SMS, batch * num_kv_heads)
    return max(1, min(wanted, capacity // MIN_SPLIT_KEYS, MAX_SPLITS))


def _decode(qkv, kv_cache, lengths, key_mask, *, num_heads, num_kv_heads, head_dim, sm_scale,
            precision, num_splits, block_n):
    """(out [B, 1, Hq D], the cache with the new token's slot written): the split kernel, then
    (with several splits) the merge kernel."""
    B, S = kv_cache.shape[:2]
    default_block_n, num_warps, num_stages = _block_config(head_dim, qkv.dtype, precision)
    block_n = block_n or default_block_n
    num_splits = num_splits or _num_splits(B, num_kv_heads, S)
    group = num_heads // num_kv_heads
    final = jax.ShapeDtypeStruct((B, 1, num_heads * head_dim), qkv.dtype)
    # One split writes the final output itself; several write fp32 partials for the merge.
    split_out = final if num_splits == 1 else jax.ShapeDtypeStruct(
        (B, num_heads, num_splits, head_dim), jnp.float32)
    # Without a mask, lengths stands in for the mask pointer (HAS_MASK off: never read).
    out, lse, kv_cache = triton_call(
        qkv, kv_cache, lengths, lengths if key_mask is None else key_mask,
        kernel=_decode_split_kernel,
        out_shape=(split_out, jax.ShapeDtypeStruct((B, num_heads, num_splits), jnp.float32),
                   jax.ShapeDtypeStruct(kv_cache.shape, kv_cache.dtype)),
        input_output_aliases={1: 2},
        grid=(num_splits, B * num_kv_heads), num_warps=num_warps, num_stages=num_stages,
        S=S, HQ=num_heads, HKV=num_kv_heads, HEAD_DIM=head_dim,
        QK_SCALE=sm_scale * math.log2(math.e), HAS_MASK=key_mask is not None,
        PRECISION=precision, NUM_SPLITS=num_splits,
        BLOCK_H=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n)
    if num_splits == 1:
        return out, kv_cache
    out = triton_call(out, lse, kernel=_decode_merge_kernel, out_shape=final,
                      grid=(B * num_heads,), num_warps=4, NUM_SPLITS=num_splits,
                      HEAD_DIM=head_dim, BLOCK_S=triton.next_power_of_2(num_splits))
    return out, kv_cache


# -------------------------------------------------------------------------------------- public

def _check_lengths(lengths, B: int, S: int):
    """lengths as int32 [B], after checking its shape, dtype and (when concrete) values."""
    lengths = jnp.asarray(lengths)
    if tuple(lengths.shape) != (B,):
        raise ValueError(f"lengths must have shape [B] = {(B,)}, got {tuple(lengths.shape)}")
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"lengths must be an integer array, got {jnp.dtype(lengths.dtype).name}")
    if not isinstance(lengths, jax.core.Tracer):
        values = np.asarray(lengths)
        if ((values < 1) | (values > S)).any():
            raise ValueError(f"lengths must be in [1, S] = [1, {S}] (the new token's slot is "
                             f"lengths - 1, within the cache's capacity), got {values.tolist()}")
    return lengths.astype(jnp.int32)


def decode_attention(qkv, kv_cache, lengths, *, num_heads, num_kv_heads=None, key_mask=None,
                     sm_scale=None, precision="ieee", num_splits=None, block_n=None):
    """Attention of one new token per batch row over its KV cache, the token's own key and
    value included; returns (out [B, 1, Hq * D] in qkv.dtype, ready for the output projection
    GEMM; the cache with the token's k and v heads stored in its slot).

    qkv [B, 1, (Hq + 2 * Hkv) * D]: the new token's packed projection [q heads | k heads | v
    heads], as flash_attention takes it. kv_cache [B, S, 2 * Hkv * D] in qkv's dtype: row s of
    batch row b is slot s's [k heads | v heads]; S is the static capacity. The kernel writes the
    new token's slot in place (the returned cache is the argument's buffer, which jit reuses
    when the argument is not needed afterwards, as in a decode loop): storing the token costs no
    launch of its own.
    lengths [B] integer, a runtime array (new values do not recompile): row b's new token goes
    to slot lengths[b] - 1 and attends to slots [0, lengths[b]). Each must be in [1, S]: a
    ValueError when lengths is concrete; under jax.jit it cannot be checked, and a row whose
    length is outside gets NaN and writes nothing.
    key_mask [B, S] int or bool, optional: nonzero = attend, 0 = skip the slot (a left-padded
    prompt's padding); the new token always sees itself. Slots at or past lengths[b] and masked
    slots are never read: their contents do not matter.

    num_heads: Hq. num_kv_heads: Hkv (default Hq); Hq must be a multiple, and query head h reads
    kv head h // (Hq // Hkv). D must be one of common.HEAD_DIMS; dtype float32, float16 or
    bfloat16. sm_scale: default D ** -0.5. precision: tl.dot's input precision for float32,
    "ieee", "tf32x3" or "tf32", as in flash_attention. Softmax statistics and accumulation are fp32.
    num_splits (how many programs share the keys of each row and kv head; with more than one, a
    second kernel merges their partial results) and block_n (keys per loop step, a power of two
    >= 16) override the defaults chosen from the static shapes (`_num_splits`, `_block_config`).

    Inference only: not differentiable (no custom_vjp).
    """
    num_kv_heads, head_dim = packed_qkv_heads(qkv, num_heads, num_kv_heads)
    B, T, _ = qkv.shape
    if T != 1:
        raise ValueError(f"qkv must hold one token per row, [B, 1, ...], got shape "
                         f"{tuple(qkv.shape)} (prompts go through flash_attention)")
    sm_scale = checked_scale(head_dim, precision, sm_scale)
    kv_width = 2 * num_kv_heads * head_dim
    if (getattr(kv_cache, "ndim", None) != 3
            or (kv_cache.shape[0], kv_cache.shape[2]) != (B, kv_width)):
        raise ValueError(f"kv_cache must have shape [B, S, 2 * num_kv_heads * head_dim] = "
                         f"[{B}, S, {kv_width}], got {tuple(getattr(kv_cache, 'shape', ()))}")
    if kv_cache.dtype != qkv.dtype:
        raise ValueError(f"kv_cache dtype must be qkv's ({jnp.dtype(qkv.dtype).name}), got "
                         f"{jnp.dtype(kv_cache.dtype).name}")
    S = kv_cache.shape[1]
    lengths = _check_lengths(lengths, B, S)
    key_mask = checked_key_mask("key_mask", key_mask, (B, S))
    if B * num_kv_heads > MAX_GRID_Y:
        raise ValueError(f"batch * num_kv_heads = {B} * {num_kv_heads} exceeds {MAX_GRID_Y}")
    check_split_options(num_splits, block_n)
    return _decode(qkv, kv_cache, lengths, key_mask, num_heads=num_heads,
                   num_kv_heads=num_kv_heads, head_dim=head_dim, sm_scale=sm_scale,
                   precision=precision, num_splits=num_splits, block_n=block_n)
