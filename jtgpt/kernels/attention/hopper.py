"""Flash attention forward and dQ for Hopper GPUs, in Gluon: FlashAttention-3's schedule.

The same functions as two of `jtgpt.kernels.attention.flash`'s kernels (see that module's
docstring for the math) for their most common case: 16-bit qkv, head_dim 128, T a multiple of 128,
no padding mask, no dropout, causal or not, grouped-query heads allowed. `flash.flash_attention`
calls them for that case on an H100/H200 and its Triton kernels for everything else:

- `forward`: out and the natural-log lse (online softmax in base 2), as _attn_fwd_kernel.
- `backward_dq`: delta_i = dO_i . out_i and dq_i = sm_scale sum_j p_ij (dP_ij - delta_i) k_j, p
  recomputed from the saved lse, as _attn_bwd_dq_kernel; the Triton dK/dV kernel then completes
  the gradient in the same buffer.

Why Gluon: in Triton's `tl.dot` every wgmma is waited for as soon as it is issued, so a program
never overlaps its elementwise work with the tensor cores. Gluon (Triton's lower-level language)
makes the asynchronous wgmma, shared memory, mbarriers and warp specialization explicit; both
kernels beat their Triton twins (bench/RESULTS.md has the measurements).

Both kernels stream the key and value blocks of one (batch, kv head) past BLOCK_M = 128 query
rows of one (batch, query head), in three warp partitions:

- A producer warpgroup (4 warps, 24 registers each, by setmaxnreg) copies the key and value blocks
  of BLOCK_N rows with cp.async into a ring of STAGES shared-memory slots. `ready` barriers say a
  slot has landed; `empty` barriers (one arrival per consumer) say both consumers are done with it.
  (Not TMA: its descriptors hold the buffer's address, and jax-triton has no way to pass or
  build them.)
- Two consumer warpgroups (240 registers each) own 64 query rows each. Forward: for key block j a
  consumer issues s_j = q k_j^T and o += p_{j-1} v_{j-1} as asynchronous wgmma, waits for s_j
  alone, runs the online softmax of block j while p v is still on the tensor cores, then waits
  for it, frees slot j - 1 and rescales o (FlashAttention-3's intra-warpgroup overlap). dQ: it
  issues s_j = q k_j^T, dP_j = dO v_j^T and dq += dS_{j-1} k_{j-1}, and forms dS_j under the last.
- Ping-pong: the consumers take turns to issue their wgmma (barriers `turn`), so that one's
  elementwise work runs while the other's products occupy the tensor cores.

Causal: a program reads the key blocks up to its last row; only blocks that cross a consumer's
first row are masked elementwise. The longest query blocks of a head start first.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier,
                                                                warpgroup_mma, warpgroup_mma_wait)

from jtgpt.call import gpu_capability, triton_call
from jtgpt.kernels.attention import common

BLOCK_M = gl.constexpr(128)  # query rows per program
WG_ROWS = gl.constexpr(64)   # query rows per consumer warpgroup
BLOCK_N = gl.constexpr(128)  # keys per block
STAGES = gl.constexpr(3)     # key/value ring slots: 3 x 64 KB, with q's 32 KB, fill the SM's 227 KB
PRODUCER_WARPS = gl.constexpr(4)
LN2 = gl.constexpr(0.6931471805599453)
LOG2E = gl.constexpr(1.4426950408889634)


def supported(qkv, mask, cfg) -> bool:
    """Whether this kernel computes `flash._forward(qkv, mask, seed, cfg)`: a Hopper GPU (or a
    compile_only build for one), 16-bit qkv, head_dim 128, T % 128 == 0, no mask, no dropout."""
    capability = gpu_capability()
    return (capability is not None and capability // 10 == 9
            and jnp.dtype(qkv.dtype) in (jnp.bfloat16, jnp.float16) and cfg.head_dim == 128
            and qkv.shape[1] % BLOCK_M.value == 0 and mask is None and cfg.dropout_rate == 0.0)


@gluon.jit
def _softmax_block(s, m_i, l_i, row0, col0, QK_SCALE: gl.constexpr, CAUSAL_MASK: gl.constexpr,
                   s_layout: gl.constexpr):
    """Fold the scores s [WG_ROWS, BLOCK_N] of query rows row0 + [0, WG_ROWS) and keys col0 + [0,
    BLOCK_N) into the running max m_i and sum l_i; returns (p, m_i, l_i, alpha), alpha being the
    factor by which the output accumulator must be rescaled."""
    if CAUSAL_MASK:
        rows = row0 + gl.arange(0, WG_ROWS, layout=gl.SliceLayout(1, s_layout))
        cols = col0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        s = gl.where(gl.expand_dims(rows, 1) >= gl.expand_dims(cols, 0), s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, axis=1) * QK_SCALE)
    p = gl.exp2(s * QK_SCALE - gl.expand_dims(m_new, 1))
    alpha = gl.exp2(m_i - m_new)
    return p, m_new, l_i * alpha + gl.sum(p, axis=1), alpha


@gluon.jit
def _producer(k_ptr, k_smem, v_smem, ready_k, ready_v, empty, n_blocks, ROW: gl.constexpr,
              KV_OFFSET: gl.constexpr, HEAD_DIM: gl.constexpr):
    """k_ptr: key 0 of this program's kv head in qkv; its values sit KV_OFFSET elements on."""
    STAGES: gl.constexpr = k_smem.shape[0]
    BLOCK_N: gl.constexpr = k_smem.shape[1]
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [PRODUCER_WARPS, 1], [1, 0])
    rows = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, layout))
    cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, layout))
    k_ptrs = k_ptr + gl.expand_dims(rows, 1) * ROW + gl.expand_dims(cols, 0)
    for j in range(n_blocks):
        slot = j % STAGES
        # The slot's previous use (block j - STAGES) must be released by both consumers.
        mbarrier.wait(empty.index(slot), ((j // STAGES) & 1) ^ 1, pred=j >= STAGES)
        async_copy.async_copy_global_to_shared(k_smem.index(slot), k_ptrs)
        async_copy.mbarrier_arrive(ready_k.index(slot), increment_count=False)
        async_copy.async_copy_global_to_shared(v_smem.index(slot), k_ptrs + KV_OFFSET)
        async_copy.mbarrier_arrive(ready_v.index(slot), increment_count=False)
        k_ptrs += BLOCK_N * ROW


@gluon.jit
def _wait_turn(turn, k, WG: gl.constexpr):
    """Before a consumer's k-th wgmma issue: warpgroup 0's k-th follows warpgroup 1's (k-1)-th,
    warpgroup 1's k-th follows warpgroup 0's k-th (each issue arrives on the other's barrier)."""
    if WG == 0:
        mbarrier.wait(turn.index(0), (k - 1) & 1, pred=k >= 1)
    else:
        mbarrier.wait(turn.index(1), k & 1)


@gluon.jit
def _wait_slot(ready, j):
    """Wait until key/value block j has landed in its slot, and make the cp.async writes visible
    to wgmma (which reads shared memory through the async proxy)."""
    STAGES: gl.constexpr = ready.shape[0]
    mbarrier.wait(ready.index(j % STAGES), (j // STAGES) & 1)
    fence_async_shared()


@gluon.jit
def _consumer(q_ptr, out_ptr, lse_ptr, q_smem, k_smem, v_smem, ready_k, ready_v, empty, turn,
              first_row, n_blocks, ROW: gl.constexpr, OUT_ROW: gl.constexpr,
              HEAD_DIM: gl.constexpr, QK_SCALE: gl.constexpr, CAUSAL: gl.constexpr,
              WG: gl.constexpr):
    """Rows first_row + [0, WG_ROWS) of one head: q_ptr, out_ptr point at the first one's q and
    out, lse_ptr at its lse."""
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    q_layout: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])
    dtype: gl.constexpr = q_ptr.dtype.element_ty

    q_rows = gl.arange(0, WG_ROWS, layout=gl.SliceLayout(1, q_layout))
    q_cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, q_layout))
    q_tile = q_smem.index(WG)
    q_tile.store(gl.load(q_ptr + gl.expand_dims(q_rows, 1) * ROW + gl.expand_dims(q_cols, 0)))
    fence_async_shared()
    if CAUSAL:
        first_masked = first_row // BLOCK_N  # key blocks from here on hold keys past some rows
    else:
        first_masked = n_blocks
    m_i = gl.full([WG_ROWS], -1.0e30, gl.float32, layout=gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([WG_ROWS], gl.float32, layout=gl.SliceLayout(1, s_layout))
    o = gl.zeros([WG_ROWS, HEAD_DIM], gl.float32, layout=o_layout)
    s_zero = gl.zeros([WG_ROWS, BLOCK_N], gl.float32, layout=s_layout)

    # Block 0: s_0 alone.
    _wait_turn(turn, 0, WG)
    _wait_slot(ready_k, 0)
    s = warpgroup_mma(q_tile, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False,
                      is_async=True)
    mbarrier.arrive(turn.index(1 - WG))
    s = warpgroup_mma_wait(0, deps=(s,))
    if first_masked == 0:
        p, m_i, l_i, alpha = _softmax_block(s, m_i, l_i, first_row, 0, QK_SCALE, True, s_layout)
    else:
        p, m_i, l_i, alpha = _softmax_block(s, m_i, l_i, first_row, 0, QK_SCALE, False, s_layout)

    # Block j: s_j and p_{j-1} v_{j-1} in flight together, the softmax of s_j under the latter.
    for j in range(1, n_blocks):
        _wait_turn(turn, j, WG)
        _wait_slot(ready_k, j)
        s = warpgroup_mma(q_tile, k_smem.index(j % STAGES).permute((1, 0)), s_zero, use_acc=False,
                          is_async=True)
        _wait_slot(ready_v, j - 1)
        o = warpgroup_mma(gl.convert_layout(p.to(dtype), p_layout), v_smem.index((j - 1) % STAGES),
                          o, is_async=True)
        mbarrier.arrive(turn.index(1 - WG))
        s = warpgroup_mma_wait(1, deps=(s,))
        if j >= first_masked:
            p, m_i, l_i, alpha = _softmax_block(s, m_i, l_i, first_row, j * BLOCK_N, QK_SCALE,
                                                True, s_layout)
        else:
            p, m_i, l_i, alpha = _softmax_block(s, m_i, l_i, first_row, j * BLOCK_N, QK_SCALE,
                                                False, s_layout)
        o = warpgroup_mma_wait(0, deps=(o,))
        mbarrier.arrive(empty.index((j - 1) % STAGES))
        o = o * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)

    # The last p v.
    last = n_blocks - 1
    _wait_turn(turn, n_blocks, WG)
    _wait_slot(ready_v, last)
    o = warpgroup_mma(gl.convert_layout(p.to(dtype), p_layout), v_smem.index(last % STAGES), o,
                      is_async=True)
    mbarrier.arrive(turn.index(1 - WG))
    o = warpgroup_mma_wait(0, deps=(o,))
    mbarrier.arrive(empty.index(last % STAGES))

    o = o / gl.expand_dims(gl.convert_layout(l_i, gl.SliceLayout(1, o_layout)), 1)
    rows = gl.arange(0, WG_ROWS, layout=gl.SliceLayout(1, s_layout))
    gl.store(lse_ptr + rows, m_i * LN2 + gl.log(l_i))
    o_rows = gl.arange(0, WG_ROWS, layout=gl.SliceLayout(1, o_layout))
    o_cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    gl.store(out_ptr + gl.expand_dims(o_rows, 1) * OUT_ROW + gl.expand_dims(o_cols, 0), o.to(dtype))


@gluon.jit
def _consumer_0(args, ROW: gl.constexpr, OUT_ROW: gl.constexpr, HEAD_DIM: gl.constexpr,
                QK_SCALE: gl.constexpr, CAUSAL: gl.constexpr):
    _consumer(*args, ROW, OUT_ROW, HEAD_DIM, QK_SCALE, CAUSAL, 0)


@gluon.jit
def _consumer_1(args, ROW: gl.constexpr, OUT_ROW: gl.constexpr, HEAD_DIM: gl.constexpr,
                QK_SCALE: gl.constexpr, CAUSAL: gl.constexpr):
    _consumer(*args, ROW, OUT_ROW, HEAD_DIM, QK_SCALE, CAUSAL, 1)


@gluon.jit
def _query_block(T: gl.constexpr, HQ: gl.constexpr, HKV: gl.constexpr, CAUSAL: gl.constexpr,
                 BLOCK_N: gl.constexpr, HEAD_GROUP: gl.constexpr):
    """(first_row, n_blocks, b, h, g) of a program on the grid (T / BLOCK_M, B * HQ): its first
    query row, the number of key blocks its rows see, its batch, query head and kv head, in the
    program order of the Triton kernels (common.query_program)."""
    start_m, _, b, h, g = common.query_program(HQ, HKV, CAUSAL, HEAD_GROUP)
    if CAUSAL:
        n_blocks = gl.cdiv((start_m + 1) * BLOCK_M, BLOCK_N)   # keys up to the last row
    else:
        n_blocks = T // BLOCK_N
    return start_m * BLOCK_M, n_blocks, b, h, g


@gluon.jit
def _kv_ring(dtype: gl.constexpr, STAGES: gl.constexpr, BLOCK_N: gl.constexpr,
             HEAD_DIM: gl.constexpr):
    """The shared memory between the producer and the consumers: the key and value slots, their
    ready_k, ready_v and empty barriers, and the consumers' turn barriers."""
    layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], layout)
    ready_k = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    ready_v = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(turn.index(i), count=1)
    for i in gl.static_range(STAGES):
        # cp.async arrives once per producer thread; each consumer warpgroup arrives once.
        mbarrier.init(ready_k.index(i), count=32 * PRODUCER_WARPS)
        mbarrier.init(ready_v.index(i), count=32 * PRODUCER_WARPS)
        mbarrier.init(empty.index(i), count=2)
    return k_smem, v_smem, ready_k, ready_v, empty, turn


