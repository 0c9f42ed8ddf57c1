"""GEMM with a fused epilogue, forward and backward: y = dropout(act(x @ W + bias)) + residual.

    x [M, K] (any leading dims, flattened), W [K, N] (or [N, K] read transposed: the tied LM head
    multiplies by wte [V, D] without a transposed copy), bias [N], residual [M, N].
    act is identity, GPT-2's tanh-GELU or Llama's SwiGLU:
        gelu_tanh(y) = 0.5 y (1 + tanh(u)) = y * s,   s = sigmoid(2u),   u = sqrt(2/pi) (y + 0.044715 y^3)
        gelu_tanh'(y) = s + 2 y s (1 - s) u',          u' = sqrt(2/pi) (1 + 3 * 0.044715 y^2)
    SwiGLU packs two projections in W = [W_gate | W_up] [K, 2F] (bias likewise [2F]; transposed,
    [2F, K]: Hugging Face's gate_proj rows, then up_proj's): y = x @ W + bias is [g | u], and
        swiglu(y) = silu(g) * u  [M, F],               silu(g) = g s,   s = sigmoid(g)
        d/dg = u silu'(g),  silu'(g) = s (1 + g (1 - s)),      d/du = silu(g)
    (the output, dropout and residual are then [M, F]: N below is F).
    dropout keeps an element with probability 1 - p, drawn by Philox from (seed, m, n) (see
    jtgpt.kernels.dropout), and scales it by 1 / (1 - p).

One kernel, `_matmul_kernel`, computes op(A) @ op(B) for every product here: each operand is read
in place through its strides, as stored or transposed (no XLA transpose copies). The products
accumulate in fp32 and every epilogue step runs in fp32 on the accumulator, so the activation,
bias and residual cost no extra pass over memory; the result is cast once to the output dtype.
16-bit GEMMs run on persistent programs: at most NUM_SMS programs take the output tiles in turn
instead of one program a tile (see _matmul_kernel; a block config's `persistent`); never with
split-K.
With SwiGLU each program owns a tile of the [M, F] output: per K step it loads its A tile once and
the gate and up tiles of B (columns n.. and F + n..) into two fp32 accumulators, so x is read
once and the [M, 2F] pre-activation never goes to memory in inference.
A norm before the product, `linear(x, norm=...)` (a pre-norm block's first GEMM), is applied by
the GEMM: with each row's mean and rstd from a statistics pass over x (8 bytes a row written,
where the norm kernel writes the whole normed row) and W' = norm_weight * W (scaled along K),
    LayerNorm: norm(x) @ W + bias = rstd * (x @ W' - mean * colsum(W')) + (bias + norm_bias @ W)
    RMSNorm:   norm(x) @ W + bias = rstd * (x @ W') + bias
so the K loop reads x itself and the epilogue does the rest, per row and column; norm(x) is
neither written nor read. It differs from the norm kernel then the GEMM only in rounding: W' is
rounded to the operand dtype where norm(x) was (fp32 accumulation keeps the mean's cancellation
exact to fp32's precision). Folding the weight is a pass over W at every call, so only GEMMs
with more rows than W has columns take this path; a decode step's few rows normalise x inside
the GEMV, and the GEMMs between (a batch of decode rows, a short prompt) run the norm kernel.
fp32 inputs use true IEEE fp32 products by default (`precision="ieee"`, FMA units);
`precision="tf32x3"` runs three tensor-core tf32 products per dot (operands split into a tf32 high
part and a tf32 remainder, the lo*lo term dropped: about fp32's accuracy) and `precision="tf32"`
one (10-bit mantissa). The one exception to reading operands in place: Hopper's tf32 instruction
takes both operands K-major, so a tf32 product first transposes (in XLA) an operand stored the
other way (see _gemm).

Backward. With dz = dy * keep / (1 - p) * gelu_tanh'(pre), pre = x @ W + bias (each factor only
when that epilogue is on), or for SwiGLU, with dy' = dy * keep / (1 - p) [M, F],
dz = [dy' u silu'(g) | dy' silu(g)] [M, 2F] (so N = 2F in the GEMMs and dbias):

    d_residual = dy,   dbias = sum over rows of dz (fp32),   dx = dz @ W^T,   dW = x^T @ dz

dz comes from one elementwise kernel, `_linear_dz_kernel`, which writes dz once (in x's dtype) and
the fp32 column sums of its tile for dbias; it is skipped when dz = dy. Computing dz in a prologue
of each GEMM's operand loads instead would save that one pass, but would put the GELU and dropout
into both GEMMs' inner loops (one reads dz row-major, the other transposed): the simple kernel
keeps the GEMM one kernel. dx and dW are two more `matmul` calls whose transpose flags read W, x
and dz in place; with transpose_w the gradient of w comes back in w's layout [N, K] (dz^T @ x).
dW reduces over all M tokens into a small output, too few tiles to fill the GPU: the reduction is
split over a second grid axis into fp32 partials [S, K, N] that an XLA sum adds (deterministic).

What the custom_vjp saves: `matmul` saves a and b. `linear` saves x and W, with an activation also
pre (written by the forward kernel as a second output, only when differentiating; for SwiGLU
pre [M, 2F] = [g | u]), and with dropout the seed: the mask is regenerated from it, never stored.
Neither bias nor the residual is saved.

Degenerate sizes: K = 0 is the empty sum, 0 (linear gives act(bias) + residual): the kernel runs
with a K loop of no steps. M = 0 or N = 0 launches nothing (a grid of no programs is no valid GPU
launch) and returns the empty result, forward and backward.
"""
import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import triton
import triton.language as tl

from jtgpt.call import on_gpu, triton_call
from jtgpt.kernels import check_float_dtype, check_precision, dropout, dropout_seed
from jtgpt.kernels.layernorm import layer_norm, rms_norm, row_statistics

SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)  # kernels read globals only as constexprs
GELU_CUBIC = tl.constexpr(0.044715)
LOG2E = tl.constexpr(1.4426950408889634)
NORM_NONE, NORM_LAYER, NORM_RMS = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)  # prologues


@triton.jit
def _sigmoid(x, SCALE: tl.constexpr):
    """sigmoid(SCALE * x) by exp2, SCALE folded into the exponent's constant."""
    return 1.0 / (1.0 + tl.exp2(-SCALE * LOG2E * x))


@triton.jit
def _gelu_gate(y):
    """sigmoid(2u) of gelu_tanh(y) = y * sigmoid(2u), with u' (the module docstring's math)."""
    u = SQRT_2_OVER_PI * (y + GELU_CUBIC * y * y * y)
    du = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_CUBIC * y * y)
    return _sigmoid(u, 2.0), du


@triton.jit
def _activation(y, y_up, GELU: tl.constexpr, SWIGLU: tl.constexpr):
    """gelu_tanh(y), swiglu: silu(y) * y_up (y the gate half), or y (module docstring)."""
    if GELU:
        gate, _ = _gelu_gate(y)
        y = y * gate
    if SWIGLU:
        y = y * _sigmoid(y, 1.0) * y_up
    return y


