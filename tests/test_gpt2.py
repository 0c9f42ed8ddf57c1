"""jtgpt.GPT against Hugging Face's FlaxGPT2LMHeadModel on the same random weights."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from conftest import (assert_close, assert_gradient_matches_finite_differences, left_padding,
                      lm_labels, relative_error, shapes)
from flax import nnx

import jtgpt
from jtgpt import checkpoint
from jtgpt.models.gpt2 import GPTConfig

# (config, batch): tiny on CPU (the interpreter); GPT-2 124M's shape under --large.
CASES = shapes([(dict(vocab_size=97, n_positions=32, n_embd=128, n_layer=2, n_head=2), (2, 13))],
               [(dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12), (4, 300))])
SHORT_BATCH = (2, 13)  # for the checks that run several model variants


@pytest.fixture(scope="module", params=range(len(CASES)))
def case(request):
    return CASES[request.param]


@pytest.fixture
def batch(case):
    return case[1]


@pytest.fixture(scope="module")
def hf_checkpoint(case, tmp_path_factory):
    """A FlaxGPT2LMHeadModel with every parameter random (norms and biases too), saved to disk."""
    hf_config = transformers.GPT2Config(**case[0])
    hf = transformers.FlaxGPT2LMHeadModel(hf_config, seed=0)
    leaves, treedef = jax.tree.flatten(hf.params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    hf.params = jax.tree.unflatten(treedef, [
        leaf + 0.1 * jax.random.normal(k, leaf.shape, leaf.dtype) for leaf, k in zip(leaves, keys)])
    path = tmp_path_factory.mktemp("gpt2")
    hf.save_pretrained(path)
    return path, hf


def _ids(hf, key, batch):
    return jax.random.randint(key, batch, 0, hf.config.vocab_size, jnp.int32)


def _hf_logits(hf, ids, attention_mask=None, position_ids=None):
    with jax.default_matmul_precision("highest"):
        return hf(ids, attention_mask=attention_mask, position_ids=position_ids).logits


def test_logits_match_hf_flax_fp32(hf_checkpoint, key, batch):
    path, hf = hf_checkpoint
    model = jtgpt.GPT.from_pretrained(path)
    ids = _ids(hf, key, batch)
    logits = jax.jit(lambda m, ids: m(ids))(model, ids)
    assert logits.shape == (*batch, hf.config.vocab_size) and logits.dtype == jnp.float32
    assert_close(logits, _hf_logits(hf, ids), rtol=1e-4)


@pytest.mark.parametrize("explicit_positions", [False, True])
def test_left_padded_batch_matches_hf_flax(hf_checkpoint, key, batch, explicit_positions):
    """Padding masks keys; positions default to 0..T-1 as in HF Flax, or come as cumsum - 1."""
    path, hf = hf_checkpoint
    model = jtgpt.GPT.from_pretrained(path)
    ids = _ids(hf, key, batch)
    mask = left_padding(*batch)
    positions = jnp.maximum(jnp.cumsum(mask, -1) - 1, 0) if explicit_positions else None
    logits = jax.jit(lambda m, ids, mask, pos: m(ids, mask, pos))(model, ids, mask, positions)
    expected = _hf_logits(hf, ids, mask, positions)
    real = np.asarray(mask, bool)  # HF gives padded queries a uniform row; compare real tokens
    assert_close(np.asarray(logits)[real], np.asarray(expected)[real], rtol=1e-4)


@pytest.mark.parametrize("dtype,param_dtype,rtol", [
    (jnp.bfloat16, jnp.bfloat16, 3e-2), (jnp.bfloat16, jnp.float32, 3e-2), (jnp.float16, jnp.float16, 5e-3)])
def test_half_precision_logits_track_fp32(hf_checkpoint, key, dtype, param_dtype, rtol):
    """Against HF fp32, within rtol or within 1.5x HF Flax's own error at the same precision,
    whichever is larger: rounding error grows with depth (12 random layers under --large)."""
    path, hf = hf_checkpoint
    model = jtgpt.GPT.from_pretrained(path, dtype=dtype, param_dtype=param_dtype)
    assert model.wte.weight[...].dtype == param_dtype
    ids = _ids(hf, key, SHORT_BATCH)
    logits = jax.jit(lambda m, ids: m(ids))(model, ids)
    assert logits.dtype == dtype
    expected = _hf_logits(hf, ids)
    hf_half = transformers.FlaxGPT2LMHeadModel.from_pretrained(path, dtype=dtype)
    hf_params = jax.tree.map(lambda p: p.astype(param_dtype), hf_half.params)
    hf_error = relative_error(hf_half(ids, params=hf_params).logits, expected)
    assert_close(logits, expected, rtol=max(rtol, 1.5 * hf_error))


@pytest.mark.parametrize("precision,rtol", [("tf32x3", 1e-4), ("tf32", 1e-2)])
def test_tensor_core_fp32_is_an_option(hf_checkpoint, key, precision, rtol):
    path, hf = hf_checkpoint
    model = jtgpt.GPT.from_pretrained(path, precision=precision)
    ids = _ids(hf, key, SHORT_BATCH)
    assert_close(jax.jit(lambda m, ids: m(ids))(model, ids), _hf_logits(hf, ids), rtol=rtol)


def test_every_dot_is_a_triton_kernel(hf_checkpoint):
    path, hf = hf_checkpoint
    model = jtgpt.GPT.from_pretrained(path, dtype=jnp.bfloat16)
    jaxpr = str(jax.make_jaxpr(lambda m, ids: m(ids))(model, jnp.zeros((1, 8), jnp.int32)))
    assert "dot_general" not in jaxpr and "conv_general" not in jaxpr


@pytest.mark.parametrize("fmt", ["safetensors", "pytorch", "flax"])
def test_save_pretrained_round_trips(hf_checkpoint, tmp_path, key, fmt):
    path, hf = hf_checkpoint
    model = jtgpt.GPT.from_pretrained(path)
    model.save_pretrained(tmp_path, format=fmt)
    again = jtgpt.GPT.from_pretrained(tmp_path)
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(again.state_dict()[name], value, err_msg=name)


def test_dropout_only_with_a_key(key):
    config = GPTConfig(vocab_size=53, n_positions=16, n_embd=64, n_layer=1, n_head=1,
                       embd_pdrop=0.2, resid_pdrop=0.2, attn_pdrop=0.2)
    model = jtgpt.GPT(config)
    ids = jax.random.randint(key, (2, 9), 0, 53)
    forward = jax.jit(lambda m, ids, k: m(ids, dropout_key=k))
    eval_out = jax.jit(lambda m, ids: m(ids))(model, ids)
    train_a = forward(model, ids, jax.random.key(1))
    train_b = forward(model, ids, jax.random.key(2))
    np.testing.assert_array_equal(train_a, forward(model, ids, jax.random.key(1)))
    assert not np.allclose(train_a, eval_out) and not np.allclose(train_a, train_b)


# ---------------------------------------------------------------------------------- gradients

def _hf_loss(hf, params, ids, labels, mask=None):
    """HF PyTorch GPT2LMHeadModel's loss, on FlaxGPT2LMHeadModel: shifted labels, -100 ignored."""
    logits = hf(ids, attention_mask=mask, params=params).logits[:, :-1].astype(jnp.float32)
    targets = labels[:, 1:]
    counted = targets != -100
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(counted, targets, 0))
    return jnp.sum(jnp.where(counted, losses, 0.0)) / jnp.sum(counted)


