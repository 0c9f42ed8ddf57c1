"""The GEMM (matmul, and linear with its fused epilogue) and its gradients against the references:
dtypes, odd shapes, transposed operands, every epilogue, split-K, and the sm_90 build."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TOLERANCE, assert_close, shapes

from jtgpt import reference
from jtgpt.call import compile_only
from jtgpt.kernels import matmul as matmul_module
from jtgpt.kernels.matmul import add_matmul, linear, matmul

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


# (leading dims, K, 2F, epilogue): F = 33 (2F = 66 crosses the interpreter's 64-column tile), then
# F = 70 (two tiles of F) with bias, residual and Hugging Face's [2F, K] w (gate_proj's rows, then
# up_proj's); K and the rows not multiples of the tiles either. Large: Llama-3.2-1B and 3.1-8B.
ALL_TRANSPOSED = dict(bias=True, residual=True, transpose_w=True)
SWIGLU_SHAPES = shapes([((2, 19), 45, 66, {}), ((37,), 48, 140, ALL_TRANSPOSED)],
                       [((4, 1000), 2048, 16384, dict(transpose_w=True)),
                        ((1000,), 4096, 28672, ALL_TRANSPOSED)])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,K,N,epilogue", SWIGLU_SHAPES)
def test_linear_swiglu_matches_reference(key, dtype, lead, K, N, epilogue):
    """silu(x @ W_gate + b_gate) * (x @ W_up + b_up) + residual from the packed w."""
    args, kwargs = _linear_case(key, lead, K, N, dtype, activation="swiglu", **epilogue)
    out = jax.jit(lambda args: linear(**args, **kwargs))(args)
    assert out.dtype == dtype and out.shape == (*lead, N // 2)
    assert_close(out, reference.linear(**args, **kwargs))


# fp32 on the tensor cores: (precision, tolerance). tf32 keeps a 10-bit mantissa; tf32x3 about
# fp32's accuracy, so fp32's tolerance (on the GPU a plain tf32 product would fail it).
TENSOR_CORE_FP32 = [("tf32x3", None), ("tf32", 2e-3)]


@pytest.mark.parametrize("precision,rtol", TENSOR_CORE_FP32)
def test_linear_tensor_core_fp32_is_an_option(key, precision, rtol):
    x, w, bias, _ = _inputs(key, (33,), 48, 40, jnp.float32)
    out = linear(x, w, bias, precision=precision)
    assert_close(out, reference.linear(x, w, bias), rtol=rtol)


@pytest.mark.parametrize("activation", [None, "swiglu"])
def test_linear_dropout_statistics(key, activation):
    """With SwiGLU the mask is drawn over the [M, F] output (w [32, 192] -> 96 columns)."""
    N = 96 if activation is None else 192
    x, w, bias, residual = _inputs(key, (64,), 32, N, jnp.float32)
    residual = residual[:, :96]
    p = 0.25
    seed = jnp.int32(1234)
    drop = functools.partial(linear, bias=bias, residual=residual, activation=activation,
                             dropout_rate=p)
    out = drop(x, w, seed=seed)
    again = drop(x, w, seed=seed)
    other = drop(x, w, seed=jnp.int32(99))
    np.testing.assert_array_equal(out, again)
    assert not np.array_equal(out, other)
    branch = np.asarray(out - residual)
    full = np.asarray(reference.linear(x, w, bias, activation=activation))
    dropped = np.abs(branch) < 1e-6
    n = dropped.size
    assert abs(dropped.mean() - p) < 5 * np.sqrt(p * (1 - p) / n)
    # Neighbouring columns (one Philox evaluation draws eight: two halves of each of four words)
    # are dropped independently.
    both = dropped[:, :-1] & dropped[:, 1:]
    assert abs(both.mean() - p * p) < 5 * np.sqrt(p * p * (1 - p * p) / both.size)
    np.testing.assert_allclose(branch[~dropped], full[~dropped] / (1 - p), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("call,match", [
    (lambda x, w: linear(x[0], w), "x must be"),
    (lambda x, w: linear(x.astype(jnp.int32), w), "x dtype"),
    (lambda x, w: linear(x, w.astype(jnp.bfloat16)), "w must be a 2-D"),
    (lambda x, w: linear(x, w.T), "K=8"),
    (lambda x, w: linear(x, w, jnp.zeros((5,))), "bias must have shape"),
    (lambda x, w: linear(x, w, residual=jnp.zeros((3, 5))), "residual must have shape"),
    (lambda x, w: linear(x, w, activation="relu"), "activation"),
    (lambda x, w: linear(x, w[:, :5], activation="swiglu"), r"w's N must be even .* N=5"),
    (lambda x, w: linear(x, w, jnp.zeros((3,)), activation="swiglu"),
     r"bias must have shape \(6,\)"),
    (lambda x, w: linear(x, w, residual=jnp.zeros((3, 6)), activation="swiglu"),
     r"residual must have shape \(3, 3\)"),
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


@pytest.mark.parametrize("precision,rtol", TENSOR_CORE_FP32)
@pytest.mark.parametrize("transpose_a,transpose_b", TRANSPOSES)
def test_matmul_tensor_core_fp32_and_grads_in_every_layout(key, transpose_a, transpose_b,
                                                           precision, rtol):
    """tf32 and tf32x3 products (operands made K-major first where they are not) and their
    gradients, each at its precision's tolerance."""
    a, b = _operands(key, 37, 45, 70, jnp.float32, transpose_a, transpose_b)
    _check_vjp(jax.random.fold_in(key, 1),
               lambda a, b: matmul(a, b, transpose_a=transpose_a, transpose_b=transpose_b,
                                   precision=precision),
               lambda a, b: _reference_matmul(a, b, transpose_a, transpose_b), a, b, rtol=rtol)


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


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("transpose_a,transpose_b", [(False, True), (True, False)])
def test_add_matmul_accumulates_into_acc(key, dtype, transpose_a, transpose_b):
    """Three products summed into one fp32 accumulator through add_matmul under jit, the
    accumulator donated (so written in place), equal the fp32 sum of the reference products."""
    ops = [_operands(jax.random.fold_in(key, i), 37, 45, 70, dtype, transpose_a, transpose_b)
           for i in range(3)]
    acc = jax.random.normal(jax.random.fold_in(key, 9), (37, 70), jnp.float32)
    expected = acc + sum(_reference_matmul(a, b, transpose_a, transpose_b, jnp.float32)
                         for a, b in ops)
    step = jax.jit(lambda acc, a, b: add_matmul(acc, a, b, transpose_a=transpose_a,
                                                transpose_b=transpose_b), donate_argnums=0)
    for a, b in ops:
        acc = step(acc, a, b)
    assert acc.dtype == jnp.float32
    assert_close(acc, expected, rtol=TOLERANCE["float32"] if dtype == jnp.float32 else 1e-5)