@gluon.jit
def _attn_fwd_hopper_kernel(qkv_ptr, out_ptr, lse_ptr, T: gl.constexpr, HQ: gl.constexpr,
                            HKV: gl.constexpr, HEAD_DIM: gl.constexpr, QK_SCALE: gl.constexpr,
                            CAUSAL: gl.constexpr, HEAD_GROUP: gl.constexpr):
    """Grid (T / BLOCK_M, B * HQ). qkv_ptr: [B, T, (HQ + 2 HKV) HEAD_DIM]; out_ptr: [B, T, HQ
    HEAD_DIM]; lse_ptr: fp32 [B, HQ, T] (the layouts of flash._attn_fwd_kernel)."""
    ROW: gl.constexpr = (HQ + 2 * HKV) * HEAD_DIM
    OUT_ROW: gl.constexpr = HQ * HEAD_DIM
    dtype: gl.constexpr = qkv_ptr.dtype.element_ty
    first_row, n_blocks, b, h, g = _query_block(T, HQ, HKV, CAUSAL, BLOCK_N, HEAD_GROUP)
    qkv_b = qkv_ptr + b.to(gl.int64) * (T * ROW)
    q_ptr = qkv_b + first_row * ROW + h * HEAD_DIM
    out_ptr += b.to(gl.int64) * (T * OUT_ROW) + first_row * OUT_ROW + h * HEAD_DIM
    lse_ptr += (b * HQ + h) * T + first_row

    q_smem = gl.allocate_shared_memory(
        dtype, [2, WG_ROWS, HEAD_DIM], gl.NVMMASharedLayout.get_default_for([WG_ROWS, HEAD_DIM],
                                                                            dtype))
    ring = _kv_ring(dtype, STAGES, BLOCK_N, HEAD_DIM)
    k_smem, v_smem, ready_k, ready_v, empty, turn = ring
    args_0 = (q_ptr, out_ptr, lse_ptr, q_smem) + ring + (first_row, n_blocks)
    args_1 = (q_ptr + WG_ROWS * ROW, out_ptr + WG_ROWS * OUT_ROW, lse_ptr + WG_ROWS, q_smem
              ) + ring + (first_row + WG_ROWS, n_blocks)
    gl.warp_specialize([
        (_consumer_0, (args_0, ROW, OUT_ROW, HEAD_DIM, QK_SCALE, CAUSAL)),
        (_consumer_1, (args_1, ROW, OUT_ROW, HEAD_DIM, QK_SCALE, CAUSAL)),
        (_producer, (qkv_b + (HQ + g) * HEAD_DIM, k_smem, v_smem, ready_k, ready_v, empty,
                     n_blocks, ROW, HKV * HEAD_DIM, HEAD_DIM)),
    ], [4, PRODUCER_WARPS], [240, 24])


