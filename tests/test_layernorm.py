"""LayerNorm kernels (forward and backward) vs jtgpt.reference.layer_norm, under jax.jit, on random
inputs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import conftest
from conftest import assert_close, shapes
from jtgpt import reference
from jtgpt.call import compile_only
from jtgpt.kernels import layernorm
from jtgpt.kernels.layernorm import layer_norm, layer_norm_forward

DTYPES = [jnp.float32, jnp.float16, jnp.bfloat16]

# D not a power of two (masked columns), odd row counts (a partial last block of rows), 3-D input,
# a power-of-two D (no column mask), GPT-2's 768 (several rows a program, more than one program).
SHAPES = shapes(small=[(37, 100), (3, 5, 48), (7, 64), (9, 768)],
                large=[(4096, 768), (2, 1023, 1600), (3, 8192)])


def _inputs(key, shape, dtype, param_dtype=None):
    kx, kw, kb = jax.random.split(key, 3)
    d = shape[-1]
    # A mean far from zero with a modest spread: what a one-pass E[x^2] - E[x]^2 would get wrong.
    x = (3.0 + 2.0 * jax.random.normal(kx, shape)).astype(dtype)
    weight = (1.0 + 0.5 * jax.random.normal(kw, (d,))).astype(param_dtype or dtype)
    bias = (0.5 * jax.random.normal(kb, (d,))).astype(param_dtype or dtype)
    return x, weight, bias


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_layer_norm_matches_reference(key, shape, dtype):
    x, weight, bias = _inputs(key, shape, dtype)
    y = jax.jit(layer_norm)(x, weight, bias)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert_close(y, reference.layer_norm(x, weight, bias))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_layer_norm_forward_stats(key, dtype):
    shape, eps = (2, 13, 100), 0.25  # a large eps, so a dropped or misplaced eps shows
    x, weight, bias = _inputs(key, shape, dtype)
    y, mean, rstd = jax.jit(lambda *a: layer_norm_forward(*a, eps=eps))(x, weight, bias)
    x32 = np.asarray(x, np.float64).reshape(-1, shape[-1])
    assert mean.shape == rstd.shape == (26,) and mean.dtype == rstd.dtype == jnp.float32
    assert_close(mean, x32.mean(-1), jnp.float32)
    assert_close(rstd, 1.0 / np.sqrt(x32.var(-1) + eps), jnp.float32)
    assert_close(y, reference.layer_norm(x, weight, bias, eps=eps))


def test_layer_norm_fp32_params_bf16_activations(key):
    x, weight, bias = _inputs(key, (11, 48), jnp.bfloat16, param_dtype=jnp.float32)
    y = jax.jit(layer_norm)(x, weight, bias)
    assert y.dtype == jnp.bfloat16
    assert_close(y, reference.layer_norm(x, weight, bias))


@pytest.mark.parametrize("x_shape, x_dtype, w_shape, w_dtype, b_shape, eps, arg", [
    ((4, 48), jnp.float32, (47,), jnp.float32, (48,), 1e-5, "weight"),
    ((4, 48), jnp.float32, (48,), jnp.float32, (1, 48), 1e-5, "bias"),
    ((4, 48), jnp.int32, (48,), jnp.float32, (48,), 1e-5, "x"),
    ((4, 48), jnp.float32, (48,), jnp.int32, (48,), 1e-5, "weight"),
    ((), jnp.float32, (1,), jnp.float32, (1,), 1e-5, "x"),
    ((1, 16385), jnp.float32, (16385,), jnp.float32, (16385,), 1e-5, "x's last axis"),
    ((4, 48), jnp.float32, (48,), jnp.float32, (48,), -1.0, "eps"),
])
def test_layer_norm_rejects(x_shape, x_dtype, w_shape, w_dtype, b_shape, eps, arg):
    x = jnp.ones(x_shape, x_dtype)
    weight, bias = jnp.ones(w_shape, w_dtype), jnp.ones(b_shape, jnp.float32)
    with pytest.raises(ValueError, match=arg):
        layer_norm(x, weight, bias, eps=eps)


# ----------------------------------------------------------------------------------- backward

# As SHAPES, plus no rows at all, and a row wider than MAX_FUSED_D (the two-launch backward).
GRAD_SHAPES = shapes(small=[(37, 100), (3, 5, 48), (7, 64), (9, 768), (0, 48), (3, 9000)],
                     large=[(16384, 768), (2, 1023, 1600), (3, 8192), (1000, 16384)])


def _grads(f, x, weight, bias, dy):
    """(dx, dweight, dbias) of f at (x, weight, bias) for the cotangent dy, under jax.jit."""
    return jax.jit(lambda *a: jax.vjp(f, *a[:3])[1](a[3]))(x, weight, bias, dy)


def _check_grads(key, shape, dtype, param_dtype=None):
    kin, kdy = jax.random.split(key)
    x, weight, bias = _inputs(kin, shape, dtype, param_dtype)
    dy = jax.random.normal(kdy, shape).astype(dtype)
    got = _grads(layer_norm, x, weight, bias, dy)
    expected = _grads(reference.layer_norm, x, weight, bias, dy)
    for name, g, e, primal in zip(("dx", "dweight", "dbias"), got, expected, (x, weight, bias)):
        assert g.shape == primal.shape and g.dtype == primal.dtype, name
        assert_close(g, e)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("shape", GRAD_SHAPES, ids=str)
def test_layer_norm_grad_matches_reference(key, shape, dtype):
    _check_grads(key, shape, dtype)


def test_layer_norm_grad_fp32_params_bf16_activations(key):
    """dx comes back in bf16, dweight and dbias in the parameters' fp32."""
    _check_grads(key, (11, 48), jnp.bfloat16, param_dtype=jnp.float32)