@pytest.mark.parametrize("call,match", [
    (lambda acc, a, b: add_matmul(acc.astype(jnp.bfloat16), a, b), "acc must be float32"),
    (lambda acc, a, b: add_matmul(acc, a, b.astype(jnp.bfloat16)), "one dtype"),
    (lambda acc, a, b: add_matmul(acc[:2], a, b), r"does not make acc's shape \[2, 6\]"),
    (lambda acc, a, b: add_matmul(acc, a, b, transpose_b=True), r"op\(b\) \[6, 8\]"),
    (lambda acc, a, b: add_matmul(acc, a, b, precision="bf16"), "precision"),
])
def test_add_matmul_rejects_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call(jnp.ones((3, 6)), jnp.ones((3, 8)), jnp.ones((8, 6)))


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


# ------------------------------------------------------------------------------ linear backward

# Each epilogue alone, then all together with the tied LM head's transposed weight; x is 3-D.
EPILOGUES = {"plain": {}, "bias": dict(bias=True), "gelu": dict(activation="gelu_tanh"),
             "residual": dict(residual=True),
             "all_transposed": dict(bias=True, activation="gelu_tanh", residual=True, transpose_w=True)}
GRAD_SHAPES = shapes([((2, 19), 45, 70)], [((4, 300), 768, 3072), ((2, 333), 768, 50257)])


