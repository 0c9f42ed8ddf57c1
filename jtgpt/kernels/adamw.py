"""AdamW's update of a whole model in one launch, over flat buffers: every parameter, gradient and
moment of the model laid end to end (jtgpt.optim.FlatLayout), the moments updated in place.

For each element, with g its gradient and t the update's count (1 for the first update):

    g <- s g                         (s: a scale, e.g. 1 / the batch's tokens for a summed gradient)
    g <- g                           if norm < max_norm, or clipping is off   (optax's
         (g / norm) * max_norm       otherwise                                 clip_by_global_norm)
    m <- (1 - b1) g + b1 m
    v <- (1 - b2) g^2 + b2 v
    u  = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t) + eps_root) + eps) + wd p    (wd: decayed only)
    p <- p - lr u           (apply: the parameters updated in place, optionally also cast to a
                             16-bit copy: fp32 master weights for a 16-bit model)
    or out = -lr u          (updates: what optax.adamw's update returns, for optax.apply_updates)

optax.adamw's operations in its order, in fp32 whatever the storage dtypes. Decayed elements are
the first `decay_end` of the buffer (FlatLayout puts the leaves the mask selects first, in each
shard of a buffer split over devices too), so the mask costs no bytes; decay_end is read at run
time, like the scalars below.

lr, 1 - b1^t, 1 - b2^t, s, the global norm of s g and max_norm are read from a small fp32 array at
run time (`scalars`): a learning-rate schedule or a new step count never recompiles. Scaling the
gradient here rather than before the call saves a pass over it: the caller hands over the
gradient as its backward summed it, and its norm (sum_of_squares, times s) reads it without
writing a copy.

Bytes: the apply form reads p, g, m, v and writes p, m, v, 28 bytes an fp32 element (+2 for a
bf16 gradient's 2 fewer, +2 a 16-bit copy): the least an AdamW step can move. optax's update under
jit moves the same bytes when XLA fuses each leaf's chain into one kernel, but launches one kernel
a leaf (or more).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from jtgpt.call import on_gpu, triton_call
from jtgpt.kernels import check_float_dtype

SCALARS = ("learning_rate", "bias_correction1", "bias_correction2", "grad_scale", "grad_norm",
           "max_norm")


class Hyper(NamedTuple):
    """AdamW's constants: compiled into the kernel (a change recompiles, as with optax's
    closures)."""
    b1: float
    b2: float
    eps: float
    eps_root: float
    weight_decay: float


@triton.jit
def _adamw_kernel(p_ptr, g_ptr, m_ptr, v_ptr, scalars_ptr, decay_end_ptr, p_out_ptr, m_out_ptr,
                  v_out_ptr, cast_ptr, N: tl.constexpr, B1: tl.constexpr,
                  B2: tl.constexpr, EPS: tl.constexpr, EPS_ROOT: tl.constexpr,
                  WEIGHT_DECAY: tl.constexpr, CLIP: tl.constexpr, APPLY: tl.constexpr,
                  CAST: tl.constexpr, BLOCK: tl.constexpr):
    """Program i: elements [i BLOCK, (i + 1) BLOCK). p_out_ptr: with APPLY the new parameters
    (p_ptr's buffer, aliased), else the updates -lr u; m_out/v_out: m_ptr's and v_ptr's buffers
    (aliased); cast_ptr: the new parameters in the copy's dtype when CAST."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    lr = tl.load(scalars_ptr)
    bc1 = tl.load(scalars_ptr + 1)
    bc2 = tl.load(scalars_ptr + 2)
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32) * tl.load(scalars_ptr + 3)
    if CLIP:
        norm = tl.load(scalars_ptr + 4)
        max_norm = tl.load(scalars_ptr + 5)
        g = tl.where(norm < max_norm, g, (g / norm) * max_norm)
    p = tl.load(p_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    m = (1.0 - B1) * g + B1 * tl.load(m_ptr + offs, mask=ok, other=0.0)
    v = (1.0 - B2) * (g * g) + B2 * tl.load(v_ptr + offs, mask=ok, other=0.0)
    u = (m / bc1) / (tl.sqrt_rn(v / bc2 + EPS_ROOT) + EPS)
    if WEIGHT_DECAY != 0.0:
        u = tl.where(offs < tl.load(decay_end_ptr), u + WEIGHT_DECAY * p, u)
    step = -lr * u
    tl.store(m_out_ptr + offs, m, mask=ok)
    tl.store(v_out_ptr + offs, v, mask=ok)
    if APPLY:
        p = p + step
        tl.store(p_out_ptr + offs, p.to(p_out_ptr.dtype.element_ty), mask=ok)
        if CAST:
            tl.store(cast_ptr + offs, p.to(cast_ptr.dtype.element_ty), mask=ok)
    else:
        tl.store(p_out_ptr + offs, step.to(p_out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _sum_of_squares_kernel(x_ptr, partial_ptr, N: tl.constexpr, BLOCK: tl.constexpr):
    """Program i: the fp32 sum of x^2 over elements [i BLOCK, (i + 1) BLOCK) into partial i."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < N, other=0.0).to(tl.float32)
    tl.store(partial_ptr + tl.program_id(0), tl.sum(x * x))


def sum_of_squares(x, *, block: int | None = None):
    """sum(x^2) over a flat [n] array (any float dtype) in fp32: the squared global norm that
    clipping needs, in one read of x (a partial a block, then an XLA sum of the partials:
    deterministic)."""
    if getattr(x, "ndim", None) != 1:
        raise ValueError(f"x must be a flat [n] array, got shape {tuple(getattr(x, 'shape', ()))}")
    check_float_dtype("x dtype", x.dtype)
    n = x.shape[0]
    if n == 0:
        return jnp.zeros((), jnp.float32)
    block = block or (16384 if on_gpu() else 1024)
    partials = triton_call(x, kernel=_sum_of_squares_kernel,
                           out_shape=jax.ShapeDtypeStruct((triton.cdiv(n, block),), jnp.float32),
                           grid=(triton.cdiv(n, block),), num_warps=8 if on_gpu() else 4, N=n,
                           BLOCK=block)
    return jnp.sum(partials)


def adamw_update(params, grads, mu, nu, scalars, hyper: Hyper, *, decay_end,
                 clip: bool = False, apply: bool = True, cast_dtype=None, block: int | None = None):
    """One AdamW step over flat buffers (module docstring).

    params [n] (fp32 when applied: the master copy; any float dtype for updates), grads [n] (any
    float dtype), mu and nu [n] fp32, scalars fp32 [6] (SCALARS: the learning rate, 1 - b1^t,
    1 - b2^t, the gradient's scale s, the global norm of s grads and max_norm; the last two read
    only with clip).
    decay_end (an int, or an int32 array of shape (), traced or not): elements [0, decay_end)
    get the weight decay.

    apply=True: (params, mu, nu), each written into its input's buffer when the caller donates it
    (jit aliases them), plus the new parameters in cast_dtype when given. apply=False: (updates
    in params' dtype, mu, nu).
    """
    n = params.shape[0] if getattr(params, "ndim", None) == 1 else None
    for name, array in (("params", params), ("grads", grads), ("mu", mu), ("nu", nu)):
        if getattr(array, "ndim", None) != 1 or array.shape[0] != n:
            raise ValueError(f"{name} must be a flat [n] array like params, got shape "
                             f"{tuple(getattr(array, 'shape', ()))} (params: "
                             f"{tuple(getattr(params, 'shape', ()))})")
        check_float_dtype(f"{name} dtype", array.dtype)
    for name, array in (("mu", mu), ("nu", nu), ("scalars", scalars)):
        if array.dtype != jnp.float32:
            raise ValueError(f"{name} must be float32, got {jnp.dtype(array.dtype).name}")
    if scalars.shape != (len(SCALARS),):
        raise ValueError(f"scalars must be [{len(SCALARS)}] ({', '.join(SCALARS)}), got "
                         f"{tuple(scalars.shape)}")
    if apply and params.dtype != jnp.float32:
        raise ValueError(f"params must be float32 to be updated in place (the master copy), got "
                         f"{jnp.dtype(params.dtype).name}")
    if isinstance(decay_end, int) and not 0 <= decay_end <= min(n, 2**31 - 1):
        raise ValueError(f"decay_end must be in [0, {min(n, 2**31 - 1)}], got {decay_end}")
    if cast_dtype is not None:
        if not apply:
            raise ValueError("cast_dtype needs apply=True")
        check_float_dtype("cast_dtype", cast_dtype)
    block = block or (4096 if on_gpu() else 256)
    if n == 0:
        outs = (params, mu, nu)
        return outs + (params.astype(cast_dtype),) if cast_dtype is not None else outs
    shape = lambda dtype: jax.ShapeDtypeStruct((n,), dtype)  # noqa: E731
    out_shape = [shape(params.dtype), shape(jnp.float32), shape(jnp.float32),
                 shape(cast_dtype or jnp.float32) if cast_dtype is not None
                 else jax.ShapeDtypeStruct((1,), jnp.float32)]
    aliases = {2: 1, 3: 2} | ({0: 0} if apply else {})
    outs = triton_call(
        params, grads, mu, nu, scalars, jnp.asarray(decay_end, jnp.int32).reshape(1),
        kernel=_adamw_kernel, out_shape=out_shape, input_output_aliases=aliases,
        grid=(triton.cdiv(n, block),), num_warps=8 if on_gpu() else 4, N=n, B1=float(hyper.b1),
        B2=float(hyper.b2), EPS=float(hyper.eps), EPS_ROOT=float(hyper.eps_root),
        WEIGHT_DECAY=float(hyper.weight_decay), CLIP=clip,
        APPLY=apply, CAST=cast_dtype is not None, BLOCK=block)
    return tuple(outs) if cast_dtype is not None else tuple(outs[:3])
