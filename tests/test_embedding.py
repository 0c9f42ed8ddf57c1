"""Embedding kernels (forward and backward) vs jtgpt.reference.embedding, under jax.jit, on random
inputs, with a position table (GPT-2) and without (Llama).

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
I32 = np.iinfo(np.int32)

# (B, T, D, V, P): D not a power of two, odd token counts; 768 with T*B not a multiple of the
# token block; 1500 splits D over two feature blocks (the grid's second axis).
SHAPES = shapes(small=[(3, 7, 48, 97, 13), (1, 5, 100, 50, 8), (2, 9, 768, 61, 16), (1, 3, 1500, 11, 5)],
                large=[(8, 300, 768, 50257, 1024), (2, 1000, 4096, 128256, 8192)])

# With a position table (positions and wpe given), and without (wte[ids] alone).
each_mode = pytest.mark.parametrize("with_wpe", [True, False], ids=["wpe", "no_wpe"])


def _inputs(key, b, t, d, v, p, dtype, with_wpe=True):
    """(ids, wte, positions, wpe), the last two None without a position table."""
    ki, kp, ke, kw = jax.random.split(key, 4)
    ids = jax.random.randint(ki, (b, t), 0, v, jnp.int32)
    wte = jax.random.normal(ke, (v, d)).astype(dtype)
    if not with_wpe:
        return ids, wte, None, None
    positions = jax.random.randint(kp, (b, t), 0, p, jnp.int32)
    wpe = (0.1 * jax.random.normal(kw, (p, d))).astype(dtype)
    return ids, wte, positions, wpe


def _as32(table):
    return None if table is None else table.astype(jnp.float32)


def _forward(ids, wte, positions, wpe, **dropout):
    return jax.jit(lambda *a: embedding(*a, **dropout))(ids, wte, positions, wpe)


@each_mode
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_embedding_matches_reference(key, shape, dtype, with_wpe):
    args = _inputs(key, *shape, dtype, with_wpe)
    out = _forward(*args)
    assert out.shape == (*args[0].shape, shape[2]) and out.dtype == dtype
    # Both sum the rows in fp32 and round once: bit-identical in every dtype.
    np.testing.assert_array_equal(np.asarray(out), np.asarray(reference.embedding(*args)))


def _out_of_range(key, b, t, d, v, p, with_wpe):
    """Inputs with ids < 0, >= V and at the int32 extremes (and the same for the positions),
    and the [B, T] mask of the tokens with any index out of range."""
    ids, wte, positions, wpe = _inputs(key, b, t, d, v, p, jnp.float32, with_wpe)
    ids = ids.at[0, :6].set(jnp.array([-1, v, v + 100, -v - 5, I32.max, I32.min]))
    bad = np.zeros((b, t), bool)
    bad[0, :6] = True
    if with_wpe:
        positions = positions.at[1, :5].set(jnp.array([p, -1, -p, I32.max, I32.min]))
        positions = positions.at[0, 0].set(-1)  # a token with both indices out of range
        bad[1, :5] = True
    return (ids, wte, positions, wpe), bad


@each_mode
@pytest.mark.parametrize("rate", [0.0, 0.5])
def test_embedding_out_of_range_indices_give_nan_rows(key, with_wpe, rate):
    """A token with an index outside its table gets a row of NaN (all of it, dropout or not), and
    every other token its rows: no wrapping of negative indices, no clamping."""
    args, bad = _out_of_range(key, 3, 9, 48, 23, 11, with_wpe)
    out = np.asarray(_forward(*args, dropout_rate=rate, seed=jnp.int32(4)))
    assert np.isnan(out[bad]).all()
    assert not np.isnan(out[~bad]).any()
    if rate == 0.0:
        np.testing.assert_array_equal(out[~bad], np.asarray(reference.embedding(*args))[~bad])


def test_embedding_mixed_table_dtypes(key):
    ids, wte, positions, _ = _inputs(key, 2, 7, 48, 31, 9, jnp.bfloat16)
    wpe = jax.random.normal(jax.random.key(1), (9, 48), jnp.float32)
    out = _forward(ids, wte, positions, wpe)
    assert out.dtype == jnp.bfloat16
    expected = reference.embedding(ids, wte, positions, wpe)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))


@each_mode
def test_embedding_dropout_seed_is_data(key, with_wpe):
    """Same seed, same output; another seed, another mask; a new seed does not retrace."""
    args = _inputs(key, 2, 7, 48, 97, 13, jnp.float32, with_wpe)
    traces = []

    @jax.jit
    def f(seed):
        traces.append(seed)
        return embedding(*args, dropout_rate=0.5, seed=seed)

    a, a2, b = f(jnp.int32(1)), f(jnp.int32(1)), f(jnp.int32(2))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(a2))
    assert ((np.asarray(a) == 0) != (np.asarray(b) == 0)).mean() > 0.3  # ~0.5 for p = 0.5
    assert len(traces) == 1


@each_mode
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: d.__name__)
@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_embedding_dropout_statistics(key, rate, dtype, with_wpe):
    b, t, d, v, p = 4, 25, 48, 97, 30  # 4800 elements
    args = _inputs(key, b, t, d, v, p, dtype, with_wpe)
    out = np.asarray(_forward(*args, dropout_rate=rate, seed=jnp.int32(1234)), np.float32)
    dropped = out == 0  # random normal sums are never exactly zero
    n = dropped.size
    assert abs(dropped.mean() - rate) <= 5 * np.sqrt(rate * (1 - rate) / n)
    # Independent per element: neighbouring tokens and neighbouring features disagree as often as
    # two independent draws do (2p(1-p)), so the mask is keyed by token and by feature.
    mask = dropped.reshape(-1, d)
    for neighbours_differ in (mask[1:] != mask[:-1], mask[:, 1:] != mask[:, :-1]):
        assert abs(neighbours_differ.mean() - 2 * rate * (1 - rate)) < 0.05
    ids, wte, positions, wpe = args
    h32 = reference.embedding(ids, _as32(wte), positions, _as32(wpe))
    expected = np.asarray((h32 / (1 - rate)).astype(dtype), np.float32)
    assert_close(out[~dropped], expected[~dropped], dtype)


def test_embedding_dropout_rate_zero_ignores_seed(key):
    args = _inputs(key, 2, 7, 48, 97, 13, jnp.float32)
    out = _forward(*args, dropout_rate=0.0, seed=jnp.int32(3))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(reference.embedding(*args)))


def _valid_args_but(case):
    """ids, wte, positions, wpe and keyword arguments that pass, the entries of `case` replaced."""
    args = dict(ids=jnp.ones((2, 3), jnp.int32), wte=jnp.ones((10, 8), jnp.float32),
                positions=jnp.ones((2, 3), jnp.int32), wpe=jnp.ones((4, 8), jnp.float32), kwargs={})
    return args | case


@pytest.mark.parametrize("case, arg", [
    (dict(ids=jnp.ones((6,), jnp.int32), positions=jnp.ones((6,), jnp.int32)), "ids"),
    (dict(ids=jnp.ones((6,), jnp.int32), positions=None, wpe=None), "ids"),
    (dict(positions=jnp.ones((2, 4), jnp.int32)), "positions"),
    (dict(ids=jnp.ones((2, 3), jnp.float32)), "ids"),
    (dict(positions=jnp.ones((2, 3), jnp.float32)), "positions"),
    (dict(positions=None), "positions and wpe"),
    (dict(wpe=None), "positions and wpe"),
    (dict(wte=jnp.ones((10, 8), jnp.int32)), "wte"),
    (dict(wte=jnp.ones((10,), jnp.float32)), "wte"),
    (dict(wte=jnp.ones((0, 8), jnp.float32), positions=None, wpe=None), "wte"),
    (dict(wpe=jnp.ones((4, 9), jnp.float32)), "wpe"),
    (dict(wpe=jnp.ones((4, 8), jnp.int32)), "wpe"),
    (dict(kwargs=dict(dropout_rate=1.0, seed=jnp.int32(0))), "dropout_rate"),
    (dict(kwargs=dict(dropout_rate=-0.1, seed=jnp.int32(0))), "dropout_rate"),
    (dict(kwargs=dict(dropout_rate=0.1)), "seed"),
    (dict(kwargs=dict(dropout_rate=0.1, seed=jnp.zeros((2,), jnp.int32))), "seed"),
    (dict(kwargs=dict(dropout_rate=0.1, seed=jnp.float32(1))), "seed"),
], ids=lambda c: c if isinstance(c, str) else None)
def test_embedding_rejects(case, arg):
    a = _valid_args_but(case)
    with pytest.raises(ValueError, match=arg):
        embedding(a["ids"], a["wte"], a["positions"], a["wpe"], **a["kwargs"])


# ----------------------------------------------------------------------------------- backward

def _grads(ids, wte, positions, wpe, dout, **dropout):
    """(out, d_wte, d_wpe) of the kernel for the cotangent dout, under jax.jit (d_wpe None
    without a position table)."""
    def f(wte, wpe, dout):
        out, vjp = jax.vjp(lambda a, b: embedding(ids, a, positions, b, **dropout), wte, wpe)
        return (out, *vjp(dout))
    return jax.jit(f)(wte, wpe, dout)


def _valid(ids, wte, positions, wpe):
    """[B, T] mask of the tokens whose indices are all in range."""
    ok = (np.asarray(ids) >= 0) & (np.asarray(ids) < wte.shape[0])
    if wpe is not None:
        ok &= (np.asarray(positions) >= 0) & (np.asarray(positions) < wpe.shape[0])
    return ok


def _reference_grads(ids, wte, positions, wpe, dout, scale=1.0):
    """jax.vjp of reference.embedding(...) * scale over the valid tokens only (the others' gradient
    lands nowhere), at fp32 copies of the tables (the kernel adds in fp32; a bf16 table's own
    transpose would add in bf16)."""
    ok = _valid(ids, wte, positions, wpe)
    only_ok = lambda a: None if a is None else jnp.asarray(np.asarray(a)[ok][None])  # noqa: E731
    ids, positions, dout = only_ok(ids), only_ok(positions), only_ok(dout.astype(jnp.float32))
    scale = only_ok(scale) if np.ndim(scale) else scale
    f = lambda a, b: reference.embedding(ids, a, positions, b) * scale  # noqa: E731
    _, vjp = jax.vjp(f, _as32(wte), _as32(wpe))
    d_wte, d_wpe = vjp(dout)
    return d_wte.astype(wte.dtype), None if wpe is None else d_wpe.astype(wpe.dtype)


def _check_grads(ids, wte, positions, wpe, dout):
    """The kernel's gradients match the reference's, and rows no valid token reads are exactly 0."""
    _, *got = _grads(ids, wte, positions, wpe, dout)
    expected = _reference_grads(ids, wte, positions, wpe, dout)
    ok = _valid(ids, wte, positions, wpe)
    for g, e, table, indices in zip(got, expected, (wte, wpe), (ids, positions)):
        if table is None:
            assert g is None and e is None
            continue
        assert g.shape == table.shape and g.dtype == table.dtype
        assert_close(g, e)
        read = np.bincount(np.asarray(indices)[ok], minlength=table.shape[0]) > 0
        assert (np.asarray(g, np.float32)[~read] == 0).all()


def _cotangent(key, ids, d, dtype):
    return jax.random.normal(jax.random.fold_in(key, 1), (*ids.shape, d)).astype(dtype)


@each_mode
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_embedding_grad_matches_reference(key, shape, dtype, with_wpe):
    args = _inputs(key, *shape, dtype, with_wpe)
    _check_grads(*args, _cotangent(key, args[0], shape[2], dtype))


@each_mode
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: d.__name__)
def test_embedding_grad_out_of_range_tokens_count_nowhere(key, dtype, with_wpe):
    """A token with an index out of range adds to no row of either table: the gradients are those
    of the valid tokens alone. One row has more valid tokens than two of the kernel's steps of
    BLOCK_T tokens, and (with wpe) a few tokens of that id whose position is out of range."""
    b, t, d, v, p = 4, 50, 48, 9, 7
    (ids, wte, positions, wpe), bad = _out_of_range(key, b, t, d, v, p, with_wpe)
    ids = ids.at[1:].set(3)
    wte = wte.astype(dtype)
    wpe = None if wpe is None else wpe.astype(dtype)
    ok = _valid(ids, wte, positions, wpe)
    assert not ok[bad].any() and ok[~bad].all()
    block_t = embedding_module._backward_config(b * t, d)[0]
    assert (np.asarray(ids)[ok] == 3).sum() > 2 * block_t
    _check_grads(ids, wte, positions, wpe, _cotangent(key, ids, d, dtype))


def test_embedding_grad_mixed_table_dtypes(key):
    ids, wte, positions, _ = _inputs(key, 2, 7, 48, 31, 9, jnp.bfloat16)
    wpe = jax.random.normal(jax.random.key(1), (9, 48), jnp.float32)
    _check_grads(ids, wte, positions, wpe, _cotangent(key, ids, 48, jnp.bfloat16))


@each_mode
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: d.__name__)
def test_embedding_grad_uses_the_forward_dropout_mask(key, dtype, with_wpe):
    """With dropout, the gradient is the reference's through the mask of the kernel's own forward,
    read off its output: the backward must regenerate exactly that mask from the seed."""
    b, t, d, v, p, rate = 3, 7, 100, 13, 9, 0.3
    ids, wte, positions, wpe = _inputs(key, b, t, d, v, p, dtype, with_wpe)
    # Positive tables: wte (+ wpe) is never 0, so out == 0 exactly where an element was dropped.
    wte, wpe = 1.0 + jnp.abs(wte), None if wpe is None else jnp.abs(wpe)
    dout = _cotangent(key, ids, d, dtype)
    out, *got = _grads(ids, wte, positions, wpe, dout, dropout_rate=rate, seed=jnp.int32(5))
    keep = np.asarray(out, np.float32) != 0
    assert abs(keep.mean() - (1 - rate)) < 0.05
    expected = _reference_grads(ids, wte, positions, wpe, dout, scale=keep / (1 - rate))
    for g, e in zip(got, expected):
        if e is None:
            assert g is None
        else:
            assert_close(g, e)


@each_mode
def test_embedding_grad_is_deterministic(key, with_wpe):
    shape = (16, 1024, 768, 50257, 1024) if conftest.LARGE else (4, 50, 48, 9, 7)
    ids, wte, positions, wpe = _inputs(key, *shape, jnp.bfloat16, with_wpe)
    ids = ids.at[1:].set(3)  # long runs of one row: a fixed order of many additions
    dout = _cotangent(key, ids, shape[2], jnp.bfloat16)
    first, second = (_grads(ids, wte, positions, wpe, dout, dropout_rate=0.1, seed=jnp.int32(9))
                     for _ in range(2))
    for a, b in zip(first, second):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@each_mode
def test_embedding_integer_inputs_get_float0_cotangents(key, with_wpe):
    ids, wte, positions, wpe = _inputs(key, 2, 7, 48, 31, 9, jnp.float32, with_wpe)
    f = lambda i, a, q, b, s: embedding(i, a, q, b, dropout_rate=0.1, seed=s)  # noqa: E731
    out, vjp = jax.vjp(f, ids, wte, positions, wpe, jnp.int32(3))
    d_ids, _, d_positions, d_wpe, d_seed = vjp(jnp.ones_like(out))
    integers = [(d_ids, ids), (d_seed, jnp.int32(3))] + [(d_positions, positions)] * with_wpe
    for cotangent, primal in integers:
        assert cotangent.dtype == jax.dtypes.float0 and cotangent.shape == primal.shape
    if not with_wpe:
        assert d_positions is None and d_wpe is None


@each_mode
def test_embedding_grad_has_no_xla_dot(key, with_wpe):
    ids, wte, positions, wpe = _inputs(key, 2, 7, 48, 31, 9, jnp.float32, with_wpe)

    def loss(wte, wpe):
        return embedding(ids, wte, positions, wpe, dropout_rate=0.1, seed=jnp.int32(1)).sum()

    jaxpr = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(wte, wpe))
    assert "pure_callback" in jaxpr or "triton" in jaxpr
    assert "dot_general" not in jaxpr


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=lambda d: d.__name__)
@pytest.mark.parametrize("rate", [0.0, 0.1])
@pytest.mark.parametrize("shape, with_wpe", [((16, 1024, 768, 50257, 1024), True),
                                             ((2, 4096, 4096, 128256, None), False)], ids=str)
def test_embedding_builds_for_hopper(shape, with_wpe, rate, dtype):
    """GPT-2's tables and Llama-3-8B's (no position table): the forward kernel and the backward
    (one launch a table, after one for the dropout's mask) fit an H100 without spilling."""
    b, t, d, v, p = shape
    ids = jax.ShapeDtypeStruct((b, t), jnp.int32)
    wte = jax.ShapeDtypeStruct((v, d), dtype)
    wpe = jax.ShapeDtypeStruct((p, d), dtype) if with_wpe else None

    def grads(ids, wte, wpe):
        def loss(wte, wpe):
            out = embedding(ids, wte, ids if with_wpe else None, wpe, dropout_rate=rate,
                            seed=jnp.int32(1))
            return out.astype(jnp.float32).sum()
        return jax.grad(loss, argnums=(0, 1))(wte, wpe)

    with compile_only(capability=90) as built:
        jax.eval_shape(grads, ids, wte, wpe)
    assert sorted(k.name for k in built) == (["_dropout_bwd_kernel"] * (rate > 0)
                                             + ["_embedding_bwd_kernel"] * (1 + with_wpe)
                                             + ["_embedding_fwd_kernel"])
    forward = [k for k in built if k.name == "_embedding_fwd_kernel"]
    assert [k.constexprs["POSITIONS"] for k in forward] == [with_wpe]
    for k in built:
        assert 0 < k.registers <= 255 and k.spill_bytes == 0 and k.shared_bytes <= 227 * 1024, k