def _linear_case(key, lead, K, N, dtype, bias=False, residual=False, transpose_w=False, **kwargs):
    """({name: differentiable input}, the other kwargs of linear and reference.linear)."""
    x, w, b, r = _inputs(key, lead, K, N, dtype)
    args = {"x": x, "w": w.T if transpose_w else w}
    if bias:
        args["bias"] = b
    if residual:
        args["residual"] = r[..., :N // 2] if kwargs.get("activation") == "swiglu" else r
    return args, dict(transpose_w=transpose_w, **kwargs)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("lead,K,N", GRAD_SHAPES)
def test_linear_grads_match_reference(key, dtype, epilogue, lead, K, N):
    args, kwargs = _linear_case(key, lead, K, N, dtype, **EPILOGUES[epilogue])
    names = list(args)
    call = lambda fn: lambda *a: fn(**dict(zip(names, a)), **kwargs)
    _check_vjp(jax.random.fold_in(key, 1), call(linear), call(reference.linear), *args.values())


# (leading dims, K, 2F, epilogue): F = 33 (the GEMMs over 2F = 66 cross a 64-column tile) with and
# without bias, then F = 70 (two tiles of F in the forward) with everything and Hugging Face's w.
SWIGLU_GRAD_CASES = shapes(
    [((2, 19), 45, 66, dict(bias=True)), ((2, 19), 45, 66, dict(residual=True, transpose_w=True)),
     ((37,), 48, 140, ALL_TRANSPOSED)],
    [((4, 1000), 2048, 16384, dict(transpose_w=True))])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("lead,K,N,epilogue", SWIGLU_GRAD_CASES)
def test_linear_swiglu_grads_match_reference(key, dtype, lead, K, N, epilogue):
    """dx, dw, dbias and d_residual through dz = [dy u silu'(g) | dy silu(g)] from the saved pre."""
    args, kwargs = _linear_case(key, lead, K, N, dtype, activation="swiglu", **epilogue)
    names = list(args)
    call = lambda fn: lambda *a: fn(**dict(zip(names, a)), **kwargs)
    _check_vjp(jax.random.fold_in(key, 1), call(linear), call(reference.linear), *args.values())


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("epilogue", ["dropout", "all", "swiglu_all"])
def test_linear_dropout_grads_use_the_forward_mask(key, dtype, epilogue):
    """The mask read off the forward (with residual=None an element is 0 exactly where dropped,
    every pre-dropout value being nonzero) applied to the reference must give our gradients: a
    backward that drew a different mask fails."""
    p, seed = 0.3, jnp.int32(7)
    extra = {"dropout": {}, "all": dict(bias=True, activation="gelu_tanh", residual=True),
             "swiglu_all": dict(bias=True, activation="swiglu", residual=True, transpose_w=True)}
    args, kwargs = _linear_case(key, (2, 19), 45, 70, dtype, **extra[epilogue])
    branch = {k: v for k, v in args.items() if k != "residual"}
    assert (np.asarray(linear(**branch, **kwargs)) != 0).all()
    keep = np.asarray(linear(**branch, **kwargs, dropout_rate=p, seed=seed)) != 0
    assert 0.5 < keep.mean() < 0.9

    def ref(x, w, bias=None, residual=None):
        y = reference.linear(x.astype(jnp.float32), w, bias, **kwargs)  # fp32 until the end
        y = jnp.where(keep, y / (1 - p), 0.0)
        return (y if residual is None else y + residual.astype(jnp.float32)).astype(dtype)

    names = list(args)
    _check_vjp(jax.random.fold_in(key, 1),
               lambda *a: linear(**dict(zip(names, a)), **kwargs, dropout_rate=p, seed=seed),
               lambda *a: ref(**dict(zip(names, a))), *args.values())


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_wide_tiles_finish_in_column_halves(key, dtype, monkeypatch):
    """The GPU's 128 x 256 tiles finish their dropout and residual in two column halves (the
    interpreter's tiles are narrower): forced here, the same dropout mask, output and add_matmul
    sum as the interpreter's tiles, with N = 300 a full tile and a partial one."""
    x, w, b, r = _inputs(key, (3, 50), 40, 300, dtype)
    acc = jax.random.normal(jax.random.fold_in(key, 1), (150, 300), jnp.float32)
    drop = dict(dropout_rate=0.3, seed=jnp.int32(9))

    def outputs():
        return (linear(x, w, b, residual=r, **drop), np.asarray(linear(x, w, b, **drop)) != 0,
                add_matmul(acc, x.reshape(150, 40), w))

    want = outputs()
    monkeypatch.setattr(matmul_module, "_block_config", lambda *a, **kw: dict(
        BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3))
    got = outputs()
    assert_close(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    assert 0.6 < got[1].mean() < 0.8
    assert_close(got[2], want[2], rtol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_persistent_programs_take_tiles_in_turn(key, dtype, monkeypatch):
    """Persistent programs (3 here, for the interpreter's 3 x 5 tiles of a [150, 300] output)
    give the outputs of one program a tile: linear with dropout and a residual (the same mask),
    GELU's gradients (its saved pre-activation among them) and add_matmul's sum."""
    x, w, b, r = _inputs(key, (3, 50), 40, 300, dtype)
    acc = jax.random.normal(jax.random.fold_in(key, 1), (150, 300), jnp.float32)
    drop = dict(dropout_rate=0.3, seed=jnp.int32(9))

    def loss(x, w, b, r):
        y = linear(x, w, b, activation="gelu_tanh", residual=r)
        return jnp.sum(y.astype(jnp.float32) * jnp.cos(y.astype(jnp.float32)))

    def outputs():
        return (linear(x, w, b, residual=r, **drop), add_matmul(acc, x.reshape(150, 40), w),
                jax.grad(loss, argnums=(0, 1, 2, 3))(x, w, b, r))

    chosen = matmul_module._block_config
    monkeypatch.setattr(matmul_module, "_block_config",
                        lambda *a, **kw: dict(chosen(*a, **kw), persistent=False))
    want = outputs()
    monkeypatch.setattr(matmul_module, "NUM_SMS", 3)
    monkeypatch.setattr(matmul_module, "_block_config",
                        lambda *a, **kw: dict(chosen(*a, **kw), persistent=True))
    got = outputs()
    assert_close(got[0], want[0])
    assert_close(got[1], want[1], rtol=1e-5)
    for g, w_ in zip(got[2], want[2]):
        assert_close(g, w_)


def test_linear_split_k_weight_gradient(key, monkeypatch):
    """dW and dx reduce in 3 slices of the token / feature axes (dz itself from the GELU kernel)."""
    monkeypatch.setattr(matmul_module, "_split_k", lambda M, N, K, cfg: 3)
    args, kwargs = _linear_case(key, (3, 37), 45, 70, jnp.float32, bias=True, activation="gelu_tanh")
    _check_vjp(jax.random.fold_in(key, 1), lambda x, w, bias: linear(x, w, bias, **kwargs),
               lambda x, w, bias: reference.linear(x, w, bias, **kwargs), *args.values())


def test_gradients_have_no_xla_dot(key):
    """The backward is Triton only: no dot_general in the jaxpr of either op's gradient."""
    x, w, bias, residual = _inputs(key, (2, 5), 8, 6, jnp.float32)

    def loss(x, w, bias, residual):
        y = linear(x, w, bias, residual=residual, activation="gelu_tanh", dropout_rate=0.1,
                   seed=jnp.int32(3))
        return matmul(y.reshape(10, 6), w, transpose_b=True, out_dtype=jnp.float32).sum()

    jaxpr = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2, 3)))(x, w, bias, residual))
    assert "dot_general" not in jaxpr
    assert "pure_callback" in jaxpr or "triton" in jaxpr  # the kernels are in it