def _constexprs(cfg, T):
    """The shapes, scale and program order exactly as the Triton kernels get them: each backward
    kernel recomputes p from the forward's lse, so the two must not drift."""
    shared = cfg.constexprs(T, has_mask=False)
    return {name: shared[name]
            for name in ("T", "HQ", "HKV", "HEAD_DIM", "QK_SCALE", "CAUSAL", "HEAD_GROUP")}


def forward(qkv, cfg):
    """(out [B, T, Hq D], lse [B, Hq, T] fp32) for `supported` inputs (flash._forward)."""
    B, T, _ = qkv.shape
    out_shapes = (jax.ShapeDtypeStruct((B, T, cfg.num_heads * cfg.head_dim), qkv.dtype),
                  jax.ShapeDtypeStruct((B, cfg.num_heads, T), jnp.float32))
    # num_warps is the first consumer's: warp_specialize adds the other partitions' warps.
    return triton_call(
        qkv, kernel=_attn_fwd_hopper_kernel, out_shape=out_shapes,
        grid=(triton.cdiv(T, BLOCK_M.value), B * cfg.num_heads), num_warps=4,
        **_constexprs(cfg, T))


# ------------------------------------------------------------------------------------- dQ

# Keys per block: with 128, a consumer's fp32 s, dP and dq (64 registers each) and its q and dO
# operands (32 each) spill. 3 to 6 stages of 32 KB timed alike on an H100 (bench/RESULTS.md).
DQ_BLOCK_N = 64
DQ_STAGES = 4