def _as_ours(flax_tree):
    """HF Flax gradients (a FlaxGPT2LMHeadModel params tree) under GPT's names and layouts: the
    PyTorch names of jtgpt.checkpoint's Flax rule, without "transformer."."""
    ours = {}
    for key, value in checkpoint._flatten(flax_tree).items():
        name, transposed = checkpoint._torch_name(key)
        ours[name.removeprefix("transformer.")] = np.asarray(value).T if transposed else value
    return ours


def _loss_and_grads(model, *args, **kwargs):
    """(loss, {HF name: gradient}) of model.loss under jax.jit."""
    graphdef, params = nnx.split(model, nnx.Param)
    loss, grads = jax.jit(jax.value_and_grad(
        lambda p: nnx.merge(graphdef, p).loss(*args, **kwargs)))(params)
    return loss, {".".join(map(str, path)): v[...] for path, v in nnx.to_flat_state(grads)}


def test_gradients_match_hf_flax_fp32(hf_checkpoint, key, batch):
    """Every parameter's gradient of the loss, left padding and ignored labels included."""
    path, hf = hf_checkpoint
    model = jtgpt.GPT.from_pretrained(path)
    ids = _ids(hf, key, batch)
    mask = left_padding(*batch)
    labels = lm_labels(ids, mask)
    loss, grads = _loss_and_grads(model, ids, labels, mask)
    with jax.default_matmul_precision("highest"):
        hf_loss, hf_grads = jax.jit(jax.value_and_grad(
            lambda p: _hf_loss(hf, p, ids, labels, mask)))(hf.params)
    expected = _as_ours(hf_grads)
    assert sorted(grads) == sorted(expected)
    assert_close(loss, hf_loss, rtol=1e-5)
    for name, grad in grads.items():
        assert grad.dtype == jnp.float32
        assert_close(grad, expected[name], rtol=1e-4, what=name)