def test_layer_norm_grad_sums_chunks_of_tiles(key, monkeypatch):
    """Each program sums several row tiles when rows outnumber PARTIALS tiles (at GPU sizes)."""
    # (45, 300): tiles of 8 rows (BLOCK_D 512), 6 tiles; PARTIALS=4 makes 3 programs of 2 tiles
    # each, the last one ragged (rows 32..44).
    monkeypatch.setattr(layernorm, "PARTIALS", 4)
    _check_grads(key, (45, 300), jnp.float32)


def test_layer_norm_grad_is_deterministic(key):
    shape = (4096, 768) if conftest.LARGE else (45, 300)
    kin, kdy = jax.random.split(key)
    x, weight, bias = _inputs(kin, shape, jnp.bfloat16)
    dy = jax.random.normal(kdy, shape).astype(jnp.bfloat16)
    first, second = (_grads(layer_norm, x, weight, bias, dy) for _ in range(2))
    for a, b in zip(first, second):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_layer_norm_grad_has_no_xla_dot(key):
    x, weight, bias = _inputs(key, (9, 48), jnp.float32)
    loss = lambda *a: layer_norm(*a).sum()  # noqa: E731
    jaxpr = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(x, weight, bias))
    assert "_layer_norm_bwd_kernel" in jaxpr or "pure_callback" in jaxpr
    assert "dot_general" not in jaxpr


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=lambda d: d.__name__)
@pytest.mark.parametrize("shape, launches", [((16384, 768), 1), ((2048, 8192), 1),
                                             ((1024, 16384), 2)], ids=str)
def test_layer_norm_backward_builds_for_hopper(shape, launches, dtype):
    """The backward kernels (fused, and the wide-row pair) fit an H100 without spilling."""
    x = jax.ShapeDtypeStruct(shape, dtype)
    param = jax.ShapeDtypeStruct(shape[-1:], dtype)
    loss = lambda *a: layer_norm(*a).astype(jnp.float32).sum()  # noqa: E731
    with compile_only(capability=90) as built:
        jax.eval_shape(jax.grad(loss, argnums=(0, 1, 2)), x, param, param)
    backward = [k for k in built if k.name == "_layer_norm_bwd_kernel"]
    assert len(backward) == launches
    for k in backward:
        assert 0 < k.registers <= 255 and k.spill_bytes == 0 and k.shared_bytes <= 227 * 1024, k
