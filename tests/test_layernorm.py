"""LayerNorm and RMSNorm kernels (forward and backward) vs jtgpt.reference.layer_norm and
rms_norm, under jax.jit, on random inputs. Each test runs for both norms: one pair of kernels."""
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import conftest
from conftest import assert_close, shapes
from jtgpt import reference
from jtgpt.call import compile_only
from jtgpt.kernels import layernorm
from jtgpt.kernels.layernorm import layer_norm, layer_norm_forward, rms_norm

DTYPES = [jnp.float32, jnp.float16, jnp.bfloat16]


class Norm(NamedTuple):
    kernel: Callable  # (x, *params, eps=..., return_input=...)
    reference: Callable  # (x, *params, eps=...)
    n_params: int  # weight and bias, or weight only


NORMS = {"layer_norm": Norm(layer_norm, reference.layer_norm, 2),
         "rms_norm": Norm(rms_norm, reference.rms_norm, 1)}
each_norm = pytest.mark.parametrize("norm", NORMS)

# D not a power of two (masked columns), odd row counts (a partial last block of rows), 3-D input,
# a power-of-two D (no column mask), GPT-2's 768 (several rows a program, more than one program).
SHAPES = shapes(small=[(37, 100), (3, 5, 48), (7, 64), (9, 768)],
                large=[(4096, 768), (2, 1023, 1600), (3, 8192)])


def _inputs(key, norm, shape, dtype, param_dtype=None):
    """x and the norm's parameters (weight, bias) or (weight,)."""
    kx, kw, kb = jax.random.split(key, 3)
    d = shape[-1]
    # A mean far from zero with a modest spread: what a one-pass E[x^2] - E[x]^2 would get wrong.
    x = (3.0 + 2.0 * jax.random.normal(kx, shape)).astype(dtype)
    weight = (1.0 + 0.5 * jax.random.normal(kw, (d,))).astype(param_dtype or dtype)
    bias = (0.5 * jax.random.normal(kb, (d,))).astype(param_dtype or dtype)
    return x, (weight, bias)[:NORMS[norm].n_params]


@each_norm
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_norm_matches_reference(key, norm, shape, dtype):
    x, params = _inputs(key, norm, shape, dtype)
    y = jax.jit(NORMS[norm].kernel)(x, *params)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert_close(y, NORMS[norm].reference(x, *params))


@each_norm
def test_norm_uses_eps(key, norm):
    """A large eps, so a dropped or misplaced eps shows."""
    x, params = _inputs(key, norm, (5, 100), jnp.float32)
    y = jax.jit(lambda *a: NORMS[norm].kernel(*a, eps=0.25))(x, *params)
    assert_close(y, NORMS[norm].reference(x, *params, eps=0.25))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_layer_norm_forward_stats(key, dtype):
    shape, eps = (2, 13, 100), 0.25
    x, (weight, bias) = _inputs(key, "layer_norm", shape, dtype)
    y, mean, rstd = jax.jit(lambda *a: layer_norm_forward(*a, eps=eps))(x, weight, bias)
    x32 = np.asarray(x, np.float64).reshape(-1, shape[-1])
    assert mean.shape == rstd.shape == (26,) and mean.dtype == rstd.dtype == jnp.float32
    assert_close(mean, x32.mean(-1), jnp.float32)
    assert_close(rstd, 1.0 / np.sqrt(x32.var(-1) + eps), jnp.float32)
    assert_close(y, reference.layer_norm(x, weight, bias, eps=eps))


@each_norm
def test_norm_fp32_params_bf16_activations(key, norm):
    x, params = _inputs(key, norm, (11, 48), jnp.bfloat16, param_dtype=jnp.float32)
    y = jax.jit(NORMS[norm].kernel)(x, *params)
    assert y.dtype == jnp.bfloat16
    assert_close(y, NORMS[norm].reference(x, *params))


_REJECTED = [  # x shape, x dtype, weight shape, weight dtype, bias shape, eps, the argument named
    ((4, 48), jnp.float32, (47,), jnp.float32, (48,), 1e-5, "weight"),
    ((4, 48), jnp.float32, (48,), jnp.float32, (1, 48), 1e-5, "bias"),
    ((4, 48), jnp.int32, (48,), jnp.float32, (48,), 1e-5, "x"),
    ((4, 48), jnp.float32, (48,), jnp.int32, (48,), 1e-5, "weight"),
    ((), jnp.float32, (1,), jnp.float32, (1,), 1e-5, "x"),
    ((1, 16385), jnp.float32, (16385,), jnp.float32, (16385,), 1e-5, "x's last axis"),
    ((4, 48), jnp.float32, (48,), jnp.float32, (48,), -1.0, "eps"),
]


