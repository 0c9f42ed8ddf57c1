"""Cross-entropy kernels vs optax, and the fused LM head + loss vs jnp logits then optax.

Values and gradients (jax.grad / jax.vjp of the reference) under jax.jit, with ignored rows,
V not a multiple of the vocabulary block, and several chunks with a partial last one.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import assert_close, shapes
from jtgpt import reference
from jtgpt.call import compile_only
from jtgpt.kernels.cross_entropy import cross_entropy, linear_cross_entropy

DTYPES = [jnp.float32, jnp.float16, jnp.bfloat16]
IGNORE = -100

# logits shapes: V = 1000 is four 256-wide interpreter blocks, the last partial; V = 97 one partial
# block; 3-D logits. Large: GPT-2's and Llama-3's vocabularies.
CE_SHAPES = shapes(small=[(13, 1000), (2, 5, 97)], large=[(4096, 50257), (2, 512, 128256)])
# (h shape, V, chunk_size): 26 tokens in chunks of 8 (three full chunks, then 2 rows); one chunk
# covering every token (the default chunk, capped at N). Large: GPT-2's head, default chunks.
LINEAR_SHAPES = shapes(small=[((2, 13, 40), 300, 8), ((11, 24), 97, None)],
                       large=[((8, 1024, 768), 50257, None), ((3000, 768), 50257, 1024)])


def _reference(logits, targets, ignore_index=IGNORE, reduction="mean"):
    return reference.cross_entropy(logits, targets, ignore_index, reduction)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reference_is_optax_with_ignored_rows(key, reduction):
    """The jnp reference the kernels are checked against is optax's loss, ignore_index aside."""
    logits = 3.0 * jax.random.normal(key, (2, 7, 31))
    targets = _targets(jax.random.fold_in(key, 1), (2, 7), 31)
    valid = targets != IGNORE
    rows = jnp.where(valid, optax.softmax_cross_entropy_with_integer_labels(
        logits, jnp.where(valid, targets, 0)), 0.0)
    expected = {"none": rows, "sum": rows.sum(), "mean": rows.sum() / valid.sum()}[reduction]
    assert_close(_reference(logits, targets, reduction=reduction), expected)


def _targets(key, rows_shape, v, n_ignored=3):
    targets = jax.random.randint(key, rows_shape, 0, v, jnp.int32).reshape(-1)
    return targets.at[1:1 + 2 * n_ignored:2].set(IGNORE).reshape(rows_shape)


def _check_value_and_grad(f, ref, args, argnums, reduction, key, loss_rtol=1e-5):
    """f and ref agree in value (NaN where ref is NaN) and in the gradients wrt args[argnums],
    under jit. "none" is differentiated through a random cotangent (a per-row scaling), "mean" and
    "sum" through 1.7 (so a backward that forgets to multiply by g fails)."""
    loss, vjp = jax.vjp(jax.jit(f), *args)
    ref_loss, ref_vjp = jax.vjp(ref, *args)
    assert loss.dtype == jnp.float32 and loss.shape == ref_loss.shape
    finite = np.isfinite(ref_loss)
    np.testing.assert_array_equal(np.isfinite(loss), finite)
    assert_close(np.where(finite, loss, 0), np.where(finite, ref_loss, 0), jnp.float32, loss_rtol)
    g = (jax.random.uniform(key, loss.shape, jnp.float32, 0.5, 2.0) if reduction == "none"
         else jnp.float32(1.7))
    grads, ref_grads = jax.jit(vjp)(g), ref_vjp(g)
    for i in argnums:
        assert grads[i].dtype == args[i].dtype
        assert_close(grads[i], ref_grads[i].astype(jnp.float32), args[i].dtype)
    return loss


