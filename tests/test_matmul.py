"""The fused-epilogue GEMM against reference.linear: dtypes, odd shapes, every epilogue."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close, shapes

from jtgpt import reference
from jtgpt.kernels.matmul import linear

DTYPES = [jnp.float32, jnp.float16, jnp.bfloat16]
# (leading dims, K, N): none a multiple of the interpreter's 64x64x32 tiles.
SHAPES = shapes([((37,), 48, 72), ((2, 19), 80, 33)],
                [((4, 300), 768, 2304), ((1000,), 3072, 768), ((333,), 768, 50257)])


def _inputs(key, lead, K, N, dtype):
    kx, kw, kb, kr = jax.random.split(key, 4)
    x = jax.random.normal(kx, (*lead, K), jnp.float32).astype(dtype)
    w = (jax.random.normal(kw, (K, N), jnp.float32) / np.sqrt(K)).astype(dtype)
    bias = jax.random.normal(kb, (N,), jnp.float32).astype(dtype)
    residual = jax.random.normal(kr, (*lead, N), jnp.float32).astype(dtype)
    return x, w, bias, residual


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,K,N", SHAPES)
@pytest.mark.parametrize("epilogue", ["plain", "bias_gelu", "bias_residual"])
def test_linear_matches_reference(key, dtype, lead, K, N, epilogue):
    x, w, bias, residual = _inputs(key, lead, K, N, dtype)
    kwargs = {"plain": {}, "bias_gelu": dict(bias=bias, activation="gelu_tanh"),
              "bias_residual": dict(bias=bias, residual=residual)}[epilogue]
    out = jax.jit(lambda x, w: linear(x, w, **kwargs))(x, w)
    assert out.dtype == dtype
    assert_close(out, reference.linear(x, w, **kwargs))


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_transposed_weight(key, dtype):
    """The tied LM head: x @ wte.T read from wte [V, D] as stored."""
    x, w, _, _ = _inputs(key, (2, 21), 40, 70, dtype)
    wte = w.T  # [V, D]
    out = jax.jit(lambda x, wte: linear(x, wte, transpose_w=True))(x, wte)
    assert_close(out, reference.linear(x, wte, transpose_w=True))


def test_linear_tf32_is_an_option(key):
    x, w, bias, _ = _inputs(key, (33,), 48, 40, jnp.float32)
    out = linear(x, w, bias, precision="tf32")
    assert_close(out, reference.linear(x, w, bias), rtol=2e-3)  # tf32: 10-bit mantissa


def test_linear_dropout_statistics(key):
    x, w, bias, residual = _inputs(key, (64,), 32, 96, jnp.float32)
    p = 0.25
    seed = jnp.int32(1234)
    out = linear(x, w, bias, residual=residual, dropout_rate=p, seed=seed)
    again = linear(x, w, bias, residual=residual, dropout_rate=p, seed=seed)
    other = linear(x, w, bias, residual=residual, dropout_rate=p, seed=jnp.int32(99))
    np.testing.assert_array_equal(out, again)
    assert not np.array_equal(out, other)
    branch = np.asarray(out - residual)
    full = np.asarray(reference.linear(x, w, bias))
    dropped = np.abs(branch) < 1e-6
    n = dropped.size
    assert abs(dropped.mean() - p) < 5 * np.sqrt(p * (1 - p) / n)
    np.testing.assert_allclose(branch[~dropped], full[~dropped] / (1 - p), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("call,match", [
    (lambda x, w: linear(x[0], w), "x must be"),
    (lambda x, w: linear(x.astype(jnp.int32), w), "x dtype"),
    (lambda x, w: linear(x, w.astype(jnp.bfloat16)), "w must be a 2-D"),
    (lambda x, w: linear(x, w.T), "K=8"),
    (lambda x, w: linear(x, w, jnp.zeros((5,))), "bias must have shape"),
    (lambda x, w: linear(x, w, residual=jnp.zeros((3, 5))), "residual must have shape"),
    (lambda x, w: linear(x, w, activation="relu"), "activation"),
    (lambda x, w: linear(x, w, dropout_rate=1.0, seed=jnp.int32(0)), "dropout_rate"),
    (lambda x, w: linear(x, w, dropout_rate=0.1), "seed"),
    (lambda x, w: linear(x, w, precision="bf16"), "precision"),
])
def test_linear_rejects_bad_input(call, match):
    x = jnp.ones((3, 8))
    w = jnp.ones((8, 6))
    with pytest.raises(ValueError, match=match):
        call(x, w)