@pytest.mark.parametrize("norm, x_shape, x_dtype, w_shape, w_dtype, b_shape, eps, arg",
                         [(n, *case) for n in NORMS for case in _REJECTED
                          if NORMS[n].n_params == 2 or case[-1] != "bias"])
def test_norm_rejects(norm, x_shape, x_dtype, w_shape, w_dtype, b_shape, eps, arg):
    x = jnp.ones(x_shape, x_dtype)
    params = (jnp.ones(w_shape, w_dtype), jnp.ones(b_shape, jnp.float32))[:NORMS[norm].n_params]
    with pytest.raises(ValueError, match=arg):
        NORMS[norm].kernel(x, *params, eps=eps)


# ----------------------------------------------------------------------------------- backward

# As SHAPES, plus no rows at all, and a row wider than MAX_FUSED_D (the two-launch backward).
GRAD_SHAPES = shapes(small=[(37, 100), (3, 5, 48), (7, 64), (9, 768), (0, 48), (3, 9000)],
                     large=[(16384, 768), (2, 1023, 1600), (3, 8192), (1000, 16384)])


def _grads(f, x, params, dy):
    """The gradients wrt (x, *params) of f at (x, *params) for the cotangent dy, under jax.jit."""
    return jax.jit(lambda x, params, dy: jax.vjp(f, x, *params)[1](dy))(x, params, dy)


def _check_grads(key, norm, shape, dtype, param_dtype=None):
    kin, kdy = jax.random.split(key)
    x, params = _inputs(kin, norm, shape, dtype, param_dtype)
    dy = jax.random.normal(kdy, shape).astype(dtype)
    got = _grads(NORMS[norm].kernel, x, params, dy)
    expected = _grads(NORMS[norm].reference, x, params, dy)
    for name, g, e, primal in zip(("dx", "dweight", "dbias"), got, expected, (x, *params)):
        assert g.shape == primal.shape and g.dtype == primal.dtype, name
        # RMSNorm's dweight sums dy * x_hat with x_hat rounded to x's dtype (what the forward
        # multiplied the weight by): where the kernel's rsqrt and XLA's differ in the last bit,
        # that rounding can land one ulp of x's dtype apart, so fp32 weights of 16-bit x are held
        # to x's dtype's tolerance (seen on an H200: 1.5e-3 at bf16).
        rounded = norm == "rms_norm" and name == "dweight"
        assert_close(g, e, dtype=x.dtype if rounded else None, what=name)


@each_norm
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("shape", GRAD_SHAPES, ids=str)
def test_norm_grad_matches_reference(key, norm, shape, dtype):
    _check_grads(key, norm, shape, dtype)


@each_norm
def test_norm_grad_fp32_params_bf16_activations(key, norm):
    """dx comes back in bf16, the parameters' gradients in their fp32."""
    _check_grads(key, norm, (11, 48), jnp.bfloat16, param_dtype=jnp.float32)


@each_norm
def test_norm_grad_sums_chunks_of_tiles(key, norm, monkeypatch):
    """Each program sums several row tiles when rows outnumber PARTIALS tiles (at GPU sizes)."""
    # (45, 300): tiles of 8 rows (BLOCK_D 512), 6 tiles; PARTIALS=4 makes 3 programs of 2 tiles
    # each, the last one ragged (rows 32..44).
    monkeypatch.setattr(layernorm, "PARTIALS", 4)
    _check_grads(key, norm, (45, 300), jnp.float32)


@each_norm
def test_norm_grad_is_deterministic(key, norm):
    shape = (4096, 768) if conftest.LARGE else (45, 300)
    kin, kdy = jax.random.split(key)
    x, params = _inputs(kin, norm, shape, jnp.bfloat16)
    dy = jax.random.normal(kdy, shape).astype(jnp.bfloat16)
    first, second = (_grads(NORMS[norm].kernel, x, params, dy) for _ in range(2))
    for a, b in zip(first, second):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@each_norm
def test_norm_grad_has_no_xla_dot(key, norm):
    x, params = _inputs(key, norm, (9, 48), jnp.float32)
    loss = lambda *a: NORMS[norm].kernel(*a).sum()  # noqa: E731
    jaxpr = str(jax.make_jaxpr(jax.grad(loss, argnums=tuple(range(1 + len(params)))))(x, *params))
    assert "_layer_norm_bwd_kernel" in jaxpr or "pure_callback" in jaxpr
    assert "dot_general" not in jaxpr


# ------------------------------------------------------------------------------- return_input

