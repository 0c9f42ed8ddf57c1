"""Paged attention over a ragged batch: every sequence's new tokens (one for a decode row, many
for a prefill or extend row) against its keys and values in a pool of fixed-size pages, in one
launch, the new tokens' keys and values stored into their pages by the same launch.

Layout. pages [num_pages, P, 2 Hkv D]: slot p of page n holds one token's [k heads | v heads]
(the k|v tail of the packed qkv row, as jtgpt.kv_cache's contiguous cache, which is the special
case of one row of pages per sequence). Sequence s's token t lives in page block_tables[s, t // P],
slot t % P. The batch's new tokens are the rows of qkv [T, (Hq + 2 Hkv) D], sequence s owning
rows [cu_q[s], cu_q[s + 1]); context_lens[s] = C_s counts its tokens including the new ones, so
with n_s = cu_q[s + 1] - cu_q[s] new tokens the first C_s - n_s are cached and new token i sits
at position C_s - n_s + i. Causal attention: that token, for query head h reading kv head
g = h // (Hq // Hkv), attends to positions j <= C_s - n_s + i:

    out_h = sum_j exp(s_j - lse) v_gj,    s_j = sm_scale q_h . k_gj,    lse = log sum_j exp(s_j)

Programs. One per (query tile, kv head, split). A tile is up to BLOCK_Q consecutive new tokens
of one sequence (`plan_tiles`, computed on the host from cu_q: a decode row is one tile of one
token, and a batch of decode rows alone takes tiles of DOT_ROWS q rows, `query_block`); its
BLOCK_Q tokens times the GROUP = Hq / Hkv query heads of the kv head form one
[BLOCK_Q GROUP', D] q tile (GROUP' = GROUP rounded up to a power of two), so each K and V tile
is read once for the whole group and q k^T is one tl.dot. Keys come BLOCK_N at a time through the
block table: cached positions from their pages, the tile's sequence's new positions from qkv
itself. The new tokens' own pages are never read, so the split-0 program of each tile can store
the tile's new k and v heads into them in the same launch without a race.

Splits, as decode.py: the tile's keys [0, last position + 1) are cut into NUM_SPLITS chunks of
whole BLOCK_N blocks, each split's partial output and log-sum-exp merged by decode.py's merge
kernel; with one split the kernel writes the output itself.

A page id outside [0, num_pages) in a block table cannot be refused under jit: its keys score
NaN, so the rows that attend to them come out NaN (and that page is not written), never a
plausible value nor a read outside the pool. Rows of qkv past cu_q[-1] (a padded batch) belong to
no tile: their output is unspecified.

Inference only: not differentiable (no custom_vjp).
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
from jtgpt.kernels.attention.common import MAX_GRID_Y, check_split_options, checked_scale
from jtgpt.kernels.attention.decode import _block_config, _decode_merge_kernel, _num_splits

TILE_ROWS = 64  # q rows (tokens x grouped heads) of a tile on the GPU; 16 in the interpreter
DOT_ROWS = 16   # the fewest rows a tl.dot operand takes: a decode batch's tile


def query_block(num_heads: int, num_kv_heads: int, *, decode: bool = False) -> int:
    """BLOCK_Q: the new tokens one tile holds, so that a tile is ~TILE_ROWS q rows; for a batch
    where every sequence has one new token (decode), DOT_ROWS rows: a decode tile holds one
    token, and every row past its grouped heads is padding that the dots compute for nothing
    (at TILE_ROWS, 63 of 64 rows for GPT-2, with 212 registers a thread against ~110)."""
    group = triton.next_power_of_2(num_heads // num_kv_heads)
    rows = DOT_ROWS if decode or not on_gpu() else TILE_ROWS
    return max(1, rows // group)


def plan_tiles(cu_q, block_q: int, num_tiles: int) -> tuple[np.ndarray, np.ndarray]:
    """(tile_seqs, tile_starts), int32 [num_tiles] each: tile i covers new tokens
    [tile_starts[i], tile_starts[i] + block_q) of sequence tile_seqs[i] (clipped to its new
    tokens); unused tiles have sequence -1. cu_q: the batch's concrete offsets [num_seqs + 1].
    A fixed num_tiles (e.g. max_tiles for the batch bucket) keeps the launch's shapes static."""
    cu_q = np.asarray(cu_q, np.int64)
    counts = np.diff(cu_q)
    if cu_q.ndim != 1 or cu_q.size < 2 or cu_q[0] != 0 or (counts < 0).any():
        raise ValueError(f"cu_q must be non-decreasing offsets starting at 0, got {cu_q.tolist()}")
    seqs = np.repeat(np.arange(counts.size), -(-counts // block_q))
    starts = np.concatenate([np.arange(0, n, block_q) for n in counts] or [np.zeros(0)])
    if seqs.size > num_tiles:
        raise ValueError(f"the batch needs {seqs.size} tiles of {block_q} tokens, more than "
                         f"num_tiles={num_tiles}")
    tile_seqs = np.full(num_tiles, -1, np.int32)
    tile_starts = np.zeros(num_tiles, np.int32)
    tile_seqs[:seqs.size], tile_starts[:seqs.size] = seqs, starts
    return tile_seqs, tile_starts


def max_tiles(max_tokens: int, max_seqs: int, block_q: int) -> int:
    """Tiles that a batch of at most max_tokens new tokens over at most max_seqs sequences can
    need: each sequence's last tile may be partial."""
    return triton.cdiv(max_tokens, block_q) + max_seqs


@triton.jit
def _paged_split_kernel(qkv_ptr, pages_ptr, tables_ptr, cu_q_ptr, ctx_ptr, tile_seq_ptr,
                        tile_start_ptr, out_ptr, lse_ptr, pages_out_ptr,
                        NUM_PAGES: tl.constexpr, PAGE_SIZE: tl.constexpr, MAX_PAGES: tl.constexpr,
                        HQ: tl.constexpr, HKV: tl.constexpr, HEAD_DIM: tl.constexpr,
                        QK_SCALE: tl.constexpr, PRECISION: tl.constexpr, NUM_SPLITS: tl.constexpr,
                        BLOCK_Q: tl.constexpr, GROUP_P2: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (tile, kv head, split); out_ptr [T, HQ, NUM_SPLITS, D] (fp32 partials, or with
    one split the output in qkv's dtype), lse_ptr fp32 [T, HQ, NUM_SPLITS] in log2 units,
    pages_out_ptr: pages_ptr's buffer (aliased)."""
    GROUP: tl.constexpr = HQ // HKV
    QKV_ROW: tl.constexpr = (HQ + 2 * HKV) * HEAD_DIM
    KV_ROW: tl.constexpr = 2 * HKV * HEAD_DIM
    ROWS: tl.constexpr = BLOCK_Q * GROUP_P2
    tile = tl.program_id(0)
    g = tl.program_id(1)
    split = tl.program_id(2)

    seq = tl.load(tile_seq_ptr + tile)
    used = seq >= 0  # an unused tile runs no loop and stores nothing
    seq = tl.maximum(seq, 0)
    q_start = tl.load(tile_start_ptr + tile)
    first_row = tl.load(cu_q_ptr + seq)
    n_new = tl.where(used, tl.load(cu_q_ptr + seq + 1) - first_row, 0)
    cached = tl.load(ctx_ptr + seq) - n_new  # positions before the new tokens
    in_tile = tl.minimum(n_new - q_start, BLOCK_Q)  # the tile's new tokens (<= 0: none)

    offs_r = tl.arange(0, ROWS)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    token = offs_r // GROUP_P2  # within the tile
    head = g * GROUP + offs_r % GROUP_P2
    row_ok = (offs_r % GROUP_P2 < GROUP) & (token < in_tile)
    q_rows = (first_row + q_start + token).to(tl.int64)
    position = cached + q_start + token
    q = tl.load(qkv_ptr + q_rows[:, None] * QKV_ROW + head[:, None] * HEAD_DIM + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)

    keys = tl.where(in_tile > 0, cached + q_start + in_tile, 0)  # the tile sees [0, keys)
    chunk = tl.cdiv(tl.cdiv(keys, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, keys)
    table = tables_ptr + seq.to(tl.int64) * MAX_PAGES
    acc = tl.zeros([ROWS, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    m_i = tl.full([ROWS], -1.0e30, dtype=tl.float32)  # finite floor, as in decode.py
    for start_n in range(lo, hi, BLOCK_N):
        j = start_n + offs_n
        in_range = j < hi
        from_page = in_range & (j < cached)
        from_qkv = in_range & (j >= cached)
        page = tl.load(table + j // PAGE_SIZE, mask=from_page, other=0)
        bad = from_page & ((page < 0) | (page >= NUM_PAGES))
        slot = (page.to(tl.int64) * PAGE_SIZE + j % PAGE_SIZE) * KV_ROW + g * HEAD_DIM
        new = (first_row + j - cached).to(tl.int64) * QKV_ROW + (HQ + g) * HEAD_DIM
        read = (from_page & ~bad)[:, None]
        k = tl.load(pages_ptr + slot[:, None] + offs_d[None, :], mask=read, other=0.0)
        k = tl.where(from_qkv[:, None],
                     tl.load(qkv_ptr + new[:, None] + offs_d[None, :], mask=from_qkv[:, None],
                             other=0.0), k)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        visible = in_range[None, :] & (j[None, :] <= position[:, None])
        s = tl.where(visible, s, float("-inf"))
        s = tl.where(bad[None, :], float("nan"), s)  # (every row sees a cached key)
        m_new = tl.maximum(m_i, tl.max(s, 1) * QK_SCALE)
        p = tl.math.exp2(s * QK_SCALE - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(pages_ptr + slot[:, None] + HKV * HEAD_DIM + offs_d[None, :], mask=read,
                    other=0.0)
        v = tl.where(from_qkv[:, None],
                     tl.load(qkv_ptr + new[:, None] + HKV * HEAD_DIM + offs_d[None, :],
                             mask=from_qkv[:, None], other=0.0), v)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new

    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    lse = tl.where(seen, m_i + tl.log2(l_safe), float("-inf"))
    lse = tl.where(l_i == l_i, lse, float("nan"))  # NaN (a bad page) stays NaN through the merge
    out_rows = q_rows * HQ + head
    tl.store(out_ptr + (out_rows[:, None] * NUM_SPLITS + split) * HEAD_DIM + offs_d[None, :],
             (acc / l_safe[:, None]).to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    tl.store(lse_ptr + out_rows * NUM_SPLITS + split, lse, mask=row_ok)

    # Split 0 stores the tile's new tokens' k and v heads of kv head g into their pages.
    offs_t = tl.arange(0, BLOCK_Q)
    writes = (offs_t < in_tile) & (split == 0)
    slot_t = cached + q_start + offs_t
    page_t = tl.load(table + slot_t // PAGE_SIZE, mask=writes, other=0)
    writes = writes & (page_t >= 0) & (page_t < NUM_PAGES)
    src = (first_row + q_start + offs_t).to(tl.int64)[:, None] * QKV_ROW + (HQ + g) * HEAD_DIM
    dst = ((page_t.to(tl.int64) * PAGE_SIZE + slot_t % PAGE_SIZE)[:, None] * KV_ROW
           + g * HEAD_DIM)
    for part in tl.static_range(2):  # k, then v (HKV heads further in both rows)
        kv = tl.load(qkv_ptr + src + part * HKV * HEAD_DIM + offs_d[None, :], mask=writes[:, None])
        tl.store(pages_out_ptr + dst + part * HKV * HEAD_DIM + offs_d[None, :], kv,
                 mask=writes[:, None])


def _check_concrete_lengths(cu_q, context_lens, T: int, capacity: int) -> None:
    """When cu_q and context_lens are concrete: offsets within qkv's T rows, and each sequence's
    context holding its new tokens and fitting its block table (traced ones cannot be checked)."""
    if isinstance(cu_q, jax.core.Tracer) or isinstance(context_lens, jax.core.Tracer):
        return
    cu_q, context_lens = np.asarray(cu_q), np.asarray(context_lens)
    counts = np.diff(cu_q)
    if cu_q[0] != 0 or (counts < 0).any() or cu_q[-1] > T:
        raise ValueError(f"cu_q must be non-decreasing offsets from 0 to at most T = {T}, got "
                         f"{cu_q.tolist()}")
    if ((context_lens < counts) | (context_lens > capacity)).any():
        raise ValueError(f"context_lens must be in [new tokens, max_pages * page_size = "
                         f"{capacity}] per sequence, got {context_lens.tolist()} for "
                         f"{counts.tolist()} new tokens")


def paged_attention(qkv, pages, block_tables, cu_q, context_lens, tile_seqs, tile_starts, *,
                    num_heads, num_kv_heads=None, sm_scale=None, precision="ieee",
                    block_q=None, num_splits=None, block_n=None):
    """Causal attention of a ragged batch's new tokens over their paged KV cache; returns (out
    [T, Hq * D] in qkv's dtype, ready for the output projection; pages with the new tokens' k
    and v stored).

    qkv [T, (Hq + 2 Hkv) D]: the new tokens' packed projections, sequence s's at rows
    [cu_q[s], cu_q[s + 1]). pages [num_pages, P, 2 Hkv D] in qkv's dtype (module docstring),
    written in place (jit reuses the buffer when the argument is not needed afterwards).
    block_tables int32 [num_seqs, max_pages]: sequence s's pages in order, covering its
    context_lens[s] positions (the new tokens' slots included). cu_q int32 [num_seqs + 1],
    context_lens int32 [num_seqs]: C_s >= n_s, the new tokens last. tile_seqs, tile_starts int32
    [num_tiles]: the work split, from `plan_tiles(cu_q, block_q, num_tiles)`.
    All are runtime arrays: new lengths, tables and plans do not recompile.

    num_heads Hq, num_kv_heads Hkv (default Hq); D one of common.HEAD_DIMS; sm_scale (default
    D ** -0.5), precision ("ieee", "tf32x3" or "tf32" for fp32); block_q, the tokens a tile of
    the plan holds (default query_block(Hq, Hkv); a power of two, at least DOT_ROWS divided by the
    query heads a kv head serves, padded to a power of two); num_splits and block_n as for
    decode_attention. Inference only (no gradient).
    """
    if getattr(qkv, "ndim", None) != 2:
        raise ValueError(f"qkv must be 2-D [T, (num_heads + 2 * num_kv_heads) * head_dim], got "
                         f"shape {tuple(getattr(qkv, 'shape', ()))}")
    num_kv_heads, head_dim = packed_qkv_heads(qkv[None], num_heads, num_kv_heads)
    T = qkv.shape[0]
    sm_scale = checked_scale(head_dim, precision, sm_scale)
    kv_width = 2 * num_kv_heads * head_dim
    if getattr(pages, "ndim", None) != 3 or pages.shape[2] != kv_width:
        raise ValueError(f"pages must have shape [num_pages, page_size, 2 * num_kv_heads * "
                         f"head_dim] = [num_pages, page_size, {kv_width}], got "
                         f"{tuple(getattr(pages, 'shape', ()))}")
    if pages.dtype != qkv.dtype:
        raise ValueError(f"pages dtype must be qkv's ({jnp.dtype(qkv.dtype).name}), got "
                         f"{jnp.dtype(pages.dtype).name}")
    num_pages, page_size = pages.shape[:2]
    if getattr(block_tables, "ndim", None) != 2:
        raise ValueError(f"block_tables must be [num_seqs, max_pages], got shape "
                         f"{tuple(getattr(block_tables, 'shape', ()))}")
    num_seqs, table_width = block_tables.shape
    for name, array, shape in [("block_tables", block_tables, (num_seqs, table_width)),
                               ("cu_q", cu_q, (num_seqs + 1,)),
                               ("context_lens", context_lens, (num_seqs,)),
                               ("tile_seqs", tile_seqs, (tile_seqs.shape[0],)),
                               ("tile_starts", tile_starts, (tile_seqs.shape[0],))]:
        if tuple(array.shape) != shape or not jnp.issubdtype(array.dtype, jnp.integer):
            raise ValueError(f"{name} must be an integer array of shape {shape}, got "
                             f"{jnp.dtype(array.dtype).name}{list(array.shape)}")
    if tile_seqs.shape[0] * num_kv_heads == 0 or num_kv_heads > MAX_GRID_Y:
        raise ValueError(f"need at least one tile and at most {MAX_GRID_Y} kv heads, got "
                         f"{tile_seqs.shape[0]} tiles, {num_kv_heads} kv heads")
    _check_concrete_lengths(cu_q, context_lens, T, table_width * page_size)
    check_split_options(num_splits, block_n)
    group = triton.next_power_of_2(num_heads // num_kv_heads)
    block_q = query_block(num_heads, num_kv_heads) if block_q is None else block_q
    if isinstance(block_q, bool) or not isinstance(block_q, int) or block_q & (block_q - 1) \
            or block_q * group < DOT_ROWS:
        raise ValueError(f"block_q must be a power of two of at least {DOT_ROWS} // {group} "
                         f"(the query heads a kv head serves, padded to a power of two), got "
                         f"{block_q!r}")
    default_block_n, num_warps, num_stages = _block_config(head_dim, qkv.dtype, precision)
    if block_q * group == DOT_ROWS:
        # A 16-row tile in 3 stages writing split partials: sm_90's ptxas caps it at 128
        # registers and spills (2 stages: 111 registers, no spill).
        num_stages = min(num_stages, 2)
    block_n = block_n or default_block_n
    num_tiles = tile_seqs.shape[0]
    num_splits = num_splits or _num_splits(num_tiles, num_kv_heads, table_width * page_size)
    final = jax.ShapeDtypeStruct((T, num_heads * head_dim), qkv.dtype)
    split_out = final if num_splits == 1 else jax.ShapeDtypeStruct(
        (T, num_heads, num_splits, head_dim), jnp.float32)
    i32 = lambda a: jnp.asarray(a).astype(jnp.int32)  # noqa: E731
    out, lse, pages = triton_call(
        qkv, pages, i32(block_tables), i32(cu_q), i32(context_lens), i32(tile_seqs),
        i32(tile_starts),
        kernel=_paged_split_kernel,
        out_shape=(split_out, jax.ShapeDtypeStruct((T, num_heads, num_splits), jnp.float32),
                   jax.ShapeDtypeStruct(pages.shape, pages.dtype)),
        input_output_aliases={1: 2},
        grid=(num_tiles, num_kv_heads, num_splits), num_warps=num_warps, num_stages=num_stages,
        NUM_PAGES=num_pages, PAGE_SIZE=page_size, MAX_PAGES=table_width, HQ=num_heads,
        HKV=num_kv_heads, HEAD_DIM=head_dim, QK_SCALE=sm_scale * math.log2(math.e),
        PRECISION=precision, NUM_SPLITS=num_splits,
        BLOCK_Q=block_q, GROUP_P2=group, BLOCK_N=block_n)
    if num_splits > 1:
        out = triton_call(out, lse, kernel=_decode_merge_kernel, out_shape=final,
                          grid=(T * num_heads,), num_warps=4, NUM_SPLITS=num_splits,
                          HEAD_DIM=head_dim, BLOCK_S=triton.next_power_of_2(num_splits))
    return out, pages
