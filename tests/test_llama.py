"""jtgpt.Llama against Hugging Face's PyTorch LlamaForCausalLM (transformers 4.57) on the same
random weights: logits, losses, every parameter's gradient, checkpoints both ways.

HF's Flax Llama ignores rope_scaling, so PyTorch is the reference throughout (also for the
llama3-scaled configs, whose positions here run past original_max_position_embeddings).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import (assert_close, assert_gradient_matches_finite_differences, left_padding,
                      lm_labels, relative_error, shapes)
from flax import nnx

import jtgpt
from jtgpt.kernels.rope import RopeScaling
from jtgpt.models.llama import PRESETS, LlamaConfig

TINY = dict(vocab_size=101, hidden_size=64, intermediate_size=88, num_hidden_layers=2,
            rms_norm_eps=1e-5, max_position_embeddings=64)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8}
# Grouped-query heads with an untied head (Llama-3.1-8B-like; theta 10000 as Llama-2/TinyLlama),
# and multi-head with a tied head and llama3 scaling (Llama-3.2-like), positions past 8.
CONFIGS = {
    "gqa_untied": dict(TINY, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "mha_tied_llama3": dict(TINY, num_attention_heads=2, num_key_value_heads=2, rope_theta=500000.0,
                            rope_scaling=LLAMA3, tie_word_embeddings=True),
}
CASES = shapes([(name, (2, 13)) for name in CONFIGS],
               [("gqa_untied", (2, 300))])


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-{c[1][0]}x{c[1][1]}")
def case(request):
    return request.param


@pytest.fixture
def batch(case):
    return case[1]


def _torch_llama(config: dict, seed: int = 0):
    """A LlamaForCausalLM with every parameter random (norm weights too), fp32, eval mode."""
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    return model


@pytest.fixture(scope="module")
def hf_checkpoint(case, tmp_path_factory):
    model = _torch_llama(CONFIGS[case[0]])
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path, safe_serialization=True)
    return path, model


def _ids(model, key, batch):
    return jax.random.randint(key, batch, 0, model.config.vocab_size, jnp.int32)


def _torch(x, dtype=torch.long):
    return None if x is None else torch.from_numpy(np.array(x)).to(dtype)


def _hf_logits(model, ids, mask=None, positions=None):
    with torch.no_grad():
        return model(_torch(ids), attention_mask=_torch(mask), position_ids=_torch(positions)).logits.numpy()


def test_logits_match_hf_fp32(hf_checkpoint, key, batch):
    path, hf = hf_checkpoint
    model = jtgpt.Llama.from_pretrained(path)
    ids = _ids(hf, key, batch)
    logits = jax.jit(lambda m, ids: m(ids))(model, ids)
    assert logits.shape == (*batch, hf.config.vocab_size) and logits.dtype == jnp.float32
    assert_close(logits, _hf_logits(hf, ids), rtol=1e-4)


@pytest.mark.parametrize("explicit_positions", [False, True])
def test_left_padded_batch_matches_hf(hf_checkpoint, key, batch, explicit_positions):
    """The mask hides padding keys; positions default to 0..T-1 as in HF, or come as cumsum - 1."""
    path, hf = hf_checkpoint
    model = jtgpt.Llama.from_pretrained(path)
    ids = _ids(hf, key, batch)
    mask = left_padding(*batch)
    positions = jnp.maximum(jnp.cumsum(mask, -1) - 1, 0) if explicit_positions else None
    logits = jax.jit(lambda m, ids, mask, pos: m(ids, mask, pos))(model, ids, mask, positions)
    expected = _hf_logits(hf, ids, mask, positions)
    real = np.asarray(mask, bool)  # padded queries see no key: compare the real tokens
    assert_close(np.asarray(logits)[real], expected[real], rtol=1e-4)


def test_llama3_scaling_changes_what_positions_past_the_original_see(key):
    """With positions past original_max_position_embeddings the llama3 frequencies differ from
    plain RoPE's: a model that ignored rope_scaling would fail test_logits_match_hf_fp32."""
    hf = _torch_llama(CONFIGS["mha_tied_llama3"])
    plain = _torch_llama({**CONFIGS["mha_tied_llama3"], "rope_scaling": None})
    ids = _ids(hf, key, (1, 13))
    assert relative_error(_hf_logits(hf, ids), _hf_logits(plain, ids)) > 1e-3


@pytest.mark.parametrize("dtype,param_dtype,rtol", [
    (jnp.bfloat16, jnp.bfloat16, 3e-2), (jnp.bfloat16, jnp.float32, 3e-2), (jnp.float16, jnp.float16, 5e-3)])
