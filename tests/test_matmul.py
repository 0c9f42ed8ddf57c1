"""The GEMM (matmul, and linear with its fused epilogue) and its gradients against the references:
dtypes, odd shapes, transposed operands, every epilogue, split-K, and the sm_90 build."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TOLERANCE, assert_close, shapes

from jtgpt import reference
from jtgpt.kernels import matmul as matmul_module
from jtgpt.kernels.matmul import linear, matmul

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


# ------------------------------------------------------------------------------------- matmul

# (M, K, N): none a multiple of the interpreter's 64x64x32 tiles.
MATMUL_SHAPES = shapes([(37, 45, 70)], [(16384, 768, 3072), (1000, 50257, 768)])
TRANSPOSES = [(False, False), (False, True), (True, False), (True, True)]


def _operands(key, M, K, N, dtype, transpose_a, transpose_b):
    ka, kb = jax.random.split(key)
    a = jax.random.normal(ka, (K, M) if transpose_a else (M, K), jnp.float32)
    b = jax.random.normal(kb, (N, K) if transpose_b else (K, N), jnp.float32) / np.sqrt(K)
    return a.astype(dtype), b.astype(dtype)


def _reference_matmul(a, b, transpose_a, transpose_b, out_dtype=None):
    """a @ b in fp32 (reference.linear), cast to out_dtype (default a.dtype)."""
    out = reference.linear((a.T if transpose_a else a).astype(jnp.float32), b, transpose_w=transpose_b)
    return out.astype(out_dtype or a.dtype)


def _check_vjp(key, ours, ref, *args, rtol=None):
    """Output and every input's gradient (random cotangent) of `ours` (jitted) against `ref`."""
    out, vjp = jax.vjp(jax.jit(ours), *args)
    ref_out, ref_vjp = jax.vjp(ref, *args)
    assert out.dtype == ref_out.dtype
    assert_close(out, ref_out, rtol=rtol)
    cotangent = jax.random.normal(key, out.shape, jnp.float32).astype(out.dtype)
    for name, grad, ref_grad in zip("abcdefgh", vjp(cotangent), ref_vjp(cotangent)):
        assert grad.dtype == ref_grad.dtype, name
        assert_close(grad, ref_grad, rtol=rtol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transpose_a,transpose_b", TRANSPOSES)
@pytest.mark.parametrize("M,K,N", MATMUL_SHAPES)
def test_matmul_and_grads_match_reference(key, dtype, transpose_a, transpose_b, M, K, N):
    a, b = _operands(key, M, K, N, dtype, transpose_a, transpose_b)
    _check_vjp(jax.random.fold_in(key, 1),
               lambda a, b: matmul(a, b, transpose_a=transpose_a, transpose_b=transpose_b),
               lambda a, b: _reference_matmul(a, b, transpose_a, transpose_b), a, b)


@pytest.mark.parametrize("transpose_a,transpose_b", [(False, True), (True, False)])
def test_matmul_fp32_output_from_bf16(key, transpose_a, transpose_b):
    """The fp32 accumulation comes out unrounded: fp32 tolerance against fp32 math on the same
    bf16 inputs (a bf16 output would be off by ~4e-3). Its fp32 cotangent gives bf16 gradients."""
    a, b = _operands(key, 37, 45, 70, jnp.bfloat16, transpose_a, transpose_b)
    f = lambda a, b: matmul(a, b, transpose_a=transpose_a, transpose_b=transpose_b,
                            out_dtype=jnp.float32)
    out = jax.jit(f)(a, b)
    assert out.dtype == jnp.float32
    assert_close(out, _reference_matmul(a, b, transpose_a, transpose_b, jnp.float32))
    _check_vjp(jax.random.fold_in(key, 1), f,
               lambda a, b: _reference_matmul(a, b, transpose_a, transpose_b, jnp.float32), a, b,
               rtol=TOLERANCE["bfloat16"])


@pytest.mark.parametrize("dtype,transpose_a,transpose_b", [(jnp.float32, True, False),
                                                           (jnp.bfloat16, False, True)])
def test_matmul_split_k(key, monkeypatch, dtype, transpose_a, transpose_b):
    """Forced to 3 slices of K: the forward's K=150 (5 tiles of 32) and both gradients' reductions
    (70 and 37 long) run split, the last slice partial, into fp32 partials summed in XLA."""
    asked = []
    monkeypatch.setattr(matmul_module, "_split_k", lambda M, N, K, cfg: asked.append(K) or 3)
    a, b = _operands(key, 37, 150, 70, dtype, transpose_a, transpose_b)
    _check_vjp(jax.random.fold_in(key, 1),
               lambda a, b: matmul(a, b, transpose_a=transpose_a, transpose_b=transpose_b),
               lambda a, b: _reference_matmul(a, b, transpose_a, transpose_b), a, b)
    assert set(asked) == {37, 70, 150}  # the forward's and both gradients' reductions


def test_split_k_fills_the_gpu_for_weight_gradients(monkeypatch):
    """The cost model splits a GPT-2 weight gradient (few output tiles, 16384-long reduction) and
    leaves a GEMM with many tiles whole."""
    monkeypatch.setattr(matmul_module, "on_gpu", lambda: True)
    cfg = matmul_module._block_config(768, 3072, 16384, jnp.bfloat16)  # dW of c_fc: 72 tiles
    assert matmul_module._split_k(768, 3072, 16384, cfg) > 1
    cfg = matmul_module._block_config(768, 768, 16384, jnp.bfloat16)  # dW of c_proj: 18 tiles
    assert matmul_module._split_k(768, 768, 16384, cfg) * 18 >= 100
    cfg = matmul_module._block_config(16384, 768, 3072, jnp.bfloat16)  # dx: 384 tiles
    assert matmul_module._split_k(16384, 768, 3072, cfg) == 1


@pytest.mark.parametrize("call,match", [
    (lambda a, b: matmul(a[0], b), "a must be a 2-D"),
    (lambda a, b: matmul(a.astype(jnp.int32), b), "a dtype"),
    (lambda a, b: matmul(a, b.astype(jnp.bfloat16)), "b must be a 2-D float32"),
    (lambda a, b: matmul(a, b, transpose_b=True), r"b must be \[N, K\] with K=8"),
    (lambda a, b: matmul(a, b, transpose_a=True), r"b must be \[K, N\] with K=3"),
    (lambda a, b: matmul(a, b, out_dtype=jnp.bfloat16), "out_dtype"),
    (lambda a, b: matmul(a, b, precision="bf16"), "precision"),
])
def test_matmul_rejects_bad_input(call, match):
    a = jnp.ones((3, 8))
    b = jnp.ones((8, 6))
    with pytest.raises(ValueError, match=match):
        call(a, b)