# ------------------------------------------------------------------------------- cross_entropy

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("shape", CE_SHAPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_matches_reference(key, shape, dtype, reduction):
    kx, kt, kg = jax.random.split(key, 3)
    logits = (3.0 * jax.random.normal(kx, shape)).astype(dtype)
    targets = _targets(kt, shape[:-1], shape[-1])
    _check_value_and_grad(
        lambda x: cross_entropy(x, targets, reduction=reduction),
        lambda x: _reference(x, targets, reduction=reduction),
        (logits,), (0,), reduction, kg)


def test_cross_entropy_online_softmax_is_stable(key):
    """Logits near 100 (exp overflows fp32 past 88) with each row's max in its third block."""
    kx, kt = jax.random.split(key)
    logits = 100.0 + jax.random.normal(kx, (6, 700))
    logits = logits.at[:, 600].add(jnp.arange(6.0) * 5)  # the third of the 256-wide blocks
    targets = jax.random.randint(kt, (6,), 0, 700).at[0].set(600)
    _check_value_and_grad(lambda x: cross_entropy(x, targets, reduction="none"),
                          lambda x: _reference(x, targets, reduction="none"),
                          (logits,), (0,), "none", key)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy_all_ignored_is_zero(key, reduction):
    """Mean over no counted row: 0 with a zero gradient (PyTorch would give NaN)."""
    logits = jax.random.normal(key, (5, 97))
    targets = jnp.full((5,), IGNORE)
    loss, grad = jax.jit(jax.value_and_grad(lambda x: cross_entropy(x, targets, reduction=reduction)))(logits)
    assert loss == 0.0
    np.testing.assert_array_equal(np.asarray(grad), 0.0)


def test_cross_entropy_ignore_index_inside_vocabulary(key):
    """ignore_index may be a real class (a padding token id): those rows count for nothing."""
    kx, kt = jax.random.split(key)
    logits = jax.random.normal(kx, (9, 50))
    targets = jax.random.randint(kt, (9,), 1, 50).at[jnp.array([0, 4])].set(0)
    _check_value_and_grad(lambda x: cross_entropy(x, targets, ignore_index=0),
                          lambda x: _reference(x, targets, ignore_index=0),
                          (logits,), (0,), "mean", key)


def test_cross_entropy_out_of_range_targets(key):
    """A target outside [0, V) (not ignore_index) gives that row a NaN loss, so the mean is NaN;
    its gradient is the softmax alone, as jax.grad of optax gives for a target >= V."""
    kx, kt = jax.random.split(key)
    v = 60
    logits = jax.random.normal(kx, (7, v))
    targets = jax.random.randint(kt, (7,), 0, v).at[2].set(v).at[5].set(v + 1000)
    rows = _check_value_and_grad(
        lambda x: cross_entropy(x, targets, reduction="none"),
        lambda x: optax.softmax_cross_entropy_with_integer_labels(x, targets),
        (logits,), (0,), "none", key)
    assert np.isnan(rows[2]) and np.isnan(rows[5]) and np.isfinite(np.delete(rows, [2, 5])).all()
    negative = cross_entropy(logits, targets.at[3].set(-1), reduction="none")  # no wrap-around
    assert np.isnan(negative[3])
    assert np.isnan(jax.jit(cross_entropy)(logits, targets))


@pytest.mark.parametrize("call,match", [
    (lambda x, t: cross_entropy(x.astype(jnp.int32), t), "logits dtype"),
    (lambda x, t: cross_entropy(x[0, :0], t[:1]), "logits must be"),
    (lambda x, t: cross_entropy(x, t.astype(jnp.float32)), "targets must be integer"),
    (lambda x, t: cross_entropy(x, t[:3]), "targets shape"),
    (lambda x, t: cross_entropy(x, t, reduction="max"), "reduction"),
    (lambda x, t: cross_entropy(x, t, ignore_index=2**40), "ignore_index"),
])
def test_cross_entropy_rejects(call, match):
    with pytest.raises(ValueError, match=match):
        call(jnp.ones((4, 10)), jnp.zeros((4,), jnp.int32))


# ------------------------------------------------------------------------ linear_cross_entropy

def _linear_inputs(key, h_shape, v, dtype):
    kh, kw, kt = jax.random.split(key, 3)
    h = jax.random.normal(kh, h_shape).astype(dtype)
    w = (2.0 * jax.random.normal(kw, (v, h_shape[-1])) / np.sqrt(h_shape[-1])).astype(dtype)
    return h, w, _targets(kt, h_shape[:-1], v)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: d.__name__)