def test_half_precision_logits_track_fp32(hf_checkpoint, key, dtype, param_dtype, rtol):
    path, hf = hf_checkpoint
    model = jtgpt.Llama.from_pretrained(path, dtype=dtype, param_dtype=param_dtype)
    assert model.embed_tokens.weight[...].dtype == param_dtype
    ids = _ids(hf, key, (2, 13))
    logits = jax.jit(lambda m, ids: m(ids))(model, ids)
    assert logits.dtype == dtype
    assert_close(logits, _hf_logits(hf, ids), rtol=rtol)


@pytest.mark.parametrize("precision,rtol", [("tf32x3", 1e-4), ("tf32", 1e-2)])
def test_tensor_core_fp32_is_an_option(hf_checkpoint, key, precision, rtol):
    path, hf = hf_checkpoint
    model = jtgpt.Llama.from_pretrained(path, precision=precision)
    ids = _ids(hf, key, (2, 13))
    assert_close(jax.jit(lambda m, ids: m(ids))(model, ids), _hf_logits(hf, ids), rtol=rtol)


def test_every_dot_is_a_triton_kernel(hf_checkpoint):
    path, _ = hf_checkpoint
    model = jtgpt.Llama.from_pretrained(path, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    ids = jnp.zeros((1, 8), jnp.int32)
    graphdef, params = nnx.split(model, nnx.Param)
    for fn in (lambda p: nnx.merge(graphdef, p)(ids),
               jax.grad(lambda p: nnx.merge(graphdef, p).loss(ids))):
        jaxpr = str(jax.make_jaxpr(fn)(params))
        assert "dot_general" not in jaxpr and "conv_general" not in jaxpr


# ---------------------------------------------------------------------------------- gradients

def _loss_and_grads(model, *args, **kwargs):
    """(loss, {HF name: gradient}) of model.loss under jax.jit; packed gradients split by the
    model's own state_dict."""
    graphdef, params = nnx.split(model, nnx.Param)
    loss, grads = jax.jit(jax.value_and_grad(
        lambda p: nnx.merge(graphdef, p).loss(*args, **kwargs)))(params)
    return loss, nnx.merge(graphdef, grads).state_dict()


def test_loss_and_gradients_match_hf_fp32(hf_checkpoint, key, batch):
    """The loss and every parameter's gradient (relative error < 1e-4), with left padding and
    ignored labels."""
    path, hf = hf_checkpoint
    model = jtgpt.Llama.from_pretrained(path)
    ids = _ids(hf, key, batch)
    mask = left_padding(*batch)
    labels = lm_labels(ids, mask)
    loss, grads = _loss_and_grads(model, ids, labels, mask)
    hf.zero_grad()
    hf_loss = hf(_torch(ids), attention_mask=_torch(mask), labels=_torch(labels)).loss
    hf_loss.backward()
    expected = {name.removeprefix("model."): p.grad.numpy() for name, p in hf.named_parameters()}
    assert sorted(grads) == sorted(expected)
    assert_close(loss, hf_loss.item(), jnp.float32, rtol=1e-5)
    for name, grad in grads.items():
        assert grad.dtype == np.float32
        assert_close(grad, expected[name], rtol=1e-4, what=name)


def test_gradient_matches_finite_differences(key):
    """The directional derivative <grad, v> against a central difference of the loss, in fp32."""
    config = LlamaConfig(**{**CONFIGS["gqa_untied"], "num_hidden_layers": 1, "vocab_size": 37})
    model = jtgpt.Llama(config, rngs=nnx.Rngs(3))
    graphdef, params = nnx.split(model, nnx.Param)
    k_ids, k_dir = jax.random.split(key)
    ids = jax.random.randint(k_ids, (2, 11), 0, config.vocab_size)
    loss_fn = jax.jit(lambda p: nnx.merge(graphdef, p).loss(ids))
    assert_gradient_matches_finite_differences(loss_fn, params, k_dir)


def test_training_steps_lower_the_loss(key):
    from jtgpt import train
    model = jtgpt.Llama(LlamaConfig(**{**CONFIGS["gqa_untied"], "vocab_size": 37}))
    ids = jax.random.randint(key, (4, 12), 0, 37)
    state, step = train.init(model, train.adamw(3e-2))
    before = float(jax.jit(lambda m: m.loss(ids))(model))
    for i in range(5):
        state, metrics = step(state, {"input_ids": ids}, jax.random.key(i))
    after = float(jax.jit(lambda m: m.loss(ids))(train.model_of(model, state)))
    assert after < 0.8 * before, (before, after)


# ------------------------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("fmt,shard", [("safetensors", None), ("safetensors", 20_000),
                                       ("pytorch", None)])