def test_linear_grads_come_back_in_each_inputs_dtype(key):
    """An fp32 bias and residual with bf16 x and w: each gradient in its own input's dtype."""
    x, w, bias, residual = _inputs(key, (7,), 24, 20, jnp.bfloat16)
    grads = jax.grad(lambda *a: linear(a[0], a[1], a[2], residual=a[3]).astype(jnp.float32).sum(),
                     argnums=(0, 1, 2, 3))(x, w, bias.astype(jnp.float32), residual.astype(jnp.float32))
    assert [g.dtype for g in grads] == [jnp.bfloat16, jnp.bfloat16, jnp.float32, jnp.float32]
    assert_close(grads[2], jnp.full((20,), 7.0))  # d(sum)/dbias = number of rows
    assert_close(grads[3], jnp.ones((7, 20)))


# ---------------------------------------------------------------------------- degenerate sizes

@pytest.mark.parametrize("dtype,M,K,N", [(jnp.float32, 37, 0, 70), (jnp.bfloat16, 37, 0, 70),
                                         (jnp.float32, 0, 45, 70), (jnp.float32, 37, 45, 0),
                                         (jnp.float32, 0, 0, 0)])
def test_matmul_degenerate_sizes(key, dtype, M, K, N):
    """K = 0: the empty sum, 0, written by the kernel (its outputs start as NaN on CPU); M = 0 or
    N = 0: an empty result. The gradients are empty or reduce over a zero-length axis."""
    for transpose_a, transpose_b in [(False, False), (True, True)]:
        a, b = _operands(key, M, K, N, dtype, transpose_a, transpose_b)
        _check_vjp(jax.random.fold_in(key, 1),
                   lambda a, b: matmul(a, b, transpose_a=transpose_a, transpose_b=transpose_b),
                   lambda a, b: _reference_matmul(a, b, transpose_a, transpose_b), a, b)


@pytest.mark.parametrize("lead,K,N,activation", [
    ((3, 5), 0, 66, None), ((3, 5), 0, 66, "gelu_tanh"), ((3, 5), 0, 66, "swiglu"),
    ((2, 0), 45, 66, "gelu_tanh"), ((2, 0), 45, 66, "swiglu"), ((37,), 45, 0, None),
    ((37,), 45, 0, "swiglu")])
def test_linear_degenerate_sizes(key, lead, K, N, activation):
    """K = 0 gives act(bias) + residual through the epilogue, and dbias its gradient; no rows or no
    columns give empty results (dbias over no rows: 0). Every input's gradient checked."""
    args, kwargs = _linear_case(key, lead, K, N, jnp.float32, bias=True, residual=True,
                                activation=activation, transpose_w=K == 0)
    names = list(args)
    call = lambda fn: lambda *a: fn(**dict(zip(names, a)), **kwargs)
    _check_vjp(jax.random.fold_in(key, 1), call(linear), call(reference.linear), *args.values())


