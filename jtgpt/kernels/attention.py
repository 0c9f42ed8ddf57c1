"""Flash attention forward: softmax(q k^T * sm_scale + mask) v; causal, padded, grouped-query.

For batch b, query head h (reading kv head g = h // (Hq // Hkv)) and query row i:

    s_ij  = sm_scale * q_i . k_j             over the keys j that i may see: j <= i when causal,
                                             and attention_mask[b, j] != 0
    lse_i = log sum_j exp(s_ij)
    out_i = sum_j exp(s_ij - lse_i) v_j

FlashAttention-2: one program owns BLOCK_M query rows of one head and streams the visible keys
in blocks of BLOCK_N. It keeps, per row, the running max m_i of the scores seen so far, the
running sum l_i = sum_j exp(s_ij - m_i) and an unnormalised fp32 accumulator acc_i =
sum_j exp(s_ij - m_i) v_j; when a key block raises the max, l_i and acc_i are rescaled by
exp(m_old - m_new) (online softmax), and acc_i / l_i is taken once at the end. Scores never reach
memory. Everything runs in base 2: log2(e) is folded into the scale, so m_i is in log2 units and
each exponential is one exp2 (a single MUFU instruction on the GPU).

Layout: qkv is the [B, T, (Hq + 2 Hkv) D] output of the c_attn GEMM, each row [q heads | k heads |
v heads] with each head D contiguous values. The kernel reads every head's [T, D] slice in place
through strides and writes out as [B, T, Hq D], the input of the output-projection GEMM, so no
split, transpose or merge of heads ever costs an XLA copy.

lse [B, Hq, T] (natural log, fp32) is saved for the backward. A query row that sees no key at all
(every key it may see is padding) gets out = 0, as in `jtgpt.reference.attention`, and
lse = +inf, so that the backward's exp(s - lse) is 0 on that row rather than NaN.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from jtgpt.call import triton_call
from jtgpt.kernels import check_float_dtype

HEAD_DIMS = (16, 32, 64, 128, 256)
PRECISIONS = ("ieee", "tf32")
MAX_GRID_Y = 65535


# -------------------------------------------------------------------------------------- kernel

@triton.jit
def _attn_fwd_block_loop(acc, l_i, m_i, q, k_ptrs, v_ptrs, mask_ptrs, offs_m, offs_n, lo, hi,
                         T: tl.constexpr, ROW: tl.constexpr, QK_SCALE: tl.constexpr,
                         HAS_MASK: tl.constexpr, DIAGONAL: tl.constexpr, KEY_TAIL: tl.constexpr,
                         PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    """Fold the key blocks [lo, hi) into (acc, l_i, m_i).

    DIAGONAL: the blocks straddle the causal diagonal (elementwise causal mask). KEY_TAIL: the
    last block may run past T (masked loads; keys >= T masked out unless the causal or padding
    mask already hides them). Blocks left of the diagonal, and the whole blocks of the
    non-causal case, need neither and skip the per-element work.
    """
    k_ptrs += lo * ROW
    v_ptrs += lo * ROW
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        in_seq = cols < T
        if KEY_TAIL:
            k = tl.load(k_ptrs, mask=in_seq[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)

        if HAS_MASK:
            # Masked load: `other=0` also marks keys >= T as padding.
            key_ok = tl.load(mask_ptrs + cols, mask=in_seq, other=0) != 0
        if DIAGONAL:
            # Rows >= T are never stored, so the causal test alone also hides keys >= T.
            keep = offs_m[:, None] >= cols[None, :]
            if HAS_MASK:
                keep = keep & key_ok[None, :]
            s = tl.where(keep, s, float("-inf"))
        elif HAS_MASK:
            s = tl.where(key_ok[None, :], s, float("-inf"))
        elif KEY_TAIL:
            s = tl.where(in_seq[None, :], s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1) * QK_SCALE)
        p = tl.math.exp2(s * QK_SCALE - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
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
def _attn_fwd_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, lse_ptr,
                     T: tl.constexpr, HQ: tl.constexpr, HKV: tl.constexpr, HEAD_DIM: tl.constexpr,
                     QK_SCALE: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
                     PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: BLOCK_M query rows of one (batch, query head). Grid (cdiv(T, BLOCK_M), B * HQ).

    q_ptr, k_ptr and v_ptr all point at the packed qkv [B, T, (HQ + 2 HKV) HEAD_DIM]; mask_ptr at
    the int32 attention mask [B, T] (unread unless HAS_MASK); out_ptr at [B, T, HQ HEAD_DIM];
    lse_ptr at fp32 [B, HQ, T].
    """
    ROW: tl.constexpr = (HQ + 2 * HKV) * HEAD_DIM  # stride of one token in qkv
    OUT_ROW: tl.constexpr = HQ * HEAD_DIM
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    if CAUSAL:
        # Causal work grows with the query block: hand out the longest blocks first so the short
        # ones fill the end of the schedule instead of leaving a tail of long ones.
        start_m = tl.num_programs(0) - 1 - pid_m
    else:
        start_m = pid_m
    b = pid_bh // HQ
    h = pid_bh % HQ
    g = h // (HQ // HKV)

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
            acc, l_i, m_i, q, k_ptrs, v_ptrs, mask_ptrs, offs_m, offs_n, 0, diag, T, ROW, QK_SCALE,
            HAS_MASK, DIAGONAL=False, KEY_TAIL=False, PRECISION=PRECISION, BLOCK_N=BLOCK_N)
        diag_end = tl.minimum(diag + BLOCK_M, T)
        acc, l_i, m_i = _attn_fwd_block_loop(
            acc, l_i, m_i, q, k_ptrs, v_ptrs, mask_ptrs, offs_m, offs_n, diag, diag_end, T, ROW,
            QK_SCALE, HAS_MASK, DIAGONAL=True, KEY_TAIL=True, PRECISION=PRECISION, BLOCK_N=BLOCK_N)
    else:
        FULL: tl.constexpr = T // BLOCK_N * BLOCK_N
        acc, l_i, m_i = _attn_fwd_block_loop(
            acc, l_i, m_i, q, k_ptrs, v_ptrs, mask_ptrs, offs_m, offs_n, 0, FULL, T, ROW, QK_SCALE,
            HAS_MASK, DIAGONAL=False, KEY_TAIL=False, PRECISION=PRECISION, BLOCK_N=BLOCK_N)
        if FULL < T:
            acc, l_i, m_i = _attn_fwd_block_loop(
                acc, l_i, m_i, q, k_ptrs, v_ptrs, mask_ptrs, offs_m, offs_n, FULL, T, T, ROW,
                QK_SCALE, HAS_MASK, DIAGONAL=False, KEY_TAIL=True, PRECISION=PRECISION,
                BLOCK_N=BLOCK_N)

    # l_i = 0 exactly when the row saw no key (then acc = 0 too): out 0 and lse +inf. m_i is in
    # log2 units, so m_i * ln(2) is the row's natural-log max.
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(seen, m_i * 0.6931471805599453 + tl.log(l_safe), float("inf"))

    row_ok = offs_m < T
    out_ptrs = (out_ptr + b.to(tl.int64) * (T * OUT_ROW) + h * HEAD_DIM
                + offs_m[:, None] * OUT_ROW + offs_d[None, :])
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    tl.store(lse_ptr + pid_bh * T + offs_m, lse, mask=row_ok)


