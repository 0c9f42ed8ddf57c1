"""Paged attention (jtgpt.kernels.attention.paged) against jtgpt.reference.paged_attention on
random pools: pages in random order, ragged batches mixing prefill, extend and decode rows whose
tokens cross page and block boundaries, grouped-query ratios 1, 3 and 4, forced splits; and the
pool it returns, with exactly the new tokens' slots written."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_close
from jtgpt import reference
from jtgpt.call import compile_only, on_gpu
from jtgpt.kernels.attention import paged

# (cached, new) tokens per sequence: a prefill of 5, a decode row after 7 cached, an extend of 6
# after 13 (crossing pages), an empty row (no new token, no tile), a decode row at position 0 and
# a prefill of 20 (two tiles in the interpreter's 16-row tiles at group 1).
BATCH = [(0, 5), (7, 1), (13, 6), (4, 0), (0, 1), (0, 20)]


def make_batch(key, batch, Hq, Hkv, D, page_size, dtype, num_pages=40, pad_rows=3, block_q=None):
    """(qkv, pages, block_tables, cu_q, context_lens, tile plan), pages in a random order."""
    rng = np.random.default_rng(0)
    counts = np.array([n for _, n in batch])
    context = np.array([c + n for c, n in batch])
    cu_q = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    max_pages = int(-(-context.max() // page_size))
    order = rng.permutation(num_pages)
    tables = np.zeros((len(batch), max_pages), np.int32)
    used = 0
    for s, c in enumerate(context):
        need = -(-c // page_size)
        tables[s, :need] = order[used:used + need]
        used += need
    assert used <= num_pages
    k1, k2 = jax.random.split(key)
    T = int(cu_q[-1]) + pad_rows  # a padded batch: rows past cu_q[-1] belong to no sequence
    qkv = jax.random.normal(k1, (T, (Hq + 2 * Hkv) * D), jnp.float32).astype(dtype)
    pages = jax.random.normal(k2, (num_pages, page_size, 2 * Hkv * D), jnp.float32).astype(dtype)
    block_q = block_q or paged.query_block(Hq, Hkv)
    plan = paged.plan_tiles(cu_q, block_q, paged.max_tiles(T, len(batch), block_q))
    return qkv, pages, tables, cu_q, context.astype(np.int32), plan


def expected(qkv, pages, tables, cu_q, context, Hq, Hkv, D):
    """(reference output [cu_q[-1], Hq D], the pool with the new tokens written)."""
    T = int(cu_q[-1])
    q = qkv[:T, :Hq * D].reshape(T, Hq, D)
    k_new = qkv[:T, Hq * D:(Hq + Hkv) * D].reshape(T, Hkv, D)
    v_new = qkv[:T, (Hq + Hkv) * D:].reshape(T, Hkv, D)
    num_pages, P, _ = pages.shape
    k_pages = pages[..., :Hkv * D].reshape(num_pages, P, Hkv, D)
    v_pages = pages[..., Hkv * D:].reshape(num_pages, P, Hkv, D)
    out = reference.paged_attention(q, k_new, v_new, k_pages, v_pages, tables, cu_q, context)
    written = np.array(pages)
    for s in range(context.size):
        for i, row in enumerate(range(cu_q[s], cu_q[s + 1])):
            position = context[s] - (cu_q[s + 1] - cu_q[s]) + i
            written[tables[s, position // P], position % P] = np.asarray(qkv[row, Hq * D:])
    return out.reshape(T, Hq * D), written


def run(qkv, pages, tables, cu_q, context, plan, **kwargs):
    f = jax.jit(lambda *a: paged.paged_attention(*a, **kwargs))
    return f(qkv, pages, tables, cu_q, context, *plan)


@pytest.mark.parametrize("Hq,Hkv,D,page_size,num_splits,block_q,dtype", [
    (2, 2, 32, 4, None, None, jnp.float32), (6, 2, 16, 16, None, None, jnp.float32),
    (4, 1, 32, 8, 3, None, jnp.bfloat16), (4, 2, 16, 5, 2, None, jnp.float32),
    (6, 2, 16, 4, None, 8, jnp.float32), (2, 2, 16, 4, 2, 32, jnp.bfloat16)])
def test_matches_reference(key, dtype, Hq, Hkv, D, page_size, num_splits, block_q):
    """block_q None: query_block's tiles (16 q rows in the interpreter); else tiles of that many
    tokens (8 tokens x 4 padded heads, 32 tokens x 1 head)."""
    qkv, pages, tables, cu_q, context, plan = make_batch(key, BATCH, Hq, Hkv, D, page_size, dtype,
                                                         block_q=block_q)
    out, new_pages = run(qkv, pages, tables, cu_q, context, plan, num_heads=Hq, num_kv_heads=Hkv,
                         num_splits=num_splits, block_n=16, block_q=block_q)
    ref_out, ref_pages = expected(qkv, pages, tables, cu_q, context, Hq, Hkv, D)
    assert out.dtype == dtype and out.shape == (qkv.shape[0], Hq * D)
    assert_close(out[:int(cu_q[-1])], ref_out)
    np.testing.assert_array_equal(new_pages, ref_pages)


def test_a_bad_page_gives_nan_not_a_read_outside(key):
    """A page id past the pool in one sequence's table: that sequence's rows are NaN, the
    others' exact, and nothing is written for the bad page."""
    Hq, Hkv, D, P = 4, 2, 16, 4
    qkv, pages, tables, cu_q, context, plan = make_batch(key, BATCH[:3], Hq, Hkv, D, P,
                                                         jnp.float32)
    tables = tables.copy()
    tables[1, 0] = 10_000  # sequence 1's first cached page
    out, new_pages = run(qkv, pages, tables, cu_q, context, plan, num_heads=Hq, num_kv_heads=Hkv,
                         block_n=16)
    out = np.asarray(out)
    assert np.isnan(out[cu_q[1]:cu_q[2]]).all()
    good = np.r_[cu_q[0]:cu_q[1], cu_q[2]:cu_q[3]]
    fixed = tables.copy()
    fixed[1, 0] = 0
    ref_out, _ = expected(qkv, pages, fixed, cu_q, context, Hq, Hkv, D)
    assert_close(out[good], np.asarray(ref_out)[good])


