"""jtgpt's AdamW: the flat kernel vs jtgpt.reference.adamw, and jtgpt.optim.adamw vs optax.adamw
step for step (schedules, masks, clipping, a scalar leaf, 16-bit parameters), under jax.jit."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_close, shapes
from flax import nnx

import jtgpt
from jtgpt import optim, reference
from jtgpt.call import compile_only
from jtgpt.kernels.adamw import SCALARS, Hyper, adamw_update, sum_of_squares
from jtgpt.models.gpt2 import GPTConfig

HYPER = Hyper(b1=0.9, b2=0.95, eps=1e-8, eps_root=0.0, weight_decay=0.1)
# Not a multiple of the interpreter's block (256) or the GPU's (4096).
SIZES = shapes(small=[1, 1000], large=[124_439_808 // 64 + 3])


def _flat_inputs(key, n, grad_dtype):
    kp, kg, km, kv = jax.random.split(key, 4)
    params = jax.random.normal(kp, (n,), jnp.float32)
    grads = (0.1 * jax.random.normal(kg, (n,))).astype(grad_dtype)
    mu = 0.01 * jax.random.normal(km, (n,), jnp.float32)
    nu = 1e-4 * jax.random.uniform(kv, (n,), jnp.float32)
    return params, grads, mu, nu


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("grad_dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("clip", [None, 0.5, 2.0])  # off; max_norm = half the norm; twice
@pytest.mark.parametrize("apply", [True, False])
def test_kernel_matches_the_reference(key, n, grad_dtype, clip, apply):
    params, grads, mu, nu = _flat_inputs(key, n, grad_dtype)
    count, lr, decay_end, scale = 6, 3e-3, n // 3, 0.37
    norm = jnp.sqrt(jnp.sum(jnp.square(grads.astype(jnp.float32) * scale)))
    if clip:
        clip = clip * float(norm)
    scalars = optim.bias_corrected_scalars(lr, jnp.int32(count), HYPER.b1, HYPER.b2,
                                           norm if clip else None, clip, grad_scale=scale)
    step = jax.jit(lambda p, g, m, v, s: adamw_update(
        p, g, m, v, s, HYPER, decay_end=decay_end, clip=clip is not None, apply=apply))
    out, m_out, v_out = step(params, grads, mu, nu, scalars)
    new, updates, m_ref, v_ref = reference.adamw(
        params, grads, mu, nu, learning_rate=lr, count=count, b1=HYPER.b1, b2=HYPER.b2,
        eps=HYPER.eps, weight_decay=HYPER.weight_decay, decay_end=decay_end, max_norm=clip,
        grad_scale=scale)
    assert_close(m_out, m_ref, rtol=1e-6, what="mu")
    assert_close(v_out, v_ref, rtol=1e-6, what="nu")
    if apply:
        assert_close(out, new, rtol=1e-6, what="params")
    else:
        assert_close(out, updates, rtol=1e-5, what="updates")
    if clip and clip < norm:  # the clip changed the step: a test of the clipping, not a no-op
        unclipped = reference.adamw(params, grads, mu, nu, learning_rate=lr, count=count,
                                    b1=HYPER.b1, b2=HYPER.b2, eps=HYPER.eps,
                                    weight_decay=HYPER.weight_decay, decay_end=decay_end,
                                    grad_scale=scale)
        assert not np.allclose(np.asarray(m_out), np.asarray(unclipped[2]))


@pytest.mark.parametrize("n", [*SIZES, 0])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_sum_of_squares_matches_the_reference(key, n, dtype):
    x = jax.random.normal(key, (n,), jnp.float32).astype(dtype)
    got = jax.jit(lambda x: sum_of_squares(x, block=256))(x)
    assert got.dtype == jnp.float32
    assert_close(got, jnp.sum(jnp.square(x.astype(jnp.float32))), rtol=1e-5)
    with pytest.raises(ValueError, match="x must be a flat"):
        sum_of_squares(x.reshape(1, n))


def test_kernel_writes_a_16_bit_copy_of_the_master_weights(key):
    params, grads, mu, nu = _flat_inputs(key, 777, jnp.bfloat16)
    scalars = optim.bias_corrected_scalars(1e-3, jnp.int32(0), HYPER.b1, HYPER.b2)
    new, _, _, copy = jax.jit(lambda *a: adamw_update(*a, HYPER, decay_end=777,
                                                      cast_dtype=jnp.bfloat16))(
        params, grads, mu, nu, scalars)
    assert copy.dtype == jnp.bfloat16 and new.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(copy), np.asarray(new.astype(jnp.bfloat16)))


def _tree(key, dtype=jnp.float32):
    """Odd sizes, a scalar leaf, a nested dict: what a model's parameters look like."""
    k = jax.random.split(key, 4)
    return {"block": {"w": jax.random.normal(k[0], (37, 5), dtype),
                      "b": jax.random.normal(k[1], (5,), dtype)},
            "embed": jax.random.normal(k[2], (3, 7, 2), dtype),
            "scale": jnp.asarray(0.3, dtype)}


