"""Embedding kernels (forward and backward) vs jtgpt.reference.embedding, under jax.jit, on random
inputs.

Dropout has no reference (its random stream is the kernel's own): the forward is checked by
determinism in the seed, the fraction of zeros, and the scaling of what is kept; the backward
against the reference's gradient through the mask read off the kernel's own forward output.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import conftest
from conftest import assert_close, shapes
from jtgpt import reference
from jtgpt.call import compile_only
from jtgpt.kernels import embedding as embedding_module
from jtgpt.kernels.embedding import embedding

DTYPES = [jnp.float32, jnp.float16, jnp.bfloat16]

# (B, T, D, V, P): D not a power of two, odd token counts; 768 with T*B not a multiple of the
# token block; 1500 splits D over two feature blocks (the grid's second axis).
SHAPES = shapes(small=[(3, 7, 48, 97, 13), (1, 5, 100, 50, 8), (2, 9, 768, 61, 16), (1, 3, 1500, 11, 5)],
                large=[(8, 300, 768, 50257, 1024), (2, 1000, 4096, 128256, 8192)])


def _inputs(key, b, t, d, v, p, dtype, low=0):
    ki, kp, ke, kw = jax.random.split(key, 4)
    ids = jax.random.randint(ki, (b, t), low, v, jnp.int32)
    positions = jax.random.randint(kp, (b, t), low, p, jnp.int32)
    wte = jax.random.normal(ke, (v, d)).astype(dtype)
    wpe = (0.1 * jax.random.normal(kw, (p, d))).astype(dtype)
    return ids, positions, wte, wpe


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_embedding_matches_reference(key, shape, dtype):
    ids, positions, wte, wpe = _inputs(key, *shape, dtype)
    out = jax.jit(embedding)(ids, positions, wte, wpe)
    assert out.shape == (*ids.shape, wte.shape[1]) and out.dtype == wte.dtype
    # Both sum the two rows in fp32 and round once: bit-identical in every dtype.
    np.testing.assert_array_equal(np.asarray(out), np.asarray(reference.embedding(ids, positions, wte, wpe)))


def test_embedding_out_of_range_indices_follow_jnp(key):
    """Negative indices count from the end, then everything clamps, as `wte[ids]` does."""
    b, t, d, v, p = 4, 9, 48, 23, 11
    ids, positions, wte, wpe = _inputs(key, b, t, d, v, p, jnp.float32, low=-30)
    ids = ids.at[0, :4].set(jnp.array([-1, v, v + 100, -v - 5]))
    positions = positions.at[0, :3].set(jnp.array([p, -1, 2**31 - 1]))
    out = jax.jit(embedding)(ids, positions, wte, wpe)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(reference.embedding(ids, positions, wte, wpe)))


def test_embedding_mixed_table_dtypes(key):
    ids, positions, wte, _ = _inputs(key, 2, 7, 48, 31, 9, jnp.bfloat16)
    wpe = jax.random.normal(jax.random.key(1), (9, 48), jnp.float32)
    out = jax.jit(embedding)(ids, positions, wte, wpe)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out), np.asarray(reference.embedding(ids, positions, wte, wpe)))


def test_embedding_dropout_seed_is_data(key):
    """Same seed, same output; another seed, another mask; a new seed does not retrace."""
    ids, positions, wte, wpe = _inputs(key, 2, 7, 48, 97, 13, jnp.float32)
    traces = []

    @jax.jit
    def f(seed):
        traces.append(seed)
        return embedding(ids, positions, wte, wpe, dropout_rate=0.5, seed=seed)

    a, a2, b = f(jnp.int32(1)), f(jnp.int32(1)), f(jnp.int32(2))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(a2))
    assert ((np.asarray(a) == 0) != (np.asarray(b) == 0)).mean() > 0.3  # ~0.5 for p = 0.5
    assert len(traces) == 1


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: d.__name__)
@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_embedding_dropout_statistics(key, rate, dtype):
    b, t, d, v, p = 4, 25, 48, 97, 30  # 4800 elements
    ids, positions, wte, wpe = _inputs(key, b, t, d, v, p, dtype)
    out = np.asarray(jax.jit(lambda s: embedding(ids, positions, wte, wpe, dropout_rate=rate, seed=s))(
        jnp.int32(1234)), np.float32)
    dropped = out == 0  # random normal sums are never exactly zero
    n = dropped.size
    assert abs(dropped.mean() - rate) <= 5 * np.sqrt(rate * (1 - rate) / n)
    # Independent per element: neighbouring tokens and neighbouring features disagree as often as
    # two independent draws do (2p(1-p)), so the mask is keyed by token and by feature.
    mask = dropped.reshape(-1, d)
    for neighbours_differ in (mask[1:] != mask[:-1], mask[:, 1:] != mask[:, :-1]):
        assert abs(neighbours_differ.mean() - 2 * rate * (1 - rate)) < 0.05
    h32 = wte[ids].astype(jnp.float32) + wpe[positions].astype(jnp.float32)
    expected = np.asarray((h32 / (1 - rate)).astype(dtype), np.float32)
    assert_close(out[~dropped], expected[~dropped], dtype)


def test_embedding_dropout_rate_zero_ignores_seed(key):
    ids, positions, wte, wpe = _inputs(key, 2, 7, 48, 97, 13, jnp.float32)
    out = jax.jit(lambda: embedding(ids, positions, wte, wpe, dropout_rate=0.0, seed=jnp.int32(3)))()
    np.testing.assert_array_equal(np.asarray(out), np.asarray(reference.embedding(ids, positions, wte, wpe)))


def _valid_args_but(case):
    """ids, positions, wte, wpe and keyword arguments that pass, with the entries of `case` replaced."""
    args = dict(ids=jnp.ones((2, 3), jnp.int32), positions=jnp.ones((2, 3), jnp.int32),
                wte=jnp.ones((10, 8), jnp.float32), wpe=jnp.ones((4, 8), jnp.float32), kwargs={})
    return args | case


@pytest.mark.parametrize("case, arg", [
    (dict(ids=jnp.ones((6,), jnp.int32), positions=jnp.ones((6,), jnp.int32)), "ids"),
    (dict(positions=jnp.ones((2, 4), jnp.int32)), "positions"),
    (dict(ids=jnp.ones((2, 3), jnp.float32)), "ids"),
    (dict(positions=jnp.ones((2, 3), jnp.float32)), "positions"),
    (dict(wte=jnp.ones((10, 8), jnp.int32)), "wte"),
    (dict(wte=jnp.ones((10,), jnp.float32)), "wte"),
    (dict(wpe=jnp.ones((4, 9), jnp.float32)), "wpe"),
    (dict(kwargs=dict(dropout_rate=1.0, seed=jnp.int32(0))), "dropout_rate"),
    (dict(kwargs=dict(dropout_rate=-0.1, seed=jnp.int32(0))), "dropout_rate"),
    (dict(kwargs=dict(dropout_rate=0.1)), "seed"),
    (dict(kwargs=dict(dropout_rate=0.1, seed=jnp.zeros((2,), jnp.int32))), "seed"),
    (dict(kwargs=dict(dropout_rate=0.1, seed=jnp.float32(1))), "seed"),
], ids=lambda c: c if isinstance(c, str) else None)
def test_embedding_rejects(case, arg):
    a = _valid_args_but(case)
    with pytest.raises(ValueError, match=arg):
        embedding(a["ids"], a["positions"], a["wte"], a["wpe"], **a["kwargs"])


# ----------------------------------------------------------------------------------- backward

def _in_range(indices, n):
    """The table row each index reads (the forward's mapping, written independently here)."""
    i = np.asarray(indices)
    return jnp.asarray(np.clip(np.where(i < 0, i + n, i), 0, n - 1), jnp.int32)


def _grads(ids, positions, wte, wpe, dout, **dropout):
    """(out, d_wte, d_wpe) of the kernel for the cotangent dout, under jax.jit."""
    def f(wte, wpe, dout):
        out, vjp = jax.vjp(lambda a, b: embedding(ids, positions, a, b, **dropout), wte, wpe)
        return (out, *vjp(dout))
    return jax.jit(f)(wte, wpe, dout)


def _reference_grads(ids, positions, wte, wpe, dout, scale=1.0):
    """jax.vjp of reference.embedding(...) * scale, at fp32 copies of the tables (the kernel adds in
    fp32; a bf16 table's own transpose would add in bf16), with the indices mapped into range:
    the forward's mapping, which jnp's gradient does not follow for out-of-range indices."""
    ids, positions = _in_range(ids, wte.shape[0]), _in_range(positions, wpe.shape[0])
    f = lambda a, b: reference.embedding(ids, positions, a, b) * scale  # noqa: E731
    _, vjp = jax.vjp(f, wte.astype(jnp.float32), wpe.astype(jnp.float32))
    d_wte, d_wpe = vjp(dout.astype(jnp.float32))
    return d_wte.astype(wte.dtype), d_wpe.astype(wpe.dtype)


def _check_grads(ids, positions, wte, wpe, dout):
    """The kernel's gradients match the reference's, and rows no token reads are exactly 0."""
    _, *got = _grads(ids, positions, wte, wpe, dout)
    expected = _reference_grads(ids, positions, wte, wpe, dout)
    for g, e, table, indices in zip(got, expected, (wte, wpe), (ids, positions)):
        assert g.shape == table.shape and g.dtype == table.dtype
        assert_close(g, e)
        unread = np.bincount(np.asarray(_in_range(indices, table.shape[0])).ravel(),
                             minlength=table.shape[0]) == 0
        assert (np.asarray(g, np.float32)[unread] == 0).all()


def _cotangent(key, ids, d, dtype):
    return jax.random.normal(jax.random.fold_in(key, 1), (*ids.shape, d)).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_embedding_grad_matches_reference(key, shape, dtype):
    ids, positions, wte, wpe = _inputs(key, *shape, dtype)
    _check_grads(ids, positions, wte, wpe, _cotangent(key, ids, shape[2], dtype))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: d.__name__)