def test_empty_results_launch_no_kernel(key):
    """A grid of no programs is no valid GPU launch: M = 0 or N = 0 never reaches a kernel."""
    for fn, *operands in [(matmul, jnp.ones((0, 8)), jnp.ones((8, 6))),
                          (matmul, jnp.ones((5, 8)), jnp.ones((8, 0))),
                          (functools.partial(linear, activation="swiglu"), jnp.ones((2, 0, 8)),
                           jnp.ones((8, 6)))]:
        jaxpr = str(jax.make_jaxpr(fn)(*operands))
        assert "pure_callback" not in jaxpr and "triton" not in jaxpr, jaxpr


# ------------------------------------------------------------------ few rows: _gemv, norm prologue

# (leading dims, K, N): 1 and 4 rows (decode at batch 1-4) take _gemv_kernel; K and N not
# multiples of the interpreter's 32 x 64 tiles (70 columns: two tiles).
GEMV_SHAPES = [((1,), 45, 70), ((4,), 96, 33)]


def _built_kernels(fn, *args):
    with compile_only(capability=90) as built:
        jax.eval_shape(fn, *args)
    return list(built)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("lead,K,N", GEMV_SHAPES)
@pytest.mark.parametrize("epilogue", ["bias_gelu", "all_transposed", "swiglu_all"])
def test_few_rows_match_reference(key, dtype, lead, K, N, epilogue):
    kwargs = {"plain": {}, "bias_gelu": dict(bias=True, activation="gelu_tanh"),
              "all_transposed": EPILOGUES["all_transposed"],
              "swiglu_all": dict(ALL_TRANSPOSED, activation="swiglu")}[epilogue]
    args, kwargs = _linear_case(key, lead, K, 2 * N if epilogue == "swiglu_all" else N, dtype,
                                **kwargs)
    out = jax.jit(lambda args: linear(**args, **kwargs))(args)
    assert out.dtype == dtype
    assert_close(out, reference.linear(**args, **kwargs))


def test_few_rows_take_the_gemv_kernel():
    """At most GEMV_M rows run _gemv_kernel, more rows the tensor-core kernel; tf32 stays on the
    tensor cores (the GEMV's products are IEEE fp32)."""
    w = jax.ShapeDtypeStruct((768, 2304), jnp.bfloat16)
    for rows, name in [(1, "_gemv_kernel"), (matmul_module.GEMV_M, "_gemv_kernel"),
                       (matmul_module.GEMV_M + 1, "_matmul_kernel")]:
        x = jax.ShapeDtypeStruct((rows, 768), jnp.bfloat16)
        assert [k.name for k in _built_kernels(linear, x, w)] == [name]
    x32, w32 = jax.ShapeDtypeStruct((1, 768), jnp.float32), jax.ShapeDtypeStruct((768, 64), jnp.float32)
    tf32 = lambda x, w: linear(x, w, precision="tf32")  # noqa: E731
    assert [k.name for k in _built_kernels(tf32, x32, w32)] == ["_matmul_kernel"]


def _norm_case(key, kind, K, dtype):
    kw, kb = jax.random.split(key)
    weight = (1.0 + 0.1 * jax.random.normal(kw, (K,), jnp.float32)).astype(dtype)
    bias = (0.1 * jax.random.normal(kb, (K,), jnp.float32)).astype(dtype) if kind == "layer" else None
    return weight, bias


def _reference_norm(x, kind, weight, bias, eps):
    return (reference.layer_norm(x, weight, bias, eps) if kind == "layer"
            else reference.rms_norm(x, weight, eps))


@pytest.mark.parametrize("kind,lead,epilogue,dtype", [
    ("layer", (1,), "bias_gelu", jnp.float32), ("layer", (4,), "swiglu", jnp.bfloat16),
    ("layer", (2, 3), "residual_transposed", jnp.bfloat16),
    ("rms", (1,), "bias_gelu", jnp.bfloat16), ("rms", (4,), "swiglu", jnp.float32),
    ("rms", (2, 3), "residual_transposed", jnp.float32),
    ("layer", (3, 50), "residual_transposed", jnp.bfloat16), ("layer", (3, 50), "swiglu", jnp.float32),
    ("rms", (3, 50), "bias_gelu", jnp.float32), ("rms", (3, 50), "swiglu", jnp.bfloat16)])
