"""A GPT-2 block's decode step for one sequence in one persistent kernel.

At batch 1 a decode step is latency-bound: the block's five kernels (the QKV GEMV with LayerNorm
inside, decode attention, and three more GEMVs) each read 1-5 MB, which HBM serves in 0.3-1.2 us,
but each takes 2.5-6 us, most of it the kernel's ramp and tail. Here one launch of as many
programs as the GPU has SMs runs the whole block: the programs share each phase's work and wait
for each other at a grid-wide barrier between phases. For one row x [C] (C = H D) and the layer's
cache of L = length slots (the new token's is L - 1):

    a    = LN_1(x)                                     rounded to x's dtype, as stored
    qkv  = a W_attn + b_attn                           phase 0: q to scratch, k and v into slot L - 1
    o_s, lse_s = attention of q_h over split s         phase 1: (head, split) items
    y    = merge_s(o_s, lse_s)                         phase 2, each program merging what it reads
    x'   = y W_proj + b_proj + x                       phase 2
    f    = gelu_tanh(LN_2(x') W_fc + b_fc)             phase 3
    out  = f W_mlp + b_mlp + x'                        phase 4

Attention (phase 1) is decode.py's flash-decoding for one row: head h's visible keys J = {j < L:
key_mask[j] != 0} + {L - 1} are cut into SPLITS chunks of whole BLOCK_KEYS blocks, and split s
gives, in fp32 with log2(e) folded into the scale,

    lse_s = log2 sum_{j in J_s} 2^(s_j),   o_s = sum_{j in J_s} 2^(s_j - lse_s) v_j,   s_j = scale log2(e) q_h . k_j

(-inf and 0 for an empty split). Phase 2 merges them per column c of y (head c // D), M = max_s
lse_s: y_c = sum_s 2^(lse_s - M) o_sc / sum_s 2^(lse_s - M), exact since 2^(lse_s - M) o_s =
sum_{j in J_s} 2^(s_j - M) v_j.

Each GEMV phase gives program p the run of cdiv(N, P) output columns starting at p cdiv(N, P)
and loads their weights, all K rows, as one tile before it reads the phase's input, so that all
of a phase's loads are in flight at once (a K loop would wait for each step's cross-warp
reduction before the next step's loads); x * w is summed in fp32 (no tensor cores: one row).
The tile must fit in registers (TILE_VALUES): GPT-2 124M and 355M at one program per SM of an
H100; larger models take the unfused path (`block_decode_fits`). Every rounding is the unfused path's (jtgpt.kernels.matmul's GEMV, decode attention): each
intermediate is rounded to x's dtype where that path stores it.

The barrier: each program adds 1 to a zeroed int32 counter with release semantics and spins until
the counter reaches P times the barrier's number (acquire), so every store before the barrier is
visible to every load after it. That needs every program resident at once, which one program per
SM (P <= SMs) guarantees. The last program to finish sets the counter back to 0, so the launches
of a decode step can pass one counter along (`barrier`) instead of each zeroing its own: a memset
in the step's CUDA graph costs about a launch. Data written in this launch is read with `.cg` loads (L2, bypassing
the SM's L1, which other SMs' stores do not update).

Triton's interpreter runs programs one after another, so no program there could wait for
another: it runs each phase as its own launch (PHASE 0-4), the scratch buffers passed from one to
the next (aliased), a launch's end being the barrier. The GPU runs all phases in one (PHASE =
ALL_PHASES).

Layout: weights as GPT-2's Conv1D stores them, [K, N] (or [N, K] with `w_nk`); kv_cache [1, S, 2C]
as jtgpt.kv_cache holds it, slot j's [k heads | v heads]. Inference only: no custom_vjp.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from jtgpt.call import on_gpu, triton_call
from jtgpt.kernels.attention.common import checked_key_mask, checked_lengths
from jtgpt.kernels.matmul import _activation

ALL_PHASES = tl.constexpr(-1)
NUM_PHASES = 5
MAX_SPLITS = 8  # of a head's keys: each program's merge reads every split's partials
NUM_WARPS = 16
TILE_VALUES = 64 * 32 * NUM_WARPS  # a program's weight tile at most: 64 values a thread


# ------------------------------------------------------------------------------------- kernels

@triton.jit
def _grid_barrier(counter_ptr, arrivals):
    """Wait until `arrivals` programs have arrived at barriers of this launch, this one included
    (module docstring)."""
    tl.debug_barrier()  # every thread of this program has issued its stores
    tl.atomic_add(counter_ptr, 1, sem="release")
    while tl.atomic_add(counter_ptr, 0, sem="acquire") < arrivals:
        pass


@triton.jit
def _weight_tile(w_ptr, K: tl.constexpr, N: tl.constexpr, W_NK: tl.constexpr,
                 PER_PROGRAM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """(the [BLOCK_N, BLOCK_K] tile of W's columns this program owns, all K rows, 0 outside;
    the columns; their mask): the run of PER_PROGRAM of the N columns from pid * PER_PROGRAM.
    Loaded before the phase's input, so that their latencies overlap."""
    offs = tl.arange(0, BLOCK_N)
    cols = tl.program_id(0) * PER_PROGRAM + offs
    col_ok = (offs < PER_PROGRAM) & (cols < N)
    ks = tl.arange(0, BLOCK_K)
    if W_NK:
        offsets = cols[:, None] * K + ks[None, :]
    else:
        offsets = ks[None, :] * N + cols[:, None]
    w = tl.load(w_ptr + offsets, mask=col_ok[:, None] & (ks < K)[None, :], other=0.0)
    return w, cols, col_ok


