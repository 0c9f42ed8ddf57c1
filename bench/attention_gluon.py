"""A FlashAttention-3-style causal forward written in Gluon, timed against jtgpt's Triton forward
and torch SDPA. A prototype for issue #3's attention target: jtgpt does not call it yet.

    python bench/attention_gluon.py                       # (B, H, T, D) = (4, 32, 4096, 128)
    python bench/attention_gluon.py --markdown out.md     # also write the table to a file

Gluon is Triton 3.6's lower-level language: layouts, shared memory, mbarriers, TMA, asynchronous
wgmma and warp specialization are explicit, where `tl.dot` waits for each wgmma as soon as it is
issued (bench/RESULTS.md, 2026-11-26, session 5). It runs here on torch tensors with host-side
TMA descriptors, because jax-triton 0.3.1 can do neither: it compiles every kernel as Triton IR
(Gluon needs its own first pass) and passes only arrays and scalars, not the 128-byte descriptors.

One program: 128 query rows of one (batch, head), in three partitions of warps.

- A producer warp (24 registers) copies key and value blocks of BLOCK_N rows by TMA into a ring of
  STAGES shared-memory slots. `ready` barriers say a slot is full; `empty` barriers (two arrivals)
  say both consumers are done with it.
- Two consumer warpgroups (240 registers each) own 64 query rows each. For key block j a consumer
  issues s_j = q k_j^T and o += p_{j-1} v_{j-1} as asynchronous wgmma, waits for s_j alone, runs
  the online softmax of block j while p v is still on the tensor cores, then waits for it, frees
  slot j - 1 and rescales o (FlashAttention-3's intra-warpgroup overlap).
- Ping-pong: the consumers take turns to issue their wgmma (barriers `turn`), so that one's softmax
  runs while the other's products occupy the tensor cores.

Math as jtgpt.kernels.attention's forward (base-2 online softmax, lse in natural log). Causal, bf16,
D = 128, T a multiple of 128 only.
"""
import argparse
import math
import os
import sys

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                                warpgroup_mma, warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # jtgpt imports JAX: keep it off the GPU
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from common import time_torch  # noqa: E402
from jtgpt.kernels import attention  # noqa: E402

BLOCK_M = gl.constexpr(128)  # query rows per program
WG_ROWS = gl.constexpr(64)   # query rows per consumer warpgroup
LN2 = gl.constexpr(0.6931471805599453)


@gluon.jit
def _softmax_block(s, m_i, l_i, row0, col0, QK_SCALE: gl.constexpr, CAUSAL_MASK: gl.constexpr,
                   s_layout: gl.constexpr):
    """Fold the scores s [WG_ROWS, BLOCK_N] of query rows row0 + [0, WG_ROWS) and keys col0 + [0,
    BLOCK_N) into the running max m_i and sum l_i; returns (p, m_i, l_i, alpha), alpha being the
    factor by which the output accumulator must be rescaled."""
    if CAUSAL_MASK:
        rows = row0 + gl.arange(0, s.shape[0], layout=gl.SliceLayout(1, s_layout))
        cols = col0 + gl.arange(0, s.shape[1], layout=gl.SliceLayout(0, s_layout))
        s = gl.where(gl.expand_dims(rows, 1) >= gl.expand_dims(cols, 0), s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, axis=1) * QK_SCALE)
    p = gl.exp2(s * QK_SCALE - gl.expand_dims(m_new, 1))
    alpha = gl.exp2(m_i - m_new)
    return p, m_new, l_i * alpha + gl.sum(p, axis=1), alpha