@gluon.jit
def _dq_scores(q, do, k_smem, v_smem, ready_k, ready_v, j, s_zero):
    """Issue s_j = q k_j^T and dP_j = dO v_j^T (asynchronous), once block j has landed."""
    STAGES: gl.constexpr = k_smem.shape[0]
    _wait_slot(ready_k, j)
    s = warpgroup_mma(q, k_smem.index(j % STAGES).permute((1, 0)), s_zero, use_acc=False,
                      is_async=True)
    _wait_slot(ready_v, j)
    dp = warpgroup_mma(do, v_smem.index(j % STAGES).permute((1, 0)), s_zero, use_acc=False,
                       is_async=True)
    return s, dp


@gluon.jit
def _dq_ds(s, dp, lse2, delta, row0, col0, QK_SCALE: gl.constexpr, CAUSAL_MASK: gl.constexpr,
           s_layout: gl.constexpr, ds_layout: gl.constexpr, dtype: gl.constexpr):
    """dS = p (dP - delta), p = exp2(s QK_SCALE - lse2), for query rows row0 + [0, WG_ROWS) and
    keys col0 + [0, BLOCK_N); as the A operand of dq += dS k."""
    p = gl.exp2(s * QK_SCALE - gl.expand_dims(lse2, 1))
    if CAUSAL_MASK:
        rows = row0 + gl.arange(0, s.shape[0], layout=gl.SliceLayout(1, s_layout))
        cols = col0 + gl.arange(0, s.shape[1], layout=gl.SliceLayout(0, s_layout))
        p = gl.where(gl.expand_dims(rows, 1) >= gl.expand_dims(cols, 0), p, 0.0)
    ds = p * (dp - gl.expand_dims(delta, 1))
    return gl.convert_layout(ds.to(dtype), ds_layout)