def test_save_pretrained_is_read_by_transformers(hf_checkpoint, tmp_path, key, fmt, shard):
    """What jtgpt writes, LlamaForCausalLM.from_pretrained reads back: the same tensors (q, k, v
    and gate, up unpacked again) and so the same logits; and jtgpt reads its own."""
    path, hf = hf_checkpoint
    model = jtgpt.Llama.from_pretrained(path)
    model.save_pretrained(tmp_path, format=fmt, max_shard_size=shard)
    assert any(p.name.endswith(".index.json") for p in tmp_path.iterdir()) == (shard is not None)
    again = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    reference = hf.state_dict()
    for name, value in again.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), reference[name].numpy(), err_msg=name)
    ids = _ids(hf, key, (1, 9))
    np.testing.assert_array_equal(_hf_logits(again, ids), _hf_logits(hf, ids))
    ours = jtgpt.from_pretrained(tmp_path)
    assert isinstance(ours, jtgpt.Llama)
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(ours.state_dict()[name], value, err_msg=name)


def test_sharded_and_flax_checkpoints_load(tmp_path, key):
    """transformers' sharded safetensors, and its Flax msgpack (2-D kernels transposed, the token
    table an `embedding`), load as the same model; jtgpt's Flax output is read by FlaxLlama."""
    hf = _torch_llama(CONFIGS["gqa_untied"])
    hf.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    hf.save_pretrained(tmp_path / "bin", safe_serialization=False)  # Flax converts no shards
    flax_hf = transformers.FlaxLlamaForCausalLM.from_pretrained(tmp_path / "bin", from_pt=True)
    flax_hf.save_pretrained(tmp_path / "flax")
    expected = {name.removeprefix("model."): value.numpy() for name, value in hf.state_dict().items()}
    for source in ("sharded", "flax"):
        state = jtgpt.Llama.from_pretrained(tmp_path / source).state_dict()
        assert sorted(state) == sorted(expected)
        for name, value in state.items():
            np.testing.assert_allclose(value, expected[name], rtol=1e-6, atol=1e-6, err_msg=name)
    jtgpt.Llama.from_pretrained(tmp_path / "sharded").save_pretrained(tmp_path / "ours", format="flax")
    again = transformers.FlaxLlamaForCausalLM.from_pretrained(tmp_path / "ours")
    layer = again.params["model"]["layers"]["1"]
    np.testing.assert_array_equal(np.asarray(layer["self_attn"]["k_proj"]["kernel"]),
                                  expected["layers.1.self_attn.k_proj.weight"].T)
    np.testing.assert_array_equal(np.asarray(again.params["model"]["embed_tokens"]["embedding"]),
                                  expected["embed_tokens.weight"])


def test_loading_streams_one_tensor_at_a_time(hf_checkpoint, monkeypatch):
    """from_pretrained reads each tensor of the checkpoint once, through Checkpoint.read, and never
    the whole state dict at once."""
    from jtgpt import checkpoint
    path, hf = hf_checkpoint
    reads = []
    original = checkpoint.Checkpoint.read
    monkeypatch.setattr(checkpoint.Checkpoint, "read",
                        lambda self, name: reads.append(name) or original(self, name))
    monkeypatch.setattr(checkpoint, "load_state_dict", None)
    jtgpt.Llama.from_pretrained(path)
    assert sorted(reads) == sorted(hf.state_dict().keys() - {"lm_head.weight"} if hf.config.tie_word_embeddings
                                   else hf.state_dict().keys())


def test_checkpoint_errors_name_the_tensor(hf_checkpoint, tmp_path):
    path, _ = hf_checkpoint
    model = jtgpt.Llama.from_pretrained(path)
    state = model.state_dict()
    state["layers.1.self_attn.k_proj.weight"] = state["layers.1.self_attn.k_proj.weight"][:-1]
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.k_proj\.weight has shape"):
        model.load_state_dict(state)
    del state["layers.1.self_attn.k_proj.weight"]
    with pytest.raises(ValueError, match=r"missing tensors \['layers\.1\.self_attn\.k_proj\.weight'\]"):
        model.load_state_dict(state)
    with pytest.raises(ValueError, match="model_type is 'llama', not 'gpt2'"):
        jtgpt.GPT.from_pretrained(path)


def test_from_pretrained_picks_the_class(hf_checkpoint, tmp_path):
    path, _ = hf_checkpoint
    assert isinstance(jtgpt.from_pretrained(path), jtgpt.Llama)
    jtgpt.GPT(jtgpt.GPTConfig(vocab_size=53, n_positions=16, n_embd=32, n_layer=1, n_head=2)).save_pretrained(
        tmp_path / "gpt2")
    assert isinstance(jtgpt.from_pretrained(tmp_path / "gpt2"), jtgpt.GPT)
    (tmp_path / "gpt2" / "config.json").write_text('{"model_type": "mistral"}')
    with pytest.raises(ValueError, match="model_type 'mistral'; jtgpt supports 'gpt2', 'llama'"):
        jtgpt.from_pretrained(tmp_path / "gpt2")