@gluon.jit
def _producer(k_desc, v_desc, k_smem, v_smem, ready_k, ready_v, empty, key0, h, n_blocks,
              H: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr,
              STAGES: gl.constexpr):
    for j in range(n_blocks):
        slot = j % STAGES
        # The slot's previous use (block j - STAGES) must be released by both consumers.
        mbarrier.wait(empty.index(slot), ((j // STAGES) & 1) ^ 1, pred=j >= STAGES)
        mbarrier.expect(ready_k.index(slot), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [key0 + j * BLOCK_N, (H + h) * HEAD_DIM],
                                        ready_k.index(slot), k_smem.index(slot))
        mbarrier.expect(ready_v.index(slot), v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(v_desc, [key0 + j * BLOCK_N, (2 * H + h) * HEAD_DIM],
                                        ready_v.index(slot), v_smem.index(slot))


@gluon.jit
def _wait_turn(turn, k, WG: gl.constexpr):
    """Before a consumer's k-th wgmma issue: warpgroup 0's k-th follows warpgroup 1's (k-1)-th,
    warpgroup 1's k-th follows warpgroup 0's k-th (each issue arrives on the other's barrier)."""
    if WG == 0:
        mbarrier.wait(turn.index(0), (k - 1) & 1, pred=k >= 1)
    else:
        mbarrier.wait(turn.index(1), k & 1)


@gluon.jit
def _consumer(q_desc, o_desc, lse_ptr, q_smem, k_smem, v_smem, q_ready, ready_k, ready_v, empty,
              turn, row0, h, bh, start_m, n_blocks, T: gl.constexpr, HEAD_DIM: gl.constexpr,
              QK_SCALE: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
              WG: gl.constexpr):
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    q_tile = q_smem.index(WG)
    first_row = start_m * BLOCK_M + WG * WG_ROWS            # within the sequence
    first_masked = first_row // BLOCK_N                      # blocks from here on cross the diagonal
    mbarrier.expect(q_ready.index(WG), q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [row0 + WG * WG_ROWS, h * HEAD_DIM],
                                    q_ready.index(WG), q_tile)
    m_i = gl.full([WG_ROWS], -1.0e30, gl.float32, layout=gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([WG_ROWS], gl.float32, layout=gl.SliceLayout(1, s_layout))
    o = gl.zeros([WG_ROWS, HEAD_DIM], gl.float32, layout=o_layout)
    s_zero = gl.zeros([WG_ROWS, BLOCK_N], gl.float32, layout=s_layout)
    mbarrier.wait(q_ready.index(WG), 0)

    # Block 0: s_0 alone.
    _wait_turn(turn, 0, WG)
    mbarrier.wait(ready_k.index(0), 0)
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
        slot = j % STAGES
        prev = (j - 1) % STAGES
        _wait_turn(turn, j, WG)
        mbarrier.wait(ready_k.index(slot), (j // STAGES) & 1)
        s = warpgroup_mma(q_tile, k_smem.index(slot).permute((1, 0)), s_zero, use_acc=False,
                          is_async=True)
        mbarrier.wait(ready_v.index(prev), ((j - 1) // STAGES) & 1)
        o = warpgroup_mma(gl.convert_layout(p.to(gl.bfloat16), p_layout), v_smem.index(prev), o,
                          is_async=True)
        mbarrier.arrive(turn.index(1 - WG))
        s = warpgroup_mma_wait(1, deps=(s,))
        if j >= first_masked:
            p, m_i, l_i, alpha = _softmax_block(s, m_i, l_i, first_row, j * BLOCK_N, QK_SCALE,
                                                True, s_layout)
        else:
            p, m_i, l_i, alpha = _softmax_block(s, m_i, l_i, first_row, j * BLOCK_N, QK_SCALE,
                                                False, s_layout)
        o = warpgroup_mma_wait(0, deps=(o,))
        mbarrier.arrive(empty.index(prev))
        o = o * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)

    # The last p v.
    last = (n_blocks - 1) % STAGES
    _wait_turn(turn, n_blocks, WG)
    mbarrier.wait(ready_v.index(last), ((n_blocks - 1) // STAGES) & 1)
    o = warpgroup_mma(gl.convert_layout(p.to(gl.bfloat16), p_layout), v_smem.index(last), o,
                      is_async=True)
    mbarrier.arrive(turn.index(1 - WG))
    o = warpgroup_mma_wait(0, deps=(o,))
    mbarrier.arrive(empty.index(last))

    o = o / gl.expand_dims(gl.convert_layout(l_i, gl.SliceLayout(1, o_layout)), 1)
    rows = first_row + gl.arange(0, WG_ROWS, layout=gl.SliceLayout(1, s_layout))
    gl.store(lse_ptr + bh * T + rows, m_i * LN2 + gl.log(l_i))
    q_tile.store(o.to(o_desc.dtype))  # q is no longer needed: its tile stages the output
    fence_async_shared()
    tma.async_copy_shared_to_global(o_desc, [row0 + WG * WG_ROWS, h * HEAD_DIM], q_tile)
    tma.store_wait(pendings=0)


@gluon.jit
def _consumer_0(args, T: gl.constexpr, HEAD_DIM: gl.constexpr, QK_SCALE: gl.constexpr,
                BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    _consumer(*args, T, HEAD_DIM, QK_SCALE, BLOCK_N, STAGES, 0)


@gluon.jit
def _consumer_1(args, T: gl.constexpr, HEAD_DIM: gl.constexpr, QK_SCALE: gl.constexpr,
                BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    _consumer(*args, T, HEAD_DIM, QK_SCALE, BLOCK_N, STAGES, 1)


@gluon.jit
def attn_fwd_kernel(q_desc, k_desc, v_desc, o_desc, lse_ptr, T: gl.constexpr, H: gl.constexpr,
                    HEAD_DIM: gl.constexpr, QK_SCALE: gl.constexpr, BLOCK_N: gl.constexpr,
                    STAGES: gl.constexpr):
    """Grid (T / BLOCK_M, B * H); q_desc .. o_desc: TMA descriptors of qkv [B T, 3 H D] and out
    [B T, H D]; lse_ptr: fp32 [B, H, T]. The longest (last) query blocks of a head start first."""
    start_m = gl.num_programs(0) - 1 - gl.program_id(0)
    bh = gl.program_id(1)
    b = bh // H
    h = bh % H
    row0 = b * T + start_m * BLOCK_M
    n_blocks = gl.cdiv((start_m + 1) * BLOCK_M, BLOCK_N)   # causal: keys up to the last row
    q_smem = gl.allocate_shared_memory(q_desc.dtype, [2] + q_desc.block_type.shape, q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape,
                                       k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape,
                                       v_desc.layout)
    q_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    ready_k = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    ready_v = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(q_ready.index(i), count=1)
        mbarrier.init(turn.index(i), count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(ready_k.index(i), count=1)
        mbarrier.init(ready_v.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)
    args = (q_desc, o_desc, lse_ptr, q_smem, k_smem, v_smem, q_ready, ready_k, ready_v, empty,
            turn, row0, h, bh, start_m, n_blocks)
    gl.warp_specialize([
        (_consumer_0, (args, T, HEAD_DIM, QK_SCALE, BLOCK_N, STAGES)),
        (_consumer_1, (args, T, HEAD_DIM, QK_SCALE, BLOCK_N, STAGES)),
        (_producer, (k_desc, v_desc, k_smem, v_smem, ready_k, ready_v, empty, b * T, h, n_blocks,
                     H, HEAD_DIM, BLOCK_N, STAGES)),
    ], [4, 1], [240, 24])


def gluon_attention_forward(qkv, num_heads, block_n=128, stages=3):
    """(out [B, T, H D], lse [B, H, T]) of causal attention over packed qkv [B, T, 3 H D]."""
    B, T, width = qkv.shape
    D = width // (3 * num_heads)
    if qkv.dtype != torch.bfloat16 or D != 128 or T % BLOCK_M.value:
        raise ValueError(f"prototype: bf16, head_dim 128, T % {BLOCK_M.value} == 0 only; got "
                         f"{qkv.dtype}, head_dim {D}, T = {T}")
    rows = qkv.view(B * T, width)
    out = torch.empty(B, T, num_heads * D, device=qkv.device, dtype=qkv.dtype)
    lse = torch.empty(B, num_heads, T, device=qkv.device, dtype=torch.float32)
    out_rows = out.view(B * T, num_heads * D)
    tile = lambda n: gl.NVMMASharedLayout.get_default_for([n, D], gl.bfloat16)  # noqa: E731
    q_desc = TensorDescriptor(rows, list(rows.shape), list(rows.stride()), [WG_ROWS.value, D],
                              tile(WG_ROWS.value))
    kv_desc = TensorDescriptor(rows, list(rows.shape), list(rows.stride()), [block_n, D],
                               tile(block_n))
    o_desc = TensorDescriptor(out_rows, list(out_rows.shape), list(out_rows.stride()),
                              [WG_ROWS.value, D], tile(WG_ROWS.value))
    attn_fwd_kernel[(T // BLOCK_M.value, B * num_heads)](
        q_desc, kv_desc, kv_desc, o_desc, lse, T, num_heads, D, D ** -0.5 * math.log2(math.e),
        block_n, stages, num_warps=4)
    return out, lse


def jtgpt_triton_forward(qkv, num_heads):
    """jtgpt's Triton forward kernel with its shipped config, launched by Triton on torch tensors
    (the same kernel `jtgpt.kernels.attention.flash_attention` runs through jax-triton)."""
    B, T, width = qkv.shape
    D = width // (3 * num_heads)
    cfg = attention._Config(num_heads, num_heads, D, True, D ** -0.5, "ieee", 0.0)
    block_m, block_n, num_warps, num_stages = attention._block_config(D, "bfloat16", "ieee")
    out = torch.empty(B, T, num_heads * D, device=qkv.device, dtype=qkv.dtype)
    lse = torch.empty(B, num_heads, T, device=qkv.device, dtype=torch.float32)
    seed = torch.zeros((), device=qkv.device, dtype=torch.int32)
    attention._attn_fwd_kernel[(math.ceil(T / block_m), B * num_heads)](
        qkv, qkv, qkv, qkv, seed, out, lse, **cfg.constexprs(T, False), BLOCK_M=block_m,
        BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages)
    return out, lse


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="4,32,4096,128", help="B,H,T,D (default %(default)s)")
    p.add_argument("--markdown", metavar="FILE", help="also write the table to FILE")
    args = p.parse_args()
    B, H, T, D = (int(x) for x in args.shape.split(","))
    torch.manual_seed(0)
    qkv = torch.randn(B, T, 3 * H * D, device="cuda", dtype=torch.bfloat16)
    q, k, v = (qkv[..., i * H * D:(i + 1) * H * D].unflatten(-1, (H, D)).transpose(1, 2)
               for i in range(3))
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    ref_out = sdpa().transpose(1, 2).flatten(2).float()
    _, ref_lse = jtgpt_triton_forward(qkv, H)
    flops = 4 * B * H * T * T * D / 2
    lines = [f"{torch.cuda.get_device_name()}, bfloat16, causal, (B, H, T, D) = ({B}, {H}, {T}, "
             f"{D}), forward only, 10 calls x 5 repeats", "",
             "| forward | ms | TFLOP/s | out rel. error vs SDPA | lse max abs. diff vs jtgpt |",
             "|---|---:|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    competitors = {
        "jtgpt Triton (shipped kernel, native launch)": lambda: jtgpt_triton_forward(qkv, H),
        "Gluon ping-pong, BLOCK_N 128, 3 stages": lambda: gluon_attention_forward(qkv, H, 128, 3),
        "Gluon ping-pong, BLOCK_N 64, 3 stages": lambda: gluon_attention_forward(qkv, H, 64, 3),
        "torch SDPA": lambda: (sdpa(), None),
    }
    for name, fn in competitors.items():
        out, lse = fn()
        err = (out.transpose(1, 2).flatten(2) if out.dim() == 4 else out).float().sub(ref_out)
        err = (err.norm() / ref_out.norm()).item()
        lse_diff = "-" if lse is None else f"{(lse - ref_lse).abs().max().item():.1e}"
        seconds, _, _ = time_torch(fn, calls=10, repeats=5)
        lines.append(f"| {name} | {seconds * 1e3:.3f} | {flops / seconds / 1e12:.1f} | "
                     f"{err:.1e} | {lse_diff} |")
        print(lines[-1], flush=True)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