MATRICES = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731


@pytest.mark.parametrize("shards", [1, 3])
def test_flat_layout_splits_every_leaf_over_the_shards(key, shards):
    """Block d of the buffer holds piece d of every leaf (the decayed ones first), each leaf's
    last piece zero-padded; unflatten undoes flatten."""
    params = _tree(key)
    layout = optim.FlatLayout.of(params, MATRICES(params), shards)
    flat = layout.flatten(params)
    assert flat.shape == (shards * layout.shard_size,)
    leaves = jax.tree.leaves(params)
    assert layout.shard_size == sum(-(-leaf.size // shards) for leaf in leaves)
    assert layout.decay_end == sum(-(-leaf.size // shards) for leaf in leaves if leaf.ndim >= 2)
    blocks = np.asarray(flat).reshape(shards, layout.shard_size)
    for j, i in enumerate(layout.order):
        values = np.ravel(np.asarray(leaves[i]))
        piece = blocks[:, layout.offsets[j]:layout.offsets[j] + layout.pieces[j]].reshape(-1)
        np.testing.assert_array_equal(piece[:values.size], values)
        assert not piece[values.size:].any()
        assert (j < len(layout.order) - 1 or layout.offsets[j] + layout.pieces[j]
                == layout.shard_size)
    assert [leaves[i].ndim >= 2 for i in layout.order] == sorted(
        [leaf.ndim >= 2 for leaf in leaves], reverse=True)
    for a, b in zip(jax.tree.leaves(layout.unflatten(flat)), leaves):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="shards must be >= 1, got 0"):
        optim.FlatLayout.of(params, MATRICES(params), 0)


@pytest.mark.parametrize("learning_rate", [3e-3, optax.warmup_cosine_decay_schedule(
    0.0, 1e-2, warmup_steps=2, decay_steps=10)])
@pytest.mark.parametrize("mask", [None, MATRICES, "tree"])
@pytest.mark.parametrize("clip_norm", [None, 1.0])
def test_transform_matches_optax_step_for_step(key, learning_rate, mask, clip_norm):
    params = _tree(key)
    if mask == "tree":
        mask = {"block": {"w": True, "b": False}, "embed": False, "scale": True}
    kwargs = dict(b1=0.8, b2=0.99, eps=1e-6, weight_decay=0.05, mask=mask)
    expected = optax.adamw(learning_rate, **kwargs)
    if clip_norm:
        expected = optax.chain(optax.clip_by_global_norm(clip_norm), expected)
    tx = optim.adamw(learning_rate, clip_norm=clip_norm, **kwargs)
    update = jax.jit(tx.update)
    ours, theirs = params, params
    state, ref_state = tx.init(params), expected.init(params)
    for i in range(4):
        grads = jax.tree.map(lambda p: 3.0 * jax.random.normal(jax.random.fold_in(key, i), p.shape),
                             params)  # global norm ~ 3 x sqrt(227) >> clip_norm: clipping acts
        updates, state = update(grads, state, ours)
        ours = optax.apply_updates(ours, updates)
        ref_updates, ref_state = expected.update(grads, ref_state, theirs)
        theirs = optax.apply_updates(theirs, ref_updates)
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
            assert_close(a, b, rtol=1e-6, what=f"step {i}")
    assert int(state.count) == 4 and state.mu.dtype == state.nu.dtype == jnp.float32
    assert update._cache_size() == 1  # the schedule's values never recompiled the step


def test_16_bit_params_keep_fp32_moments(key):
    """bf16 params and gradients: the moments stay fp32 and the update is optax's fp32 math on
    the upcast values, rounded once to bf16."""
    params = _tree(key, jnp.bfloat16)
    tx = optim.adamw(1e-2, weight_decay=0.1)
    state = tx.init(params)
    assert state.mu.dtype == state.nu.dtype == jnp.float32
    grads = jax.tree.map(lambda p: jax.random.normal(key, p.shape, jnp.bfloat16), params)
    updates, state = jax.jit(tx.update)(grads, state, params)
    up32 = lambda t: jax.tree.map(lambda x: x.astype(jnp.float32), t)  # noqa: E731
    expected, _ = optax.adamw(1e-2, weight_decay=0.1).update(up32(grads), optax.adamw(
        1e-2, weight_decay=0.1).init(up32(params)), up32(params))
    for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(expected)):
        assert a.dtype == jnp.bfloat16
        assert_close(a, b.astype(jnp.bfloat16), dtype=jnp.bfloat16)


def test_composes_with_optax_chain_and_nnx_optimizer():
    model = jtgpt.GPT(GPTConfig(vocab_size=37, n_positions=16, n_embd=32, n_layer=1, n_head=2,
                                embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0),
                      rngs=nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(1), (2, 8), 0, 37)
    # One gradient for both optimizers, applied twice: a gradient recomputed on each one's
    # parameters would carry the model's own rounding into the comparison.
    grads = nnx.grad(lambda m: m.loss(ids))(model)
    results = []
    unit = optax.scale_by_schedule(lambda n: 1.0)
    for tx in (optax.chain(unit, optim.adamw(1e-2, mask=MATRICES)),
               optax.chain(unit, optax.adamw(1e-2, mask=MATRICES))):
        m = nnx.clone(model)
        optimizer = nnx.Optimizer(m, tx, wrt=nnx.Param)
        for _ in range(2):
            optimizer.update(m, grads)
        results.append(jax.tree.leaves(nnx.state(m, nnx.Param)))
    for a, b in zip(*results):
        assert_close(a, b, rtol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(b1=1.0), "b1 must be in"),
    (dict(eps=-1.0), "eps must be >= 0"),
    (dict(clip_norm=0.0), "clip_norm must be > 0"),
    (dict(learning_rate=-1.0), "learning_rate must be >= 0"),
])
def test_bad_options_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        optim.adamw(**({"learning_rate": 1e-3} | kwargs))


