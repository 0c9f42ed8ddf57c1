"""jtgpt.train: the jitted step (accumulation, clipping, AdamW) and the example training script."""
import re

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


def _example():
    import importlib.util
    import pathlib
    script = pathlib.Path(__file__).parents[1] / "examples" / "train_gpt2.py"
    spec = importlib.util.spec_from_file_location("train_gpt2", script)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example


def test_example_script_resumes_on_another_device_count(tmp_path, capsys):
    example = _example()
    text = tmp_path / "input.txt"
    text.write_text("To be, or not to be, that is the question. " * 20, encoding="utf-8")
    common = ["--text", str(text), "--config", "tiny", "--batch", "4", "--seq", "16",
              "--log-every", "1", "--checkpoint", str(tmp_path / "run")]
    example.main(common + ["--steps", "2", "--devices", str(min(2, len(jax.devices())))])
    example.main(common + ["--steps", "3", "--resume"])
    out = capsys.readouterr().out
    assert "resumed from" in out and "at step 2" in out
    assert [line.split()[1] for line in out.splitlines() if line.startswith("step")] == \
        ["1", "2", "3"]


def test_example_script_refuses_bad_options(tmp_path):
    example = _example()
    text = tmp_path / "input.txt"
    text.write_text("To be, or not to be. " * 20, encoding="utf-8")
    common = ["--text", str(text), "--config", "tiny", "--steps", "1"]
    with pytest.raises(SystemExit, match="--resume needs --checkpoint DIR"):
        example.main(common + ["--resume"])
    with pytest.raises(SystemExit, match="--devices 0: this machine has"):
        example.main(common + ["--devices", "0"])


def test_example_script_trains_and_saves(tmp_path, capsys):
    example = _example()
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


def test_flat_adamw_step_equals_optax(key):
    """train.adamw keeps the parameters flat and updates them in one kernel: the same parameters
    and metrics, step for step, as optax's clip + adamw on the tree (a schedule; clipping acts)."""
    model = tiny(**NO_DROPOUT)
    ids = jax.random.randint(key, (4, 10), 0, 37)
    schedule = optax.linear_schedule(3e-2, 1e-2, 5)
    runs = []
    for optimizer in (train.adamw(schedule, clip_norm=0.5),
                      train.optax_adamw(schedule, clip_norm=0.5)):
        state, step = train.init(model, optimizer)
        metrics = []
        for i in range(3):
            state, m = step(state, {"input_ids": ids}, jax.random.key(i))
            metrics.append(m)
        assert step._cache_size() == 1  # the schedule's values never recompiled the step
        runs.append((train.model_of(model, state), metrics))
    (flat, m_flat), (tree, m_tree) = runs
    assert isinstance(train.init(model, train.adamw(1e-3))[0].params, jtgpt.optim.FlatParams)
    for a, b in zip(m_flat, m_tree):
        assert_close(a["loss"], b["loss"], rtol=1e-6)
        assert_close(a["grad_norm"], b["grad_norm"], rtol=1e-5)
        assert float(b["grad_norm"]) > 0.5  # the clipping acted
    _assert_same_params(flat, tree)


def _assert_same_params(model, expected, rtol=1e-5):
    """Each parameter within fp32 rounding of expected's, the key bias left out (below)."""
    for (path, a), (_, b) in zip(nnx.to_flat_state(_without_key_bias(model)),
                                 nnx.to_flat_state(_without_key_bias(expected))):
        assert_close(a[...], b[...], rtol=rtol, what=str(path))


def _without_key_bias(model):
    """model's parameters, the key part of c_attn's bias zeroed. Its gradient is 0 in exact math
    (q . (k + b) adds the same q . b to every key's score, which softmax cancels), so what it
    holds is rounding noise that Adam normalises into steps of ~lr: two correct implementations
    give it different values."""
    params = nnx.state(model, nnx.Param)
    D = model.config.n_embd
    for block in params["h"].values():
        bias = block["attn"]["c_attn"]["bias"]
        bias[...] = bias[...].at[D:2 * D].set(0.0)
    return params


def _mesh(devices):
    return jax.sharding.Mesh(np.asarray(devices), (train.DATA,))