def test_norm_prologue_matches_reference(key, dtype, kind, lead, epilogue):
    """linear(x, norm=...) = linear(norm(x)): inside the GEMV for 1 and 4 rows, the norm kernel
    then the GEMM for 6, in the GEMM's epilogue for 150 (more rows than w's 70 or 140 columns);
    x off-centre (mean 0.5, std 2) so that the mean matters."""
    K, N = 45, 70
    kwargs = {"bias_gelu": dict(bias=True, activation="gelu_tanh"),
              "swiglu": dict(ALL_TRANSPOSED, activation="swiglu"),
              "residual_transposed": dict(residual=True, transpose_w=True)}[epilogue]
    args, kwargs = _linear_case(key, lead, K, 2 * N if epilogue == "swiglu" else N, dtype, **kwargs)
    args["x"] = (0.5 + 2.0 * args["x"].astype(jnp.float32)).astype(dtype)
    weight, bias = _norm_case(jax.random.fold_in(key, 7), kind, K, dtype)
    norm = matmul_module.Norm(kind, weight, bias, 1e-5)
    out = jax.jit(lambda args, norm: linear(**args, **kwargs, norm=norm))(args, norm)
    normed = dict(args, x=_reference_norm(args["x"], kind, weight, bias, 1e-5))
    assert_close(out, reference.linear(**normed, **kwargs))


@pytest.mark.parametrize("kind,dtype", [("layer", jnp.float32), ("rms", jnp.bfloat16)])
def test_norm_prologue_grads_match_reference(key, dtype, kind):
    """Gradients of the fused form wrt x, the norm's weight (and bias), w, bias and residual."""
    K, N = 45, 70
    args, kwargs = _linear_case(key, (2,), K, N, dtype, bias=True, residual=True,
                                activation="gelu_tanh")
    weight, bias = _norm_case(jax.random.fold_in(key, 7), kind, K, dtype)
    names = list(args)

    def fused(norm_weight, norm_bias, *a):
        norm = matmul_module.Norm(kind, norm_weight, norm_bias, 1e-5)
        return linear(**dict(zip(names, a)), **kwargs, norm=norm)

    def ref(norm_weight, norm_bias, *a):
        a = dict(zip(names, a))
        return reference.linear(**dict(a, x=_reference_norm(a["x"], kind, norm_weight, norm_bias,
                                                             1e-5)), **kwargs)

    if kind == "rms":  # no bias to differentiate
        fused_rms, ref_rms = fused, ref
        fused = lambda w, *a: fused_rms(w, None, *a)  # noqa: E731
        ref = lambda w, *a: ref_rms(w, None, *a)  # noqa: E731
        _check_vjp(jax.random.fold_in(key, 1), fused, ref, weight, *args.values())
    else:
        _check_vjp(jax.random.fold_in(key, 1), fused, ref, weight, bias, *args.values())


def test_norm_prologue_writes_no_normed_rows():
    """Not differentiated, a norm before a GEMM of many rows is a statistics pass (no normed rows
    written) and the GEMM with the norm in its epilogue; at a decode batch's 64 rows (fewer than
    w's columns: folding the norm into w would cost more) and differentiated (the backward's dW
    needs norm(x)), the norm kernel writes norm(x) and the GEMM reads it."""
    x = jax.ShapeDtypeStruct((16384, 768), jnp.bfloat16)
    w, vec = jax.ShapeDtypeStruct((768, 2304), jnp.bfloat16), jax.ShapeDtypeStruct((768,), jnp.bfloat16)

    def normed(x, w, g, b):
        return linear(x, w, norm=matmul_module.Norm("layer", g, b, 1e-5))

    kernels = [(k.name, k.constexprs.get("WRITE_Y", k.constexprs.get("NORM")))
               for k in _built_kernels(normed, x, w, vec, vec)]
    assert kernels == [("_layer_norm_fwd_kernel", False), ("_matmul_kernel", 1)]
    batch = jax.ShapeDtypeStruct((64, 768), jnp.bfloat16)
    kernels = [(k.name, k.constexprs.get("WRITE_Y", k.constexprs.get("NORM")))
               for k in _built_kernels(normed, batch, w, vec, vec)]
    assert kernels == [("_layer_norm_fwd_kernel", True), ("_matmul_kernel", 0)]
    grad = jax.grad(lambda *a: normed(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2, 3))
    built = _built_kernels(grad, x, w, vec, vec)
    assert [(k.constexprs["WRITE_Y"]) for k in built if k.name == "_layer_norm_fwd_kernel"] == [True]
    assert {k.constexprs["NORM"] for k in built if k.name == "_matmul_kernel"} == {0}