def test_bad_updates_are_refused(key):
    params = _tree(key)
    tx = optim.adamw(1e-3)
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    with pytest.raises(ValueError, match="needs params"):
        tx.update(grads, state)
    with pytest.raises(ValueError, match="init it from these parameters"):
        tx.update({"w": jnp.ones(3)}, state, {"w": jnp.ones(3)})
    with pytest.raises(ValueError, match="mu must be float32"):
        adamw_update(jnp.ones(3), jnp.ones(3), jnp.ones(3, jnp.bfloat16), jnp.ones(3),
                     jnp.ones(6), HYPER, decay_end=0)
    with pytest.raises(ValueError, match="grads must be a flat"):
        adamw_update(jnp.ones(3), jnp.ones(4), jnp.ones(3), jnp.ones(3), jnp.ones(6), HYPER,
                     decay_end=0)
    with pytest.raises(ValueError, match="decay_end must be in"):
        adamw_update(jnp.ones(3), jnp.ones(3), jnp.ones(3), jnp.ones(3), jnp.ones(6), HYPER,
                     decay_end=4)
    with pytest.raises(ValueError, match=r"scalars must be \[6\]"):
        adamw_update(jnp.ones(3), jnp.ones(3), jnp.ones(3), jnp.ones(3), jnp.ones(4), HYPER,
                     decay_end=0)
    with pytest.raises(ValueError, match="params must be float32 to be updated in place"):
        adamw_update(jnp.ones(3, jnp.bfloat16), jnp.ones(3), jnp.ones(3), jnp.ones(3),
                     jnp.ones(6), HYPER, decay_end=0)
    with pytest.raises(ValueError, match="cast_dtype needs apply=True"):
        adamw_update(jnp.ones(3), jnp.ones(3), jnp.ones(3), jnp.ones(3), jnp.ones(6), HYPER,
                     decay_end=0, apply=False, cast_dtype=jnp.bfloat16)
    clipped = optim.adamw(1e-3, clip_norm=1.0)
    with pytest.raises(ValueError, match="the gradient's global norm is needed"):
        optim.apply_flat(clipped.settings, jnp.ones(3), jnp.ones(3), clipped.init(jnp.ones(3)),
                         decay_end=3)


def test_kernel_builds_for_hopper_without_spills():
    n = 10_000
    args = [jax.ShapeDtypeStruct((n,), jnp.float32)] * 4 + [jax.ShapeDtypeStruct((len(SCALARS),),
                                                                      jnp.float32)]
    with compile_only(capability=90) as built:
        jax.eval_shape(lambda *a: adamw_update(*a, HYPER, decay_end=n // 2, clip=True,
                                               cast_dtype=jnp.bfloat16), *args)
    (kernel,) = built
    assert kernel.spill_bytes == 0 and 0 < kernel.registers <= 128, kernel


def test_apply_flat_equals_the_transform(key):
    """The in-place flat step (what jtgpt.train runs) gives the parameters the optax form gives,
    with the decay boundary as a traced value (each ZeRO shard passes its own)."""
    params = _tree(key)
    tx = optim.adamw(optax.linear_schedule(1e-2, 1e-3, 4), weight_decay=0.1, mask=MATRICES,
                     clip_norm=0.5)
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.fold_in(key, 1), p.shape), params)
    updates, _ = tx.update(grads, tx.init(params), params)
    expected = optax.apply_updates(params, updates)
    layout = tx.settings.layout(params)
    flat_grads = layout.flatten(grads)
    norm = jnp.sqrt(jnp.sum(flat_grads * flat_grads))
    step = jax.jit(lambda p, g, s, d, n: optim.apply_flat(tx.settings, p, g, s, decay_end=d,
                                                          norm=n))
    buffer, state = step(layout.flatten(params), flat_grads, tx.init(params),
                         jnp.int32(layout.decay_end), norm)
    assert int(state.count) == 1
    for a, b in zip(jax.tree.leaves(layout.unflatten(buffer)), jax.tree.leaves(expected)):
        assert_close(a, b, rtol=1e-6)