def test_mixed_precision_gradients_track_fp32(hf_checkpoint, key):
    """bf16 compute over fp32 parameters: each gradient within 6e-2 of fp32's, or within 2x HF
    Flax's own bf16-compute error on that tensor, whichever is larger (see the logits test)."""
    path, hf = hf_checkpoint
    ids = _ids(hf, key, SHORT_BATCH)
    _, grads32 = _loss_and_grads(jtgpt.GPT.from_pretrained(path), ids)
    _, grads = _loss_and_grads(jtgpt.GPT.from_pretrained(path, dtype=jnp.bfloat16, param_dtype=jnp.float32), ids)
    hf_bf16 = transformers.FlaxGPT2LMHeadModel.from_pretrained(path, dtype=jnp.bfloat16)
    hf_grads = {}
    for precision, model in (("fp32", hf), ("bf16", hf_bf16)):
        with jax.default_matmul_precision("highest"):
            g = jax.jit(jax.grad(lambda p, model=model: _hf_loss(model, p, ids, ids)))(model.params)
        hf_grads[precision] = _as_ours(g)
    for name, grad in grads.items():
        assert grad.dtype == jnp.float32  # gradients in the parameters' dtype
        hf_error = relative_error(hf_grads["bf16"][name], hf_grads["fp32"][name])
        assert_close(grad, grads32[name], rtol=max(6e-2, 2 * hf_error), what=name)


@pytest.mark.parametrize("dropout", [False, True])
def test_gradient_matches_finite_differences(key, dropout):
    """The directional derivative <grad, v> against a central difference of the loss, in fp32.

    With dropout the loss is still a deterministic function of the parameters for a fixed key,
    so this also checks that every backward kernel regenerates its forward's dropout mask."""
    config = GPTConfig(vocab_size=61, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                       embd_pdrop=0.1, resid_pdrop=0.1, attn_pdrop=0.1)
    model = jtgpt.GPT(config, rngs=nnx.Rngs(3))
    graphdef, params = nnx.split(model, nnx.Param)
    k_ids, k_dir = jax.random.split(key)
    ids = jax.random.randint(k_ids, (2, 11), 0, config.vocab_size)
    dropout_key = jax.random.key(5) if dropout else None
    loss_fn = jax.jit(lambda p: nnx.merge(graphdef, p).loss(ids, dropout_key=dropout_key))
    assert_gradient_matches_finite_differences(loss_fn, params, k_dir)


def test_every_dot_of_the_gradient_is_a_triton_kernel(hf_checkpoint):
    path, _ = hf_checkpoint
    model = jtgpt.GPT.from_pretrained(path, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    graphdef, params = nnx.split(model, nnx.Param)
    ids = jnp.zeros((1, 8), jnp.int32)
    jaxpr = str(jax.make_jaxpr(jax.grad(
        lambda p: nnx.merge(graphdef, p).loss(ids, dropout_key=jax.random.key(0))))(params))
    assert "dot_general" not in jaxpr and "conv_general" not in jaxpr


def test_loss_is_the_mean_of_the_logits_cross_entropy(hf_checkpoint, key):
    """model.loss (fused LM head) against cross-entropy of model(ids)'s logits, sum and mean."""
    path, hf = hf_checkpoint
    model = jtgpt.GPT.from_pretrained(path)
    ids = _ids(hf, key, SHORT_BATCH)
    labels = lm_labels(ids, jnp.ones_like(ids))
    logits = jax.jit(lambda m, ids: m(ids))(model, ids)[:, :-1]
    counted = labels[:, 1:] != -100
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(counted, labels[:, 1:], 0))
    total = jnp.sum(jnp.where(counted, per_token, 0.0))
    loss = jax.jit(lambda m: m.loss(ids, labels, reduction="sum"))(model)
    assert_close(loss, total, rtol=1e-5)
    assert_close(jax.jit(lambda m: m.loss(ids, labels))(model), total / counted.sum(), rtol=1e-5)


