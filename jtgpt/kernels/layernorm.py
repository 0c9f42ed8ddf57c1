"""LayerNorm and RMSNorm over the last axis, forward and backward: Triton kernels behind a
jax.custom_vjp.

For each row x of length D (every leading axis of the input is a row), LayerNorm:

    mean = sum(x) / D
    var  = sum((x - mean)^2) / D                 (two passes over the row held in registers:
    rstd = 1 / sqrt(var + eps)                    no E[x^2] - E[x]^2 cancellation)
    x_hat = (x - mean) * rstd
    y    = x_hat * weight + bias

and RMSNorm (Llama's): no mean and no bias,

    rstd  = 1 / sqrt(sum(x^2) / D + eps)
    x_hat = x * rstd
    y     = weight * round(x_hat)                (round: to x's dtype, Hugging Face
                                                  LlamaRMSNorm's order, then y is rounded again)

Backward, from dy (per row, then summed over the rows for the parameters), with g = weight * dy:

    LayerNorm: dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat))     (means over the row's D
    RMSNorm:   dx = rstd * (g - x_hat * mean(g * x_hat))                values)
    dweight = sum over rows of dy * x_hat,    dbias = sum over rows of dy (LayerNorm only)

with RMSNorm's dweight summing dy * round(x_hat), what the forward multiplied the weight by; in dx
the round is a cast, whose derivative is taken as 1 (as jax.vjp of the reference takes it).
One pair of kernels computes both norms: the constexpr RMS drops the mean, the bias and the
-mean(g) term.

Statistics and arithmetic are fp32 whatever the storage dtype (fp32, fp16 or bf16); y is cast once
to x's dtype, and each gradient to its input's dtype (weight and bias may be fp32 while x is bf16).
`mean` and `rstd` (fp32, one per row) let the backward rebuild x_hat without another reduction,
so the forward always writes them (rstd only, for RMSNorm).

return_input=True returns (y, x): x itself, the residual stream that a pre-norm transformer block
adds its branch to. The gradient reaching that second output, dres, is added to dx inside the
backward kernel (one more load in the dx pass) instead of by XLA after it: a separate add of two
[rows, D] arrays reads both and writes one, 3 passes; fused it is 1. The forward's residual add
already runs in the epilogue of the GEMM before the next norm (`linear(..., residual=x)`,
jtgpt/kernels/matmul.py), so this is the pass that a fused add+norm kernel saves here.

What the custom_vjp saves: x, weight, mean (LayerNorm) and rstd; bias is not needed. The backward
kernel computes dx row by row and, in the same pass, each program's fp32 partial sums of dweight
and dbias over its contiguous chunk of rows; an XLA sum adds the few hundred partials (fixed order:
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
# once: ptxas (sm_90, 16 warps, so at most 128 registers a thread) fits LayerNorm's 8192 in 104
# (bf16) to 121 (fp32) registers, RMSNorm's in 75 to 104; it spills 216 bytes a thread at 16384.
# Wider rows take two launches. (LayerNorm at 8192 in fp32 with return_input's dres spills 16
# bytes: two loop-invariant pointers, reloaded from L1 once a row.)
MAX_FUSED_D = 8192
# Row chunks, hence fp32 partial rows of dweight and dbias, at most: ~4 programs for each of an
# H100's 132 SMs. Their round trip (2 x 512 x D x 4 bytes, written then summed) is ~8% of the
# backward's traffic at GPT-2's 16384 x 768 bf16, less with more rows.
PARTIALS = 512


@triton.jit
def _layer_norm_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr,
                           N_ROWS: tl.constexpr, D: tl.constexpr, EPS: tl.constexpr,
                           BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr, RMS: tl.constexpr,
                           WRITE_Y: tl.constexpr):
    """RMS: RMSNorm, which reads no b_ptr and writes no mean_ptr. WRITE_Y False: the statistics
    alone (no w_ptr, b_ptr or y_ptr access), for a GEMM that applies the norm in its epilogue."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < N_ROWS
    col_ok = cols < D
    mask = row_ok[:, None] & col_ok[None, :]
    # int64: rows * D passes 2**31 for large activations (e.g. 153600 x 16384).
    offs = rows.to(tl.int64)[:, None] * D + cols[None, :]

    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if RMS:
        xc = x  # padding columns were loaded as 0
    else:
        mean = tl.sum(x, axis=1) / D
        # Padding columns must not add (0 - mean)^2 to the variance.
        xc = tl.where(mask, x - mean[:, None], 0.0)
        tl.store(mean_ptr + rows, mean, mask=row_ok)
    var = tl.sum(xc * xc, axis=1) / D  # RMSNorm: mean(x^2)
    rstd = tl.rsqrt(var + EPS)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)
    if WRITE_Y:
        x_hat = xc * rstd[:, None]
        if RMS:  # Hugging Face's order: x / rms is rounded to x's dtype before the weight multiplies
            x_hat = x_hat.to(x_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        y = x_hat * w[None, :]
        if not RMS:
            y += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _layer_norm_bwd_kernel(x_ptr, w_ptr, mean_ptr, rstd_ptr, dy_ptr, dres_ptr,
                           dx_ptr, dw_ptr, db_ptr,
                           N_ROWS: tl.constexpr, D: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr,
                           BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
                           DX: tl.constexpr, DWB: tl.constexpr, RMS: tl.constexpr,
                           RESIDUAL: tl.constexpr):
    """Program (i, j): rows [i * ROWS_PER_PROGRAM, ...) in tiles of BLOCK_ROWS, columns block j.

    DX writes dx (needs the whole row: BLOCK_D >= D, one column block), plus dres with RESIDUAL;
    DWB writes this chunk's column sums of dy * x_hat (RMSNorm: round(x_hat)) and dy to row i of
    the fp32 partials dw, db [programs, D]. RMS: RMSNorm, which reads no mean_ptr and writes
    no db_ptr.
    """
    pid = tl.program_id(0)
    # With DX the one column block starts at 0, known at compile time: at D == BLOCK_D the
    # column mask then folds away.
    cols = (0 if DX else tl.program_id(1) * BLOCK_D) + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    # Summed over rows only once, after the loop: one cross-warp reduction per program.
    dw_acc = tl.zeros([BLOCK_ROWS, BLOCK_D], tl.float32)
    if not RMS:
        db_acc = tl.zeros([BLOCK_ROWS, BLOCK_D], tl.float32)
    first = pid * ROWS_PER_PROGRAM
    for start in range(first, tl.minimum(first + ROWS_PER_PROGRAM, N_ROWS), BLOCK_ROWS):
        rows = start + tl.arange(0, BLOCK_ROWS)
        row_ok = rows < N_ROWS
        mask = row_ok[:, None] & col_ok[None, :]
        offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        if RMS:
            x_hat = x * rstd[:, None]  # padding was loaded as 0
            # What the forward multiplied the weight by: x_hat rounded to x's dtype.
            w_factor = x_hat.to(x_ptr.dtype.element_ty).to(tl.float32)
        else:
            mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
            x_hat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)  # padding stays 0
            w_factor = x_hat
        if DWB:  # before dx: dy is dead once g is formed
            dw_acc += dy * w_factor
            if not RMS:
                db_acc += dy
        if DX:
            # Reloaded per tile (an L1 hit) rather than held across the loop: at D=8192 in fp32
            # that is the difference between 127 registers and spilling.
            w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            g = w[None, :] * dy
            # Both row sums before dx is formed: one [rows, D] value fewer live at once.
            mean_gx = tl.sum(g * x_hat, axis=1) / D
            if not RMS:
                g -= (tl.sum(g, axis=1) / D)[:, None]
            dx = (g - x_hat * mean_gx[:, None]) * rstd[:, None]
            if RESIDUAL:
                dx += tl.load(dres_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if DWB:
        tl.store(dw_ptr + pid * D + cols, tl.sum(dw_acc, axis=0), mask=col_ok)
        if not RMS:
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
    """bias None: RMSNorm's arguments."""
    if x.ndim < 1:
        raise ValueError(f"x must have at least one axis (the normalised one), got shape {x.shape}")
    check_float_dtype("x dtype", x.dtype)
    d = x.shape[-1]
    if not 1 <= d <= MAX_D:
        raise ValueError(f"x's last axis D={d} must be in [1, {MAX_D}] (the row is held in registers)")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
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
    return _forward(x, weight, bias, float(eps))


def row_statistics(x, *, eps: float, rms: bool):
    """(mean, rstd) of x's rows as the forward computes them, fp32 [rows] each (RMSNorm's mean a
    (1,) placeholder), without the normed output: for `linear(x, norm=...)`, whose GEMM applies
    the norm to its product (jtgpt.kernels.matmul). Not differentiable. x [rows, D]."""
    unused = jnp.zeros((1,), x.dtype)  # the weight and bias, never read without y
    _, mean, rstd = _launch_forward(x, unused, None if rms else unused, eps, write_y=False)
    return mean, rstd


def _forward(x, weight, bias, eps: float):
    """(y, mean, rstd) of LayerNorm, or with bias None of RMSNorm (mean a (1,) placeholder)."""
    n_rows, d = math.prod(x.shape[:-1]), x.shape[-1]
    y, mean, rstd = _launch_forward(x.reshape(n_rows, d), weight, bias, eps, write_y=True)
    return y.reshape(x.shape), mean, rstd


def _launch_forward(x, weight, bias, eps: float, *, write_y: bool):
    """One _layer_norm_fwd_kernel launch over x [rows, D]; y a (1,) placeholder without write_y."""
    rms = bias is None
    n_rows, d = x.shape
    y = jax.ShapeDtypeStruct((n_rows, d) if write_y else (1,), x.dtype)
    stats = jax.ShapeDtypeStruct((n_rows,), jnp.float32)
    mean = jax.ShapeDtypeStruct((1,) if rms else (n_rows,), jnp.float32)
    if n_rows == 0:  # a grid of zero programs is not a valid GPU launch
        return tuple(jnp.zeros(a.shape, a.dtype) for a in (y, mean, stats))
    block_rows, block_d, num_warps = _launch_config(n_rows, d)
    return triton_call(
        x, weight, weight if rms else bias,  # RMSNorm: b_ptr is not read
        kernel=_layer_norm_fwd_kernel, out_shape=(y, mean, stats),
        grid=(triton.cdiv(n_rows, block_rows),), num_warps=num_warps,
        N_ROWS=n_rows, D=d, EPS=eps, BLOCK_ROWS=block_rows, BLOCK_D=block_d, RMS=rms,
        WRITE_Y=write_y)


def layer_norm(x, weight, bias, *, eps=1e-5, return_input=False):
    """(x - mean) / sqrt(var + eps) * weight + bias over x's last axis; returns x's dtype.

    Shapes and dtypes as layer_norm_forward. Differentiable wrt x, weight and bias, gradients in
    each one's dtype; the backward saves x, weight, mean and rstd (module docstring). The forward
    is the same kernel as layer_norm_forward: the discarded mean/rstd cost 8 bytes a row against
    4*D bytes of bf16 traffic (0.3% at D=768), not worth a second kernel.
    return_input: returns (y, x), x not copied; the gradient reaching x through the second output
    is added to dx inside the backward kernel (module docstring).
    """
    _check_inputs(x, weight, bias, eps)
    return _norm(x, weight, bias, _NormConfig(float(eps), return_input, jnp.dtype(bias.dtype)))


def rms_norm(x, weight, *, eps=1e-6, return_input=False):
    """weight * round_to_x_dtype(x / sqrt(mean(x^2) + eps)) over x's last axis: Llama's RMSNorm.

    x [..., D] fp32/fp16/bf16; weight [D] in any of those dtypes; y has x's shape and dtype.
    Differentiable wrt x and weight, gradients in each one's dtype; the backward saves x, weight
    and rstd. return_input as layer_norm's: `h, x = rms_norm(x, w, return_input=True)`.
    """
    _check_inputs(x, weight, None, eps)
    return _norm(x, weight, None, _NormConfig(float(eps), return_input, None))


class _NormConfig(NamedTuple):
    eps: float
    return_input: bool
    bias_dtype: jnp.dtype | None  # dbias comes back in it (bias is not saved); None: RMSNorm


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _norm(x, weight, bias, cfg: _NormConfig):
    """LayerNorm, or RMSNorm with bias None; (y, x) with cfg.return_input."""
    return _norm_fwd(x, weight, bias, cfg)[0]


def _norm_fwd(x, weight, bias, cfg):
    y, mean, rstd = _forward(x, weight, bias, cfg.eps)
    return ((y, x) if cfg.return_input else y), (x, weight, mean, rstd)


def _norm_bwd(cfg, saved, cotangent):
    x, weight, mean, rstd = saved
    # dres: the second output's cotangent; JAX passes zeros (of x's dtype) where nothing used it.
    dy, dres = cotangent if cfg.return_input else (cotangent, None)
    rms = cfg.bias_dtype is None
    n_rows, d = rstd.shape[0], x.shape[-1]
    if n_rows == 0:
        dbias = None if rms else jnp.zeros((d,), cfg.bias_dtype)
        return jnp.zeros_like(x), jnp.zeros_like(weight), dbias
    rows = lambda a: None if a is None else a.reshape(n_rows, d)  # noqa: E731
    dx, dw, db = _backward(rows(x), weight, mean, rstd, rows(dy), rows(dres), rms)
    # The partials' sum: a few hundred rows, added in a fixed order by XLA (deterministic).
    dweight = dw.sum(axis=0).astype(weight.dtype)
    dbias = None if rms else db.sum(axis=0).astype(cfg.bias_dtype)
    return dx.reshape(x.shape), dweight, dbias


_norm.defvjp(_norm_fwd, _norm_bwd)


def _backward(x, weight, mean, rstd, dy, dres, rms: bool):
    """(dx, dweight partials, dbias partials) for x, dy [rows, D] and dres [rows, D] (added to dx)
    or None; partials fp32 [programs, D] (dbias's a (1,) placeholder for RMSNorm)."""
    n_rows, d = x.shape
    block_rows, block_d, num_warps = _launch_config(n_rows, d)
    launch = functools.partial(_launch_backward, x, weight, mean, rstd, dy, rms=rms)
    if block_d <= MAX_FUSED_D:  # one pass: dx and the partials
        return launch(dres, block_rows, block_d, num_warps, dx=True, dwb=True)
    dx, _, _ = launch(dres, block_rows, block_d, num_warps, dx=True, dwb=False)
    # The partials need no whole row: GPT-2's tile (4 rows of 1024 columns) over column blocks.
    block_rows, block_d, num_warps = _launch_config(n_rows, 1024)
    _, dw, db = launch(None, block_rows, block_d, num_warps, dx=False, dwb=True)
    return dx, dw, db


def _launch_backward(x, weight, mean, rstd, dy, dres, block_rows, block_d, num_warps, *,
                     dx, dwb, rms):
    """One _layer_norm_bwd_kernel launch; the outputs it does not write are (1,) placeholders.
    Without dres (None) the kernel gets dy in its place and does not read it.

    dx alone: one tile of rows a program, as the forward. With the partials, each program sums
    a chunk of consecutive tiles, so that there are at most PARTIALS chunks.
    """
    n_rows, d = x.shape
    tiles_per_program = triton.cdiv(triton.cdiv(n_rows, block_rows), PARTIALS) if dwb else 1
    rows_per_program = block_rows * tiles_per_program
    programs = triton.cdiv(n_rows, rows_per_program)
    dw = jax.ShapeDtypeStruct((programs, d) if dwb else (1,), jnp.float32)
    db = jax.ShapeDtypeStruct((programs, d) if dwb and not rms else (1,), jnp.float32)
    return triton_call(
        x, weight, mean, rstd, dy, dy if dres is None else dres,
        kernel=_layer_norm_bwd_kernel,
        out_shape=(jax.ShapeDtypeStruct((n_rows, d) if dx else (1,), x.dtype), dw, db),
        grid=(programs, triton.cdiv(d, block_d)), num_warps=num_warps,
        N_ROWS=n_rows, D=d, ROWS_PER_PROGRAM=rows_per_program, BLOCK_ROWS=block_rows,
        BLOCK_D=block_d, DX=dx, DWB=dwb, RMS=rms, RESIDUAL=dres is not None)