def test_new_lengths_and_tables_do_not_recompile(key):
    Hq, Hkv, D, P = 4, 2, 16, 4
    traces = []

    @jax.jit
    def f(*args):
        traces.append(1)
        return paged.paged_attention(*args, num_heads=Hq, num_kv_heads=Hkv, block_n=16)

    for batch in ([(3, 2), (9, 1), (0, 4)], [(0, 7), (2, 1), (11, 1)]):
        pad_rows = 12 - sum(n for _, n in batch)  # one bucket: 12 rows, 4 pages a table
        qkv, pages, tables, cu_q, context, plan = make_batch(key, batch, Hq, Hkv, D, P,
                                                             jnp.float32, pad_rows=pad_rows)
        tables = np.pad(tables, ((0, 0), (0, 4 - tables.shape[1])))
        out, _ = f(qkv, pages, tables, cu_q, context, *plan)
        assert_close(out[:cu_q[-1]], expected(qkv, pages, tables, cu_q, context, Hq, Hkv, D)[0])
    assert len(traces) == 1


def test_plan_tiles():
    seqs, starts = paged.plan_tiles([0, 5, 6, 6, 40], block_q=16, num_tiles=8)
    assert seqs.tolist() == [0, 1, 3, 3, 3, -1, -1, -1]
    assert starts.tolist() == [0, 0, 0, 16, 32, 0, 0, 0]
    with pytest.raises(ValueError, match="more than num_tiles=4"):
        paged.plan_tiles([0, 5, 6, 6, 40], block_q=16, num_tiles=4)
    with pytest.raises(ValueError, match="cu_q must be"):
        paged.plan_tiles([0, 5, 3], block_q=16, num_tiles=4)