@triton.jit
def _gemv(w, x):
    """x @ W over a program's tile: w [BLOCK_N, BLOCK_K], x [BLOCK_K] -> fp32 [BLOCK_N]."""
    return tl.sum(w.to(tl.float32) * x[None, :], 1)


@triton.jit
def _layer_norm_row(x_ptr, weight_ptr, bias_ptr, C: tl.constexpr, EPS: tl.constexpr,
                    BLOCK_ROW: tl.constexpr):
    """LN(x) of the row x [C] in fp32 (0 past C), computed and rounded to x's dtype as
    jtgpt.kernels.matmul's GEMV prologue does it."""
    ks = tl.arange(0, BLOCK_ROW)
    ok = ks < C
    row = tl.load(x_ptr + ks, mask=ok, other=0.0, cache_modifier=".cg").to(tl.float32)
    mean = tl.sum(row, 0) / C
    centered = tl.where(ok, row - mean, 0.0)
    rstd = tl.rsqrt(tl.sum(centered * centered, 0) / C + EPS)
    y = centered * rstd * tl.load(weight_ptr + ks, mask=ok, other=0.0).to(tl.float32)
    y += tl.load(bias_ptr + ks, mask=ok, other=0.0).to(tl.float32)
    return tl.where(ok, y.to(x_ptr.dtype.element_ty).to(tl.float32), 0.0)


@triton.jit
def _merged_row(part_ptr, lse_ptr, C: tl.constexpr, H: tl.constexpr, D: tl.constexpr,
                SPLITS: tl.constexpr, BLOCK_ROW: tl.constexpr, dtype: tl.constexpr):
    """The attention output y [C] merged from the splits' partials (module docstring), rounded
    to dtype, 0 past C. part [SPLITS, C] fp32, lse [SPLITS, H] fp32 (log2 units). Elementwise
    over the splits (a static loop): no reduction across threads."""
    ks = tl.arange(0, BLOCK_ROW)
    ok = ks < C
    m = tl.full([BLOCK_ROW], float("-inf"), tl.float32)
    for split in tl.static_range(SPLITS):
        m = tl.maximum(m, tl.load(lse_ptr + split * H + ks // D, mask=ok, other=float("-inf"),
                                  cache_modifier=".cg"))
    m = tl.where(m == float("-inf"), 0.0, m)  # no split saw a key: every weight is 2^-inf = 0
    total = tl.zeros([BLOCK_ROW], tl.float32)
    y = tl.zeros([BLOCK_ROW], tl.float32)
    for split in tl.static_range(SPLITS):
        weight = tl.math.exp2(tl.load(lse_ptr + split * H + ks // D, mask=ok,
                                      other=float("-inf"), cache_modifier=".cg") - m)
        total += weight
        y += weight * tl.load(part_ptr + split * C + ks, mask=ok, other=0.0, cache_modifier=".cg")
    y = y / tl.where(total > 0.0, total, 1.0)
    return tl.where(ok, y.to(dtype).to(tl.float32), 0.0)