def test_norm_epilogue_gemms_build_for_hopper():
    """The forward GEMMs that apply a norm in their epilogue, at GPT-2's and Llama-3.2-1B's
    shapes (32768 tokens, more than any of their weights' columns; bf16): no spills."""
    bf16 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)  # noqa: E731
    layer = matmul_module.Norm("layer", bf16(768), bf16(768), 1e-5)
    rms = matmul_module.Norm("rms", bf16(2048), None, 1e-5)
    calls = [(768, bf16(768, 2304), dict(bias=bf16(2304), norm=layer)),
             (768, bf16(768, 3072), dict(bias=bf16(3072), activation="gelu_tanh", norm=layer)),
             (2048, bf16(3072, 2048), dict(transpose_w=True, norm=rms)),
             (2048, bf16(16384, 2048), dict(transpose_w=True, activation="swiglu", norm=rms))]
    built = []
    for K, w, kwargs in calls:
        arrays = {k: v for k, v in kwargs.items() if k not in ("activation", "transpose_w")}
        static = {k: v for k, v in kwargs.items() if k in ("activation", "transpose_w")}
        built += [k for k in _built_kernels(lambda x, w, kw: linear(x, w, **kw, **static),
                                            bf16(32768, K), w, arrays) if k.name == "_matmul_kernel"]
    assert [k.constexprs["NORM"] for k in built] == [1, 1, 2, 2]
    for k in built:
        assert 0 < k.registers <= 255 and k.spill_bytes == 0, k


@pytest.mark.parametrize("norm,match", [
    (("batch", (45,), (45,)), "norm.kind"),
    (("layer", (44,), (45,)), r"norm.weight must have shape \(45,\)"),
    (("layer", (45,), None), "norm.bias must be"),
    (("rms", (45,), (45,)), "norm.bias must be None"),
])
def test_norm_prologue_rejects_bad_norms(norm, match):
    kind, weight, bias = norm
    norm = matmul_module.Norm(kind, jnp.ones(weight), None if bias is None else jnp.ones(bias), 1e-5)
    with pytest.raises(ValueError, match=match):
        linear(jnp.ones((1, 45)), jnp.ones((45, 8)), norm=norm)


# --------------------------------------------------------------------------------- sm_90 build

@pytest.mark.parametrize("dtype,precision", [(jnp.bfloat16, "ieee"), (jnp.float32, "ieee"),
                                             (jnp.float32, "tf32x3"), (jnp.float32, "tf32")])
def test_backward_builds_for_hopper(dtype, precision):
    """GPT-2's MLP (with dropout after the GELU too) and tied LM head, differentiated at 16384
    tokens: the forwards with dropout and with the saved pre-activation, the dz kernel, the dx
    GEMMs and the dW GEMMs (transposed A; split over K for the MLP, whole for the LM head's
    dz^T @ x). Every build fits an H100 SM; the bf16 builds do not spill."""
    sizes = dict(x=(16384, 768), w_fc=(768, 3072), b_fc=(3072,), w_proj=(3072, 768),
                 b_proj=(768,), wte=(50257, 768))
    params = {name: jax.ShapeDtypeStruct(size, dtype) for name, size in sizes.items()}
    x = params.pop("x")

    def loss(x, p):
        dropout = dict(dropout_rate=0.1, seed=jnp.int32(1), precision=precision)
        h = linear(x, p["w_fc"], p["b_fc"], activation="gelu_tanh", **dropout)
        y = linear(h, p["w_proj"], p["b_proj"], residual=x, **dropout)
        return linear(y, p["wte"], transpose_w=True, precision=precision).astype(jnp.float32).sum()

    jax.block_until_ready(linear(jnp.ones((3, 4)), jnp.ones((4, 5)), dropout_rate=0.5,
                                 seed=jnp.int32(1)))  # interpret tl.rand first (test_hopper_build)
    with compile_only(capability=90) as built:
        jax.eval_shape(jax.grad(loss, argnums=(0, 1)), x, params)
    built = list(built)
    assert {k.name for k in built} == {"_matmul_kernel", "_linear_dz_kernel"}
    gemms = [k.constexprs for k in built if k.name == "_matmul_kernel"]
    assert any(c["SAVE_PRE"] and c["DROPOUT_P"] for c in gemms)
    # The dW GEMMs read x^T in place; tf32(x3) makes such an operand K-major first (see _gemm).
    transposed_a = 1 if precision == "ieee" else sizes["x"][0]  # stride of [M, tokens]
    assert any(c["K_PER_SPLIT"] < c["K"] and c["stride_am"] == transposed_a
               for c in gemms)  # split dW
    assert any(c["M"] == 50257 for c in gemms)  # the LM head's dW
    for k in built:
        assert 0 < k.registers <= 255 and k.shared_bytes <= 227 * 1024, k
        assert dtype == jnp.float32 or k.spill_bytes == 0, k


