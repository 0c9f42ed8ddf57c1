"""LayerNorm over the last axis, forward and backward: Triton kernels behind a jax.custom_vjp.

For each row x of length D (every leading axis of the input is a row):

    mean = sum(x) / D
    var  = sum((x - mean)^2) / D                 (two passes over the row held in registers:
    rstd = 1 / sqrt(var + eps)                    no E[x^2] - E[x]^2 cancellation)
    x_hat = (x - mean) * rstd
    y    = x_hat * weight + bias

Backward, from dy (per row, then summed over the rows for the parameters):

    g  = weight * dy
    dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat))       (means over the row's D values)
    dweight = sum over rows of dy * x_hat,    dbias = sum over rows of dy

Statistics and arithmetic are fp32 whatever the storage dtype (fp32, fp16 or bf16); y is cast once
to x's dtype, and each gradient to its input's dtype (weight and bias may be fp32 while x is bf16).
`mean` and `rstd` (fp32, one per row) let the backward rebuild x_hat without another reduction,
so the forward always writes them.

What the custom_vjp saves: x, weight, mean and rstd (bias is not needed). The backward kernel
computes dx row by row and, in the same pass, each program's fp32 partial sums of dweight and
dbias over its contiguous chunk of rows; an XLA sum adds the few hundred partials (fixed order:
deterministic, no atomics). Rows wider than MAX_FUSED_D do not leave room in registers for the
two accumulators: there one launch computes dx and a second reads x and dy again for the partials.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from jtgpt.call import triton_call
from jtgpt.kernels import check_float_dtype

# The whole row lives in registers. At 16384 (Llama-3 405B's hidden size) and 16 warps that is
# 32 fp32 values a thread; a wider row would need a kernel that loops over chunks of it.
MAX_D = 16384
# Elements one program normalises: small rows are packed several to a program (see _launch_config).
TILE = 4096
# Widest row whose backward keeps x_hat, dy and the dweight/dbias accumulators in registers at
# once: ptxas (sm_90, 16 warps, so at most 128 registers a thread) fits 8192 in 102 (bf16) to
# 127 (fp32) registers and spills 216 bytes a thread at 16384. Wider rows take two launches.
MAX_FUSED_D = 8192
# Row chunks, hence fp32 partial rows of dweight and dbias, at most: ~4 programs for each of an
# H100's 132 SMs. Their round trip (2 x 512 x D x 4 bytes, written then summed) is ~8% of the
# backward's traffic at GPT-2's 16384 x 768 bf16, less with more rows.
PARTIALS = 512


@triton.jit
def _layer_norm_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr,
                           N_ROWS: tl.constexpr, D: tl.constexpr, EPS: tl.constexpr,
                           BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < N_ROWS
    col_ok = cols < D
    mask = row_ok[:, None] & col_ok[None, :]
    # int64: rows * D passes 2**31 for large activations (e.g. 153600 x 16384).
    offs = rows.to(tl.int64)[:, None] * D + cols[None, :]

    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / D
    # Padding columns must not add (0 - mean)^2 to the variance.
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / D
    rstd = tl.rsqrt(var + EPS)

    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + rows, mean, mask=row_ok)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)


@triton.jit
def _layer_norm_bwd_kernel(x_ptr, w_ptr, mean_ptr, rstd_ptr, dy_ptr, dx_ptr, dw_ptr, db_ptr,
                           N_ROWS: tl.constexpr, D: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr,
                           BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
                           DX: tl.constexpr, DWB: tl.constexpr):
    """Program (i, j): rows [i * ROWS_PER_PROGRAM, ...) in tiles of BLOCK_ROWS, columns block j.

    DX writes dx (needs the whole row: BLOCK_D >= D, one column block); DWB writes this chunk's
    column sums of dy * x_hat and dy to row i of the fp32 partials dw, db [programs, D].
    """
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    # Summed over rows only once, after the loop: one cross-warp reduction per program.
    dw_acc = tl.zeros([BLOCK_ROWS, BLOCK_D], tl.float32)
    db_acc = tl.zeros([BLOCK_ROWS, BLOCK_D], tl.float32)
    first = pid * ROWS_PER_PROGRAM
    for start in range(first, tl.minimum(first + ROWS_PER_PROGRAM, N_ROWS), BLOCK_ROWS):
        rows = start + tl.arange(0, BLOCK_ROWS)
        row_ok = rows < N_ROWS
        mask = row_ok[:, None] & col_ok[None, :]
        offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        x_hat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)  # padding stays 0
        if DX:
            # Reloaded per tile (an L1 hit) rather than held across the loop: at D=8192 in fp32
            # that is the difference between 127 registers and spilling.
            w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            g = w[None, :] * dy
            mean_g = tl.sum(g, axis=1) / D
            mean_gx = tl.sum(g * x_hat, axis=1) / D
            dx = (g - mean_g[:, None] - x_hat * mean_gx[:, None]) * rstd[:, None]
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if DWB:
            dw_acc += dy * x_hat
            db_acc += dy
    if DWB:
        tl.store(dw_ptr + pid * D + cols, tl.sum(dw_acc, axis=0), mask=col_ok)
        tl.store(db_ptr + pid * D + cols, tl.sum(db_acc, axis=0), mask=col_ok)


def _launch_config(n_rows: int, d: int) -> tuple[int, int, int]:
    """(BLOCK_ROWS, BLOCK_D, num_warps) for n_rows rows of length d.

    A GPT-2 row (D=768) is 1.5 KB in bf16: one row per program would mean 150k tiny programs,
    each loading weight and bias again and doing two block-wide reductions for 1.5 KB of work.
    Packing rows until a program holds TILE (4096) elements, four rows at D=768, amortises the
    weight/bias loads and keeps more bytes in flight per program. It also divides the number of
    program instances, which is what the CPU interpreter's time is proportional to.
    num_warps gives each thread ~16 fp32 values (two 16-byte loads of bf16), up to 16 warps for
    the widest rows (32 values a thread at D=16384). The backward tiles its rows the same way.
    """
    block_d = triton.next_power_of_2(d)
    block_rows = max(1, min(TILE // block_d, triton.next_power_of_2(n_rows)))
    num_warps = min(16, max(1, block_rows * block_d // 512))
    return block_rows, block_d, num_warps


def _check_inputs(x, weight, bias, eps) -> None:
    if x.ndim < 1:
        raise ValueError(f"x must have at least one axis (the normalised one), got shape {x.shape}")
    check_float_dtype("x dtype", x.dtype)
    d = x.shape[-1]
    if not 1 <= d <= MAX_D:
        raise ValueError(f"x's last axis D={d} must be in [1, {MAX_D}] (the row is held in registers)")
    for name, p in (("weight", weight), ("bias", bias)):
        if p.shape != (d,):
            raise ValueError(f"{name} shape {p.shape} must be (D,) = ({d},), x's last axis")
        check_float_dtype(f"{name} dtype", p.dtype)
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")


def layer_norm_forward(x, weight, bias, *, eps=1e-5):
    """LayerNorm over x's last axis; returns (y, mean, rstd). Not differentiable: see layer_norm.

    x [..., D] fp32/fp16/bf16; weight, bias [D] in any of those dtypes (fp32 master weights with
    bf16 activations are fine). y has x's shape and dtype; mean and rstd are fp32 [rows], rows =
    the product of x's leading axes (row-major), for the backward kernel.
    """
    _check_inputs(x, weight, bias, eps)
    n_rows, d = math.prod(x.shape[:-1]), x.shape[-1]
    stats = jax.ShapeDtypeStruct((n_rows,), jnp.float32)
    if n_rows == 0:  # a grid of zero programs is not a valid GPU launch
        return x, jnp.zeros(stats.shape, stats.dtype), jnp.zeros(stats.shape, stats.dtype)
    block_rows, block_d, num_warps = _launch_config(n_rows, d)
    y, mean, rstd = triton_call(
        x.reshape(n_rows, d), weight, bias,
        kernel=_layer_norm_fwd_kernel,
        out_shape=(jax.ShapeDtypeStruct((n_rows, d), x.dtype), stats, stats),
        grid=(triton.cdiv(n_rows, block_rows),), num_warps=num_warps,
        N_ROWS=n_rows, D=d, EPS=float(eps), BLOCK_ROWS=block_rows, BLOCK_D=block_d)
    return y.reshape(x.shape), mean, rstd


def layer_norm(x, weight, bias, *, eps=1e-5):
    """(x - mean) / sqrt(var + eps) * weight + bias over x's last axis; returns x's dtype.

    Shapes and dtypes as layer_norm_forward. Differentiable wrt x, weight and bias, gradients in
    each one's dtype; the backward saves x, weight, mean and rstd (module docstring). The forward
    is the same kernel as layer_norm_forward: the discarded mean/rstd cost 8 bytes a row against
    4*D bytes of bf16 traffic (0.3% at D=768), not worth a second kernel.
    """
    _check_inputs(x, weight, bias, eps)
    return _layer_norm(x, weight, bias, _LayerNormConfig(float(eps), jnp.dtype(bias.dtype)))


class _LayerNormConfig(NamedTuple):
    eps: float
    bias_dtype: jnp.dtype  # dbias comes back in it (bias itself is not saved)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm(x, weight, bias, cfg: _LayerNormConfig):
    return layer_norm_forward(x, weight, bias, eps=cfg.eps)[0]


def _layer_norm_fwd(x, weight, bias, cfg):
    y, mean, rstd = layer_norm_forward(x, weight, bias, eps=cfg.eps)
    return y, (x, weight, mean, rstd)


def _layer_norm_bwd(cfg, saved, dy):
    x, weight, mean, rstd = saved
    n_rows, d = mean.shape[0], x.shape[-1]
    if n_rows == 0:
        return jnp.zeros_like(x), jnp.zeros_like(weight), jnp.zeros((d,), cfg.bias_dtype)
    dx, dw, db = _backward(x.reshape(n_rows, d), weight, mean, rstd, dy.reshape(n_rows, d))
    # The partials' sum: a few hundred rows, added in a fixed order by XLA (deterministic).
    dweight, dbias = dw.sum(axis=0).astype(weight.dtype), db.sum(axis=0).astype(cfg.bias_dtype)
    return dx.reshape(x.shape), dweight, dbias


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def _backward(x, weight, mean, rstd, dy):
    """(dx, dweight partials, dbias partials) for x, dy [rows, D]; partials fp32 [programs, D]."""
    n_rows, d = x.shape
    block_rows, block_d, num_warps = _launch_config(n_rows, d)
    if block_d <= MAX_FUSED_D:  # one pass: dx and the partials
        return _launch_backward(x, weight, mean, rstd, dy, block_rows, block_d, num_warps,
                                dx=True, dwb=True)
    dx, _, _ = _launch_backward(x, weight, mean, rstd, dy, block_rows, block_d, num_warps,
                                dx=True, dwb=False)
    # The partials need no whole row: GPT-2's tile (4 rows of 1024 columns) over column blocks.
    block_rows, block_d, num_warps = _launch_config(n_rows, 1024)
    _, dw, db = _launch_backward(x, weight, mean, rstd, dy, block_rows, block_d, num_warps,
                                 dx=False, dwb=True)
    return dx, dw, db


def _launch_backward(x, weight, mean, rstd, dy, block_rows, block_d, num_warps, *, dx, dwb):
    """One _layer_norm_bwd_kernel launch; the outputs it does not write are (1,) placeholders.

    dx alone: one tile of rows a program, as the forward. With the partials, each program sums
    a chunk of consecutive tiles, so that there are at most PARTIALS chunks.
    """
    n_rows, d = x.shape
    tiles_per_program = triton.cdiv(triton.cdiv(n_rows, block_rows), PARTIALS) if dwb else 1
    rows_per_program = block_rows * tiles_per_program
    programs = triton.cdiv(n_rows, rows_per_program)
    partials = jax.ShapeDtypeStruct((programs, d) if dwb else (1,), jnp.float32)
    return triton_call(
        x, weight, mean, rstd, dy,
        kernel=_layer_norm_bwd_kernel,
        out_shape=(jax.ShapeDtypeStruct((n_rows, d) if dx else (1,), x.dtype), partials, partials),
        grid=(programs, triton.cdiv(d, block_d)), num_warps=num_warps,
        N_ROWS=n_rows, D=d, ROWS_PER_PROGRAM=rows_per_program, BLOCK_ROWS=block_rows,
        BLOCK_D=block_d, DX=dx, DWB=dwb)