@triton.jit
def _qkv_phase(x_ptr, ln_w_ptr, ln_b_ptr, w_ptr, b_ptr, q_ptr, kv_ptr, length, valid,
               C: tl.constexpr, EPS: tl.constexpr, W_NK: tl.constexpr, PER_PROGRAM: tl.constexpr,
               BLOCK_ROW: tl.constexpr, BLOCK_N: tl.constexpr):
    """qkv = LN_1(x) W_attn + b_attn: q to q_ptr [C], k and v heads into the cache's slot
    length - 1 (the cache row is qkv's k|v tail)."""
    w, cols, col_ok = _weight_tile(w_ptr, C, 3 * C, W_NK, PER_PROGRAM, BLOCK_N, BLOCK_ROW)
    qkv = _gemv(w, _layer_norm_row(x_ptr, ln_w_ptr, ln_b_ptr, C, EPS, BLOCK_ROW))
    qkv = (qkv + tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32))
    qkv = qkv.to(q_ptr.dtype.element_ty)
    tl.store(q_ptr + cols, qkv, mask=col_ok & (cols < C))
    slot = kv_ptr + (length - 1).to(tl.int64) * (2 * C)
    tl.store(slot + cols - C, qkv, mask=col_ok & (cols >= C) & valid)


@triton.jit
def _attention_phase(q_ptr, kv_ptr, mask_ptr, part_ptr, lse_ptr, length, valid,
                     C: tl.constexpr, H: tl.constexpr, D: tl.constexpr, QK_SCALE: tl.constexpr,
                     HAS_MASK: tl.constexpr, SPLITS: tl.constexpr, P: tl.constexpr,
                     BLOCK_KEYS: tl.constexpr):
    """The (head, split) items program_id, + P, ...: split s of head h's keys into part[s, h D:]
    and lse[s, h] (module docstring). An invalid length gives NaN partials."""
    chunk = tl.cdiv(tl.cdiv(length, SPLITS), BLOCK_KEYS) * BLOCK_KEYS
    offs_d = tl.arange(0, D)
    offs_j = tl.arange(0, BLOCK_KEYS)
    for item in range(tl.program_id(0), H * SPLITS, P):
        h = item // SPLITS
        split = item % SPLITS
        lo = split * chunk
        hi = tl.minimum(lo + chunk, length)  # lo >= hi: an empty split
        q = tl.load(q_ptr + h * D + offs_d, cache_modifier=".cg").to(tl.float32)
        acc = tl.zeros([D], dtype=tl.float32)
        l_i = tl.sum(tl.zeros([BLOCK_KEYS], dtype=tl.float32), 0)
        # A finite floor, as in flash.py: while every key seen is masked, 2^(-inf - floor) = 0.
        m_i = l_i - 1.0e30
        for start in range(lo, hi, BLOCK_KEYS):
            j = start + offs_j
            keep = j < hi
            if HAS_MASK:  # the new token always sees itself
                keep &= (tl.load(mask_ptr + j, mask=keep, other=0) != 0) | (j == length - 1)
            # Keys not kept are not read (other=0): NaN there cannot leak in through 0 * NaN.
            k_ptrs = kv_ptr + j.to(tl.int64)[:, None] * (2 * C) + h * D + offs_d[None, :]
            k = tl.load(k_ptrs, mask=keep[:, None], other=0.0, cache_modifier=".cg")
            v = tl.load(k_ptrs + C, mask=keep[:, None], other=0.0, cache_modifier=".cg")
            s = tl.where(keep, tl.sum(k.to(tl.float32) * q[None, :], 1) * QK_SCALE,
                         float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 0))
            p = tl.math.exp2(s - m_new)
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 0)
            acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), 0)
            m_i = m_new
        seen = l_i > 0.0  # l_i = 0 exactly when the split saw no key (then acc = 0)
        l_safe = tl.where(seen, l_i, 1.0)
        tl.store(part_ptr + split * C + h * D + offs_d,
                 tl.where(valid, acc / l_safe, float("nan")))
        tl.store(lse_ptr + split * H + h,
                 tl.where(valid, tl.where(seen, m_i + tl.log2(l_safe), float("-inf")),
                          float("nan")))