def test_embedding_grad_repeated_and_out_of_range_indices(key, dtype):
    """Negative and out-of-range indices send their gradient to the row the forward read; one row
    has more tokens than two of the kernel's steps of BLOCK_T tokens."""
    b, t, d, v, p = 4, 50, 48, 9, 7
    ids, positions, wte, wpe = _inputs(key, b, t, d, v, p, dtype, low=-12)
    ids = ids.at[1:].set(3)
    ids = ids.at[0, :5].set(jnp.array([-1, v, v + 100, -v - 5, 2**31 - 1]))
    positions = positions.at[0, :3].set(jnp.array([p, -1, -2**31]))
    block_t = embedding_module._backward_config(b * t, d)[0]
    assert np.bincount(np.asarray(_in_range(ids, v)).ravel()).max() > 2 * block_t
    _check_grads(ids, positions, wte, wpe, _cotangent(key, ids, d, dtype))


def test_embedding_grad_mixed_table_dtypes(key):
    ids, positions, wte, _ = _inputs(key, 2, 7, 48, 31, 9, jnp.bfloat16)
    wpe = jax.random.normal(jax.random.key(1), (9, 48), jnp.float32)
    _check_grads(ids, positions, wte, wpe, _cotangent(key, ids, 48, jnp.bfloat16))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: d.__name__)
