"""LayerNorm over the last axis, forward: one Triton kernel.

For each row x of length D (every leading axis of the input is a row):

    mean = sum(x) / D
    var  = sum((x - mean)^2) / D                 (two passes over the row held in registers:
    rstd = 1 / sqrt(var + eps)                    no E[x^2] - E[x]^2 cancellation)
    y    = (x - mean) * rstd * weight + bias

Statistics and arithmetic are fp32 whatever the storage dtype (fp32, fp16 or bf16); y is cast once
to x's dtype. `mean` and `rstd` (fp32, one per row) are what the backward pass needs to rebuild
x_hat = (x - mean) * rstd without another reduction, so the forward always writes them.
"""
from __future__ import annotations

import math

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


def _launch_config(n_rows: int, d: int) -> tuple[int, int, int]:
    """(BLOCK_ROWS, BLOCK_D, num_warps) for n_rows rows of length d.

    A GPT-2 row (D=768) is 1.5 KB in bf16: one row per program would mean 150k tiny programs,
    each loading weight and bias again and doing two block-wide reductions for 1.5 KB of work.
    Packing rows until a program holds TILE (4096) elements, four rows at D=768, amortises the
    weight/bias loads and keeps more bytes in flight per program. It also divides the number of
    program instances, which is what the CPU interpreter's time is proportional to.
    num_warps gives each thread ~16 fp32 values (two 16-byte loads of bf16), up to 16 warps for
    the widest rows (32 values a thread at D=16384).
    """
    block_d = triton.next_power_of_2(d)
    block_rows = max(1, min(TILE // block_d, triton.next_power_of_2(n_rows)))
    num_warps = min(16, max(1, block_rows * block_d // 512))
    return block_rows, block_d, num_warps


def layer_norm_forward(x, weight, bias, *, eps=1e-5):
    """LayerNorm over x's last axis; returns (y, mean, rstd).

    x [..., D] fp32/fp16/bf16; weight, bias [D] in any of those dtypes (fp32 master weights with
    bf16 activations are fine). y has x's shape and dtype; mean and rstd are fp32 [rows], rows =
    the product of x's leading axes (row-major), for the backward kernel.
    """
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

    n_rows = math.prod(x.shape[:-1])
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

    The same kernel as layer_norm_forward: the discarded mean/rstd cost 8 bytes a row against
    4*D bytes of bf16 traffic (0.3% at D=768), not worth a second kernel.
    """
    return layer_norm_forward(x, weight, bias, eps=eps)[0]
