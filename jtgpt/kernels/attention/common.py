"""What every attention kernel shares: the static description of one attention call, and the
order the programs of a causal kernel run in (flash.py's Triton kernels and hopper.py's Gluon
kernels both read them from here, so the two cannot drift: each backward kernel recomputes p from
the forward's lse)."""
from __future__ import annotations

import math
from typing import NamedTuple

import jax.numpy as jnp

import triton
import triton.language as tl

from jtgpt.kernels import check_precision

HEAD_GROUP = 4  # causal programs start in groups of this many heads (program_in_group)
HEAD_DIMS = (16, 32, 64, 128, 256)
MAX_GRID_Y = 65535  # CUDA's cap on the grid's second axis, where (batch, head) pairs run


class AttentionConfig(NamedTuple):
    """The static arguments of one attention: hashable, so custom_vjp can take it as nondiff."""
    num_heads: int
    num_kv_heads: int
    head_dim: int
    causal: bool
    sm_scale: float
    precision: str
    dropout_rate: float

    def constexprs(self, T: int, has_mask: bool) -> dict:
        """The constexprs the forward and backward kernels share."""
        return dict(T=T, HQ=self.num_heads, HKV=self.num_kv_heads, HEAD_DIM=self.head_dim,
                    QK_SCALE=self.sm_scale * math.log2(math.e), CAUSAL=self.causal,
                    HAS_MASK=has_mask, DROPOUT_P=self.dropout_rate, PRECISION=self.precision,
                    HEAD_GROUP=HEAD_GROUP)


@triton.jit
def program_in_group(HEAD_GROUP: tl.constexpr):
    """(rank, head) of a program on a grid (blocks, heads), for causal kernels whose programs do
    unequal work. The GPU starts programs in grid order, axis 0 fastest; taken in that order,
    programs go through the heads in groups of HEAD_GROUP, and within a group rank r of every
    head starts before rank r + 1 of any. The kernel maps rank 0 to its longest block. Programs
    running at once then share a few heads' K and V (q and dO) in L2, which a grid ordered
    heads-first across all heads loses, and the kernel ends on short programs of several heads
    rather than on one head's longest."""
    n = tl.num_programs(0)
    pid = tl.program_id(1) * n + tl.program_id(0)
    first = pid // (HEAD_GROUP * n) * HEAD_GROUP
    size = tl.minimum(tl.num_programs(1) - first, HEAD_GROUP)
    within = pid - first * n
    return within // size, first + within % size


@triton.jit
def query_program(HQ: tl.constexpr, HKV: tl.constexpr, CAUSAL: tl.constexpr,
                  HEAD_GROUP: tl.constexpr):
    """(query block, batch * HQ + head, batch, query head, kv head) of a program on the grid
    (query blocks, B * HQ) of the forward and dQ kernels. Causal work grows with the query
    block: the longest start first (program_in_group)."""
    if CAUSAL:
        rank, pid_bh = program_in_group(HEAD_GROUP)
        start_m = tl.num_programs(0) - 1 - rank
    else:
        start_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
    h = pid_bh % HQ
    return start_m, pid_bh, pid_bh // HQ, h, h // (HQ // HKV)


def checked_scale(head_dim: int, precision: str, sm_scale) -> float:
    """sm_scale (default head_dim ** -0.5) after checking head_dim, precision and sm_scale."""
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head_dim = qkv.shape[-1] / (num_heads + 2 * num_kv_heads) = {head_dim} "
                         f"is not supported; supported head_dim: {HEAD_DIMS}")
    check_precision("attention", precision)
    sm_scale = head_dim ** -0.5 if sm_scale is None else float(sm_scale)
    if not sm_scale > 0:
        # The kernels take max(s) * scale as max(s * scale), which needs scale > 0.
        raise ValueError(f"sm_scale must be positive, got {sm_scale}")
    return sm_scale


def checked_key_mask(name: str, mask, shape: tuple[int, int]):
    """The [B, S] key mask (nonzero = attend, 0 = padding) as int32, or None, after checking it."""
    if mask is None:
        return None
    if tuple(mask.shape) != shape:
        raise ValueError(f"{name} must have shape [B, S] = {shape}, got {tuple(mask.shape)}")
    dtype = jnp.dtype(mask.dtype)
    if not (jnp.issubdtype(dtype, jnp.integer) or dtype == jnp.bool_):
        raise ValueError(f"{name} must be int or bool (1 = token, 0 = padding), got {dtype.name}")
    return mask.astype(jnp.int32)


def check_split_options(num_splits, block_n) -> None:
    """The override arguments of the split (flash-decoding) kernels: num_splits a positive int,
    block_n a power of two >= 16 (tl.dot's smallest), each or None (the default)."""
    if num_splits is not None and not (isinstance(num_splits, int) and num_splits >= 1):
        raise ValueError(f"num_splits must be a positive int, got {num_splits!r}")
    if block_n is not None and not (isinstance(block_n, int) and block_n >= 16
                                    and block_n & (block_n - 1) == 0):
        raise ValueError(f"block_n must be a power of two >= 16, got {block_n!r}")
