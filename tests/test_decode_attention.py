"""Decode attention (jtgpt.kernels.attention.decode_attention) against
jtgpt.reference.decode_attention, on random caches: the output, and the cache it returns with
each row's new token stored in slot lengths - 1.

On CPU the small cases use 16-key blocks, so that lengths 1, 15, 16, 17 and 70 put the last key
before, at and after a block boundary, and the forced splits (num_splits=4) leave some splits
empty (a length of 17 fills two of four). The sm_90 build of the GPU configuration is checked by
compile_only at the end.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_close, shapes
from jtgpt import reference
from jtgpt.call import compile_only
from jtgpt.kernels.attention import decode


def random_inputs(key, B, S, Hq, Hkv, D, dtype):
    """(qkv [B, 1, (Hq + 2 Hkv) D], kv_cache [B, S, 2 Hkv D]), normal random values."""
    k1, k2 = jax.random.split(key)
    qkv = jax.random.normal(k1, (B, 1, (Hq + 2 * Hkv) * D), jnp.float32).astype(dtype)
    kv_cache = jax.random.normal(k2, (B, S, 2 * Hkv * D), jnp.float32).astype(dtype)
    return qkv, kv_cache


def with_new_token(qkv, kv_cache, lengths):
    """The cache with each row's new token (qkv's k and v heads) in slot lengths - 1."""
    new = qkv[:, 0, qkv.shape[-1] - kv_cache.shape[-1]:]
    return kv_cache.at[jnp.arange(kv_cache.shape[0]), jnp.asarray(lengths) - 1].set(new)


def expected(qkv, kv_cache, lengths, Hq, Hkv, key_mask=None, sm_scale=None):
    """reference.decode_attention on the q heads of qkv and the k, v heads of the cache holding
    the new tokens (each visible to itself), as [B, 1, Hq D]."""
    B, S, _ = kv_cache.shape
    D = qkv.shape[-1] // (Hq + 2 * Hkv)
    kv_cache = with_new_token(qkv, kv_cache, lengths)
    if key_mask is not None:
        key_mask = jnp.asarray(key_mask, jnp.int32).at[jnp.arange(B), jnp.asarray(lengths) - 1].set(1)
    q = qkv[:, 0, :Hq * D].reshape(B, Hq, D)
    k = kv_cache[..., :Hkv * D].reshape(B, S, Hkv, D)
    v = kv_cache[..., Hkv * D:].reshape(B, S, Hkv, D)
    out = reference.decode_attention(q, k, v, jnp.asarray(lengths), key_mask, sm_scale)
    return out.reshape(B, 1, Hq * D)


def run(qkv, kv_cache, lengths, key_mask=None, **kwargs):
    """(out, cache) of decode_attention under jax.jit, lengths and key_mask as runtime
    arguments."""
    f = jax.jit(lambda x, kv, n, m: decode.decode_attention(x, kv, n, key_mask=m, **kwargs))
    return f(qkv, kv_cache, jnp.asarray(lengths, jnp.int32), key_mask)


# (B, S, Hq, Hkv, D, lengths, block_n): MHA (GPT-2), a group of 4, a group of 3 (not a power of
# two); every row its own length. The large ones run the GPU's default blocks.
CASES = shapes(
    [(3, 80, 2, 2, 64, [17, 80, 1], 16), (2, 40, 8, 2, 32, [15, 16], 16),
     (2, 80, 6, 2, 32, [70, 2], 16)],
    [(64, 4352, 32, 8, 64, [(97 * b) % 4353 for b in range(63)] + [4352], None),
     (1, 384, 12, 12, 64, [384], None), (4, 1000, 12, 12, 64, [1000, 999, 513, 1], None)])


@pytest.mark.parametrize("num_splits", [None, 4])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("B,S,Hq,Hkv,D,lengths,block_n", CASES)
def test_matches_reference(key, dtype, num_splits, B, S, Hq, Hkv, D, lengths, block_n):
    qkv, kv_cache = random_inputs(key, B, S, Hq, Hkv, D, dtype)
    out, cache = run(qkv, kv_cache, lengths, num_heads=Hq, num_kv_heads=Hkv,
                     num_splits=num_splits, block_n=block_n)
    assert out.dtype == dtype and out.shape == (B, 1, Hq * D)
    assert_close(out, expected(qkv, kv_cache, lengths, Hq, Hkv))
    np.testing.assert_array_equal(cache, with_new_token(qkv, kv_cache, lengths))


def test_float16(key):
    B, S, Hq, Hkv, D, lengths = 2, 40, 4, 1, 32, [33, 9]
    qkv, kv_cache = random_inputs(key, B, S, Hq, Hkv, D, jnp.float16)
    out, cache = run(qkv, kv_cache, lengths, num_heads=Hq, num_kv_heads=Hkv, num_splits=2,
                     block_n=16)
    assert_close(out, expected(qkv, kv_cache, lengths, Hq, Hkv))
    np.testing.assert_array_equal(cache, with_new_token(qkv, kv_cache, lengths))


def left_padded(S, pads):
    """[B, S] int32 key mask of a left-padded prompt: pads[b] padding slots, then the row's
    prompt tokens and the generated ones (all 1)."""
    return jnp.asarray(np.arange(S)[None, :] >= np.asarray(pads)[:, None], jnp.int32)


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
def test_key_mask(key, dtype, num_splits):
    """Left padding of 0, 20 (one whole block masked) and 24 slots: the last row's 11 cached
    slots are all padding, so its new token sees only itself: each head's output is its value."""
    B, S, Hq, Hkv, D, lengths = 3, 48, 4, 2, 32, [40, 33, 12]
    qkv, kv_cache = random_inputs(key, B, S, Hq, Hkv, D, dtype)
    key_mask = left_padded(S, [0, 20, 24])
    if dtype == jnp.bfloat16:
        key_mask = key_mask.astype(bool)
    out, _ = run(qkv, kv_cache, lengths, key_mask, num_heads=Hq, num_kv_heads=Hkv, sm_scale=0.3,
                 num_splits=num_splits, block_n=16)
    assert_close(out, expected(qkv, kv_cache, lengths, Hq, Hkv, key_mask, sm_scale=0.3))
    v_new = qkv[2, 0, (Hq + Hkv) * D:].reshape(Hkv, D)
    assert_close(out[2, 0].reshape(Hq, D), jnp.repeat(v_new, Hq // Hkv, axis=0))


def test_slots_not_attended_are_not_read(key):
    """NaN in every slot at or past a row's length, in every masked slot and in the new token's
    slot (it is written, never read): the output is the same, bit for bit, as with the finite
    cache (those keys and values are never loaded)."""
    B, S, Hq, Hkv, D, lengths = 3, 48, 4, 2, 32, [17, 48, 1]
    qkv, kv_cache = random_inputs(key, B, S, Hq, Hkv, D, jnp.bfloat16)
    key_mask = left_padded(S, [3, 0, 0])
    attended = ((np.arange(S)[None, :] < np.asarray(lengths)[:, None] - 1)
                & np.asarray(key_mask, bool))
    poisoned = jnp.where(jnp.asarray(attended)[..., None], kv_cache, jnp.nan)
    kwargs = dict(num_heads=Hq, num_kv_heads=Hkv, num_splits=3, block_n=16)
    out, _ = run(qkv, poisoned, lengths, key_mask, **kwargs)
    np.testing.assert_array_equal(out, run(qkv, kv_cache, lengths, key_mask, **kwargs)[0])
    assert_close(out, expected(qkv, kv_cache, lengths, Hq, Hkv, key_mask))


def test_new_lengths_do_not_recompile(key):
    B, S, Hq, Hkv, D = 2, 40, 4, 2, 16
    qkv, kv_cache = random_inputs(key, B, S, Hq, Hkv, D, jnp.float32)
    traces = []

    @jax.jit
    def f(x, kv, lengths):
        traces.append(1)
        return decode.decode_attention(x, kv, lengths, num_heads=Hq, num_kv_heads=Hkv,
                                       num_splits=2, block_n=16)

    for lengths in ([5, 40], [33, 1]):
        out, _ = f(qkv, kv_cache, jnp.asarray(lengths, jnp.int32))
        assert_close(out, expected(qkv, kv_cache, lengths, Hq, Hkv))
    assert len(traces) == 1 and f._cache_size() == 1


def _shape(*shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


# qkv [2, 1, (4 + 2 * 2) * 16], cache [2, 10, 64] unless the case says otherwise.
@pytest.mark.parametrize("args,kwargs,match", [
    ((_shape(2, 3, 128), _shape(2, 10, 64), _shape(2, dtype=jnp.int32)), {}, "one token"),
    ((_shape(2, 1, 128), _shape(2, 10, 32), _shape(2, dtype=jnp.int32)), {}, "kv_cache must"),
    ((_shape(2, 1, 128), _shape(2, 10, 64, dtype=jnp.bfloat16), _shape(2, dtype=jnp.int32)), {},
     "kv_cache dtype"),
    ((_shape(2, 1, 128), _shape(2, 10, 64), _shape(2, 1, dtype=jnp.int32)), {}, "lengths"),
    ((_shape(2, 1, 128), _shape(2, 10, 64), _shape(2)), {}, "lengths"),
    ((_shape(2, 1, 128), _shape(2, 10, 64), _shape(2, dtype=jnp.int32)),
     {"key_mask": jnp.ones((2, 9), jnp.int32)}, "key_mask"),
    ((_shape(2, 1, 128), _shape(2, 10, 64), _shape(2, dtype=jnp.int32)),
     {"key_mask": jnp.ones((2, 10), jnp.float32)}, "key_mask"),
    ((_shape(2, 1, 4 * 24), _shape(2, 10, 2 * 24), _shape(2, dtype=jnp.int32)),
     {"num_heads": 2, "num_kv_heads": 1}, "head_dim"),
    ((_shape(2, 1, 7 * 16), _shape(2, 10, 64), _shape(2, dtype=jnp.int32)),
     {"num_heads": 3, "num_kv_heads": 2}, "num_kv_heads"),
    ((_shape(2, 1, 128), _shape(2, 10, 64), _shape(2, dtype=jnp.int32)), {"precision": "bf16"},
     "precision"),
    ((_shape(2, 1, 128), _shape(2, 10, 64), _shape(2, dtype=jnp.int32)), {"num_splits": 0},
     "num_splits"),
    ((_shape(2, 1, 128), _shape(2, 10, 64), _shape(2, dtype=jnp.int32)), {"block_n": 24},
     "block_n"),
])
def test_invalid_arguments(args, kwargs, match):
    """Each is refused while tracing (eval_shape: nothing runs)."""
    kwargs = {"num_heads": 4, "num_kv_heads": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(lambda *a: decode.decode_attention(*a, **kwargs), *args)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_traced_lengths_outside_the_cache_give_nan(key, num_splits):
    """Under jit a length outside [1, S] cannot be refused: that row's output is NaN (not the
    attention over a clamped length) and its cache row is not written; the other rows are
    untouched."""
    B, S, Hq, Hkv, D = 4, 40, 4, 2, 16
    qkv, kv_cache = random_inputs(key, B, S, Hq, Hkv, D, jnp.float32)
    out, cache = run(qkv, kv_cache, [17, S + 1, 0, -1], num_heads=Hq, num_kv_heads=Hkv,
                     num_splits=num_splits, block_n=16)
    assert np.isnan(np.asarray(out[1:])).all()
    assert_close(out[:1], expected(qkv[:1], kv_cache[:1], [17], Hq, Hkv))
    np.testing.assert_array_equal(cache[1:], kv_cache[1:])


@pytest.mark.parametrize("lengths", [[3, 11], [0, 2]])
def test_concrete_lengths_outside_the_cache(lengths):
    qkv, kv_cache = jnp.ones((2, 1, 128)), jnp.ones((2, 10, 64))
    with pytest.raises(ValueError, match="lengths must be in"):
        decode.decode_attention(qkv, kv_cache, jnp.asarray(lengths), num_heads=4, num_kv_heads=2)


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("Hq,Hkv", [(32, 8), (12, 12)])
def test_builds_for_hopper(D, Hq, Hkv):
    """The GPU configuration builds for sm_90 without spills, masked or not: at batch 1 (several
    splits, then the merge kernel) and at batch 64 (one split: the split kernel alone)."""
    S = 4096
    for B, kernels in ((1, {"_decode_split_kernel", "_decode_merge_kernel"}),
                       (64, {"_decode_split_kernel"})):
        args = (_shape(B, 1, (Hq + 2 * Hkv) * D, dtype=jnp.bfloat16),
                _shape(B, S, 2 * Hkv * D, dtype=jnp.bfloat16), _shape(B, dtype=jnp.int32))
        with compile_only(capability=90) as built:
            for mask in (None, _shape(B, S, dtype=jnp.int32)):
                jax.eval_shape(lambda x, kv, n, m: decode.decode_attention(
                    x, kv, n, num_heads=Hq, num_kv_heads=Hkv, key_mask=m), *args, mask)
        assert {k.name for k in built} == kernels
        for k in built:
            assert 0 < k.registers <= 255 and k.shared_bytes <= 227 * 1024, k
            assert k.spill_bytes == 0, k