@pytest.mark.parametrize("dtype,precision", [(jnp.bfloat16, "ieee"), (jnp.float32, "ieee"),
                                             (jnp.float32, "tf32x3"), (jnp.float32, "tf32")])
def test_swiglu_builds_for_hopper(dtype, precision):
    """Llama's gate/up GEMM at 8192 tokens with Hugging Face's [2F, K] weight, for Llama-3.2-1B
    (K = 2048, F = 8192) and Llama-3.1-8B (K = 4096, F = 14336): the forward without (inference)
    and with the saved pre-activation, the SwiGLU dz kernel, and the dx and dW GEMMs over 2F.
    None spills (the figures are in _block_config)."""
    built = []
    for K, F in [(2048, 8192), (4096, 14336)]:
        x, w = jax.ShapeDtypeStruct((8192, K), dtype), jax.ShapeDtypeStruct((2 * F, K), dtype)
        loss = lambda x, w: linear(x, w, activation="swiglu", transpose_w=True,  # noqa: E731
                                   precision=precision).astype(jnp.float32).sum()
        with compile_only(capability=90) as kernels:
            jax.eval_shape(loss, x, w)
            jax.eval_shape(jax.grad(loss, argnums=(0, 1)), x, w)
        kernels = list(kernels)
        kinds = {(k.name, k.constexprs["SWIGLU"], k.constexprs.get("SAVE_PRE"), k.constexprs["N"])
                 for k in kernels}
        assert kinds == {("_matmul_kernel", True, False, F), ("_matmul_kernel", True, True, F),
                         ("_linear_dz_kernel", True, None, F),
                         ("_matmul_kernel", False, False, K)}, kinds  # dx [M, K], dW [2F, K]
        assert len(kernels) == 5
        built += kernels
    for k in built:
        assert 0 < k.registers <= 255 and k.shared_bytes <= 227 * 1024, k
        assert k.spill_bytes == 0, k


def test_empty_reduction_builds_for_hopper():
    """K = 0 (a K loop of no steps, a zero stride) builds for sm_90, plain and with SwiGLU."""
    with compile_only(capability=90) as built:
        jax.eval_shape(lambda a, b: matmul(a, b), jax.ShapeDtypeStruct((300, 0), jnp.bfloat16),
                       jax.ShapeDtypeStruct((0, 500), jnp.bfloat16))
        jax.eval_shape(lambda x, w, b: linear(x, w, b, activation="swiglu", transpose_w=True),
                       jax.ShapeDtypeStruct((300, 0), jnp.bfloat16),
                       jax.ShapeDtypeStruct((1000, 0), jnp.bfloat16),
                       jax.ShapeDtypeStruct((1000,), jnp.bfloat16))
    built = list(built)
    assert [(k.constexprs["K"], k.constexprs["SWIGLU"]) for k in built] == [(0, False), (0, True)]
    for k in built:
        assert 0 < k.registers <= 255 and k.spill_bytes == 0, k


@pytest.mark.parametrize("rows", [1, 4])
def test_decode_gemvs_build_for_hopper(rows):
    """Every GEMV of a GPT-2 and a Llama-3.2-1B decode step (bf16), the norms fused, at 1 and
    4 rows: no spills."""
    bf16 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)  # noqa: E731
    layer = matmul_module.Norm("layer", bf16(768), bf16(768), 1e-5)
    rms = matmul_module.Norm("rms", bf16(2048), None, 1e-5)
    calls = [  # (x [rows, K], w, kwargs)
        (768, bf16(768, 2304), dict(bias=bf16(2304), norm=layer)),
        (768, bf16(768, 3072), dict(bias=bf16(3072), activation="gelu_tanh", norm=layer)),
        (3072, bf16(3072, 768), dict(bias=bf16(768), residual=bf16(rows, 768))),
        (2048, bf16(3072, 2048), dict(transpose_w=True, norm=rms)),
        (2048, bf16(16384, 2048), dict(transpose_w=True, activation="swiglu", norm=rms)),
        (8192, bf16(2048, 8192), dict(transpose_w=True, residual=bf16(rows, 2048))),
        (2048, bf16(128256, 2048), dict(transpose_w=True, norm=rms)),  # the LM head
    ]
    built = []
    for K, w, kwargs in calls:
        arrays = {k: v for k, v in kwargs.items() if k not in ("activation", "transpose_w")}
        static = {k: v for k, v in kwargs.items() if k in ("activation", "transpose_w")}
        built += _built_kernels(lambda x, w, kw: linear(x, w, **kw, **static), bf16(rows, K), w,
                                arrays)
    assert {k.name for k in built} == {"_gemv_kernel"}
    for k in built:
        assert 0 < k.registers <= 255 and k.spill_bytes == 0, k
