"""Token embedding, plus an optional position embedding, with optional dropout, forward and
backward: Triton kernels behind a jax.custom_vjp.

For token n = b*T + t of the [B, T] batch and feature d:

    h[n, d]   = wte[ids[n], d] (+ wpe[positions[n], d])                 (in fp32)
    out[n, d] = h * keep / (1 - p),  keep = rand(seed, n*D + d) >= p    (p > 0 only)

cast once to wte's dtype. Llama has no position table: without positions and wpe the kernel
reads wte alone (a constexpr, so no loads of a second table).

Indices outside a table: a token whose id is outside [0, V), or whose position is outside
[0, P), gets a row of NaN (all of it: NaN is written after dropout), never another row's values;
negative indices do not wrap and large ones are not clamped, as `jtgpt.reference.embedding`.
In the backward such a token adds to no row of either table: its gradient is dropped. Concrete
ids are checked with a clear error at the model level (jtgpt.layers.check_ids_in_range); this is
what happens under jax.jit, where they are traced. The indices become table rows once, in XLA
(`_token_rows`: an elementwise op over the [B, T] indices): a token with any index out of range
gets the row counts V and P ("no row") in both tables, and both directions use that.

Dropout keeps element (n, d) of the [tokens, D] output by jtgpt.kernels.dropout_keep, a function
of the seed and (n, d) alone (eight draws a Philox call), so the mask depends on neither the block
sizes nor the machine, and the backward kernel rebuilds it from the seed alone. The seed is an
array read inside the kernel: a new seed every step does not recompile. Use a different seed for
every dropout site: two ops with the same seed draw the same mask where (n, d) and D agree (the
GEMM epilogue's dropout draws by the same function).

Backward, with g = dout * keep / (1 - p) (the same function of dout as of h above; with dropout,
one elementwise kernel makes g for both tables, so the row sums below draw no random numbers):

    d_wte[v] = sum of g[n] over the tokens n with row ids[n] == v      (0 if there are none)
    d_wpe[q] = sum of g[n] over the tokens n with row positions[n] == q

One kernel computes either table's gradient. An XLA stable argsort of the tokens' rows lists each
row's tokens together, in token order, and offsets[v] (the number of tokens with row < v, from a
bincount) says where; the out-of-range tokens (row V) sort last, past offsets[V]. There is one
program per token in that order (and feature block); the first token of each row sums the row's
tokens BLOCK_T at a time, in fp32, and writes the row once in the table's dtype, while the others
return at once. The table starts as zeros (an XLA fill of the output's buffer), so the rows no
token reads cost no program any work: with GPT-2's V = 50257 most rows of the table are not read
by a batch. There are no atomics, the result is bit-for-bit deterministic, and the work is one
read of dout per token and one write per row read. A row's tokens are summed serially by one
program, BLOCK_T (32 at D >= 128) a step: 8192 padding tokens of one id take 256 dependent steps.

What the custom_vjp saves: the tokens' wte and wpe rows (int32, after the index mapping) and the
seed; none of the tables' values.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from jtgpt.call import triton_call
from jtgpt.kernels import check_float_dtype, dropout, dropout_seed

# Elements one program writes (BLOCK_T tokens x BLOCK_D features).
TILE = 4096
# Widest feature block; wider rows are split over the grid's second axis (no reduction here).
MAX_BLOCK_D = 1024
# Backward: the feature block one program sums (see _backward_config).
BWD_BLOCK_D = 128


@triton.jit
def _embedding_fwd_kernel(ids_ptr, pos_ptr, wte_ptr, wpe_ptr, seed_ptr, out_ptr,
                          N_TOKENS: tl.constexpr, D: tl.constexpr, V: tl.constexpr,
                          POSITIONS: tl.constexpr, DROPOUT_P: tl.constexpr,
                          BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """ids, positions: the tokens' table rows, from _token_rows; ids == V for a token with no row
    (a row of NaN). Without POSITIONS, pos_ptr and wpe_ptr are not read."""
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    col0 = tl.program_id(1) * BLOCK_D
    cols = col0 + tl.arange(0, BLOCK_D)
    tok_ok = tok < N_TOKENS
    out_mask = tok_ok[:, None] & (cols < D)[None, :]
    ids = tl.load(ids_ptr + tok, mask=tok_ok, other=0)
    ok = ids < V
    mask = out_mask & ok[:, None]  # what is read: no table row for a token without one

    # int64: V * D and B * T * D can pass 2**31 (Llama-3: 128256 x 4096 = 2**29, x8 batch rows).
    h = tl.load(wte_ptr + ids.to(tl.int64)[:, None] * D + cols[None, :], mask=mask, other=0.0)
    h = h.to(tl.float32)
    if POSITIONS:
        pos = tl.load(pos_ptr + tok, mask=tok_ok, other=0)
        p = tl.load(wpe_ptr + pos.to(tl.int64)[:, None] * D + cols[None, :], mask=mask, other=0.0)
        h += p.to(tl.float32)

    offs = tok.to(tl.int64)[:, None] * D + cols[None, :]
    if DROPOUT_P > 0.0:
        h = dropout(h, seed_ptr, tok, col0, D, DROPOUT_P, BLOCK_T, BLOCK_D)
    h = tl.where(ok[:, None], h, float("nan"))
    tl.store(out_ptr + offs, h.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _dropout_bwd_kernel(dout_ptr, seed_ptr, g_ptr, N_TOKENS: tl.constexpr, D: tl.constexpr,
                        DROPOUT_P: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """g = dout * keep / (1 - p) on one [BLOCK_T, BLOCK_D] tile of the [tokens, D] cotangent: the
    forward's mask, drawn for the same elements."""
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    col0 = tl.program_id(1) * BLOCK_D
    cols = col0 + tl.arange(0, BLOCK_D)
    offs = tok.to(tl.int64)[:, None] * D + cols[None, :]
    ok = (tok < N_TOKENS)[:, None] & (cols < D)[None, :]
    g = dropout(tl.load(dout_ptr + offs, mask=ok, other=0.0).to(tl.float32), seed_ptr, tok,
                col0, D, DROPOUT_P, BLOCK_T, BLOCK_D)
    tl.store(g_ptr + offs, g.to(g_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _embedding_bwd_kernel(order_ptr, sorted_rows_ptr, offsets_ptr, g_ptr, zeros_ptr, dtable_ptr,
                          N_ROWS: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr,
                          BLOCK_D: tl.constexpr):
    """Program (k, j): the k-th token in row order, features block j. The first token of each
    table row sums the row's tokens order[offsets[r]:offsets[r + 1]] (token indices, ascending)
    and writes the row; every other program returns at once. dtable's buffer is zeros_ptr's
    (aliased): rows no token reads keep its zeros."""
    k = tl.program_id(0)
    row = tl.load(sorted_rows_ptr + k)
    previous = tl.load(sorted_rows_ptr + tl.maximum(k - 1, 0))
    if (row < N_ROWS) & ((k == 0) | (previous != row)):
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        end = tl.load(offsets_ptr + row + 1)
        acc = tl.zeros([BLOCK_D], tl.float32)
        for first in range(k, end, BLOCK_T):
            idx = first + tl.arange(0, BLOCK_T)
            tok_ok = idx < end
            tok = tl.load(order_ptr + idx, mask=tok_ok, other=0)
            g = tl.load(g_ptr + tok.to(tl.int64)[:, None] * D + cols[None, :],
                        mask=tok_ok[:, None] & col_ok[None, :], other=0.0)
            acc += tl.sum(g.to(tl.float32), axis=0)
        # int64: V * D can pass 2**31
        tl.store(dtable_ptr + row.to(tl.int64) * D + cols, acc.to(dtable_ptr.dtype.element_ty),
                 mask=col_ok)


def _launch_config(n_tokens: int, d: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_D, num_warps): a TILE-element block of whole rows where they fit.

    Each token reads one D-row of each table (wte, and wpe if given) and writes one: pure
    bandwidth, with 4096 elements (8 KB of bf16 output, 16 to 24 KB moved) a program to keep
    loads in flight, ~16 values a thread. Rows wider than MAX_BLOCK_D go over grid axis 1, so D
    has no upper limit.
    """
    block_d = max(8, min(triton.next_power_of_2(d), MAX_BLOCK_D))  # dropout's draws: 8 a call
    block_t = max(1, min(TILE // block_d, triton.next_power_of_2(n_tokens)))
    num_warps = min(8, max(1, block_t * block_d // 512))
    return block_t, block_d, num_warps


def _backward_config(n_tokens: int, d: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_D, num_warps) of the backward.

    Narrow feature blocks (BWD_BLOCK_D, 256 bytes of bf16 a token: whole cache lines) leave room
    for many tokens a step, so a row read by many tokens takes few serial steps.
    """
    block_d = min(triton.next_power_of_2(d), BWD_BLOCK_D)
    block_t = max(1, min(TILE // block_d, triton.next_power_of_2(n_tokens)))
    return block_t, block_d, 4


def embedding(ids, wte, positions=None, wpe=None, *, dropout_rate=0.0, seed=None):
    """dropout(wte[ids] (+ wpe[positions])) -> [B, T, D] in wte's dtype.

    ids [B, T] integer; wte [V, D] fp32/fp16/bf16. positions [B, T] integer and wpe [P, D] (any of
    those dtypes, wpe's may differ from wte's) come together, or neither (no position table).
    A token with an index outside its table gets a row of NaN, and no gradient (module
    docstring). dropout_rate p in [0, 1): with p > 0, seed (an integer array of shape (), traced
    or not) is required; the kept elements are scaled by 1/(1-p). Differentiable wrt wte and wpe
    (gradients in each one's dtype); the backward saves the tokens' rows and the seed.
    """
    if (positions is None) != (wpe is None):
        raise ValueError("positions and wpe must be given together (or neither, for no position "
                         f"table), got positions={'None' if positions is None else 'an array'} "
                         f"and wpe={'None' if wpe is None else 'an array'}")
    if ids.ndim != 2:
        raise ValueError(f"ids must be [B, T], got shape {ids.shape}")
    if positions is not None and positions.shape != ids.shape:
        raise ValueError(f"positions shape {positions.shape} must equal ids shape {ids.shape}")
    for name, a in (("ids", ids), ("positions", positions)):
        if a is not None and not jnp.issubdtype(a.dtype, jnp.integer):
            raise ValueError(f"{name} must be integer, got {a.dtype}")
    for name, table in (("wte", wte), ("wpe", wpe)):
        if table is None:
            continue
        if table.ndim != 2 or table.shape[0] == 0:
            raise ValueError(f"{name} must be a [rows, D] table with rows >= 1, got shape {table.shape}")
        check_float_dtype(f"{name} dtype", table.dtype)
    if wpe is not None and wpe.shape[1] != wte.shape[1]:
        raise ValueError(f"wpe D={wpe.shape[1]} must equal wte D={wte.shape[1]}")
    seed = dropout_seed(dropout_rate, seed)

    cfg = _EmbeddingConfig(float(dropout_rate), wte.shape[0], jnp.dtype(wte.dtype),
                           None if wpe is None else wpe.shape[0],
                           None if wpe is None else jnp.dtype(wpe.dtype))
    out = _embedding(*_token_rows(ids, positions, cfg), wte, wpe, seed, cfg)
    return out.reshape(*ids.shape, wte.shape[1])


def _token_rows(ids, positions, cfg: _EmbeddingConfig):
    """(wte rows, wpe rows) the tokens read, int32 [tokens] each (None without positions): for a
    token with an index outside its table, V and P, no row, in both.

    Compared before the cast to int32, so that no int64 index wraps into range, and in at least
    32 bits, so that V itself is representable (an int16 cannot hold 50257)."""
    def in_range(indices, n_rows):
        i = indices.reshape(-1)
        if jnp.iinfo(i.dtype).bits < 32:
            i = i.astype(jnp.int32)
        return i, (i >= 0) & (i < n_rows)

    i, ok = in_range(ids, cfg.wte_rows)
    if positions is None:
        return jnp.where(ok, i, cfg.wte_rows).astype(jnp.int32), None
    q, q_ok = in_range(positions, cfg.wpe_rows)
    ok &= q_ok
    return (jnp.where(ok, i, cfg.wte_rows).astype(jnp.int32),
            jnp.where(ok, q, cfg.wpe_rows).astype(jnp.int32))


class _EmbeddingConfig(NamedTuple):
    dropout_rate: float
    wte_rows: int  # the tables' sizes and dtypes, for the gradients (no table is saved)
    wte_dtype: jnp.dtype
    wpe_rows: int | None  # None: no position table
    wpe_dtype: jnp.dtype | None


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _embedding(ids, positions, wte, wpe, seed, cfg: _EmbeddingConfig):
    """[tokens, D] from the tokens' table rows ids, positions (int32 [tokens], from _token_rows;
    positions and wpe None without a position table)."""
    (n_tokens,), d = ids.shape, wte.shape[1]
    out_shape = jax.ShapeDtypeStruct((n_tokens, d), wte.dtype)
    if n_tokens == 0 or d == 0:  # a grid of zero programs is not a valid GPU launch
        return jnp.zeros(out_shape.shape, out_shape.dtype)
    block_t, block_d, num_warps = _launch_config(n_tokens, d)
    has_positions = wpe is not None
    return triton_call(
        # Without a position table the kernel does not read its pointers: ids and wte stand in.
        ids, positions if has_positions else ids, wte, wpe if has_positions else wte, seed,
        kernel=_embedding_fwd_kernel, out_shape=out_shape,
        grid=(triton.cdiv(n_tokens, block_t), triton.cdiv(d, block_d)), num_warps=num_warps,
        N_TOKENS=n_tokens, D=d, V=cfg.wte_rows, POSITIONS=has_positions,
        DROPOUT_P=cfg.dropout_rate, BLOCK_T=block_t, BLOCK_D=block_d)


def _embedding_fwd(ids, positions, wte, wpe, seed, cfg):
    return _embedding(ids, positions, wte, wpe, seed, cfg), (ids, positions, seed)


def _embedding_bwd(cfg, saved, dout):
    ids, positions, seed = saved
    g = dout if cfg.dropout_rate == 0.0 else _dropout_grad(dout, seed, cfg.dropout_rate)
    d_wte = _table_grad(ids, g, cfg.wte_rows, cfg.wte_dtype)
    d_wpe = None if positions is None else _table_grad(positions, g, cfg.wpe_rows, cfg.wpe_dtype)
    return None, None, d_wte, d_wpe, None  # ids, positions and seed are integers


_embedding.defvjp(_embedding_fwd, _embedding_bwd)


def _dropout_grad(dout, seed, dropout_rate: float):
    """dout [tokens, D] with the forward's dropout applied: the gradient both tables sum."""
    n_tokens, d = dout.shape
    if dout.size == 0:
        return dout
    block_t, block_d, num_warps = _launch_config(n_tokens, d)
    return triton_call(dout, seed, kernel=_dropout_bwd_kernel,
                       out_shape=jax.ShapeDtypeStruct(dout.shape, dout.dtype),
                       grid=(triton.cdiv(n_tokens, block_t), triton.cdiv(d, block_d)),
                       num_warps=num_warps, N_TOKENS=n_tokens, D=d, DROPOUT_P=dropout_rate,
                       BLOCK_T=block_t, BLOCK_D=block_d)


def _table_grad(rows, g, n_rows: int, dtype):
    """[n_rows, D] in dtype: row r sums g of the tokens with rows == r; the tokens with
    rows == n_rows (out of range) count in no row."""
    n_tokens, d = g.shape
    if n_tokens == 0 or d == 0:
        return jnp.zeros((n_rows, d), dtype)
    order = jnp.argsort(rows, stable=True).astype(jnp.int32)  # stable: each row's tokens ascending
    # Integer adds: exact in any order. The last count, row n_rows's, is no table row's.
    counts = jnp.bincount(rows, length=n_rows + 1)[:n_rows]
    offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(counts, dtype=jnp.int32)])
    block_t, block_d, num_warps = _backward_config(n_tokens, d)
    return triton_call(
        order, rows[order], offsets, g, jnp.zeros((n_rows, d), dtype),
        kernel=_embedding_bwd_kernel, out_shape=jax.ShapeDtypeStruct((n_rows, d), dtype),
        input_output_aliases={4: 0}, grid=(n_tokens, triton.cdiv(d, block_d)),
        num_warps=num_warps, N_ROWS=n_rows, D=d, BLOCK_T=block_t, BLOCK_D=block_d)
