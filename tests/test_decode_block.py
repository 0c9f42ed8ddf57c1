"""The fused GPT-2 decode block (jtgpt.kernels.decode_block.block_decode) against
jtgpt.reference.gpt2_block_decode on random weights and caches: the block's output, and the cache
with the new token's k and v in slot length - 1.

On CPU the interpreter runs each phase as its own launch, so several programs (num_programs 3-7)
split every phase as on the GPU, where all phases run in one launch and meet at grid barriers.
Small shapes: C = 48 (3 heads of 16), so each program owns a few columns and the last ones own
none; lengths 1, a key block - 1 and + 1 (16-key blocks at capacity 40) and the full cache, with
forced splits leaving some empty. The sm_90 build at GPT-2's shapes is checked at the end.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_close
from jtgpt import reference
from jtgpt.call import compile_only
from jtgpt.kernels.decode_block import BlockWeights, block_decode

C, H, S = 48, 3, 40
SHAPES = [(C,), (C,), (C, 3 * C), (3 * C,), (C, C), (C,), (C,), (C,), (C, 4 * C), (4 * C,),
          (4 * C, C), (C,)]


def random_block(seed, dtype):
    """(x [1, 1, C], kv_cache [1, S, 2C], BlockWeights): normal values, norm weights around 1,
    matrices scaled by 1 / sqrt(K) so that every activation stays O(1)."""
    keys = jax.random.split(jax.random.key(seed), len(SHAPES) + 2)
    normal = lambda key, shape: jax.random.normal(key, shape, jnp.float32)
    weights = []
    for i, shape in enumerate(SHAPES):
        w = normal(keys[i], shape)
        w = w / shape[0] ** 0.5 if len(shape) == 2 else (1.0 + 0.2 * w if i in (0, 6) else 0.2 * w)
        weights.append(w.astype(dtype))
    x = normal(keys[-2], (1, 1, C)).astype(dtype)
    kv_cache = normal(keys[-1], (1, S, 2 * C)).astype(dtype)
    return x, kv_cache, BlockWeights(*weights)


def check(x, kv_cache, length, weights, key_mask=None, **options):
    lengths = jnp.array([length], jnp.int32)
    out, cache, barrier = block_decode(x, kv_cache, lengths, weights, num_heads=H, eps=1e-5,
                                       key_mask=key_mask, **options)
    ref_out, ref_cache = reference.gpt2_block_decode(x, kv_cache, lengths, tuple(weights), H,
                                                     1e-5, key_mask)
    assert out.shape == x.shape and out.dtype == x.dtype
    np.testing.assert_array_equal(barrier, [0])  # left at 0 for the next launch
    assert_close(out, ref_out, what="block output")
    assert_close(cache, ref_cache, what="cache")
    # Only slot length - 1 changes.
    np.testing.assert_array_equal(np.delete(np.asarray(cache[0], np.float32), length - 1, 0),
                                  np.delete(np.asarray(kv_cache[0], np.float32), length - 1, 0))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("length,num_programs,num_splits", [
    (1, 3, None), (15, 5, 3), (17, 7, 4), (S, 3, 2), (17, 1, None)])
def test_matches_reference(dtype, length, num_programs, num_splits):
    x, kv_cache, weights = random_block(0, dtype)
    check(x, kv_cache, length, weights, num_programs=num_programs, num_splits=num_splits)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_key_mask(dtype):
    """Masked slots are skipped (and never read: they hold NaN here); the new token always sees
    itself, even where the mask says 0."""
    x, kv_cache, weights = random_block(1, dtype)
    key_mask = (jax.random.uniform(jax.random.key(2), (1, S)) > 0.4).astype(jnp.int32)
    length = 23
    key_mask = key_mask.at[0, length - 1].set(0)
    poisoned = jnp.where(key_mask[..., None] == 0, jnp.nan, kv_cache).astype(dtype)
    out, _, _ = block_decode(x, poisoned, jnp.array([length]), weights, num_heads=H, eps=1e-5,
                          key_mask=key_mask, num_programs=4, num_splits=3)
    ref_out, _ = reference.gpt2_block_decode(x, kv_cache, jnp.array([length]), tuple(weights),
                                             H, 1e-5, key_mask)
    assert_close(out, ref_out)


def test_weights_stored_n_by_k():
    """w_nk: the four matrices transposed ([N, K]) give the same block."""
    x, kv_cache, weights = random_block(3, jnp.float32)
    transposed = weights._replace(**{name: getattr(weights, name).T for name in (
        "c_attn_weight", "attn_c_proj_weight", "c_fc_weight", "mlp_c_proj_weight")})
    lengths = jnp.array([9])
    a = block_decode(x, kv_cache, lengths, weights, num_heads=H, eps=1e-5, num_programs=3)
    b = block_decode(x, kv_cache, lengths, transposed, num_heads=H, eps=1e-5, num_programs=3,
                     w_nk=True)
    assert_close(b[0], a[0])
    np.testing.assert_array_equal(b[1], a[1])


def test_barrier_passes_from_call_to_call():
    """Three blocks in a row in one jit, each launch given the counter the previous one
    returned (as GPT-2's decode step passes it): each block as the reference computes it."""
    x, kv_cache, weights = random_block(6, jnp.float32)
    lengths = jnp.array([12])

    @jax.jit
    def three_blocks(x, kv_cache):
        barrier, outs = None, []
        for _ in range(3):
            x, kv_cache, barrier = block_decode(x, kv_cache, lengths, weights, num_heads=H,
                                                eps=1e-5, barrier=barrier, num_programs=5)
            outs.append(x)
        return outs, barrier

    outs, barrier = three_blocks(x, kv_cache)
    for out in outs:
        x, kv_cache = reference.gpt2_block_decode(x, kv_cache, lengths, tuple(weights), H, 1e-5)
        assert_close(out, x)
    np.testing.assert_array_equal(barrier, [0])


def test_traced_length_outside_the_cache_gives_nan():
    """Under jit a length outside [1, S] cannot be refused: the output is NaN and no slot is
    written."""
    x, kv_cache, weights = random_block(4, jnp.float32)
    run = jax.jit(lambda n: block_decode(x, kv_cache, n, weights, num_heads=H, eps=1e-5,
                                         num_programs=3))
    for length in (0, S + 1):
        out, cache, _ = run(jnp.array([length]))
        assert np.isnan(np.asarray(out)).all()
        np.testing.assert_array_equal(cache, kv_cache)


def _shape(*shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


@pytest.mark.parametrize("change,match", [
    (dict(x=_shape(2, 1, C)), "one token of one sequence"),
    (dict(kv_cache=_shape(1, S, C)), "kv_cache must be"),
    (dict(kv_cache=_shape(1, S, 2 * C, dtype=jnp.bfloat16)), "kv_cache must be"),
    (dict(lengths=_shape(2, dtype=jnp.int32)), "lengths must have shape"),
    (dict(key_mask=_shape(1, S - 1, dtype=jnp.int32)), "key_mask must have shape"),
    (dict(num_heads=5), "head dim"),
    (dict(c_fc_weight=_shape(4 * C, C)), "weights.c_fc_weight must be"),
    (dict(ln_2_bias=_shape(C, dtype=jnp.bfloat16)), "weights.ln_2_bias must be"),
])
def test_invalid_arguments(change, match):
    """Each is refused while tracing (eval_shape: nothing runs)."""
    args = dict(x=_shape(1, 1, C), kv_cache=_shape(1, S, 2 * C), lengths=_shape(1, dtype=jnp.int32),
                key_mask=None, num_heads=H)
    weights = {name: _shape(*shape) for name, shape in zip(BlockWeights._fields, SHAPES)}
    for name, value in change.items():
        (weights if name in weights else args)[name] = value
    num_heads = args.pop("num_heads")
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(lambda a, w: block_decode(a["x"], a["kv_cache"], a["lengths"],
                                                 BlockWeights(**w), key_mask=a["key_mask"],
                                                 num_heads=num_heads, eps=1e-5),
                       args, weights)


def test_concrete_length_outside_the_cache():
    x, kv_cache, weights = random_block(5, jnp.float32)
    with pytest.raises(ValueError, match="lengths must be in"):
        block_decode(x, kv_cache, jnp.array([S + 1]), weights, num_heads=H, eps=1e-5)


@pytest.mark.parametrize("w_nk", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_builds_for_hopper(w_nk, masked):
    """GPT-2's shapes (C = 768, 12 heads, 1024 slots) build for sm_90 without spills, one program
    per SM of an H100."""
    n = 768
    weights = {name: _shape(*(tuple(n * d // C for d in s)[::-1] if w_nk else
                              tuple(n * d // C for d in s)), dtype=jnp.bfloat16)
               for name, s in zip(BlockWeights._fields, SHAPES)}
    mask = _shape(1, 1024, dtype=jnp.int32) if masked else None
    with compile_only(capability=90) as built:
        jax.eval_shape(lambda x, kv, n_, w, m: block_decode(
            x, kv, n_, BlockWeights(**w), num_heads=12, eps=1e-5, key_mask=m, w_nk=w_nk,
            num_programs=132), _shape(1, 1, n, dtype=jnp.bfloat16),
            _shape(1, 1024, 2 * n, dtype=jnp.bfloat16), _shape(1, dtype=jnp.int32), weights, mask)
    (kernel,) = built
    assert kernel.spill_bytes == 0 and 0 < kernel.registers <= 255, kernel


def test_one_launch_with_barriers():
    """All phases in one launch, meeting at the grid barriers: in the interpreter only a single
    program can pass them (it runs programs one after another); the GPU suite runs the defaults,
    one launch of one program per SM."""
    x, kv_cache, weights = random_block(7, jnp.bfloat16)
    check(x, kv_cache, 30, weights, num_programs=1, num_splits=3, one_launch=True)