@gluon.jit
def _dq_consumer(q_ptr, out_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, k_smem, v_smem, ready_k,
                 ready_v, empty, turn, first_row, n_blocks, ROW: gl.constexpr,
                 OUT_ROW: gl.constexpr, HEAD_DIM: gl.constexpr, QK_SCALE: gl.constexpr,
                 SM_SCALE: gl.constexpr, CAUSAL: gl.constexpr, WG: gl.constexpr):
    """delta and dq of rows first_row + [0, WG_ROWS) of one head: q_ptr, dq_ptr point at the
    first one's q in qkv and dqkv, out_ptr, do_ptr at its out and dO, lse_ptr, delta_ptr at its
    lse and delta."""
    STAGES: gl.constexpr = k_smem.shape[0]
    BLOCK_N: gl.constexpr = k_smem.shape[1]
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    dq_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, HEAD_DIM, 16])
    ds_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=dq_layout, k_width=2)
    qdo_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=2)
    io_layout: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])
    dtype: gl.constexpr = q_ptr.dtype.element_ty

    rows = gl.expand_dims(gl.arange(0, WG_ROWS, layout=gl.SliceLayout(1, io_layout)), 1)
    cols = gl.expand_dims(gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, io_layout)), 0)
    # q and dO are the A operands of every s and dP product: from registers, wgmma reads only
    # the key (value) block from shared memory.
    q = gl.convert_layout(gl.load(q_ptr + rows * ROW + cols), qdo_layout)
    do = gl.load(do_ptr + rows * OUT_ROW + cols)
    delta = gl.sum(do.to(gl.float32) * gl.load(out_ptr + rows * OUT_ROW + cols).to(gl.float32),
                   axis=1)
    do = gl.convert_layout(do, qdo_layout)
    gl.store(delta_ptr + gl.arange(0, WG_ROWS, layout=gl.SliceLayout(1, io_layout)), delta)
    delta = gl.convert_layout(delta, gl.SliceLayout(1, s_layout))
    lse2 = gl.load(lse_ptr + gl.arange(0, WG_ROWS, layout=gl.SliceLayout(1, s_layout))) * LOG2E
    if CAUSAL:
        first_masked = first_row // BLOCK_N  # key blocks from here on hold keys past some rows
    else:
        first_masked = n_blocks
    dq = gl.zeros([WG_ROWS, HEAD_DIM], gl.float32, layout=dq_layout)
    s_zero = gl.zeros([WG_ROWS, BLOCK_N], gl.float32, layout=s_layout)

    # Block 0: s_0 and dP_0 alone.
    _wait_turn(turn, 0, WG)
    s, dp = _dq_scores(q, do, k_smem, v_smem, ready_k, ready_v, 0, s_zero)
    mbarrier.arrive(turn.index(1 - WG))
    s, dp = warpgroup_mma_wait(0, deps=(s, dp))
    if first_masked == 0:
        ds = _dq_ds(s, dp, lse2, delta, first_row, 0, QK_SCALE, True, s_layout, ds_layout, dtype)
    else:
        ds = _dq_ds(s, dp, lse2, delta, first_row, 0, QK_SCALE, False, s_layout, ds_layout, dtype)

    # Block j: s_j, dP_j and dq += dS_{j-1} k_{j-1} in flight together, dS_j under the last.
    for j in range(1, n_blocks):
        _wait_turn(turn, j, WG)
        s, dp = _dq_scores(q, do, k_smem, v_smem, ready_k, ready_v, j, s_zero)
        dq = warpgroup_mma(ds, k_smem.index((j - 1) % STAGES), dq, is_async=True)
        mbarrier.arrive(turn.index(1 - WG))
        s, dp = warpgroup_mma_wait(1, deps=(s, dp))
        if j >= first_masked:
            ds = _dq_ds(s, dp, lse2, delta, first_row, j * BLOCK_N, QK_SCALE, True,
                        s_layout, ds_layout, dtype)
        else:
            ds = _dq_ds(s, dp, lse2, delta, first_row, j * BLOCK_N, QK_SCALE, False,
                        s_layout, ds_layout, dtype)
        dq = warpgroup_mma_wait(0, deps=(dq,))
        mbarrier.arrive(empty.index((j - 1) % STAGES))

    # The last dS k.
    last = n_blocks - 1
    _wait_turn(turn, n_blocks, WG)
    dq = warpgroup_mma(ds, k_smem.index(last % STAGES), dq, is_async=True)
    mbarrier.arrive(turn.index(1 - WG))
    dq = warpgroup_mma_wait(0, deps=(dq,))
    mbarrier.arrive(empty.index(last % STAGES))

    dq_rows = gl.arange(0, WG_ROWS, layout=gl.SliceLayout(1, dq_layout))
    dq_cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, dq_layout))
    gl.store(dq_ptr + gl.expand_dims(dq_rows, 1) * ROW + gl.expand_dims(dq_cols, 0),
             (dq * SM_SCALE).to(dtype))