@pytest.mark.parametrize("h_shape,v,chunk_size", LINEAR_SHAPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_cross_entropy_matches_reference(key, h_shape, v, chunk_size, dtype, reduction):
    h, w, targets = _linear_inputs(key, h_shape, v, dtype)
    _check_value_and_grad(
        lambda h, w: linear_cross_entropy(h, w, targets, reduction=reduction, chunk_size=chunk_size),
        lambda h, w: _reference(reference.linear(h, w, transpose_w=True), targets, reduction=reduction),
        (h, w), (0, 1), reduction, key,
        loss_rtol=1e-5 if dtype == jnp.float32 else 1e-3)


def test_linear_cross_entropy_primal_path(key):
    """Without differentiation the loss alone is computed, and it is the same loss."""
    h, w, targets = _linear_inputs(key, (19, 24), 150, jnp.float32)
    loss = jax.jit(lambda h, w: linear_cross_entropy(h, w, targets, chunk_size=8))(h, w)
    assert_close(loss, _reference(reference.linear(h, w, transpose_w=True), targets))


def test_no_dot_general_in_gradients(key):
    """The backward is Triton only: no XLA matmul in either gradient's jaxpr (the reference's has)."""
    h, w, targets = _linear_inputs(key, (2, 7, 16), 50, jnp.float32)
    logits = reference.linear(h, w, transpose_w=True)
    ce_grad = jax.make_jaxpr(jax.grad(lambda x: cross_entropy(x, targets)))(logits)
    linear_grad = jax.make_jaxpr(jax.grad(
        lambda h, w: linear_cross_entropy(h, w, targets, chunk_size=4), argnums=(0, 1)))(h, w)
    ref_grad = jax.make_jaxpr(jax.grad(
        lambda h, w: _reference(reference.linear(h, w, transpose_w=True), targets), argnums=(0, 1)))(h, w)
    assert "dot_general" in str(ref_grad)  # the check below can fail
    assert "dot_general" not in str(ce_grad)
    assert "dot_general" not in str(linear_grad)


def test_linear_cross_entropy_memory_is_bounded():
    """Compiled, the loss and its value_and_grad hold chunks of logits, never the [N, V] logits.

    (Measured on CPU: 8.2 MB for the gradient, 4.1 MB for the loss alone, against 131 MB.)
    """
    n, v, d, chunk = 4096, 8000, 32, 128
    h = jax.ShapeDtypeStruct((n, d), jnp.float32)
    w = jax.ShapeDtypeStruct((v, d), jnp.float32)
    targets = jax.ShapeDtypeStruct((n,), jnp.int32)
    loss = lambda h, w, t: linear_cross_entropy(h, w, t, chunk_size=chunk)  # noqa: E731
    for fn in (loss, jax.value_and_grad(loss, (0, 1))):
        temp = jax.jit(fn).lower(h, w, targets).compile().memory_analysis().temp_size_in_bytes
        assert 0 < temp < n * v * 4 / 10, temp


@pytest.mark.parametrize("call,match", [
    (lambda h, w, t: linear_cross_entropy(h[0, 0], w, t), "h must be"),
    (lambda h, w, t: linear_cross_entropy(h.astype(jnp.int32), w, t), "h dtype"),
    (lambda h, w, t: linear_cross_entropy(h, w.T, t), "w must be"),
    (lambda h, w, t: linear_cross_entropy(h, w.astype(jnp.bfloat16), t), "w dtype"),
    (lambda h, w, t: linear_cross_entropy(h, w, t[:, :2]), "targets shape"),
    (lambda h, w, t: linear_cross_entropy(h, w, t, reduction="none"), "reduction"),
    (lambda h, w, t: linear_cross_entropy(h, w, t, chunk_size=0), "chunk_size"),
    (lambda h, w, t: linear_cross_entropy(h, w, t, precision="bf16"), "precision"),
])
def test_linear_cross_entropy_rejects(call, match):
    with pytest.raises(ValueError, match=match):
        call(jnp.ones((2, 3, 8)), jnp.ones((20, 8)), jnp.zeros((2, 3), jnp.int32))


# ------------------------------------------------------------------------------ sm_90 builds

@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=lambda d: d.__name__)
def test_cross_entropy_kernels_build_for_hopper(dtype):
    """Forward (loss only and fused with the gradient) and backward kernels at GPT-2's V."""
    n, v, d = 4096, 50257, 768
    logits = jax.ShapeDtypeStruct((n, v), dtype)
    h = jax.ShapeDtypeStruct((n, d), dtype)
    w = jax.ShapeDtypeStruct((v, d), dtype)
    targets = jax.ShapeDtypeStruct((n,), jnp.int32)
    with compile_only(capability=90) as built:
        jax.eval_shape(jax.value_and_grad(cross_entropy), logits, targets)
        jax.eval_shape(jax.value_and_grad(linear_cross_entropy, (0, 1)), h, w, targets)
    ours = [k for k in built if k.name.startswith("_cross_entropy")]
    assert {(k.name, k.constexprs.get("WRITE_GRAD")) for k in ours} == {
        ("_cross_entropy_fwd_kernel", False), ("_cross_entropy_fwd_kernel", True),
        ("_cross_entropy_bwd_kernel", None)}
    for k in ours:
        assert 0 < k.registers <= 255 and k.spill_bytes == 0 and k.shared_bytes <= 227 * 1024, k