def test_embedding_grad_uses_the_forward_dropout_mask(key, dtype):
    """With dropout, the gradient is the reference's through the mask of the kernel's own forward,
    read off its output: the backward must regenerate exactly that mask from the seed."""
    b, t, d, v, p, rate = 3, 7, 100, 13, 9, 0.3
    ids, positions, wte, wpe = _inputs(key, b, t, d, v, p, dtype)
    # Positive tables: wte + wpe is never 0, so out == 0 exactly where an element was dropped.
    wte, wpe = 1.0 + jnp.abs(wte), jnp.abs(wpe)
    dout = _cotangent(key, ids, d, dtype)
    out, *got = _grads(ids, positions, wte, wpe, dout, dropout_rate=rate, seed=jnp.int32(5))
    keep = np.asarray(out, np.float32) != 0
    assert abs(keep.mean() - (1 - rate)) < 0.05
    scale = jnp.asarray(keep / (1 - rate))
    expected = _reference_grads(ids, positions, wte, wpe, dout, scale=scale)
    for g, e in zip(got, expected):
        assert_close(g, e)


def test_embedding_grad_is_deterministic(key):
    shape = (16, 1024, 768, 50257, 1024) if conftest.LARGE else (4, 50, 48, 9, 7)
    ids, positions, wte, wpe = _inputs(key, *shape, jnp.bfloat16)
    ids = ids.at[1:].set(3)  # long runs of one row: a fixed order of many additions
    dout = _cotangent(key, ids, shape[2], jnp.bfloat16)
    first, second = (_grads(ids, positions, wte, wpe, dout, dropout_rate=0.1, seed=jnp.int32(9))
                     for _ in range(2))
    for a, b in zip(first, second):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_embedding_integer_inputs_get_float0_cotangents(key):
    ids, positions, wte, wpe = _inputs(key, 2, 7, 48, 31, 9, jnp.float32)
    f = lambda i, q, a, b, s: embedding(i, q, a, b, dropout_rate=0.1, seed=s)  # noqa: E731
    out, vjp = jax.vjp(f, ids, positions, wte, wpe, jnp.int32(3))
    d_ids, d_positions, _, _, d_seed = vjp(jnp.ones_like(out))
    for cotangent, primal in ((d_ids, ids), (d_positions, positions), (d_seed, jnp.int32(3))):
        assert cotangent.dtype == jax.dtypes.float0 and cotangent.shape == primal.shape