@pytest.mark.parametrize("call,match", [
    (lambda m: m(jnp.zeros((1, 4))), "input_ids must be an integer"),
    (lambda m: m(jnp.zeros((4,), jnp.int32)), "input_ids must be an integer"),
    (lambda m: m(jnp.zeros((1, 0), jnp.int32)), "at least one token"),
    (lambda m: m.loss(jnp.zeros((1, 0), jnp.int32)), "at least one token"),
    (lambda m: m(jnp.zeros((1, 17), jnp.int32)), "n_positions=16"),
    (lambda m: m(jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 5))), "attention_mask must have shape"),
    (lambda m: m(jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4))), "attention_mask must be int or bool"),
    (lambda m: m(jnp.zeros((1, 4), jnp.int32), None, jnp.ones((2, 4), jnp.int32)), "position_ids must be"),
    (lambda m: m.loss(jnp.zeros((1, 4), jnp.int32), jnp.zeros((1, 5), jnp.int32)), "labels must be"),
    (lambda m: m(jnp.array([[1, 53, 2]])), r"input_ids\[0, 1\] = 53 is outside \[0, 53\)"),
    (lambda m: m(jnp.array([[1, -1]])), r"input_ids\[0, 1\] = -1 is outside"),
    (lambda m: m(jnp.array([[1, 2]]), None, jnp.array([[0, 16]])), r"position_ids\[0, 1\] = 16 is outside \[0, 16\)"),
    (lambda m: m(jnp.array([[1, 2]]), None, jnp.array([[-1, 0]])), r"position_ids\[0, 0\] = -1"),
])
def test_bad_input_is_a_clear_error(call, match):
    model = jtgpt.GPT(GPTConfig(vocab_size=53, n_positions=16, n_embd=64, n_layer=1, n_head=1))
    with pytest.raises(ValueError, match=match):
        call(model)


def test_out_of_range_ids_under_jit_give_nan_not_another_token():
    """Traced ids cannot be checked: the token's embedding, hence its logits (and, through
    attention, possibly its sequence's others), are NaN rather than a plausible row's; the other
    sequences of the batch are untouched."""
    model = jtgpt.GPT(GPTConfig(vocab_size=53, n_positions=16, n_embd=64, n_layer=1, n_head=1))
    forward = jax.jit(lambda m, ids, pos: m(ids, None, pos))
    good_ids, good_pos = jnp.array([1, 2, 3, 4]), jnp.arange(4)
    for ids, pos, bad in ((jnp.array([1, 2, 53, 3]), good_pos, 2), (jnp.array([1, -5, 2, 3]), good_pos, 1),
                          (good_ids, jnp.array([0, 1, 2, 99]), 3)):
        logits = np.asarray(forward(model, jnp.stack([ids, good_ids]), jnp.stack([pos, good_pos])))
        assert np.isnan(logits[0, bad]).all() and np.isfinite(logits[1]).all()


def test_python_lists_are_accepted():
    model = jtgpt.GPT(GPTConfig(vocab_size=53, n_positions=16, n_embd=64, n_layer=1, n_head=1))
    ids, mask = [[5, 6, 7, 8]], [[0, 1, 1, 1]]
    np.testing.assert_array_equal(model(ids, mask), model(jnp.array(ids), jnp.array(mask)))
    assert float(model.loss(ids, attention_mask=mask)) == float(model.loss(jnp.array(ids), attention_mask=jnp.array(mask)))


def test_bad_options_are_clear_errors():
    config = GPTConfig(vocab_size=53, n_positions=16, n_embd=64, n_layer=1, n_head=1)
    with pytest.raises(ValueError, match="dtype must be"):
        jtgpt.GPT(config, dtype=jnp.int8)
    with pytest.raises(ValueError, match="precision must be"):
        jtgpt.GPT(config, precision="fast")


