"""jtgpt.train: the jitted step (accumulation, clipping, AdamW) and the example training script."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_close
from flax import nnx

import jtgpt
from jtgpt import train
from jtgpt.models.gpt2 import GPTConfig

NO_DROPOUT = dict(embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0)


def tiny(**overrides):
    config = GPTConfig(vocab_size=37, n_positions=16, n_embd=32, n_layer=1, n_head=2, **overrides)
    return jtgpt.GPT(config, rngs=nnx.Rngs(0))


def test_a_few_steps_lower_the_loss(key):
    model = tiny()  # GPT-2's dropout, on in training
    ids = jax.random.randint(key, (4, 12), 0, 37)
    state, step = train.init(model, train.adamw(3e-2))
    before = float(jax.jit(lambda m: m.loss(ids))(model))
    losses = []
    for i in range(6):
        state, metrics = step(state, {"input_ids": ids}, jax.random.key(i))
        losses.append(float(metrics["loss"]))
    after = float(jax.jit(lambda m: m.loss(ids))(train.model_of(model, state)))
    assert int(state.step) == 6 and int(metrics["tokens"]) == 4 * 11
    assert after < 0.8 * before, (before, losses, after)
    # init copied the parameters: the step's donation left the caller's model intact.
    assert float(jax.jit(lambda m: m.loss(ids))(model)) == before


def test_accumulation_equals_one_big_batch(key):
    """Two micro-batches with different numbers of labelled tokens: the step must weight them by
    tokens, not average their means. (Plain SGD: the update is the gradient itself, where Adam's
    first step, g / |g|, would amplify rounding in tiny gradient entries.)"""
    model = tiny(**NO_DROPOUT)
    k_ids, k_step = jax.random.split(key)
    ids = jax.random.randint(k_ids, (4, 10), 0, 37)
    labels = ids.at[:2, 3:].set(-100)  # the first micro-batch has far fewer labelled tokens
    batch = {"input_ids": ids, "labels": labels}
    optimizer = optax.sgd(1.0)
    results = []
    for accum_steps in (1, 2):
        state, step = train.init(model, optimizer, accum_steps=accum_steps)
        state, metrics = step(state, batch, k_step)
        results.append((state, metrics))
    (one, m1), (two, m2) = results
    assert int(m1["tokens"]) == int(m2["tokens"]) == 2 * 2 + 2 * 9
    assert_close(m2["loss"], m1["loss"], rtol=1e-6)
    assert_close(m2["grad_norm"], m1["grad_norm"], rtol=1e-5)
    _, params = nnx.split(model, nnx.Param)
    for a, b, p in zip(jax.tree.leaves(two.params), jax.tree.leaves(one.params), jax.tree.leaves(params)):
        assert_close(a - p, b - p, rtol=1e-5)


def test_metrics_and_clipping(key):
    """grad_norm is the norm of the mean gradient, and clipping rescales what the optimizer gets:
    with optax.identity() as the optimizer, a step adds the (clipped) gradient to the params."""
    model = tiny(**NO_DROPOUT)
    ids = jax.random.randint(key, (2, 9), 0, 37)
    graphdef, params = nnx.split(model, nnx.Param)
    loss, grads = jax.jit(jax.value_and_grad(lambda p: nnx.merge(graphdef, p).loss(ids)))(params)
    norm = train.global_norm(grads)
    for clip in (None, float(norm) / 4):
        tx = optax.identity() if clip is None else optax.chain(optax.clip_by_global_norm(clip), optax.identity())
        state, step = train.init(model, tx)
        state, metrics = step(state, {"input_ids": ids}, key)
        assert_close(metrics["loss"], loss, rtol=1e-6)
        assert_close(metrics["grad_norm"], norm, rtol=1e-5)
        applied = jax.tree.map(lambda new, old: new - old, state.params, params)
        assert_close(train.global_norm(applied), norm if clip is None else norm / 4, rtol=1e-4)


def test_weight_decay_skips_biases_and_norms():
    model = tiny(**NO_DROPOUT)
    _, params = nnx.split(model, nnx.Param)
    zero = jax.tree.map(jnp.zeros_like, params)
    optimizer = train.adamw(0.1, weight_decay=0.5, clip_norm=None)
    updates, _ = optimizer.update(zero, optimizer.init(params), params)
    for (path, update), param in zip(nnx.to_flat_state(updates), jax.tree.leaves(params)):
        decayed = param.ndim >= 2
        assert np.any(np.asarray(update[...]) != 0) == decayed, path


def test_bad_batch_is_a_clear_error(key):
    state, step = train.init(tiny(), train.adamw(1e-3), accum_steps=3)
    with pytest.raises(ValueError, match="divisible by accum_steps=3"):
        step(state, {"input_ids": jnp.zeros((4, 8), jnp.int32)}, key)
    with pytest.raises(ValueError, match="accum_steps"):
        train.init(tiny(), train.adamw(1e-3), accum_steps=0)


def test_example_script_trains_and_saves(tmp_path, capsys):
    import importlib.util
    import pathlib
    script = pathlib.Path(__file__).parents[1] / "examples" / "train_gpt2.py"
    spec = importlib.util.spec_from_file_location("train_gpt2", script)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    text = tmp_path / "input.txt"
    text.write_text("To be, or not to be, that is the question. " * 20, encoding="utf-8")
    example.main(["--text", str(text), "--config", "tiny", "--steps", "2", "--batch", "2",
                  "--seq", "16", "--log-every", "1", "--save", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert out.count("tokens/s") == 2 and "held-out loss" in out
    assert jtgpt.GPT.from_pretrained(tmp_path / "out").config.vocab_size == 256


def test_16_bit_models_train_through_fp32_master_weights(key):
    """A pure fp16 model (bf16 takes the same path): the state keeps fp32 parameters and moments (fp16 moments turned
    the first AdamW update into NaN: eps = 1e-8 and the squared gradients underflow), the loss
    falls, nothing is NaN, and model_of gives the parameters back in the model's dtype."""
    dtype = jnp.float16
    config = GPTConfig(vocab_size=37, n_positions=16, n_embd=32, n_layer=1, n_head=2, **NO_DROPOUT)
    model = jtgpt.GPT(config, dtype=dtype, rngs=nnx.Rngs(0))
    ids = jax.random.randint(key, (4, 12), 0, 37)
    state, step = train.init(model, train.adamw(3e-2))
    floats = [x for x in jax.tree.leaves((state.params, state.opt_state))
              if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floats and all(x.dtype == jnp.float32 for x in floats)
    before = float(jax.jit(lambda m: m.loss(ids))(model))
    for i in range(6):
        state, metrics = step(state, {"input_ids": ids}, jax.random.key(i))
        assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
    trained = train.model_of(model, state)
    for leaf in jax.tree.leaves(nnx.state(trained, nnx.Param)):
        assert leaf.dtype == dtype and bool(jnp.isfinite(leaf).all())
    after = float(jax.jit(lambda m: m.loss(ids))(trained))
    assert after < 0.8 * before, (before, after)