@triton.jit
def _out_proj_phase(part_ptr, lse_ptr, w_ptr, b_ptr, x_ptr, mid_ptr, C: tl.constexpr,
                    H: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr, W_NK: tl.constexpr,
                    PER_PROGRAM: tl.constexpr, BLOCK_ROW: tl.constexpr, BLOCK_N: tl.constexpr):
    """x' = merge(partials) W_proj + b_proj + x into mid_ptr [C]."""
    w, cols, col_ok = _weight_tile(w_ptr, C, C, W_NK, PER_PROGRAM, BLOCK_N, BLOCK_ROW)
    out = _gemv(w, _merged_row(part_ptr, lse_ptr, C, H, D, SPLITS, BLOCK_ROW,
                               mid_ptr.dtype.element_ty))
    out += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    out += tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(mid_ptr + cols, out.to(mid_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def _mlp_in_phase(mid_ptr, ln_w_ptr, ln_b_ptr, w_ptr, b_ptr, f_ptr, C: tl.constexpr,
                  EPS: tl.constexpr, W_NK: tl.constexpr, PER_PROGRAM: tl.constexpr,
                  BLOCK_ROW: tl.constexpr, BLOCK_N: tl.constexpr):
    """f = gelu_tanh(LN_2(x') W_fc + b_fc) into f_ptr [4C]."""
    w, cols, col_ok = _weight_tile(w_ptr, C, 4 * C, W_NK, PER_PROGRAM, BLOCK_N, BLOCK_ROW)
    f = _gemv(w, _layer_norm_row(mid_ptr, ln_w_ptr, ln_b_ptr, C, EPS, BLOCK_ROW))
    f += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    f = _activation(f, f, True, False)
    tl.store(f_ptr + cols, f.to(f_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def _mlp_out_phase(f_ptr, w_ptr, b_ptr, mid_ptr, out_ptr, C: tl.constexpr, W_NK: tl.constexpr,
                   PER_PROGRAM: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_N: tl.constexpr):
    """out = f W_mlp + b_mlp + x' into out_ptr [C]."""
    w, cols, col_ok = _weight_tile(w_ptr, 4 * C, C, W_NK, PER_PROGRAM, BLOCK_N, BLOCK_F)
    ks = tl.arange(0, BLOCK_F)
    f = tl.load(f_ptr + ks, mask=ks < 4 * C, other=0.0, cache_modifier=".cg")
    out = _gemv(w, f.to(tl.float32))
    out += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    out += tl.load(mid_ptr + cols, mask=col_ok, other=0.0, cache_modifier=".cg").to(tl.float32)
    tl.store(out_ptr + cols, out.to(out_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def _block_decode_kernel(x_ptr, ln1_w_ptr, ln1_b_ptr, attn_w_ptr, attn_b_ptr, proj_w_ptr,
                         proj_b_ptr, ln2_w_ptr, ln2_b_ptr, fc_w_ptr, fc_b_ptr, mlp_w_ptr,
                         mlp_b_ptr, len_ptr, mask_ptr, kv_in_ptr, q_in_ptr, part_in_ptr,
                         lse_in_ptr, mid_in_ptr, f_in_ptr, counter_in_ptr,
                         out_ptr, kv_ptr, q_ptr, part_ptr, lse_ptr, mid_ptr, f_ptr, counter_ptr,
                         C: tl.constexpr, H: tl.constexpr, D: tl.constexpr, S: tl.constexpr,
                         EPS: tl.constexpr, QK_SCALE: tl.constexpr, HAS_MASK: tl.constexpr,
                         W_NK: tl.constexpr, P: tl.constexpr, SPLITS: tl.constexpr,
                         PHASE: tl.constexpr, PER_QKV: tl.constexpr, PER_C: tl.constexpr,
                         PER_F: tl.constexpr, BLOCK_N_QKV: tl.constexpr,
                         BLOCK_N_C: tl.constexpr, BLOCK_N_F: tl.constexpr,
                         BLOCK_ROW: tl.constexpr, BLOCK_F: tl.constexpr,
                         BLOCK_KEYS: tl.constexpr):
    """The block (module docstring); grid (P,). Every buffer the phases hand on (q [C], part
    [SPLITS, C] and lse [SPLITS, H] fp32, mid [C], f [4C]), the cache [S, 2C] and the counter
    are read and written through the output pointers; the *_in pointers are their inputs,
    aliased to them where a previous launch filled them (the interpreter's phases), else
    placeholders never read."""
    # Under jax.jit a length outside [1, S] cannot be refused: the block then writes no slot
    # and gives NaN, never a plausible value.
    length = tl.load(len_ptr)
    valid = (length >= 1) & (length <= S)
    length = tl.where(valid, length, 0)
    if (PHASE == ALL_PHASES) | (PHASE == 0):
        _qkv_phase(x_ptr, ln1_w_ptr, ln1_b_ptr, attn_w_ptr, attn_b_ptr, q_ptr, kv_ptr, length,
                   valid, C, EPS, W_NK, PER_QKV, BLOCK_ROW, BLOCK_N_QKV)
    if PHASE == ALL_PHASES:
        _grid_barrier(counter_ptr, P)
    if (PHASE == ALL_PHASES) | (PHASE == 1):
        _attention_phase(q_ptr, kv_ptr, mask_ptr, part_ptr, lse_ptr, length, valid, C, H, D,
                         QK_SCALE, HAS_MASK, SPLITS, P, BLOCK_KEYS)
    if PHASE == ALL_PHASES:
        _grid_barrier(counter_ptr, 2 * P)
    if (PHASE == ALL_PHASES) | (PHASE == 2):
        _out_proj_phase(part_ptr, lse_ptr, proj_w_ptr, proj_b_ptr, x_ptr, mid_ptr, C, H, D,
                        SPLITS, W_NK, PER_C, BLOCK_ROW, BLOCK_N_C)
    if PHASE == ALL_PHASES:
        _grid_barrier(counter_ptr, 3 * P)
    if (PHASE == ALL_PHASES) | (PHASE == 3):
        _mlp_in_phase(mid_ptr, ln2_w_ptr, ln2_b_ptr, fc_w_ptr, fc_b_ptr, f_ptr, C, EPS, W_NK,
                      PER_F, BLOCK_ROW, BLOCK_N_F)
    if PHASE == ALL_PHASES:
        _grid_barrier(counter_ptr, 4 * P)
    if (PHASE == ALL_PHASES) | (PHASE == 4):
        _mlp_out_phase(f_ptr, mlp_w_ptr, mlp_b_ptr, mid_ptr, out_ptr, C, W_NK, PER_C, BLOCK_F,
                       BLOCK_N_C)
    if PHASE == ALL_PHASES:  # the last program out leaves the counter at 0 for the next launch
        if tl.atomic_add(counter_ptr, 1, sem="acq_rel") == 5 * P - 1:
            tl.atomic_xchg(counter_ptr, 0)


# ------------------------------------------------------------------------------------ launcher

class BlockWeights(NamedTuple):
    """A GPT-2 block's parameters in the compute dtype, named as Hugging Face names them; the
    four matrices [K, N] as Conv1D stores them, or all four [N, K] (`w_nk=True`)."""
    ln_1_weight: jax.Array
    ln_1_bias: jax.Array
    c_attn_weight: jax.Array   # [C, 3C]
    c_attn_bias: jax.Array
    attn_c_proj_weight: jax.Array  # [C, C]
    attn_c_proj_bias: jax.Array
    ln_2_weight: jax.Array
    ln_2_bias: jax.Array
    c_fc_weight: jax.Array     # [C, 4C]
    c_fc_bias: jax.Array
    mlp_c_proj_weight: jax.Array  # [4C, C]
    mlp_c_proj_bias: jax.Array


def block_decode_fits(x_shape, num_heads: int, dtype, precision: str) -> bool:
    """Whether block_decode computes this step: one token of one sequence, a power-of-two head
    dim, weight tiles that fit (`_tile_values`), and fp32 only as IEEE products (as matmul's
    GEMV path)."""
    C = x_shape[-1]
    return (tuple(x_shape[:-1]) == (1, 1) and C % num_heads == 0
            and _is_power_of_two(C // num_heads)
            and _tile_values(C, default_num_programs()) <= TILE_VALUES
            and not (jnp.dtype(dtype) == jnp.float32 and precision == "tf32"))


def _tile_values(C: int, P: int) -> int:
    """The largest weight tile a program of the P loads: [its columns, all K] of each matrix."""
    pad = triton.next_power_of_2
    return max(pad(triton.cdiv(n, P)) * pad(k) for n, k in ((3 * C, C), (C, C), (4 * C, C),
                                                                (C, 4 * C)))


def default_num_programs() -> int:
    """P: on the GPU, one program per SM (all resident at once, as the barrier needs); in the
    interpreter 1 (fewest program instances)."""
    if not on_gpu():
        return 1
    device = jax.local_devices()[0]
    return getattr(device, "core_count", None) or 1


def block_decode(x, kv_cache, lengths, weights: BlockWeights, *, num_heads: int, eps: float,
                 key_mask=None, barrier=None, w_nk: bool = False, num_programs: int | None = None,
                 num_splits: int | None = None, one_launch: bool | None = None):
    """(out [1, 1, C]: x after the block; the cache with the token's k and v heads in slot
    lengths[0] - 1; the barrier counter) for one new token x [1, 1, C] of one sequence, in one
    launch.

    kv_cache [1, S, 2C] (slot j's [k heads | v heads]) in x's dtype, written in place like
    decode_attention's; lengths [1] int32, the slots after this token (1..S; a traced length
    outside gives NaN); key_mask [1, S] (nonzero: attend) or None; weights (BlockWeights) in
    x's dtype. barrier: int32 [1] holding 0 (default: a new one), as a previous block_decode
    returns it: pass it on to the next call. num_programs: P (default: one per SM; never more than the SMs, or the barrier
    waits forever); num_splits: how many splits share a head's keys (default: enough (head,
    split) items for the P programs); one_launch: all phases in one launch, meeting at grid
    barriers, or each phase its own launch (default: one launch on the GPU; one a phase in the
    interpreter, where a barrier can only pass with a single program). fp32 is computed as IEEE
    fp32 products.
    """
    _, T, C = x.shape
    if x.shape[0] != 1 or T != 1:
        raise ValueError(f"block_decode: x must be one token of one sequence, [1, 1, C], got "
                         f"{tuple(x.shape)}")
    if C % num_heads or not _is_power_of_two(C // num_heads):
        raise ValueError(f"block_decode: the head dim C / num_heads = {C} / {num_heads} must be "
                         f"a power of two")
    if kv_cache.ndim != 3 or kv_cache.shape[0] != 1 or kv_cache.shape[2] != 2 * C \
            or kv_cache.dtype != x.dtype:
        raise ValueError(f"block_decode: kv_cache must be {x.dtype}[1, S, {2 * C}], got "
                         f"{kv_cache.dtype}{list(kv_cache.shape)}")
    S = kv_cache.shape[1]
    H, D = num_heads, C // num_heads
    _check_weights(weights, C, x.dtype, w_nk)
    lengths = checked_lengths(lengths, 1, S)
    key_mask = checked_key_mask("key_mask", key_mask, (1, S))
    P = num_programs or default_num_programs()
    if _tile_values(C, P) > TILE_VALUES:
        raise ValueError(f"block_decode: C={C} at {P} programs needs weight tiles of "
                         f"{_tile_values(C, P)} values, more than {TILE_VALUES} (block_decode_fits)")
    splits = num_splits or max(1, min(P // H, triton.cdiv(S, 64), MAX_SPLITS))
    block_keys = triton.next_power_of_2(max(16, min(64, triton.cdiv(S, splits))))
    per = {n: triton.cdiv(n, P) for n in (C, 3 * C, 4 * C)}
    block_n = {n: triton.next_power_of_2(per[n]) for n in per}
    gpu = on_gpu()
    constexprs = dict(
        C=C, H=H, D=D, S=S, EPS=float(eps), QK_SCALE=D ** -0.5 * math.log2(math.e),
        HAS_MASK=key_mask is not None, W_NK=bool(w_nk), P=P, SPLITS=splits,
        PER_QKV=per[3 * C], PER_C=per[C], PER_F=per[4 * C], BLOCK_N_QKV=block_n[3 * C],
        BLOCK_N_C=block_n[C], BLOCK_N_F=block_n[4 * C], BLOCK_ROW=triton.next_power_of_2(C),
        BLOCK_F=triton.next_power_of_2(4 * C), BLOCK_KEYS=block_keys)
    dtype = x.dtype
    scratch = [jax.ShapeDtypeStruct((C,), dtype),                  # q
               jax.ShapeDtypeStruct((splits, C), jnp.float32),     # part
               jax.ShapeDtypeStruct((splits, H), jnp.float32),     # lse
               jax.ShapeDtypeStruct((C,), dtype),                  # mid (x')
               jax.ShapeDtypeStruct((4 * C,), dtype)]              # f
    out_shapes = (jax.ShapeDtypeStruct((1, 1, C), dtype), jax.ShapeDtypeStruct(kv_cache.shape, dtype),
                  *scratch, jax.ShapeDtypeStruct((1,), jnp.int32))
    mask = lengths if key_mask is None else key_mask  # HAS_MASK off: never read
    placeholder = jnp.zeros((1,), dtype)  # an unread *_in pointer
    # A computed zero, not a constant XLA would have to copy before the kernel writes it.
    counter = jax.lax.optimization_barrier(jnp.zeros((1,), jnp.int32)) if barrier is None \
        else barrier
    inputs = (x, *weights, lengths, mask)
    n = len(inputs)  # the index of kv_in: the aliased buffers follow in the outputs' order
    call = dict(kernel=_block_decode_kernel, out_shape=out_shapes, grid=(P,),
                num_warps=NUM_WARPS if gpu else 4, num_stages=1)
    if gpu if one_launch is None else one_launch:
        buffers = (kv_cache, placeholder, placeholder, placeholder, placeholder, placeholder,
                   counter)
        outs = triton_call(*inputs, *buffers, input_output_aliases={n: 1, n + 6: 7},
                           PHASE=ALL_PHASES.value, **call, **constexprs)
    else:
        buffers = (kv_cache, *(jnp.zeros(s.shape, s.dtype) for s in scratch), counter)
        for phase in range(NUM_PHASES):
            outs = triton_call(*inputs, *buffers,
                               input_output_aliases={n + i: 1 + i for i in range(7)},
                               PHASE=phase, **call, **constexprs)
            buffers = outs[1:]
    return outs[0], outs[1], outs[7]


def _check_weights(weights: BlockWeights, C: int, dtype, w_nk: bool) -> None:
    if not isinstance(weights, BlockWeights):
        raise ValueError(f"block_decode: weights must be a BlockWeights, got {type(weights).__name__}")
    matrices = {"c_attn_weight": (C, 3 * C), "attn_c_proj_weight": (C, C),
                "c_fc_weight": (C, 4 * C), "mlp_c_proj_weight": (4 * C, C)}
    vectors = {"c_attn_bias": 3 * C, "c_fc_bias": 4 * C}
    for name, value in weights._asdict().items():
        shape = matrices.get(name)
        shape = (shape[::-1] if w_nk else shape) if shape else (vectors.get(name, C),)
        if tuple(value.shape) != shape or value.dtype != dtype:
            raise ValueError(f"block_decode: weights.{name} must be {jnp.dtype(dtype).name}"
                             f"{list(shape)}, got {jnp.dtype(value.dtype).name}{list(value.shape)}")


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0