def test_zero2_step_equals_the_one_device_step(key):
    """Data-parallel over every device the platform has (8 simulated CPU devices in the CPU
    suite): the same parameters and metrics as one device, and each device holds 1/N of the
    parameters and moments."""
    devices = jax.devices()[:8]
    n = len(devices)
    model = tiny(**NO_DROPOUT)
    ids = jax.random.randint(key, (2 * n, 10), 0, 37)
    labels = ids.at[0, 3:].set(-100)  # devices see different numbers of labelled tokens
    batch = {"input_ids": ids, "labels": labels}
    runs = []
    for mesh in (None, _mesh(devices)):
        state, step = train.init(model, train.adamw(1e-2, clip_norm=0.1), accum_steps=2,
                                 mesh=mesh)
        for i in range(2):
            state, metrics = step(state, batch, jax.random.key(i))
        runs.append((state, metrics))
    (one, m_one), (sharded, m_sharded) = runs
    assert int(m_one["tokens"]) == int(m_sharded["tokens"])
    assert_close(m_sharded["loss"], m_one["loss"], rtol=1e-6)
    assert_close(m_sharded["grad_norm"], m_one["grad_norm"], rtol=1e-5)
    # The devices' gradients are summed in another order than one device's; Adam divides by
    # sqrt(v), which scales that rounding up where a gradient is small: fp32's looser bound.
    _assert_same_params(train.model_of(model, sharded), train.model_of(model, one), rtol=1e-4)
    layout = sharded.params.layout
    # 1/N of every leaf a device: at most one padding value a leaf over an even split
    assert layout.shard_size <= -(-layout.size // n) + len(layout.order)
    for array in (sharded.params.buffer, sharded.opt_state.mu, sharded.opt_state.nu):
        assert array.sharding.spec == jax.sharding.PartitionSpec(train.DATA)
        assert {s.data.shape[0] for s in array.addressable_shards} == {layout.shard_size}
        assert len(array.addressable_shards) == n


def test_zero2_gathers_parameters_in_the_16_bit_compute_dtype(key):
    """A bf16-compute model (fp32 master weights) has its parameters all-gathered in bf16, leaf
    by leaf, and its first step's loss is the one device's: the model reads them rounded to bf16
    anyway. (The gradients differ at bf16's level: each device's dW is rounded to bf16 before
    the devices' sum.)"""
    devices = jax.devices()[:8]
    config = GPTConfig(vocab_size=37, n_positions=16, n_embd=32, n_layer=1, n_head=2, **NO_DROPOUT)
    model = jtgpt.GPT(config, dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    batch = {"input_ids": jax.random.randint(key, (2 * len(devices), 10), 0, 37)}
    metrics = []
    for mesh in (None, _mesh(devices)):
        state, step = train.init(model, train.adamw(1e-2), mesh=mesh)
        metrics.append(step(state, batch, jax.random.key(0))[1])
        if mesh is not None:
            hlo = step.lower(state, batch, jax.random.key(0)).as_text()
            gathers = re.findall(r"all_gather.*-> tensor<\d+x(\w+)>", hlo)
            assert gathers and set(gathers) == {"bf16"}, set(gathers)
            assert len(gathers) == len(state.params.layout.order)
    assert_close(metrics[1]["loss"], metrics[0]["loss"], rtol=1e-6)
    assert_close(metrics[1]["grad_norm"], metrics[0]["grad_norm"], rtol=1e-3)


def test_bad_meshes_are_clear_errors(key):
    devices = jax.devices()[:2]
    with pytest.raises(ValueError, match="must have a 'data' axis"):
        train.init(tiny(), train.adamw(1e-3),
                   mesh=jax.sharding.Mesh(np.asarray(devices), ("batch",)))
    with pytest.raises(ValueError, match="needs jtgpt's AdamW"):
        train.init(tiny(), optax.adamw(1e-3), mesh=_mesh(devices))
    if len(devices) == 2:
        state, step = train.init(tiny(), train.adamw(1e-3), mesh=_mesh(devices))
        with pytest.raises(ValueError, match="divisible by the mesh's 2 'data' devices"):
            step(state, {"input_ids": jnp.zeros((3, 8), jnp.int32)}, key)


@pytest.mark.parametrize("saved_on, restored_on", [(None, None), (8, 2), (2, None)])
def test_save_and_restore_round_trip_across_device_counts(key, tmp_path, saved_on, restored_on):
    """A run saved after two steps and resumed (on the same or another number of devices) makes
    the same third step as the run that went on."""
    devices = jax.devices()
    mesh_of = lambda n: None if n is None or len(devices) < n else _mesh(devices[:n])  # noqa: E731
    model = tiny(**NO_DROPOUT)
    batch = {"input_ids": jax.random.randint(key, (8, 10), 0, 37)}
    state, step = train.init(model, train.adamw(1e-2), mesh=mesh_of(saved_on))
    for i in range(2):
        state, _ = step(state, batch, jax.random.key(i))
    train.save(tmp_path / "ckpt", state)
    state, reference = step(state, batch, jax.random.key(2))

    fresh, resumed_step = train.init(model, train.adamw(1e-2), mesh=mesh_of(restored_on))
    resumed = train.restore(tmp_path / "ckpt", fresh)
    assert int(resumed.step) == 2 and int(resumed.opt_state.count) == 2
    assert all(a.sharding == b.sharding for a, b in zip(jax.tree.leaves(resumed),
                                                        jax.tree.leaves(fresh)))
    resumed, metrics = resumed_step(resumed, batch, jax.random.key(2))
    assert_close(metrics["loss"], reference["loss"], rtol=1e-6)
    _assert_same_params(train.model_of(model, resumed), train.model_of(model, state))


def test_save_and_restore_an_optax_state(key, tmp_path):
    model = tiny(**NO_DROPOUT)
    state, step = train.init(model, optax.adamw(1e-2))
    state, _ = step(state, {"input_ids": jax.random.randint(key, (2, 8), 0, 37)}, key)
    train.save(tmp_path / "ckpt", state)
    restored = train.restore(tmp_path / "ckpt", train.init(model, optax.adamw(1e-2))[0])
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    wider = jtgpt.GPT(GPTConfig(vocab_size=37, n_positions=16, n_embd=64, n_layer=1, n_head=2))
    other = train.init(wider, optax.adamw(1e-2))[0]
    with pytest.raises(ValueError, match="does not fit this model and optimizer"):
        train.restore(tmp_path / "ckpt", other)
    with pytest.raises(ValueError, match="no train state in"):
        train.restore(tmp_path / "missing", restored)