# ------------------------------------------------------------------------------------ launcher

def _block_config(head_dim: int, dtype, precision: str) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for an H100; not yet timed there.

    Chosen by compiling every variant for sm_90a on CPU: the largest tiles for which ptxas
    reports no register spills and no serialized wgmma (C7515: with 128 x 128 tiles the causal
    masked variant hits it at D = 64). BLOCK_M must be a multiple of BLOCK_N (the causal diagonal
    is BLOCK_M // BLOCK_N key blocks). Each pipeline stage holds one K and one V tile in shared
    memory, 2 * BLOCK_N * head_dim * itemsize bytes.
    """
    if jnp.dtype(dtype).itemsize == 2:
        # 8 warps: two warpgroups of 64 query rows each, sharing every K and V tile.
        if head_dim <= 128:
            return 128, 64, 8, 3
        return 128, 32, 8, 2
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


def _launch(qkv, mask, *, num_heads, num_kv_heads, head_dim, causal, sm_scale, precision):
    B, T, _ = qkv.shape
    block_m, block_n, num_warps, num_stages = _block_config(head_dim, qkv.dtype, precision)
    out_shapes = (jax.ShapeDtypeStruct((B, T, num_heads * head_dim), qkv.dtype),
                  jax.ShapeDtypeStruct((B, num_heads, T), jnp.float32))
    # Without a mask, qkv stands in for the mask pointer (HAS_MASK off: never read), so no
    # placeholder array is made.
    return triton_call(
        qkv, qkv, qkv, qkv if mask is None else mask,
        kernel=_attn_fwd_kernel, out_shape=out_shapes,
        grid=(triton.cdiv(T, block_m), B * num_heads), num_warps=num_warps, num_stages=num_stages,
        T=T, HQ=num_heads, HKV=num_kv_heads, HEAD_DIM=head_dim,
        QK_SCALE=sm_scale * math.log2(math.e), CAUSAL=bool(causal), HAS_MASK=mask is not None,
        PRECISION=precision, BLOCK_M=block_m, BLOCK_N=block_n)


# -------------------------------------------------------------------------------------- public

def attention_forward(qkv, *, num_heads, num_kv_heads=None, attention_mask=None, causal=True,
                      sm_scale=None, precision="ieee"):
    """Attention over packed qkv; returns (out, lse). See `flash_attention` for the arguments.

    lse [B, num_heads, T] fp32 is the natural-log log-sum-exp of each query row's scaled, masked
    scores (+inf on rows that see no key), kept for the backward.
    """
    if getattr(qkv, "ndim", None) != 3:
        raise ValueError(f"qkv must be 3-D [B, T, (num_heads + 2 * num_kv_heads) * head_dim], "
                         f"got shape {getattr(qkv, 'shape', None)}")
    check_float_dtype("qkv dtype", qkv.dtype)
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if num_kv_heads < 1 or num_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a positive multiple of num_kv_heads "
                         f"({num_kv_heads})")
    B, T, width = qkv.shape
    heads = num_heads + 2 * num_kv_heads
    if width % heads:
        raise ValueError(f"qkv's last dim ({width}) must be (num_heads + 2 * num_kv_heads) * "
                         f"head_dim = {heads} * head_dim")
    head_dim = width // heads
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head_dim = qkv.shape[-1] / (num_heads + 2 * num_kv_heads) = {head_dim} "
                         f"is not supported; supported head_dim: {HEAD_DIMS}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    sm_scale = head_dim ** -0.5 if sm_scale is None else float(sm_scale)
    if not sm_scale > 0:
        # The kernel takes max(s) * scale as max(s * scale), which needs scale > 0.
        raise ValueError(f"sm_scale must be positive, got {sm_scale}")
    if B * num_heads > MAX_GRID_Y:
        # (batch, head) pairs run on the grid's second axis, which CUDA caps at 65535.
        raise ValueError(f"batch * num_heads = {B} * {num_heads} exceeds {MAX_GRID_Y}: split the "
                         f"batch into chunks of at most {MAX_GRID_Y // num_heads}")
    if attention_mask is not None:
        if tuple(attention_mask.shape) != (B, T):
            raise ValueError(f"attention_mask must have shape [B, T] = {(B, T)}, "
                             f"got {tuple(attention_mask.shape)}")
        mask_dtype = jnp.dtype(attention_mask.dtype)
        if not (jnp.issubdtype(mask_dtype, jnp.integer) or mask_dtype == jnp.bool_):
            raise ValueError(f"attention_mask must be int or bool (1 = token, 0 = padding), "
                             f"got {mask_dtype.name}")
        attention_mask = attention_mask.astype(jnp.int32)
    return _launch(qkv, attention_mask, num_heads=num_heads, num_kv_heads=num_kv_heads,
                   head_dim=head_dim, causal=causal, sm_scale=sm_scale, precision=precision)


def flash_attention(qkv, *, num_heads, num_kv_heads=None, attention_mask=None, causal=True,
                    sm_scale=None, precision="ieee"):
    """Multi-head (or grouped-query) attention straight from the packed qkv projection.

    qkv [B, T, (Hq + 2 * Hkv) * D] packed as [q heads | k heads | v heads], each [H, D] row-major
    (exactly the output of GPT-2's c_attn GEMM reshaped nowhere). Returns [B, T, Hq * D] in
    qkv.dtype (ready for the output projection GEMM, no transpose).

    num_heads: Hq. num_kv_heads: Hkv (default Hq); Hq must be a multiple, and query head h reads
    kv head h // (Hq // Hkv). D must be one of HEAD_DIMS; dtype float32, float16 or bfloat16.
    attention_mask: [B, T] int or bool, 1 = token, 0 = padding; it masks keys, as in Hugging Face
    GPT-2, and a query row whose visible keys are all padding returns zeros. causal: query i sees
    keys j <= i. sm_scale: default D ** -0.5. precision: tl.dot's input precision for float32
    inputs, "ieee" (true fp32) or "tf32" (faster, ~1e-3 relative error); 16-bit inputs ignore it.
    Softmax statistics and accumulation are fp32 whatever the dtype.
    """
    out, _ = attention_forward(qkv, num_heads=num_heads, num_kv_heads=num_kv_heads,
                               attention_mask=attention_mask, causal=causal, sm_scale=sm_scale,
                               precision=precision)
    return out