def test_embedding_grad_has_no_xla_dot(key):
    ids, positions, wte, wpe = _inputs(key, 2, 7, 48, 31, 9, jnp.float32)
    def loss(wte, wpe):
        return embedding(ids, positions, wte, wpe, dropout_rate=0.1, seed=jnp.int32(1)).sum()

    jaxpr = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(wte, wpe))
    assert "pure_callback" in jaxpr or "triton" in jaxpr
    assert "dot_general" not in jaxpr


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=lambda d: d.__name__)
@pytest.mark.parametrize("rate", [0.0, 0.1])
@pytest.mark.parametrize("shape", [(16, 1024, 768, 50257, 1024), (2, 4096, 4096, 128256, 8192)],
                         ids=str)
def test_embedding_backward_builds_for_hopper(shape, rate, dtype):
    """GPT-2's and Llama-3-8B's tables: the backward kernel (one launch a table) fits an H100."""
    b, t, d, v, p = shape
    ids = jax.ShapeDtypeStruct((b, t), jnp.int32)
    tables = jax.ShapeDtypeStruct((v, d), dtype), jax.ShapeDtypeStruct((p, d), dtype)

    def grads(ids, wte, wpe):
        def loss(wte, wpe):
            out = embedding(ids, ids, wte, wpe, dropout_rate=rate, seed=jnp.int32(1))
            return out.astype(jnp.float32).sum()
        return jax.grad(loss, argnums=(0, 1))(wte, wpe)

    with compile_only(capability=90) as built:
        jax.eval_shape(grads, ids, *tables)
    backward = [k for k in built if k.name == "_embedding_bwd_kernel"]
    assert len(backward) == 2
    for k in backward:
        assert 0 < k.registers <= 255 and k.spill_bytes == 0 and k.shared_bytes <= 227 * 1024, k