@gluon.jit
def _dq_consumer_0(args, ROW: gl.constexpr, OUT_ROW: gl.constexpr, HEAD_DIM: gl.constexpr,
                   QK_SCALE: gl.constexpr, SM_SCALE: gl.constexpr, CAUSAL: gl.constexpr):
    _dq_consumer(*args, ROW, OUT_ROW, HEAD_DIM, QK_SCALE, SM_SCALE, CAUSAL, 0)


@gluon.jit
def _dq_consumer_1(args, ROW: gl.constexpr, OUT_ROW: gl.constexpr, HEAD_DIM: gl.constexpr,
                   QK_SCALE: gl.constexpr, SM_SCALE: gl.constexpr, CAUSAL: gl.constexpr):
    _dq_consumer(*args, ROW, OUT_ROW, HEAD_DIM, QK_SCALE, SM_SCALE, CAUSAL, 1)


@gluon.jit
def _attn_bwd_dq_hopper_kernel(qkv_ptr, out_ptr, do_ptr, lse_ptr, dq_ptr, delta_ptr,
                               T: gl.constexpr, HQ: gl.constexpr, HKV: gl.constexpr,
                               HEAD_DIM: gl.constexpr, QK_SCALE: gl.constexpr,
                               SM_SCALE: gl.constexpr, CAUSAL: gl.constexpr,
                               BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                               HEAD_GROUP: gl.constexpr):
    """Grid (T / BLOCK_M, B * HQ): delta and dq of BLOCK_M query rows of one (batch, query head).
    Arguments as flash._attn_bwd_dq_kernel's (dq_ptr: its dqkv_ptr, packed like qkv, of which
    this kernel writes the q heads)."""
    ROW: gl.constexpr = (HQ + 2 * HKV) * HEAD_DIM
    OUT_ROW: gl.constexpr = HQ * HEAD_DIM
    dtype: gl.constexpr = qkv_ptr.dtype.element_ty
    first_row, n_blocks, b, h, g = _query_block(T, HQ, HKV, CAUSAL, BLOCK_N, HEAD_GROUP)
    batch_offset = b.to(gl.int64) * (T * ROW)
    q_offset = batch_offset + first_row * ROW + h * HEAD_DIM
    out_offset = b.to(gl.int64) * (T * OUT_ROW) + first_row * OUT_ROW + h * HEAD_DIM
    stats_offset = (b * HQ + h) * T + first_row

    ring = _kv_ring(dtype, STAGES, BLOCK_N, HEAD_DIM)
    k_smem, v_smem, ready_k, ready_v, empty, turn = ring
    args_0 = (qkv_ptr + q_offset, out_ptr + out_offset, do_ptr + out_offset,
              lse_ptr + stats_offset, delta_ptr + stats_offset, dq_ptr + q_offset) + ring + (
        first_row, n_blocks)
    args_1 = (qkv_ptr + q_offset + WG_ROWS * ROW, out_ptr + out_offset + WG_ROWS * OUT_ROW,
              do_ptr + out_offset + WG_ROWS * OUT_ROW, lse_ptr + stats_offset + WG_ROWS,
              delta_ptr + stats_offset + WG_ROWS, dq_ptr + q_offset + WG_ROWS * ROW) + ring + (
        first_row + WG_ROWS, n_blocks)
    gl.warp_specialize([
        (_dq_consumer_0, (args_0, ROW, OUT_ROW, HEAD_DIM, QK_SCALE, SM_SCALE, CAUSAL)),
        (_dq_consumer_1, (args_1, ROW, OUT_ROW, HEAD_DIM, QK_SCALE, SM_SCALE, CAUSAL)),
        (_producer, (qkv_ptr + batch_offset + (HQ + g) * HEAD_DIM, k_smem, v_smem, ready_k, ready_v,
                     empty, n_blocks, ROW, HKV * HEAD_DIM, HEAD_DIM)),
    ], [4, PRODUCER_WARPS], [240, 24])


def backward_dq(qkv, out, dout, lse, cfg):
    """(dqkv with its q heads written, delta [B, Hq, T] fp32) for `supported` inputs: what
    flash._attn_bwd_dq_kernel returns, for its dK/dV kernel to complete."""
    B, T, _ = qkv.shape
    return triton_call(
        qkv, out, dout, lse, kernel=_attn_bwd_dq_hopper_kernel,
        out_shape=(jax.ShapeDtypeStruct(qkv.shape, qkv.dtype),
                   jax.ShapeDtypeStruct((B, cfg.num_heads, T), jnp.float32)),
        grid=(triton.cdiv(T, BLOCK_M.value), B * cfg.num_heads), num_warps=4,
        **_constexprs(cfg, T), SM_SCALE=cfg.sm_scale, BLOCK_N=DQ_BLOCK_N, STAGES=DQ_STAGES)