# ----------------------------------------------------------------------------------- configs

def test_config_reads_both_rope_formats():
    base = {"model_type": "llama", **TINY, "num_attention_heads": 4}
    old = LlamaConfig.from_hf({**base, "rope_theta": 500000.0, "rope_scaling": {"type": "llama3", **{
        k: v for k, v in LLAMA3.items() if k != "rope_type"}}})
    new = LlamaConfig.from_hf({**base, "rope_parameters": {"rope_theta": 500000.0, **LLAMA3}})
    assert old == new and old.rope_theta == 500000.0 and old.rope_scaling == RopeScaling.from_hf(LLAMA3)
    plain = LlamaConfig.from_hf({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}})
    assert plain.rope_scaling is None and plain.num_key_value_heads == 4 and plain.head_dim == 16
    assert LlamaConfig.from_hf(old.to_hf()) == old


@pytest.mark.parametrize("change,match", [
    ({"model_type": "mistral"}, "model_type is 'mistral', not 'llama'"),
    ({"model_type": None}, "no model_type"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
    ({"attention_bias": True}, "attention_bias=True"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "dynamic"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "yarn"),
    ({"num_key_value_heads": 3}, "multiple of num_key_value_heads"),
    ({"hidden_size": "64"}, "hidden_size must be int"),
    ({"rms_norm_eps": True}, "rms_norm_eps must be float"),
    ({"intermediate_size": 0}, "intermediate_size must be positive"),
])
def test_bad_config_is_a_clear_error(change, match):
    hf = {"model_type": "llama", **TINY, "num_attention_heads": 4, **change}
    if hf["model_type"] is None:
        del hf["model_type"]
    with pytest.raises(ValueError, match=match):
        LlamaConfig.from_hf(hf)


def test_presets_match_the_published_sizes():
    sizes = {"llama-3.2-1b": 1_235_814_400, "llama-3.2-3b": 3_212_749_824, "llama-3.1-8b": 8_030_261_248}
    for name, n in sizes.items():
        assert PRESETS[name].num_params == n, name
        assert jtgpt.PRESETS[name] is PRESETS[name]
    small = LlamaConfig(**{**CONFIGS["gqa_untied"]})
    hf = _torch_llama(small.to_hf())
    assert small.num_params == sum(p.numel() for p in hf.parameters())


# ---------------------------------------------------------------------------------- bad input

def test_out_of_range_ids_are_an_error_or_nan(key):
    model = jtgpt.Llama(LlamaConfig(**{**CONFIGS["gqa_untied"], "num_hidden_layers": 1}))
    ids = jnp.array([[1, 2, 101, 3]])
    with pytest.raises(ValueError, match=r"input_ids\[0, 2\] = 101 is outside \[0, 101\)"):
        model(ids)
    with pytest.raises(ValueError, match=r"input_ids\[0, 0\] = -1"):
        model.loss(jnp.array([[-1, 2, 3]]))
    # Under jit: NaN in the bad token's logits (and, through attention, possibly its sequence's
    # others), never a plausible row; other sequences of the batch are untouched.
    batch = jnp.concatenate([ids, jnp.array([[1, 2, 3, 4]])])
    logits = np.asarray(jax.jit(lambda m, ids: m(ids))(model, batch))
    assert np.isnan(logits[0, 2]).all() and np.isfinite(logits[1]).all()


@pytest.mark.parametrize("call,match", [
    (lambda m: m(jnp.zeros((1, 0), jnp.int32)), "at least one token"),
    (lambda m: m.loss(jnp.zeros((2, 0), jnp.int32)), "at least one token"),
    (lambda m: m(jnp.zeros((1, 4))), "input_ids must be an integer"),
    (lambda m: m(jnp.zeros((1, 4), jnp.int32), [[1, 1, 1]]), "attention_mask must have shape"),
    (lambda m: m(jnp.zeros((1, 4), jnp.int32), None, jnp.zeros((1, 4))), "position_ids must be an integer"),
    (lambda m: m.loss(jnp.zeros((1, 4), jnp.int32), jnp.zeros((1, 5), jnp.int32)), "labels must be"),
])
def test_bad_input_is_a_clear_error(call, match):
    model = jtgpt.Llama(LlamaConfig(**{**CONFIGS["gqa_untied"], "num_hidden_layers": 1}))
    with pytest.raises(ValueError, match=match):
        call(model)


def test_python_lists_are_accepted(key):
    model = jtgpt.Llama(LlamaConfig(**{**CONFIGS["gqa_untied"], "num_hidden_layers": 1}))
    ids = [[5, 6, 7, 8]]
    expected = model(jnp.array(ids), jnp.array([[0, 1, 1, 1]]))
    np.testing.assert_array_equal(model(ids, [[0, 1, 1, 1]]), expected)