@each_norm
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_norm_return_input_returns_x(key, norm, dtype):
    x, params = _inputs(key, norm, (3, 5, 48), dtype)
    y, x_out = jax.jit(lambda *a: NORMS[norm].kernel(*a, return_input=True))(x, *params)
    assert x_out.dtype == x.dtype
    np.testing.assert_array_equal(np.asarray(x_out), np.asarray(x))
    y_alone = jax.jit(NORMS[norm].kernel)(x, *params)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_alone))


# Which outputs the loss reads: both; only the returned input (the normed output's cotangent is
# JAX's instantiated zeros, so dx is the residual's cotangent alone: the kernel must add it); only
# the normed output (the residual's cotangent is zeros).
USES = {"both": (True, True), "input only": (False, True), "normed only": (True, False)}


@each_norm
@pytest.mark.parametrize("uses, dtype, shape", [
    *(("both", dtype, (37, 100)) for dtype in DTYPES), ("both", jnp.float32, (3, 9000)),
    ("input only", jnp.bfloat16, (37, 100)), ("normed only", jnp.bfloat16, (37, 100))],
    ids=lambda v: getattr(v, "__name__", str(v)))
def test_norm_return_input_grad(key, norm, uses, dtype, shape):
    """sum(a * tanh(y)) + sum(b * x_out) differentiated through the kernel, against jax.grad of
    the same function of the reference's (y, x): the residual's gradient b joins dx in the
    backward kernel (the (3, 9000) rows: in the two-launch backward's dx launch)."""
    use_y, use_x = USES[uses]
    kin, ka, kb = jax.random.split(key, 3)
    x, params = _inputs(kin, norm, shape, dtype)
    a, b = jax.random.normal(ka, shape), jax.random.normal(kb, shape)

    def loss(norm_fn, x, *params):
        y, x_out = norm_fn(x, *params)
        return (use_y * jnp.sum(a * jnp.tanh(y.astype(jnp.float32)))
                + use_x * jnp.sum(b * x_out.astype(jnp.float32)))

    argnums = tuple(range(1, 2 + len(params)))
    kernel = lambda *a: NORMS[norm].kernel(*a, return_input=True)  # noqa: E731
    composition = lambda x, *p: (NORMS[norm].reference(x, *p), x)  # noqa: E731
    got = jax.jit(jax.grad(loss, argnums), static_argnums=0)(kernel, x, *params)
    expected = jax.jit(jax.grad(loss, argnums), static_argnums=0)(composition, x, *params)
    for name, g, e, primal in zip(("dx", "dweight", "dbias"), got, expected, (x, *params)):
        assert g.shape == primal.shape and g.dtype == primal.dtype, name
        if use_y:
            assert_close(g, e, what=name)
        else:  # dx is b rounded to x's dtype, the parameters' gradients are exactly 0
            np.testing.assert_array_equal(np.asarray(g), np.asarray(e), err_msg=name)


# ---------------------------------------------------------------------------------- sm_90 build

# The fp32 LayerNorm backward at D=8192 with dres spills two loop-invariant pointers (16 bytes,
# see MAX_FUSED_D); nothing else may spill.
_SPILL_BYTES = {("layer_norm", (2048, 8192), "float32", True): 16}


@pytest.mark.parametrize("return_input", [False, True], ids=["", "return_input"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=lambda d: d.__name__)
@pytest.mark.parametrize("norm, shape, launches", [
    ("layer_norm", (16384, 768), 1), ("layer_norm", (2048, 8192), 1),
    ("layer_norm", (1024, 16384), 2),
    ("rms_norm", (8192, 2048), 1), ("rms_norm", (2048, 4096), 1), ("rms_norm", (1024, 16384), 2),
], ids=str)
def test_norm_backward_builds_for_hopper(norm, shape, launches, dtype, return_input):
    """The backward kernels (fused, and the wide-row pair) fit an H100 without spilling."""
    x = jax.ShapeDtypeStruct(shape, dtype)
    params = (jax.ShapeDtypeStruct(shape[-1:], dtype),) * NORMS[norm].n_params

    def loss(*args):
        out = NORMS[norm].kernel(*args, return_input=return_input)
        return sum(o.astype(jnp.float32).sum() for o in (out if return_input else (out,)))

    with compile_only(capability=90) as built:
        jax.eval_shape(jax.grad(loss, argnums=tuple(range(1 + len(params)))), x, *params)
    backward = [k for k in built if k.name == "_layer_norm_bwd_kernel"]
    assert len(backward) == launches
    assert [k.constexprs["RESIDUAL"] for k in backward] == [return_input] + [False] * (launches - 1)
    spill = _SPILL_BYTES.get((norm, shape, jnp.dtype(dtype).name, return_input), 0)
    for k in backward:
        assert 0 < k.registers <= 255 and k.spill_bytes <= spill and k.shared_bytes <= 227 * 1024, k