@pytest.mark.parametrize("hf,match", [
    ({}, "no model_type"),
    ({"model_type": "llama"}, "model_type is 'llama', not 'gpt2'"),
    ({"model_type": "gpt2", "activation_function": "relu"}, "activation_function"),
    ({"model_type": "gpt2", "scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ({"model_type": "gpt2", "n_embd": "768"}, "n_embd must be int"),
    ({"model_type": "gpt2", "n_layer": 2.0}, "n_layer must be int"),
    ({"model_type": "gpt2", "layer_norm_epsilon": None}, "layer_norm_epsilon must be float"),
    ({"model_type": "gpt2", "n_embd": 100, "n_head": 3}, r"n_embd \(100\) must be a multiple of n_head \(3\)"),
    ({"model_type": "gpt2", "n_layer": 0}, "n_layer must be positive"),
    ({"model_type": "gpt2", "attn_pdrop": 1.0}, r"attn_pdrop must be in \[0, 1\)"),
    ({"model_type": "gpt2", "n_embd": 64, "hidden_size": 32}, "hidden_size=32 and n_embd=64"),
    ({"model_type": "gpt2", "eos_token_id": "x"}, "eos_token_id must be"),
])
def test_bad_config_is_a_clear_error(hf, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig.from_hf(hf)


def test_config_reads_hf_aliases():
    """GPT2Config's attribute_map: hidden_size, num_hidden_layers, ... mean n_embd, n_layer, ..."""
    config = GPTConfig.from_hf({"model_type": "gpt2", "hidden_size": 64, "num_hidden_layers": 3,
                                "num_attention_heads": 4, "max_position_embeddings": 32,
                                "eos_token_id": [7, 8]})
    assert (config.n_embd, config.n_layer, config.n_head, config.n_positions) == (64, 3, 4, 32)
    assert config.eos_token_id == (7, 8) and GPTConfig.from_hf(config.to_hf()) == config


def test_untied_lm_head_is_loaded(tmp_path, key):
    """tie_word_embeddings: false: the checkpoint's lm_head.weight is the head, not wte."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=16, vocab_size=61,
                                     tie_word_embeddings=False)
    hf = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        hf.lm_head.weight.copy_(torch.randn_like(hf.lm_head.weight))
    hf.save_pretrained(tmp_path, safe_serialization=True)
    model = jtgpt.GPT.from_pretrained(tmp_path)
    assert model.lm_head is not None and not model.config.tie_word_embeddings
    ids = _ids(hf, key, (2, 9))
    with torch.no_grad():
        expected = hf(torch.from_numpy(np.array(ids)).long()).logits.numpy()
    assert_close(jax.jit(lambda m, ids: m(ids))(model, ids), expected, rtol=1e-4)
    model.save_pretrained(tmp_path / "again")
    again = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "again")
    np.testing.assert_array_equal(again.lm_head.weight.detach().numpy(), hf.lm_head.weight.detach().numpy())
    assert model.config.num_params == sum(p.numel() for p in hf.parameters())


def test_checkpoint_tensor_of_wrong_shape_is_named(hf_checkpoint, tmp_path):
    path, _ = hf_checkpoint
    model = jtgpt.GPT.from_pretrained(path)
    state = model.state_dict()
    state["h.1.mlp.c_fc.bias"] = state["h.1.mlp.c_fc.bias"][:-1]
    with pytest.raises(ValueError, match=r"h\.1\.mlp\.c_fc\.bias has shape"):
        model.load_state_dict(state)
    del state["h.1.mlp.c_fc.bias"]
    with pytest.raises(ValueError, match=r"missing tensors \['h\.1\.mlp\.c_fc\.bias'\]"):
        model.load_state_dict(state)


def test_hub_style_bin_loads(hf_checkpoint, tmp_path):
    """Like the hub's gpt2 pytorch_model.bin: no "transformer." prefix, the attention-mask
    buffers and the tied head's copy, which are no parameters; anything else unknown is named."""
    path, _ = hf_checkpoint
    model = jtgpt.GPT.from_pretrained(path)
    state = {k: torch.from_numpy(np.array(v)) for k, v in model.state_dict().items()}
    for i in range(model.config.n_layer):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(4, 4)).view(1, 1, 4, 4)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    state["lm_head.weight"] = state["wte.weight"]
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    loaded = jtgpt.GPT.from_pretrained(tmp_path)
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(loaded.state_dict()[name], value, err_msg=name)
    state["score.weight"] = torch.zeros(2, 2)
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.warns(UserWarning, match="score.weight"):
        jtgpt.GPT.from_pretrained(tmp_path)


@pytest.mark.parametrize("fmt,shard", [("safetensors", 30_000), ("pytorch", None), ("flax", None)])
def test_transformers_loads_ours(hf_checkpoint, tmp_path, key, fmt, shard):
    """What save_pretrained writes, GPT2LMHeadModel (PyTorch formats) or FlaxGPT2LMHeadModel
    (Flax) reads back with the same logits."""
    path, hf = hf_checkpoint
    model = jtgpt.GPT.from_pretrained(path)
    model.save_pretrained(tmp_path, format=fmt, max_shard_size=shard)
    ids = _ids(hf, key, SHORT_BATCH)
    if fmt == "flax":
        again = transformers.FlaxGPT2LMHeadModel.from_pretrained(tmp_path)
        assert_close(_hf_logits(again, ids), _hf_logits(hf, ids), rtol=1e-6)
    else:
        again = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
        with torch.no_grad():
            logits = again(torch.from_numpy(np.array(ids)).long()).logits.numpy()
        assert_close(logits, _hf_logits(hf, ids), rtol=1e-5)


def test_presets_match_hf_sizes():
    expected = {"gpt2": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-large": 774_030_080,
                "gpt2-xl": 1_557_611_200}
    for name, n in expected.items():
        assert jtgpt.PRESETS[name].num_params == n, name
