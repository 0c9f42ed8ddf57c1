"""Embedding kernel vs jtgpt.reference.embedding, under jax.jit, on random inputs.

Dropout has no reference (its random stream is the kernel's own): it is checked by determinism
in the seed, the fraction of zeros, and the scaling of what is kept.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_close, shapes
from jtgpt import reference
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
