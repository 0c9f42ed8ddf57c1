"""Generation (jtgpt.generate) against Hugging Face's PyTorch `generate` on the same tiny random
GPT-2 and Llama checkpoints (fp32): greedy tokens equal token for token, for a left-padded batch,
with and without eos; a jitted call equals a plain one; streaming gives generate's tokens;
sampling is reproducible from its key; and the CLI streams text from a checkpoint directory.
"""
import io
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import left_padding
from flax import nnx

import jtgpt
from jtgpt import cli
from jtgpt.layers import Linear, with_k_contiguous_weights

TINY_GPT2 = dict(vocab_size=101, n_positions=64, n_embd=64, n_layer=2, n_head=4, bos_token_id=1,
                 eos_token_id=1)  # the config's eos: generate's default
TINY_LLAMA = dict(vocab_size=101, hidden_size=64, intermediate_size=88, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
B, T, NEW = 3, 7, 6


def _random_weights(model):
    """Every parameter random (norm weights too) so that greedy choices are far from ties."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    return model.eval()


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def models(request, tmp_path_factory):
    """(jtgpt model, HF PyTorch model) on the same weights, via a checkpoint directory."""
    if request.param == "gpt2":
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**TINY_GPT2))
    else:
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_LLAMA))
    path = tmp_path_factory.mktemp(request.param)
    _random_weights(hf).save_pretrained(path, safe_serialization=True)
    return jtgpt.from_pretrained(path), hf


@pytest.fixture(scope="module")
def prompt():
    ids = jax.random.randint(jax.random.key(1), (B, T), 0, TINY_GPT2["vocab_size"], jnp.int32)
    return np.asarray(ids), np.asarray(left_padding(B, T))


def _hf_generate(hf, ids, mask, eos, pad):
    with torch.no_grad():
        out = hf.generate(torch.tensor(ids).long(), attention_mask=torch.tensor(mask).long(),
                          max_new_tokens=NEW, do_sample=False, eos_token_id=eos,
                          pad_token_id=pad).numpy()
    # HF stops once every row has finished: the rest of jtgpt's fixed-size output is pad.
    return np.pad(out, ((0, 0), (0, T + NEW - out.shape[1])), constant_values=pad)


GREEDY = dict(max_new_tokens=NEW, eos_token_id=[], pad_token_id=0)


@pytest.fixture(scope="module")
def greedy(models, prompt):
    """jtgpt's greedy tokens for the prompt without eos (a plain call), computed once."""
    return models[0].generate(*prompt, **GREEDY)


def test_greedy_matches_hf_left_padded(models, prompt, greedy):
    ids, mask = prompt
    expected = _hf_generate(models[1], ids, mask, eos=[], pad=0)
    assert greedy.dtype == jnp.int32 and greedy.shape == (B, T + NEW)
    np.testing.assert_array_equal(np.asarray(greedy), expected)


@pytest.mark.parametrize("row", [0, B - 1])
def test_greedy_one_sequence_matches_hf(models, prompt, row):
    """A batch of one sequence (the GEMV path of every decode GEMM), unpadded (row 0) and
    left-padded (the last row)."""
    model, hf = models
    ids, mask = prompt[0][row:row + 1], prompt[1][row:row + 1]
    expected = _hf_generate(hf, ids, mask, eos=[], pad=0)
    np.testing.assert_array_equal(np.asarray(model.generate(ids, mask, **GREEDY)), expected)


def test_greedy_matches_hf_with_eos(models, prompt):
    """Row 0 emits eos at its 2nd new token, row 1 at its 4th: every row after its eos is pad,
    and with row 2 never finishing the loop runs to the end (then, with row 2's first token an
    eos too, it stops early and the rest is pad)."""
    model, hf = models
    ids, mask = prompt
    free = _hf_generate(hf, ids, mask, eos=[], pad=0)[:, T:]
    eos = [int(free[0, 1]), int(free[1, 3])]
    pad = next(t for t in range(100) if t not in free)
    for eos_ids in (eos, eos + [int(free[2, 0])]):
        expected = _hf_generate(hf, ids, mask, eos=eos_ids, pad=pad)
        out = model.generate(ids, mask, max_new_tokens=NEW, eos_token_id=eos_ids, pad_token_id=pad)
        np.testing.assert_array_equal(np.asarray(out), expected)
    assert (expected[:, T + 4:] == pad).all()  # the second case finished every row early


def test_jit_equals_plain_call_and_stream(models, prompt, greedy):
    model, _ = models
    ids, mask = prompt
    jitted = jax.jit(lambda m, i, a: m.generate(i, a, **GREEDY))(model, ids, mask)
    np.testing.assert_array_equal(np.asarray(jitted), np.asarray(greedy))
    chunks = list(model.stream(ids, mask, chunk_size=4, **GREEDY))
    assert [c.shape[1] for c in chunks] == [4, 1, 1]  # 4 and 1 decode steps, then the last choice
    np.testing.assert_array_equal(np.concatenate(chunks, axis=1), np.asarray(greedy)[:, T:])


def test_sampling_is_reproducible(prompt):
    """On one model (sampling is the model-agnostic part of the loop): the same key gives the
    same tokens, another key others."""
    model = jtgpt.Llama(jtgpt.LlamaConfig(**TINY_LLAMA))
    ids, mask = prompt
    options = dict(max_new_tokens=4, do_sample=True, temperature=1.5, top_k=40, top_p=0.95,
                   repetition_penalty=1.3, eos_token_id=[])
    sample = jax.jit(lambda m, key: m.generate(ids, mask, key=key, **options))  # compiled once
    first, again, other = (sample(model, jax.random.key(k)) for k in (0, 0, 1))
    np.testing.assert_array_equal(np.asarray(first), np.asarray(again))
    assert (np.asarray(first)[:, :T] == ids).all()
    assert not (np.asarray(first) == np.asarray(other)).all()


@pytest.mark.parametrize("bad, match", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=2, do_sample=True), "key"),
    (dict(max_new_tokens=2, eos_token_id=101), "eos_token_id"),
    (dict(max_new_tokens=2, pad_token_id=-1), "pad_token_id"),
    (dict(max_new_tokens=2, top_p=1.5), "top_p"),
])
def test_bad_arguments(models, prompt, bad, match):
    model, _ = models
    with pytest.raises(ValueError, match=match):
        model.generate(prompt[0], **bad)


