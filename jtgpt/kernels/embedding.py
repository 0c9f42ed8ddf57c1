"""Token + position embedding with optional dropout, forward: one Triton kernel.

For token (b, t) and feature d:

    h[b, t, d]   = wte[ids[b, t], d] + wpe[positions[b, t], d]            (in fp32)
    out[b, t, d] = h * keep / (1 - p),  keep = rand(seed, (b*T + t)*D + d) >= p   (p > 0 only)

cast once to wte's dtype. Indices follow jnp's `wte[ids]`: a negative index counts from the end
(i + V), then anything still outside [0, V) is clamped to the nearest row; the same for positions
and wpe. So `jtgpt.reference.embedding` (plain jnp indexing) agrees on any input.

Dropout draws tl.rand (Philox) keyed by the seed and the element's offset in the [B, T, D] output,
so the mask depends on neither the block sizes nor the machine, and a backward kernel can rebuild
it from the seed alone. The seed is an array read inside the kernel: a new seed every step does
not recompile. Use a different seed for every dropout site: two ops with the same seed and
overlapping offsets draw the same mask.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from jtgpt.call import triton_call
from jtgpt.kernels import check_float_dtype, dropout_seed

# Elements one program writes (BLOCK_T tokens x BLOCK_D features).
TILE = 4096
# Widest feature block; wider rows are split over the grid's second axis (no reduction here).
MAX_BLOCK_D = 1024


@triton.jit
def _clamp_index(i, n: tl.constexpr):
    """jnp gather semantics: negative indices count from the end, the rest clamp into [0, n)."""
    i = tl.where(i < 0, i + n, i)
    return tl.minimum(tl.maximum(i, 0), n - 1)


@triton.jit
def _embedding_fwd_kernel(ids_ptr, pos_ptr, wte_ptr, wpe_ptr, seed_ptr, out_ptr,
                          N_TOKENS: tl.constexpr, V: tl.constexpr, P: tl.constexpr, D: tl.constexpr,
                          DROPOUT_P: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    tok_ok = tok < N_TOKENS
    mask = tok_ok[:, None] & (cols < D)[None, :]

    ids = _clamp_index(tl.load(ids_ptr + tok, mask=tok_ok, other=0), V)
    pos = _clamp_index(tl.load(pos_ptr + tok, mask=tok_ok, other=0), P)
    # int64: V * D and B * T * D can pass 2**31 (Llama-3: 128256 x 4096 = 2**29, x8 batch rows).
    e = tl.load(wte_ptr + ids.to(tl.int64)[:, None] * D + cols[None, :], mask=mask, other=0.0)
    p = tl.load(wpe_ptr + pos.to(tl.int64)[:, None] * D + cols[None, :], mask=mask, other=0.0)
    h = e.to(tl.float32) + p.to(tl.float32)

    offs = tok.to(tl.int64)[:, None] * D + cols[None, :]
    if DROPOUT_P > 0.0:
        keep = tl.rand(tl.load(seed_ptr), offs) >= DROPOUT_P
        h = tl.where(keep, h * (1.0 / (1.0 - DROPOUT_P)), 0.0)
    tl.store(out_ptr + offs, h.to(out_ptr.dtype.element_ty), mask=mask)


def _launch_config(n_tokens: int, d: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_D, num_warps): a TILE-element block of whole rows where they fit.

    Each token reads two D-rows (wte and wpe) and writes one: pure bandwidth, with 4096 elements
    (8 KB of bf16 output, 24 KB moved) a program to keep loads in flight, ~16 values a thread.
    Rows wider than MAX_BLOCK_D go over grid axis 1, so D has no upper limit.
    """
    block_d = min(triton.next_power_of_2(d), MAX_BLOCK_D)
    block_t = max(1, min(TILE // block_d, triton.next_power_of_2(n_tokens)))
    num_warps = min(8, max(1, block_t * block_d // 512))
    return block_t, block_d, num_warps


def embedding(ids, positions, wte, wpe, *, dropout_rate=0.0, seed=None):
    """dropout(wte[ids] + wpe[positions]) -> [B, T, D] in wte's dtype.

    ids, positions [B, T] integer (cast to int32); wte [V, D], wpe [P, D] fp32/fp16/bf16 (wpe may
    differ from wte); out-of-range indices as jnp indexing (see the module docstring).
    dropout_rate p in [0, 1): with p > 0, seed (an integer array of shape (), traced or not) is
    required; the kept elements are scaled by 1/(1-p).
    """
    if ids.ndim != 2:
        raise ValueError(f"ids must be [B, T], got shape {ids.shape}")
    if positions.shape != ids.shape:
        raise ValueError(f"positions shape {positions.shape} must equal ids shape {ids.shape}")
    for name, a in (("ids", ids), ("positions", positions)):
        if not jnp.issubdtype(a.dtype, jnp.integer):
            raise ValueError(f"{name} must be integer, got {a.dtype}")
    for name, table in (("wte", wte), ("wpe", wpe)):
        if table.ndim != 2 or table.shape[0] == 0:
            raise ValueError(f"{name} must be a [rows, D] table with rows >= 1, got shape {table.shape}")
        check_float_dtype(f"{name} dtype", table.dtype)
    if wpe.shape[1] != wte.shape[1]:
        raise ValueError(f"wpe D={wpe.shape[1]} must equal wte D={wte.shape[1]}")
    seed = dropout_seed(dropout_rate, seed)

    (b, t), (v, d), n_positions = ids.shape, wte.shape, wpe.shape[0]
    n_tokens = b * t
    out_shape = jax.ShapeDtypeStruct((b, t, d), wte.dtype)
    if n_tokens == 0 or d == 0:  # a grid of zero programs is not a valid GPU launch
        return jnp.zeros(out_shape.shape, out_shape.dtype)
    block_t, block_d, num_warps = _launch_config(n_tokens, d)
    return triton_call(
        ids.reshape(n_tokens).astype(jnp.int32), positions.reshape(n_tokens).astype(jnp.int32),
        wte, wpe, seed,
        kernel=_embedding_fwd_kernel, out_shape=out_shape,
        grid=(triton.cdiv(n_tokens, block_t), triton.cdiv(d, block_d)), num_warps=num_warps,
        N_TOKENS=n_tokens, V=v, P=n_positions, D=d, DROPOUT_P=float(dropout_rate),
        BLOCK_T=block_t, BLOCK_D=block_d)