def _shape(*shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


I32 = jnp.int32
GOOD = dict(qkv=_shape(9, 128), pages=_shape(10, 4, 64), block_tables=_shape(2, 3, dtype=I32),
            cu_q=_shape(3, dtype=I32), context_lens=_shape(2, dtype=I32),
            tile_seqs=_shape(4, dtype=I32), tile_starts=_shape(4, dtype=I32))


@pytest.mark.parametrize("change,match", [
    (dict(qkv=_shape(1, 9, 128)), "qkv must be 2-D"),
    (dict(pages=_shape(10, 4, 32)), "pages must have shape"),
    (dict(pages=_shape(10, 4, 64, dtype=jnp.bfloat16)), "pages dtype"),
    (dict(block_tables=_shape(2, 3)), "block_tables must be an integer"),
    (dict(cu_q=_shape(2, dtype=I32)), "cu_q must be"),
    (dict(context_lens=_shape(3, dtype=I32)), "context_lens must be"),
    (dict(tile_starts=_shape(5, dtype=I32)), "tile_starts must be"),
])
def test_invalid_arguments(change, match):
    args = dict(GOOD, **change)
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(lambda a: paged.paged_attention(**a, num_heads=4, num_kv_heads=2), args)


@pytest.mark.parametrize("block_q", [3, 2, 0, True])
def test_invalid_block_q(block_q):
    """Not a power of two, or a tile of fewer than 16 q rows (2 tokens x 4 padded heads)."""
    with pytest.raises(ValueError, match="block_q must be a power of two"):
        jax.eval_shape(lambda a: paged.paged_attention(**a, num_heads=6, num_kv_heads=2,
                                                       block_q=block_q),
                       dict(GOOD, qkv=_shape(9, 160)))


def test_decode_tiles():
    """A batch that only decodes takes 16-row tiles on the GPU too (one token x the padded
    group, at least one token); others take TILE_ROWS rows there, 16 in the interpreter."""
    assert [paged.query_block(Hq, Hkv, decode=True) for Hq, Hkv in [(12, 12), (32, 8), (6, 2),
                                                                     (64, 2)]] == [16, 4, 4, 1]
    assert paged.query_block(32, 8) == (16 if on_gpu() else 4)


def test_concrete_lengths_are_checked():
    qkv, pages = jnp.ones((4, 128)), jnp.ones((10, 4, 64))
    tables, plan = jnp.zeros((2, 2), jnp.int32), paged.plan_tiles([0, 2, 4], 16, 4)
    with pytest.raises(ValueError, match="context_lens must be"):
        paged.paged_attention(qkv, pages, tables, jnp.array([0, 2, 4]), jnp.array([1, 3]), *plan,
                              num_heads=4, num_kv_heads=2)
    with pytest.raises(ValueError, match="cu_q must be"):
        paged.paged_attention(qkv, pages, tables, jnp.array([0, 2, 5]), jnp.array([2, 3]), *plan,
                              num_heads=4, num_kv_heads=2)


@pytest.mark.parametrize("Hq,Hkv,D", [(12, 12, 64), (32, 8, 128)])
def test_builds_for_hopper(Hq, Hkv, D):
    """The GPU configuration builds for sm_90 without spills: a decode bucket of 8 sequences
    in decode tiles (several splits and the merge) and a 512-token prefill bucket (one split)."""
    page_size, max_pages = 16, 256
    for seqs, tokens, rows in ((8, 8, 16), (4, 512, 64)):
        with compile_only(capability=90) as built:
            block_q = max(1, rows // triton_pow2(Hq // Hkv))
            tiles = seqs if rows == 16 else -(-tokens // block_q) + seqs
            jax.eval_shape(
                lambda *a: paged.paged_attention(*a, num_heads=Hq, num_kv_heads=Hkv,
                                                 block_q=block_q),
                _shape(tokens, (Hq + 2 * Hkv) * D, dtype=jnp.bfloat16),
                _shape(4096, page_size, 2 * Hkv * D, dtype=jnp.bfloat16),
                _shape(seqs, max_pages, dtype=I32), _shape(seqs + 1, dtype=I32),
                _shape(seqs, dtype=I32), _shape(tiles, dtype=I32), _shape(tiles, dtype=I32))
        for k in built:
            assert 0 < k.registers <= 255 and k.shared_bytes <= 227 * 1024, k
            assert k.spill_bytes == 0, k


def triton_pow2(n):
    return 1 << (n - 1).bit_length()