def test_k_contiguous_weights_compute_the_same(models, prompt):
    """generate's copy of the model with GPT-2's [in, out] weights transposed once gives the
    same logits (both layouts through the same kernels); the model itself is left as it was."""
    model, _ = models
    copy = with_k_contiguous_weights(model)
    linears = [(m, c) for (_, m), (_, c) in zip(nnx.iter_modules(model), nnx.iter_modules(copy))
               if isinstance(m, Linear)]
    assert linears and all(not c.in_out for _, c in linears)
    for m, c in linears:
        assert c.weight[...].shape == (m.weight[...].T.shape if m.in_out else m.weight[...].shape)
    assert any(m.in_out for m, _ in linears) == isinstance(model, jtgpt.GPT)
    ids = jnp.asarray(prompt[0])
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    want, _ = model.next_token_logits(ids, positions, model.empty_cache(B, T))
    got, _ = copy.next_token_logits(ids, positions, copy.empty_cache(B, T))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_gpt2_capacity_is_n_positions():
    model = jtgpt.GPT(jtgpt.GPTConfig(**TINY_GPT2))
    with pytest.raises(ValueError, match="n_positions"):
        model.generate(np.zeros((1, 60), np.int32), max_new_tokens=5)


# ------------------------------------------------------------------------------------- CLI

def _word_tokenizer(words):
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return tokenizer


def _cli_args(path, **overrides):
    args = dict(command="generate", model=str(path), prompt="w3 w5 w7", max_new_tokens=5,
                temperature=0.0, top_k=None, top_p=None, seed=0, dtype="float32")
    return types.SimpleNamespace(**{**args, **overrides})


def test_cli_streams_greedy_text(tmp_path):
    hf = _random_weights(transformers.GPT2LMHeadModel(transformers.GPT2Config(**TINY_GPT2)))
    hf.save_pretrained(tmp_path, safe_serialization=True)
    tokenizer = _word_tokenizer([f"w{i}" for i in range(TINY_GPT2["vocab_size"])])
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    out, err = io.StringIO(), io.StringIO()
    cli.generate_command(_cli_args(tmp_path), out, err)
    ids = torch.tensor([tokenizer.encode("w3 w5 w7").ids])
    with torch.no_grad():
        expected = hf.generate(ids, max_new_tokens=5, do_sample=False)[0, 3:].tolist()
    assert out.getvalue() == " ".join(["w3", "w5", "w7"] + [f"w{t}" for t in expected]) + "\n"
    assert "tokens/s" in err.getvalue()


def test_cli_errors_name_what_is_missing(tmp_path, capsys):
    assert cli.main(["generate", "--model", str(tmp_path / "nowhere"), "--prompt", "x"]) == 1
    assert "no such local directory" in capsys.readouterr().err
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**TINY_GPT2))
    hf.save_pretrained(tmp_path, safe_serialization=True)
    assert cli.main(["generate", "--model", str(tmp_path), "--prompt", "x"]) == 1  # no tokenizer
    assert "has no tokenizer.json" in capsys.readouterr().err
