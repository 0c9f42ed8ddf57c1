"""LayerNorm kernel vs jtgpt.reference.layer_norm, under jax.jit, on random inputs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_close, shapes
from jtgpt import reference
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