@triton.jit
def _load_k_tile(ptrs, k_index, k_left, MASKED: tl.constexpr):
    """The operand tile at ptrs; MASKED: only its elements with k_index < k_left exist (the tail
    of K), the others read as 0."""
    if MASKED:
        tile = tl.load(ptrs, mask=k_index < k_left, other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def _accumulate(acc, acc_up, a_ptrs, b_ptrs, offs_k, k_left, MASKED: tl.constexpr,
                SWIGLU: tl.constexpr, B_UP: tl.constexpr, PRECISION: tl.constexpr):
    """One K step: acc + a[:, k:k+BLOCK_K] @ b[k:k+BLOCK_K, :] for the tiles at a_ptrs, b_ptrs,
    and with SWIGLU acc_up + the same A tile @ the up columns' B tile, B_UP elements past b_ptrs
    (otherwise acc_up comes back as it came). MASKED: only the first k_left of the BLOCK_K exist."""
    a = _load_k_tile(a_ptrs, offs_k[None, :], k_left, MASKED)
    b = _load_k_tile(b_ptrs, offs_k[:, None], k_left, MASKED)
    acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if SWIGLU:
        b_up = _load_k_tile(b_ptrs + B_UP, offs_k[:, None], k_left, MASKED)
        acc_up = tl.dot(a, b_up, acc_up, input_precision=PRECISION)
    return acc, acc_up


@triton.jit
def _epilogue_operands(bias_ptr, residual_ptr, offs_m, offs_n, cols, M: tl.constexpr,
                       N: tl.constexpr, HAS_BIAS: tl.constexpr, SWIGLU: tl.constexpr,
                       HAS_RESIDUAL: tl.constexpr):
    """(bias, SwiGLU's up bias, residual tile) in fp32 for _gemv_kernel's epilogue; 0.0 for
    those absent."""
    bias, bias_up, residual = 0.0, 0.0, 0.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols).to(tl.float32)
        if SWIGLU:
            bias_up = tl.load(bias_ptr + N + cols).to(tl.float32)
    if HAS_RESIDUAL:
        offsets = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
        in_bounds = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        residual = tl.load(residual_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
    return bias, bias_up, residual


@triton.jit
def _store_output(y, out_ptr, residual_ptr, seed_ptr, offs_m, col0, M: tl.constexpr,
                  N: tl.constexpr, HAS_RESIDUAL: tl.constexpr, DROPOUT_P: tl.constexpr,
                  BLOCK_M: tl.constexpr, WIDTH: tl.constexpr):
    """The epilogue's last steps on y, the [BLOCK_M, WIDTH] piece of the output at rows offs_m
    and columns col0..: dropout, + the residual's piece (loaded here, after the K loop: held
    across it, a large tile's residual would spill), stored in the output's dtype."""
    offs_n = col0 + tl.arange(0, WIDTH)
    offsets = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    in_bounds = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if DROPOUT_P > 0.0:
        y = dropout(y, seed_ptr, offs_m, col0, N, DROPOUT_P, BLOCK_M, WIDTH)
    if HAS_RESIDUAL:
        y += tl.load(residual_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
    tl.store(out_ptr + offsets, y.to(out_ptr.dtype.element_ty), mask=in_bounds)


@triton.jit
def _matmul_kernel(a_ptr, b_ptr, bias_ptr, residual_ptr, seed_ptr, mean_ptr, rstd_ptr,
                   col_sum_ptr, out_ptr, pre_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr,
                   stride_am: tl.constexpr, stride_ak: tl.constexpr,
                   stride_bk: tl.constexpr, stride_bn: tl.constexpr, K_PER_SPLIT: tl.constexpr,
                   HAS_BIAS: tl.constexpr, GELU: tl.constexpr, SWIGLU: tl.constexpr,
                   HAS_RESIDUAL: tl.constexpr, DROPOUT_P: tl.constexpr, SAVE_PRE: tl.constexpr,
                   NORM: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                   PROGRAMS: tl.constexpr):
    """One output tile a program (PROGRAMS = 0), or PROGRAMS persistent programs that take the
    tiles in turn: tile t goes to program t % PROGRAMS, and the loop over a program's tiles and
    their K steps is pipelined as one, so the next tile's first loads are in flight during this
    tile's epilogue (a new program would start with an empty pipeline). No split-K then."""
    if PROGRAMS == 0:
        _matmul_tile(tl.program_id(0), a_ptr, b_ptr, bias_ptr, residual_ptr, seed_ptr, mean_ptr,
                     rstd_ptr, col_sum_ptr, out_ptr, pre_ptr, M, N, K, stride_am, stride_ak,
                     stride_bk, stride_bn, K_PER_SPLIT, HAS_BIAS, GELU, SWIGLU, HAS_RESIDUAL,
                     DROPOUT_P, SAVE_PRE, NORM, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
    else:
        tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
        for tile in tl.range(tl.program_id(0), tiles, PROGRAMS, flatten=True):
            _matmul_tile(tile, a_ptr, b_ptr, bias_ptr, residual_ptr, seed_ptr, mean_ptr, rstd_ptr,
                         col_sum_ptr, out_ptr, pre_ptr, M, N, K, stride_am, stride_ak, stride_bk,
                         stride_bn, K_PER_SPLIT, HAS_BIAS, GELU, SWIGLU, HAS_RESIDUAL, DROPOUT_P,
                         SAVE_PRE, NORM, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)


@triton.jit
def _matmul_tile(pid, a_ptr, b_ptr, bias_ptr, residual_ptr, seed_ptr, mean_ptr, rstd_ptr,
                 col_sum_ptr, out_ptr, pre_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr,
                 stride_am: tl.constexpr, stride_ak: tl.constexpr,
                 stride_bk: tl.constexpr, stride_bn: tl.constexpr, K_PER_SPLIT: tl.constexpr,
                 HAS_BIAS: tl.constexpr, GELU: tl.constexpr, SWIGLU: tl.constexpr,
                 HAS_RESIDUAL: tl.constexpr, DROPOUT_P: tl.constexpr, SAVE_PRE: tl.constexpr,
                 NORM: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """Output tile `pid` (in the grouped order below) of _matmul_kernel, and split-K slice
    program_id(1) of it."""
    # The output is [M, N]; with SWIGLU, B and bias have 2N columns [gate | up], and the program
    # of output columns n.. accumulates gate columns n.. and up columns N + n.. from one A tile.
    # Grouped tile order: GROUP_M row-tiles share each column-tile of B while it sits in L2.
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * tiles_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * tiles_n)) % group_size
    pid_n = (pid % (GROUP_M * tiles_n)) // group_size

    if K_PER_SPLIT < K:  # split-K: program (pid, s) reduces K's slice s into partial s of out
        split = tl.program_id(1)
        k_start = split * K_PER_SPLIT
        k_len = tl.minimum(K - k_start, K_PER_SPLIT)
        out_ptr += split.to(tl.int64) * (M * N)
    else:
        k_start = 0
        k_len = K

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Out-of-range rows and columns wrap onto valid ones so the loads in the K loop need no mask;
    # the store below drops them. Offsets go 64-bit: the LM head's M * N passes 2**31.
    rows = (offs_m % M).to(tl.int64)
    cols = (offs_n % N).to(tl.int64)
    ks = (k_start + offs_k).to(tl.int64)
    a_ptrs = a_ptr + rows[:, None] * stride_am + ks[None, :] * stride_ak
    b_ptrs = b_ptr + ks[:, None] * stride_bk + cols[None, :] * stride_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # SwiGLU's up half; else unused
    # Full BLOCK_K tiles without masks, then the tail of K (if any) once, masked: masks in the
    # pipelined loop cost registers (the LM head's dh GEMM, K = 50257, spilled 120 bytes).
    for k in range(0, k_len // BLOCK_K):
        acc, acc_up = _accumulate(acc, acc_up, a_ptrs, b_ptrs, offs_k, BLOCK_K, False, SWIGLU,
                                  N * stride_bn, PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if K % BLOCK_K != 0:  # K_PER_SPLIT is a multiple of BLOCK_K: only K's own tail is partial
        acc, acc_up = _accumulate(acc, acc_up, a_ptrs, b_ptrs, offs_k, k_len % BLOCK_K, True,
                                  SWIGLU, N * stride_bn, PRECISION)

    y = acc
    if NORM != NORM_NONE:  # the product was x @ (weight * W): norm(x) @ W from it (see _gemm)
        rstd = tl.load(rstd_ptr + rows)[:, None]
        if NORM == NORM_LAYER:
            mean = tl.load(mean_ptr + rows)[:, None]
            y = (y - mean * tl.load(col_sum_ptr + cols)[None, :]) * rstd
            if SWIGLU:
                acc_up = (acc_up - mean * tl.load(col_sum_ptr + N + cols)[None, :]) * rstd
        else:
            y *= rstd
            if SWIGLU:
                acc_up *= rstd
    if HAS_BIAS:
        y += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
        if SWIGLU:
            acc_up += tl.load(bias_ptr + N + cols).to(tl.float32)[None, :]
    out_offsets = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    in_bounds = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if SAVE_PRE:  # for the backward's act'(pre)
        if SWIGLU:  # pre [M, 2N] = [gate | up]
            pre_offsets = offs_m.to(tl.int64)[:, None] * (2 * N) + offs_n[None, :]
            tl.store(pre_ptr + pre_offsets, y.to(pre_ptr.dtype.element_ty), mask=in_bounds)
            tl.store(pre_ptr + N + pre_offsets, acc_up.to(pre_ptr.dtype.element_ty), mask=in_bounds)
        else:
            tl.store(pre_ptr + out_offsets, y.to(pre_ptr.dtype.element_ty), mask=in_bounds)
    y = _activation(y, acc_up, GELU, SWIGLU)
    col0 = pid_n * BLOCK_N
    if (DROPOUT_P > 0.0 or HAS_RESIDUAL) and BLOCK_N >= 256:
        # A wide tile finishes in two column halves: its dropout draws or residual tile, made
        # for all 256 columns at once beside the 128-value accumulator, spill 32-232 bytes.
        HALF: tl.constexpr = BLOCK_N // 2
        y0, y1 = tl.split(tl.permute(tl.reshape(y, (BLOCK_M, 2, HALF)), (0, 2, 1)))
        _store_output(y0, out_ptr, residual_ptr, seed_ptr, offs_m, col0, M, N, HAS_RESIDUAL,
                      DROPOUT_P, BLOCK_M, HALF)
        _store_output(y1, out_ptr, residual_ptr, seed_ptr, offs_m, col0 + HALF, M, N,
                      HAS_RESIDUAL, DROPOUT_P, BLOCK_M, HALF)
    else:
        _store_output(y, out_ptr, residual_ptr, seed_ptr, offs_m, col0, M, N, HAS_RESIDUAL,
                      DROPOUT_P, BLOCK_M, BLOCK_N)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, bias_ptr, residual_ptr, norm_w_ptr, norm_b_ptr, out_ptr,
                 M: tl.constexpr, N: tl.constexpr, K: tl.constexpr,
                 stride_wk: tl.constexpr, stride_wn: tl.constexpr,
                 HAS_BIAS: tl.constexpr, GELU: tl.constexpr, SWIGLU: tl.constexpr,
                 HAS_RESIDUAL: tl.constexpr, NORM: tl.constexpr, NORM_EPS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 BLOCK_ROW: tl.constexpr):
    """_matmul_kernel's product and epilogue for a few rows (M <= BLOCK_M), without tensor cores:
    each program owns BLOCK_N output columns of all M rows and streams their W columns once,
    accumulating x[m, k] * w[k, n] elementwise in a [BLOCK_M, BLOCK_N, BLOCK_K] fp32 tile that is
    reduced over k once at the end. NORM (NORM_LAYER or NORM_RMS) first normalises each x row as
    layernorm.py's forward does (its statistics from the whole row, BLOCK_ROW >= K wide, then the
    same arithmetic and rounding per K step), so the normed x never goes to memory."""
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    row_ok = offs_m < M
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = (offs_n % N).to(tl.int64)  # out-of-range columns wrap onto valid ones; never stored
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * K
    if NORM != NORM_NONE:
        ks = tl.arange(0, BLOCK_ROW)
        row = tl.load(x_rows + ks[None, :], mask=row_ok[:, None] & (ks < K)[None, :],
                      other=0.0).to(tl.float32)
        if NORM == NORM_LAYER:  # padding columns must not add (0 - mean)^2 to the variance
            mean = tl.sum(row, axis=1) / K
            row = tl.where((ks < K)[None, :], row - mean[:, None], 0.0)
        rstd = tl.rsqrt(tl.sum(row * row, axis=1) / K + NORM_EPS)  # RMSNorm: mean(x^2)
    # Loaded first: their latency overlaps the K loop's (a few rows: no registers to spare).
    bias, bias_up, residual = _epilogue_operands(bias_ptr, residual_ptr, offs_m, offs_n, cols, M,
                                                 N, HAS_BIAS, SWIGLU, HAS_RESIDUAL)
    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)  # SwiGLU's up half
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(x_rows + offs_k[None, :], mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0).to(tl.float32)
        if NORM != NORM_NONE:
            if NORM == NORM_LAYER:
                x -= mean[:, None]
            x *= rstd[:, None]
            if NORM == NORM_RMS:  # Hugging Face's order: x / rms rounded before the weight
                x = x.to(x_ptr.dtype.element_ty).to(tl.float32)
            x *= tl.load(norm_w_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
            if NORM == NORM_LAYER:
                x += tl.load(norm_b_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
            x = x.to(x_ptr.dtype.element_ty).to(tl.float32)  # the norm's output, as stored
        w_ptrs = w_ptr + cols[:, None] * stride_wn + offs_k[None, :] * stride_wk
        w = tl.load(w_ptrs, mask=k_ok[None, :], other=0.0).to(tl.float32)
        acc += x[:, None, :] * w[None, :, :]
        if SWIGLU:
            w_up = tl.load(w_ptrs + N * stride_wn, mask=k_ok[None, :], other=0.0).to(tl.float32)
            acc_up += x[:, None, :] * w_up[None, :, :]
    y = tl.sum(acc, axis=2)
    y_up = tl.sum(acc_up, axis=2)
    if HAS_BIAS:
        y += bias[None, :]
        if SWIGLU:
            y_up += bias_up[None, :]
    y = _activation(y, y_up, GELU, SWIGLU)
    if HAS_RESIDUAL:
        y += residual
    out_offsets = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    tl.store(out_ptr + out_offsets, y.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (offs_n < N)[None, :])


@triton.jit
def _linear_dz_kernel(dy_ptr, pre_ptr, seed_ptr, dz_ptr, dbias_ptr,
                      M: tl.constexpr, N: tl.constexpr, GELU: tl.constexpr, SWIGLU: tl.constexpr,
                      DROPOUT_P: tl.constexpr, HAS_BIAS: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dz = dy * keep / (1 - p) * act'(pre) on one tile of dy [M, N]; dbias gets the tile's column
    sums as row pid_m of fp32 partials [tiles_m, N]. With SWIGLU, pre, dz and the partials have 2N
    columns [gate | up]: the tile writes its columns of both halves."""
    pid_m = tl.program_id(0)
    col0 = tl.program_id(1) * BLOCK_N
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = col0 + tl.arange(0, BLOCK_N)
    offsets = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    in_bounds = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    WIDTH: tl.constexpr = 2 * N if SWIGLU else N  # of pre, dz and the dbias partials

    dz = tl.load(dy_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
    if DROPOUT_P > 0.0:
        dz = dropout(dz, seed_ptr, offs_m, col0, N, DROPOUT_P, BLOCK_M, BLOCK_N)
    if GELU:
        pre = tl.load(pre_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
        gate, du = _gelu_gate(pre)
        dz *= gate + 2.0 * pre * gate * (1.0 - gate) * du
    if SWIGLU:  # offsets from here on are the gate half's; the up half is N columns further
        offsets = offs_m.to(tl.int64)[:, None] * WIDTH + offs_n[None, :]
        g = tl.load(pre_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
        u = tl.load(pre_ptr + N + offsets, mask=in_bounds, other=0.0).to(tl.float32)
        s = _sigmoid(g, 1.0)
        _store_dz(dz_ptr + N, dbias_ptr + N, offsets, in_bounds, dz * g * s, pid_m, offs_n, N,
                  WIDTH, HAS_BIAS)  # d/du = silu(g)
        dz *= u * s * (1.0 + g * (1.0 - s))  # d/dg = u silu'(g)
    _store_dz(dz_ptr, dbias_ptr, offsets, in_bounds, dz, pid_m, offs_n, N, WIDTH, HAS_BIAS)


@triton.jit
def _store_dz(dz_ptr, dbias_ptr, offsets, in_bounds, dz, pid_m, offs_n, N: tl.constexpr,
              WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr):
    """A tile of dz, and with HAS_BIAS its column sums into row pid_m of the partials (WIDTH
    columns; out-of-range elements, loaded as 0, add nothing)."""
    tl.store(dz_ptr + offsets, dz.to(dz_ptr.dtype.element_ty), mask=in_bounds)
    if HAS_BIAS:
        tl.store(dbias_ptr + pid_m * WIDTH + offs_n, tl.sum(dz, axis=0), mask=offs_n < N)


def _block_config(M: int, N: int, K: int, dtype, dropout: bool = False, swiglu: bool = False,
                  fp32_ieee: bool = False) -> dict:
    """Tile sizes and launch shape per dtype, shrunk to the problem for small matrices. N is the
    output's width: with SwiGLU, F, each program accumulating two [BLOCK_M, BLOCK_N] tiles."""
    if not on_gpu():  # the interpreter: fewest program instances, smallest tiles that fit
        return dict(BLOCK_M=_fit(M, 64), BLOCK_N=_fit(N, 64), BLOCK_K=_fit(K, 32), GROUP_M=8,
                    num_warps=4, num_stages=1)
    if M <= SKINNY_M:
        # Decode: a row per sequence, so the GEMM is W streamed once (memory-bound) by one wave
        # of programs, one an SM (a program's pipeline takes most of an SM's shared memory): the
        # narrowest tiles that need at most NUM_SMS programs, as many as N allows. A second,
        # partial wave costs nearly as much as the first: at 64 rows on the H200 GPT-2's c_attn
        # ran 6.6 us on 144 programs of 16 columns, 3.9 us on 72 of 32. Long K steps keep each
        # program's loads in flight, but at least SKINNY_STAGES of them (K = 768: 128, not 256).
        block_m = _fit(M, SKINNY_M)
        block_n = next((b for b in (16, 32) if triton.cdiv(N, b) <= NUM_SMS), 64)
        long_k = SKINNY_BLOCK_K if K >= SKINNY_STAGES * SKINNY_BLOCK_K else SKINNY_BLOCK_K // 2
        block_k = _fit(K, 64 if dtype == jnp.float32 else long_k)
        stage_bytes = (block_m + block_n * (2 if swiglu else 1)) * block_k * jnp.dtype(dtype).itemsize
        return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=1, num_warps=4,
                    num_stages=max(2, min(SKINNY_STAGES, SHARED_MEMORY // stage_bytes)))
    if dtype == jnp.float32:
        cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3)
    else:
        # bf16 128x256x64, 8 warps, 3 stages: 619 TFLOP/s on an H100 at 8192^3, measured.
        # Finished in column halves (_matmul_kernel), its dropout + residual epilogue fits in
        # 230 registers and the LM head dW's fp32 residual in 242 (compile_only, sm_90); drawn
        # and loaded for the whole tile they spilled 232 and 208 bytes. SwiGLU's two
        # accumulators beside dropout's draws take 128x(2x64) (see below).
        # Persistent programs (_matmul_kernel; where _gemm allows): GPT-2's bf16 forward at
        # 512 x 300 60.81 -> 58.82 ms and its train step 38.28 -> 37.56 ms on an H200.
        narrow = dropout and swiglu
        cfg = dict(BLOCK_M=128, BLOCK_N=128 if narrow else 256, BLOCK_K=64, GROUP_M=8,
                   num_warps=8, num_stages=3, persistent=True)
    if swiglu:
        # The gate and up accumulators together hold the registers of one [BLOCK_M, 2 BLOCK_N]
        # tile. compile_only for sm_90 at Llama-3.2-1B's and 3.1-8B's gate/up GEMMs (8192 tokens,
        # w [16384, 2048] and [28672, 4096]): bf16 128x(2x128)x64 171 registers (194 saving pre),
        # with dropout 128x(2x64) 127-128; tf32 128x(2x64)x32 105-122; none spills. fp32 "ieee"
        # (FMA dots) spills 152-176 bytes at 128x(2x64) and fits at 64x(2x64) in 128 registers.
        cfg["BLOCK_N"] //= 2
        if fp32_ieee:
            cfg["BLOCK_M"] = 64
    cfg["BLOCK_M"] = _fit(M, cfg["BLOCK_M"])
    cfg["BLOCK_N"] = _fit(N, cfg["BLOCK_N"])
    cfg["BLOCK_K"] = _fit(K, cfg["BLOCK_K"])
    return cfg


SKINNY_M = 64  # at most this many rows (decode's batch): _block_config's memory-bound tiles
SKINNY_BLOCK_K, SKINNY_STAGES = 256, 4
SHARED_MEMORY = 160 * 1024  # for the pipeline's stages (H100/H200: 227 KB a block at most)


def _fit(size: int, block: int) -> int:
    """The block, or the next power of two >= size if smaller (tl.dot needs at least 16)."""
    return max(16, min(block, triton.next_power_of_2(size)))


# Split-K cost model (H100 SXM, bf16; only the ratio of the two rates matters, and fp32, slower
# to compute, would split more: erring toward fewer splits).
NUM_SMS = 132
SM_FLOPS = 600e12 / NUM_SMS   # dense GEMM throughput of one SM
HBM_BYTES = 3e12              # bytes/s for the fp32 partials' round trip
MIN_K_TILES_PER_SPLIT = 4     # each slice keeps a few K steps for the software pipeline
MAX_SPLIT_K = 32


def _split_k(M: int, N: int, K: int, cfg: dict) -> int:
    """How many slices S the K reduction is split into (1: no split).

    A weight gradient has a small output and a long reduction (dW = x^T @ dz: 768 x 3072 outputs,
    16384 tokens), so its tiles fill only part of the SMs. S slices give S times the programs,
    each 1/S of the work, but S fp32 partials [M, N] make a round trip through memory. The S
    with the least estimated time wins: waves of programs times the work of one, plus the bytes.
    """
    if not on_gpu():  # the interpreter runs programs one at a time: splitting only adds work
        return 1
    tiles = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"])
    tile_seconds = 2 * cfg["BLOCK_M"] * cfg["BLOCK_N"] * K / SM_FLOPS

    def seconds(s):
        partials = 8 * s * M * N / HBM_BYTES if s > 1 else 0.0  # written fp32, read by the sum
        return triton.cdiv(tiles * s, NUM_SMS) * tile_seconds / s + partials

    most = max(1, min(MAX_SPLIT_K, triton.cdiv(K, cfg["BLOCK_K"]) // MIN_K_TILES_PER_SPLIT))
    return min(range(1, most + 1), key=seconds)  # the smallest S on ties


GEMV_M = 4  # at most this many rows (decode at batch 1-4): _gemv_kernel, see _gemv
NORM_ROW_VALUES = 16384  # rows x K_pow2 a fused norm's statistics hold in registers at most


def _gemv_fits(M, K, dtype, transpose_a, precision, dropout_p, save_pre, norm) -> bool:
    """Whether _gemv computes this product: a few rows, no dropout, nothing saved for the
    backward, fp32 only as IEEE products (tf32 needs the tensor cores; tf32x3 gets IEEE's, at
    least as accurate), a norm's row in registers."""
    if transpose_a or M > GEMV_M or dropout_p > 0.0 or save_pre:
        return False
    if dtype == jnp.float32 and precision == "tf32":
        return False
    return norm is None or triton.next_power_of_2(M) * triton.next_power_of_2(K) <= NORM_ROW_VALUES


def _gemv(a, b, transpose_b, out_dtype, *, bias, residual, activation, norm):
    """op(a) @ op(b) with the epilogue (and norm, a Norm or None) in one `_gemv_kernel` launch.

    At a few rows the product is W streamed once, and what costs is keeping every SM's loads in
    flight: many programs of few columns each, long K steps. Measured on an H200 (bf16, one row,
    GPU time of Llama-3.2-1B's and GPT-2's decode GEMMs): tensor-core tiles reached 1.0-3.1 TB/s
    on Llama's, these 2.1-4.0 TB/s on the K-contiguous [N, K] weights with 2 columns a program,
    and 0.5-1.1 TB/s (from 0.4-0.8) on GPT-2's small [K, N] ones, where a column is strided and
    8-16 columns a program make each row's load one contiguous 16-32 byte piece."""
    M, K = a.shape
    b_n = b.shape[0] if transpose_b else b.shape[1]
    N = b_n // 2 if activation == "swiglu" else b_n
    block_m = triton.next_power_of_2(M)
    if not on_gpu():  # the interpreter: fewest program instances
        block_n, block_k, num_warps = min(64, triton.next_power_of_2(N)), 32, 4
    elif transpose_b:  # [N, K]: each column's K values contiguous
        block_n, block_k, num_warps = 2, 1024 // block_m, 4
    else:  # [K, N]
        block_n = 16 if triton.cdiv(N, 16) >= NUM_SMS else 8
        block_k, num_warps = 8192 // (block_n * block_m), 8
    block_k = max(16, min(block_k, triton.next_power_of_2(K)))
    kind = _norm_kind(norm)
    placeholder = jnp.zeros((1,), a.dtype)  # stands in for an absent operand; never read
    optional = lambda v: placeholder if v is None else v
    return triton_call(
        a, b, optional(bias), optional(residual),
        optional(None if norm is None else norm.weight), optional(None if norm is None else norm.bias),
        kernel=_gemv_kernel, out_shape=jax.ShapeDtypeStruct((M, N), out_dtype),
        grid=(triton.cdiv(N, block_n),), num_warps=num_warps, num_stages=1,
        M=M, N=N, K=K, stride_wk=1 if transpose_b else b_n, stride_wn=K if transpose_b else 1,
        HAS_BIAS=bias is not None, GELU=activation == "gelu_tanh", SWIGLU=activation == "swiglu",
        HAS_RESIDUAL=residual is not None, NORM=kind, NORM_EPS=0.0 if norm is None else norm.eps,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        BLOCK_ROW=1 if norm is None else triton.next_power_of_2(K))


def _norm_kind(norm) -> int:
    """The kernels' NORM constexpr for a Norm or None."""
    kind = NORM_NONE if norm is None else (NORM_LAYER if norm.kind == "layer" else NORM_RMS)
    return kind.value


def _fold_norm(b, transpose_b, norm, bias):
    """(op(b) scaled by norm.weight along K, in b's dtype; its fp32 column sums; bias + norm.bias
    @ op(b) in fp32, or bias for RMSNorm): the operands with which the GEMM of the raw rows
    applies the norm in its epilogue (module docstring)."""
    along_k = (1, -1) if transpose_b else (-1, 1)
    k_axis = 1 if transpose_b else 0
    w = b.astype(jnp.float32)
    folded = (w * norm.weight.astype(jnp.float32).reshape(along_k)).astype(b.dtype)
    col_sum = folded.astype(jnp.float32).sum(axis=k_axis)
    if norm.kind == "layer":
        shift = (w * norm.bias.astype(jnp.float32).reshape(along_k)).sum(axis=k_axis)
        bias = shift if bias is None else bias.astype(jnp.float32) + shift
    return folded, col_sum, bias


def _gemm(a, b, transpose_a, transpose_b, out_dtype, precision, *, bias=None, residual=None,
          activation=None, dropout_p=0.0, seed=None, save_pre=False, norm=None,
          residual_in_place=False):
    """op(a) @ op(b) with the epilogue in one `_matmul_kernel` launch (plus an XLA sum of the
    partials when split over K, only without an epilogue), or for a few rows one `_gemv` launch;
    returns out, or (out, pre). activation None, "gelu_tanh" or "swiglu" (op(b) [K, 2F] gives
    out [M, F], pre [M, 2F]). norm (a Norm applied to a's rows, a not transposed): inside the
    GEMV where _gemv_fits; with more rows than W has columns, from the rows' statistics in the
    epilogue (module docstring); else by the norm kernel first.
    residual_in_place: out is written into residual's buffer (the caller, add_matmul, checks
    that residual is out_dtype and [M, N]), an accumulation `residual += op(a) @ op(b)` with no
    buffer of its own where residual is dead after the call (XLA copies it first otherwise)."""
    M, K = a.shape[::-1] if transpose_a else a.shape
    b_n = b.shape[0] if transpose_b else b.shape[1]
    swiglu = activation == "swiglu"
    N = b_n // 2 if swiglu else b_n
    if M == 0 or N == 0:  # nothing to compute, and a grid of no programs is no GPU launch
        out = jnp.zeros((M, N), out_dtype)
        return (out, jnp.zeros((M, b_n), a.dtype)) if save_pre else out
    if _gemv_fits(M, K, a.dtype, transpose_a, precision, dropout_p, save_pre, norm):
        return _gemv(a, b, transpose_b, out_dtype, bias=bias, residual=residual,
                     activation=activation, norm=norm)
    mean = rstd = col_sum = None
    if norm is not None:
        assert not transpose_a, "a norm applies to the rows of a stored [M, K]"
        if M <= b_n:
            # No more rows than W has columns (a decode step's batch, a short prompt): folding
            # the norm into W, a pass over W at every call, costs more than the norm kernel
            # writing norm(x) for the GEMM to read.
            a, norm = _normalized(a, norm), None
        else:
            mean, rstd = row_statistics(a, eps=norm.eps, rms=norm.kind == "rms")
            b, col_sum, bias = _fold_norm(b, transpose_b, norm, bias)
    fp32_ieee = a.dtype == jnp.float32 and precision == "ieee"
    if a.dtype == jnp.float32 and precision != "ieee":
        # Hopper's tf32 tensor-core instruction (wgmma; tf32x3 runs three) reads both operands
        # K-major from shared memory. An N-major B ([K, N], GPT-2's Conv1D weights) or M-major A
        # then reaches shared memory 4 bytes a copy, transposed on the way (the PTX has 48 4-byte
        # cp.async a thread a stage where a K-major operand takes 16-byte ones); one XLA
        # transpose first is cheaper.
        if not transpose_b:
            b, transpose_b = b.T, True
        if transpose_a:
            a, transpose_a = a.T, False
    cfg = _block_config(M, N, K, a.dtype, dropout=dropout_p > 0.0, swiglu=swiglu,
                        fp32_ieee=fp32_ieee)
    plain = (bias is None and residual is None and activation is None and dropout_p == 0.0
             and norm is None)
    k_tiles = triton.cdiv(K, cfg["BLOCK_K"])
    k_per_split = triton.cdiv(k_tiles, _split_k(M, N, K, cfg) if plain else 1) * cfg["BLOCK_K"]
    # K = 0: one program per tile whose K loop runs no step, the empty sum 0 into the epilogue.
    splits = triton.cdiv(K, k_per_split) if K else 1
    out_shape = (jax.ShapeDtypeStruct((splits, M, N), jnp.float32) if splits > 1
                 else jax.ShapeDtypeStruct((M, N), out_dtype))
    tiles = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"])
    # Persistent programs only where sm_90 builds them without spilling or exceeding shared
    # memory: never with split-K, nor with SwiGLU's two accumulators (8 bytes spilled), a partial
    # last K step (144), a transposed A (the LM head's dW, 384), or an epilogue that both saves
    # pre and draws dropout (270 KB of shared memory asked; no model layer has it).
    persistent = (cfg.pop("persistent", False) and splits == 1 and not swiglu and not transpose_a
                  and K % cfg["BLOCK_K"] == 0 and not (save_pre and dropout_p))
    programs = min(tiles, NUM_SMS) if persistent else 0
    placeholder = jnp.zeros((1,), a.dtype)  # stands in for an absent operand; never read
    out, pre = triton_call(
        a, b,
        placeholder if bias is None else bias,
        placeholder if residual is None else residual,
        jnp.zeros((), jnp.int32) if seed is None else seed,
        *(placeholder if v is None else v for v in (mean, rstd, col_sum)),
        kernel=_matmul_kernel,
        out_shape=(out_shape, jax.ShapeDtypeStruct((M, b_n) if save_pre else (1,), a.dtype)),
        input_output_aliases={3: 0} if residual_in_place else None,
        grid=(programs or tiles, splits), PROGRAMS=programs,
        M=M, N=N, K=K, stride_am=1 if transpose_a else K, stride_ak=M if transpose_a else 1,
        stride_bk=1 if transpose_b else b_n, stride_bn=K if transpose_b else 1,
        K_PER_SPLIT=k_per_split, HAS_BIAS=bias is not None, GELU=activation == "gelu_tanh",
        SWIGLU=swiglu, HAS_RESIDUAL=residual is not None, DROPOUT_P=float(dropout_p),
        # 16-bit operands ignore the precision: one value, one compiled kernel.
        SAVE_PRE=save_pre, NORM=_norm_kind(norm),
        PRECISION=precision if a.dtype == jnp.float32 else "tf32", **cfg)
    if splits > 1:
        out = out.sum(axis=0).astype(out_dtype)
    return (out, pre) if save_pre else out


# ------------------------------------------------------------------------------------- matmul

def matmul(a, b, *, transpose_a=False, transpose_b=False, out_dtype=None, precision="ieee"):
    """a @ b in one Triton GEMM (fp32 accumulation); returns [M, N] in out_dtype. Differentiable.

    a [M, K], or [K, M] read transposed with `transpose_a=True`; b [K, N], or [N, K] with
    `transpose_b=True`; both in place (no transposed copies), of one float dtype. out_dtype is
    a's dtype (default) or float32: then the fp32 accumulation is written out without rounding.
    precision "ieee", "tf32x3" or "tf32" for fp32 inputs (module docstring). The backward is two
    more matmuls; it saves a, b.
    """
    a, b = jnp.asarray(a), jnp.asarray(b)
    a_layout, b_layout = "[K, M]" if transpose_a else "[M, K]", "[N, K]" if transpose_b else "[K, N]"
    if a.ndim != 2:
        raise ValueError(f"matmul: a must be a 2-D {a_layout} matrix, got shape {a.shape}")
    check_float_dtype("matmul: a dtype", a.dtype)
    if b.ndim != 2 or b.dtype != a.dtype:
        raise ValueError(f"matmul: b must be a 2-D {a.dtype} matrix, got {b.dtype}{list(b.shape)}")
    K = a.shape[0] if transpose_a else a.shape[1]
    if (b.shape[1] if transpose_b else b.shape[0]) != K:
        raise ValueError(f"matmul: b must be {b_layout} with K={K} (a is {a_layout}), "
                         f"got {list(b.shape)}")
    out_dtype = a.dtype if out_dtype is None else jnp.dtype(out_dtype)
    if out_dtype not in (a.dtype, jnp.float32):
        raise ValueError(f"matmul: out_dtype must be a's dtype ({a.dtype}) or float32, got {out_dtype}")
    check_precision("matmul", precision)
    return _matmul(a, b, _MatmulConfig(bool(transpose_a), bool(transpose_b), out_dtype, precision))


def add_matmul(acc, a, b, *, transpose_a=False, transpose_b=False, precision="ieee"):
    """acc + op(a) @ op(b) in one Triton GEMM whose epilogue adds acc [M, N] (fp32) and writes
    the sum into acc's buffer: an accumulation over several products (chunks of a batch) with no
    buffer per product and no separate add pass. a, b as in matmul. Not differentiable: it is
    for sums inside other ops' gradient rules."""
    acc, a, b = jnp.asarray(acc), jnp.asarray(a), jnp.asarray(b)
    if acc.dtype != jnp.float32:
        raise ValueError(f"add_matmul: acc must be float32, got {jnp.dtype(acc.dtype).name}")
    if a.ndim != 2 or b.ndim != 2 or b.dtype != a.dtype:
        raise ValueError(f"add_matmul: a and b must be 2-D matrices of one dtype, got "
                         f"{a.dtype}{list(a.shape)} and {b.dtype}{list(b.shape)}")
    check_float_dtype("add_matmul: a dtype", a.dtype)
    check_precision("add_matmul", precision)
    M, K = a.shape[::-1] if transpose_a else a.shape
    K_b, N = b.shape[::-1] if transpose_b else b.shape
    if K_b != K or acc.shape != (M, N):
        raise ValueError(f"add_matmul: op(a) {[M, K]} @ op(b) {[K_b, N]} does not make acc's "
                         f"shape {list(acc.shape)}")
    return _gemm(a, b, transpose_a, transpose_b, jnp.float32, precision, residual=acc,
                 residual_in_place=True)


class _MatmulConfig(NamedTuple):
    transpose_a: bool
    transpose_b: bool
    out_dtype: jnp.dtype
    precision: str


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul(a, b, cfg: _MatmulConfig):
    return _gemm(a, b, cfg.transpose_a, cfg.transpose_b, cfg.out_dtype, cfg.precision)


def _matmul_fwd(a, b, cfg):
    return _matmul(a, b, cfg), (a, b)


def _matmul_bwd(cfg, saved, g):
    a, b = saved
    return _operand_grads(a, b, g, cfg.transpose_a, cfg.transpose_b, cfg.precision)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _operand_grads(a, b, g, transpose_a, transpose_b, precision):
    """(da, db) of C = op(a) @ op(b) from g = dC [M, N], each in its operand's stored layout:
    dop(a) = g @ op(b)^T and dop(b) = op(a)^T @ g, or their transposes for a transposed operand.
    Both are matmuls over a, b and g in place; g is first cast to a's dtype (an fp32 cotangent of
    an fp32 output from bf16 inputs)."""
    g = g.astype(a.dtype)
    mm = functools.partial(matmul, precision=precision)
    da = mm(b, g, transpose_a=transpose_b, transpose_b=True) if transpose_a else \
        mm(g, b, transpose_b=not transpose_b)
    db = mm(g, a, transpose_a=True, transpose_b=transpose_a) if transpose_b else \
        mm(a, g, transpose_a=not transpose_a)
    return da, db


# ------------------------------------------------------------------------------------- linear

@functools.partial(jax.tree_util.register_dataclass, data_fields=["weight", "bias"],
                   meta_fields=["kind", "eps"])
@dataclasses.dataclass(frozen=True)
class Norm:
    """A norm over x's last axis that `linear(x, ..., norm=Norm(...))` applies before its product,
    as jtgpt.kernels.layernorm computes it: kind "layer" (LayerNorm: weight and bias [K]) or "rms"
    (RMSNorm: weight [K], bias None), with eps. A pytree (kind and eps static): it passes through
    jax.jit like the arrays it holds."""
    kind: str
    weight: jax.Array
    bias: jax.Array | None
    eps: float


def linear(x, w, bias=None, *, residual=None, activation=None, dropout_rate=0.0, seed=None,
           transpose_w=False, precision="ieee", norm: Norm | None = None, return_input=False):
    """dropout(act(x @ w + bias)) + residual in one Triton GEMM; returns [..., N] in x.dtype.

    x [..., K]; w [K, N], or [N, K] with `transpose_w=True`; bias [N]; residual [..., N];
    activation None, "gelu_tanh" or "swiglu": then w packs gate and up, [K, 2F] = [W_gate | W_up]
    (transposed: [2F, K], gate_proj's rows then up_proj's), bias [2F], and the result is
    silu(x @ W_gate + b_gate) * (x @ W_up + b_up) [..., F] (residual [..., F]). Dropout with rate
    `dropout_rate` needs `seed`, an int32 array of shape () (a new seed does not recompile);
    precision "ieee", "tf32x3" or "tf32" for fp32 inputs. Differentiable wrt x, w, bias and residual
    (gradients in each one's dtype); the backward saves x, w, with an activation the
    pre-activation and with dropout the seed (module docstring).

    norm (a Norm): the product reads norm(x) instead of x. For a decode step's few rows the
    norm runs inside the GEMV (_gemv_kernel), at no launch of its own; for more rows than w has
    columns, a statistics pass over x (its rows' mean and rstd) precedes the GEMM of x itself,
    whose epilogue makes norm(x) @ W of it (module docstring), and norm(x) never goes to memory;
    in between, the norm kernel runs first. Differentiable too, wrt the norm's weight and bias
    as well; differentiated, the norm kernel runs first and writes norm(x), which the backward
    needs.
    return_input: returns (out, x), x not copied: the residual stream of a pre-norm block, whose
    gradient then joins the norm's own inside the norm's backward kernel (see layer_norm).
    """
    x = jnp.asarray(x)
    if x.ndim < 2:
        raise ValueError(f"linear: x must be [..., K] with at least 2 dims, got shape {x.shape}")
    check_float_dtype("linear: x dtype", x.dtype)
    if w.ndim != 2 or w.dtype != x.dtype:
        raise ValueError(f"linear: w must be a 2-D {x.dtype} matrix, got {w.dtype}{list(w.shape)}")
    K = x.shape[-1]
    N, w_k = (w.shape[0], w.shape[1]) if transpose_w else (w.shape[1], w.shape[0])
    if w_k != K:
        layout = "[N, K]" if transpose_w else "[K, N]"
        raise ValueError(f"linear: w must be {layout} with K={K} (x's last dim), got {list(w.shape)}")
    if activation not in (None, "gelu_tanh", "swiglu"):
        raise ValueError(f"linear: activation must be None, 'gelu_tanh' or 'swiglu', "
                         f"got {activation!r}")
    if activation == "swiglu" and N % 2:
        raise ValueError(f"linear: with activation='swiglu', w's N must be even (gate and up "
                         f"halves, 2F), got N={N} (w {list(w.shape)})")
    out_shape = (*x.shape[:-1], N // 2 if activation == "swiglu" else N)
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"linear: bias must have shape ({N},), got {bias.shape}")
    if residual is not None and residual.shape != out_shape:
        raise ValueError(f"linear: residual must have shape {out_shape}, got {residual.shape}")
    seed = dropout_seed(dropout_rate, seed)
    check_precision("linear", precision)
    if norm is not None:
        _check_norm(norm, K)

    M = math.prod(x.shape[:-1])
    cfg = _LinearConfig(activation, float(dropout_rate), bool(transpose_w), precision,
                        bias is not None, None if residual is None else residual.dtype)
    x2 = x.reshape(M, K)
    bias = None if bias is None else bias.astype(x.dtype)
    residual = None if residual is None else residual.reshape(M, out_shape[-1])
    if norm is None:
        out = _linear(x2, w, bias, residual, seed, cfg)
    else:
        out, x2 = _normed_linear(x2, norm.weight, norm.bias, w, bias, residual, seed,
                                 (norm.kind, float(norm.eps)), cfg)
    out = out.reshape(out_shape)
    return (out, x2.reshape(x.shape)) if return_input else out


def _check_norm(norm: Norm, K: int) -> None:
    if norm.kind not in ("layer", "rms"):
        raise ValueError(f"linear: norm.kind must be 'layer' or 'rms', got {norm.kind!r}")
    if K == 0:
        raise ValueError("linear: a norm needs x's last dim K >= 1, got 0")
    if norm.weight.shape != (K,):
        raise ValueError(f"linear: norm.weight must have shape ({K},), got {norm.weight.shape}")
    if (norm.bias is None) != (norm.kind == "rms"):
        raise ValueError(f"linear: norm.bias must be {'None' if norm.kind == 'rms' else f'[{K}]'} "
                         f"for kind {norm.kind!r}")
    if norm.bias is not None and norm.bias.shape != (K,):
        raise ValueError(f"linear: norm.bias must have shape ({K},), got {norm.bias.shape}")
    if not norm.eps > 0.0:
        raise ValueError(f"linear: norm.eps must be > 0, got {norm.eps}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _normed_linear(x, norm_weight, norm_bias, w, bias, residual, seed, norm_cfg, cfg):
    """(linear(norm(x)), x) with norm(x) never in memory: the GEMM applies the norm (_gemm);
    norm_cfg = (kind, eps). Differentiated, the forward is the norm kernel, then the GEMM
    (_unfused_normed_linear): the backward's dW needs norm(x), which that forward saves, and
    x's gradient through the second output joins the norm's own in its backward kernel."""
    kind, eps = norm_cfg
    out = _gemm(x, w, False, cfg.transpose_w, x.dtype, cfg.precision, bias=bias,
                residual=residual, activation=cfg.activation, dropout_p=cfg.dropout_rate,
                seed=seed, norm=Norm(kind, norm_weight, norm_bias, eps))
    return out, x


def _unfused_normed_linear(x, norm_weight, norm_bias, w, bias, residual, seed, norm_cfg, cfg):
    h, x = _normalized(x, Norm(norm_cfg[0], norm_weight, norm_bias, norm_cfg[1]),
                       return_input=True)
    return _linear(h, w, bias, residual, seed, cfg), x


def _normalized(x, norm: Norm, return_input=False):
    """norm(x) by the norm kernel; with return_input, (norm(x), x) (see layer_norm)."""
    if norm.kind == "layer":
        return layer_norm(x, norm.weight, norm.bias, eps=norm.eps, return_input=return_input)
    return rms_norm(x, norm.weight, eps=norm.eps, return_input=return_input)


def _normed_linear_fwd(x, norm_weight, norm_bias, w, bias, residual, seed, norm_cfg, cfg):
    unfused = functools.partial(_unfused_normed_linear, norm_cfg=norm_cfg, cfg=cfg)
    return jax.vjp(unfused, x, norm_weight, norm_bias, w, bias, residual, seed)


def _normed_linear_bwd(norm_cfg, cfg, pullback, cotangents):
    return pullback(cotangents)


_normed_linear.defvjp(_normed_linear_fwd, _normed_linear_bwd)


class _LinearConfig(NamedTuple):
    activation: str | None
    dropout_rate: float
    transpose_w: bool
    precision: str
    has_bias: bool
    residual_dtype: jnp.dtype | None  # the residual's gradient comes back in its dtype


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _linear(x, w, bias, residual, seed, cfg: _LinearConfig):
    return _linear_gemm(x, w, bias, residual, seed, cfg, save_pre=False)


def _linear_gemm(x, w, bias, residual, seed, cfg, save_pre):
    return _gemm(x, w, False, cfg.transpose_w, x.dtype, cfg.precision, bias=bias,
                 residual=residual, activation=cfg.activation, dropout_p=cfg.dropout_rate,
                 seed=seed, save_pre=save_pre)


def _linear_fwd(x, w, bias, residual, seed, cfg):
    if cfg.activation is not None:
        out, pre = _linear_gemm(x, w, bias, residual, seed, cfg, save_pre=True)
    else:
        out, pre = _linear_gemm(x, w, bias, residual, seed, cfg, save_pre=False), None
    return out, (x, w, pre, seed)  # the seed: a scalar, read only with dropout


def _linear_bwd(cfg, saved, dy):
    x, w, pre, seed = saved
    dz, dbias = _linear_dz(dy, pre, seed, cfg)
    dx, dw = _operand_grads(x, w, dz, False, cfg.transpose_w, cfg.precision)
    d_residual = None if cfg.residual_dtype is None else dy.astype(cfg.residual_dtype)
    return dx, dw, dbias, d_residual, np.zeros(seed.shape, jax.dtypes.float0)


_linear.defvjp(_linear_fwd, _linear_bwd)


def _linear_dz(dy, pre, seed, cfg: _LinearConfig):
    """(dz, dbias or None): the gradient at the GEMM's output, before bias, and its column sum;
    with SwiGLU both are [gate | up], twice dy's width."""
    M, N = dy.shape
    swiglu = cfg.activation == "swiglu"
    width = 2 * N if swiglu else N
    if cfg.activation is None and cfg.dropout_rate == 0.0:  # dz = dy: no pass over it but dbias's
        return dy, dy.astype(jnp.float32).sum(axis=0).astype(dy.dtype) if cfg.has_bias else None
    if M == 0 or N == 0:  # no program to launch: the empty dz, and dbias a sum over no rows
        dbias = jnp.zeros((width,), dy.dtype) if cfg.has_bias else None
        return jnp.zeros((M, width), dy.dtype), dbias
    if on_gpu():
        # Memory bound: 32 rows of up to 256 columns, 64 values of each tensor a thread; SwiGLU's
        # five tiles (dy, pre's and dz's halves) at 32x256 spill 16-576 bytes (compile_only,
        # sm_90), at 32x128 fit in 71-168 registers.
        block_m, block_n, num_warps = 32, _fit(N, 128 if swiglu else 256), 4
    else:  # the interpreter: fewest program instances
        block_m, block_n, num_warps = _fit(M, 64), _fit(N, 128), 4
    tiles_m = triton.cdiv(M, block_m)
    dz, partials = triton_call(
        dy, dy if pre is None else pre, seed,
        kernel=_linear_dz_kernel,
        out_shape=(jax.ShapeDtypeStruct((M, width), dy.dtype),
                   jax.ShapeDtypeStruct((tiles_m, width) if cfg.has_bias else (1,), jnp.float32)),
        grid=(tiles_m, triton.cdiv(N, block_n)), num_warps=num_warps,
        M=M, N=N, GELU=cfg.activation == "gelu_tanh", SWIGLU=swiglu, DROPOUT_P=cfg.dropout_rate,
        HAS_BIAS=cfg.has_bias, BLOCK_M=block_m, BLOCK_N=block_n)
    return dz, partials.sum(axis=0).astype(dy.dtype) if cfg.has_bias else None
