"""GPT-2 as a Flax NNX module whose every heavy op is a jtgpt Triton kernel.

    h_0     = dropout(wte[ids] + wpe[positions])
    h_l'    = h_l  + dropout(c_proj(attention(c_attn(ln_1(h_l)))))      for each of n_layer blocks
    h_l+1   = h_l' + dropout(c_proj(gelu_tanh(c_fc(ln_2(h_l')))))
    logits  = ln_f(h_L) @ wte^T              (the LM head: tied to wte, or lm_head.weight if untied)
    loss    = mean over labelled tokens t of  logsumexp(logits_t) - logits_t[labels_t+1]

attention() drops attention probabilities too (attn_pdrop). Every op is a jax.custom_vjp whose
backward is Triton as well, so jax.grad of `loss` runs on Triton kernels end to end; the loss
fuses the LM head with the cross-entropy and never holds the whole batch's logits.

Parameters are named and laid out exactly as Hugging Face's PyTorch GPT2Model names them
("h.0.attn.c_attn.weight", Conv1D weights [in, out]), so a checkpoint maps onto the module by name.
The residual adds, biases, GELU and dropout run in the GEMM epilogues; no XLA matmul remains.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
from flax import nnx

from jtgpt.kernels.attention import flash_attention
from jtgpt.kernels.embedding import embedding
from jtgpt.kv_cache import KVCache, KVSpec
from jtgpt.layers import (Compute, Embedding, LayerNorm, Linear, causal_lm_loss, check_ids_in_range,
                          dropout_args, dropout_seeds, lm_logits, model_inputs)
from jtgpt.models.pretrained import (PretrainedModel, check_model_type, check_positive, check_rate,
                                     fields_from_hf, token_ids)

# GPT2Config.attribute_map: the generic names transformers also accepts for GPT-2's own.
HF_ALIASES = {"hidden_size": "n_embd", "max_position_embeddings": "n_positions",
              "num_attention_heads": "n_head", "num_hidden_layers": "n_layer"}
TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """The fields of Hugging Face's GPT2Config that the model uses (same names and defaults)."""
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    layer_norm_epsilon: float = 1e-5
    embd_pdrop: float = 0.1
    resid_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 50256
    eos_token_id: int | tuple[int, ...] | None = 50256
    pad_token_id: int | None = None

    def __post_init__(self):
        check_positive(self, "vocab_size", "n_positions", "n_embd", "n_layer", "n_head",
                       "layer_norm_epsilon")
        check_rate(self, "embd_pdrop", "resid_pdrop", "attn_pdrop")
        if self.n_embd % self.n_head:
            raise ValueError(f"config n_embd ({self.n_embd}) must be a multiple of n_head "
                             f"({self.n_head})")

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> GPTConfig:
        """From a Hugging Face GPT-2 config.json: its names or GPT2Config's aliases (hidden_size,
        num_hidden_layers, ...), each type-checked; what the kernels do not implement refused."""
        check_model_type(hf, "gpt2")
        activation = hf.get("activation_function", "gelu_new")
        if activation != "gelu_new":
            raise ValueError(f"config activation_function must be 'gelu_new' (GPT-2's tanh GELU), "
                             f"got {activation!r}")
        fields = fields_from_hf(cls, hf, HF_ALIASES, skip=TOKEN_IDS)
        if hf.get("n_inner") not in (None, 4 * fields.get("n_embd", cls.n_embd)):
            raise ValueError(f"config n_inner must be None or 4 * n_embd, got {hf['n_inner']}")
        # Variants of GPT-2 that the kernels do not implement.
        for name, supported in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                                ("add_cross_attention", False)):
            if hf.get(name, supported) != supported:
                raise ValueError(f"config {name}={hf[name]} is not supported (only {supported})")
        fields.update({name: token_ids(hf[name], name) for name in TOKEN_IDS if name in hf})
        return cls(**fields)

    @property
    def num_params(self) -> int:
        """Parameters of the model (a tied LM head counted once, with wte)."""
        D, L = self.n_embd, self.n_layer
        head = 0 if self.tie_word_embeddings else self.vocab_size * D
        return self.vocab_size * D + self.n_positions * D + L * (12 * D * D + 13 * D) + 2 * D + head

    def to_hf(self) -> dict[str, Any]:
        config = dataclasses.asdict(self)
        if isinstance(self.eos_token_id, tuple):
            config["eos_token_id"] = list(self.eos_token_id)
        return {**config, "model_type": "gpt2", "activation_function": "gelu_new",
                "architectures": ["GPT2LMHeadModel"]}


PRESETS = {
    "gpt2": GPTConfig(),
    "gpt2-medium": GPTConfig(n_embd=1024, n_layer=24, n_head=16),
    "gpt2-large": GPTConfig(n_embd=1280, n_layer=36, n_head=20),
    "gpt2-xl": GPTConfig(n_embd=1600, n_layer=48, n_head=25),
}


class Attention(nnx.Module):
    def __init__(self, config: GPTConfig, param_dtype, compute: Compute, rngs: nnx.Rngs):
        D = config.n_embd
        self.c_attn = Linear(D, 3 * D, param_dtype, compute, rngs, bias=True, in_out=True)
        self.c_proj = Linear(D, D, param_dtype, compute, rngs, bias=True, in_out=True)
        self.n_head = config.n_head
        self.precision = compute.precision

    def __call__(self, x, norm, attention_mask, prob_dropout, dropout, cache=None, layer=0):
        """x + the attention of norm(x), and the cache; norm (a Norm): ln_1, applied by c_attn."""
        qkv, x = self.c_attn(x, norm=norm, return_input=True)
        if cache is None:
            y = flash_attention(qkv, num_heads=self.n_head, attention_mask=attention_mask,
                                causal=True, precision=self.precision, **prob_dropout)
        else:
            y, cache = cache.attend(layer, qkv, num_heads=self.n_head, num_kv_heads=self.n_head,
                                    precision=self.precision)
        return self.c_proj(y, residual=x, **dropout), cache


class MLP(nnx.Module):
    def __init__(self, config: GPTConfig, param_dtype, compute: Compute, rngs: nnx.Rngs):
        D = config.n_embd
        self.c_fc = Linear(D, 4 * D, param_dtype, compute, rngs, bias=True, in_out=True)
        self.c_proj = Linear(4 * D, D, param_dtype, compute, rngs, bias=True, in_out=True)

    def __call__(self, x, norm, dropout):
        """x + the MLP of norm(x); norm (a Norm): ln_2, applied by c_fc."""
        h, x = self.c_fc(x, norm=norm, activation="gelu_tanh", return_input=True)
        return self.c_proj(h, residual=x, **dropout)


class Block(nnx.Module):
    def __init__(self, config: GPTConfig, param_dtype, compute: Compute, rngs: nnx.Rngs):
        eps = config.layer_norm_epsilon
        self.ln_1 = LayerNorm(config.n_embd, eps, param_dtype, compute)
        self.attn = Attention(config, param_dtype, compute, rngs)
        self.ln_2 = LayerNorm(config.n_embd, eps, param_dtype, compute)
        self.mlp = MLP(config, param_dtype, compute, rngs)

    def __call__(self, x, attention_mask, dropout, cache=None, layer=0):
        """(x after the block, the cache with this layer's keys and values or None).
        dropout: the kwargs of the three dropout sites, (attention probabilities, attention
        output, MLP output)."""
        prob_dropout, attn_dropout, mlp_dropout = dropout
        x, cache = self.attn(x, self.ln_1.as_prologue(), attention_mask, prob_dropout,
                             attn_dropout, cache, layer)
        return self.mlp(x, self.ln_2.as_prologue(), mlp_dropout), cache


class GPT(PretrainedModel):
    """GPT-2 language model.

    `GPT(config, dtype=..., param_dtype=..., precision=..., rngs=...)` makes one with random
    weights; `GPT.from_pretrained(name_or_path, ...)` loads a Hugging Face checkpoint.
    `dtype` is the compute dtype (float32, bfloat16 or float16) and `param_dtype` the storage dtype
    (default: `dtype`); fp32 params with bf16 compute is the mixed mode. For float32 compute,
    `precision="ieee"` gives true fp32 products, `"tf32x3"` three tensor-core tf32 products per
    product (about fp32's accuracy) and `"tf32"` one (10-bit mantissa).
    """

    config_class = GPTConfig
    base_prefix = "transformer."
    ignored_tensors = r"h\.\d+\.attn\.(bias|masked_bias)"  # old .bin files' attention-mask buffers

    def __init__(self, config: GPTConfig, *, dtype=jnp.float32, param_dtype=None,
                 precision: str = "ieee", rngs: nnx.Rngs | None = None):
        rngs = nnx.Rngs(0) if rngs is None else rngs
        param_dtype = jnp.dtype(dtype if param_dtype is None else param_dtype)
        self.config = config
        self.compute = Compute(dtype, precision)
        self.wte = Embedding(config.vocab_size, config.n_embd, param_dtype, rngs)
        self.wpe = Embedding(config.n_positions, config.n_embd, param_dtype, rngs)
        self.h = nnx.List([Block(config, param_dtype, self.compute, rngs)
                           for _ in range(config.n_layer)])
        self.ln_f = LayerNorm(config.n_embd, config.layer_norm_epsilon, param_dtype, self.compute)
        self.lm_head = None if config.tie_word_embeddings else Linear(
            config.n_embd, config.vocab_size, param_dtype, self.compute, rngs, bias=False)

    def __call__(self, input_ids, attention_mask=None, position_ids=None, *, dropout_key=None):
        """Logits [B, T, vocab_size] in the compute dtype.

        input_ids [B, T] int; attention_mask [B, T] (1 = token, 0 = padding) masks keys, and
        position_ids [B, T] defaults to 0..T-1 in every row, as in Hugging Face's Flax GPT-2 (pass
        cumsum(mask) - 1 for left-padded batches). Dropout runs only when `dropout_key` (a
        jax.random key) is given: that is training mode; without it the model is in eval mode.
        Token ids outside [0, vocab_size) and positions outside [0, n_positions) are a ValueError
        when the ids are concrete; under jax.jit (traced ids) such a token's logits are NaN (and
        possibly its sequence's).
        """
        h = self.hidden_states(input_ids, attention_mask, position_ids, dropout_key=dropout_key)
        return lm_logits(h, self._head_weight(), self.compute.precision)

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None, *, dropout_key=None):
        """The final layer-normed hidden states [B, T, n_embd]: the model without its LM head."""
        config = self.config
        ids, mask, positions = model_inputs(input_ids, attention_mask, position_ids)
        if ids.shape[1] > config.n_positions:
            raise ValueError(f"input_ids has {ids.shape[1]} positions, more than "
                             f"n_positions={config.n_positions}")
        check_ids_in_range("input_ids", ids, config.vocab_size)
        check_ids_in_range("position_ids", positions, config.n_positions)
        return self.ln_f(self._residual_stream(ids, positions, mask, dropout_key)[0])

    @property
    def final_norm(self) -> LayerNorm:
        return self.ln_f

    def empty_cache(self, batch: int, capacity: int) -> KVCache:
        """A KV cache for `batch` rows of up to `capacity` tokens (prompt + new ones), which
        GPT-2's position table caps at n_positions."""
        if capacity > self.config.n_positions:
            raise ValueError(f"prompt length + max_new_tokens = {capacity} exceeds GPT-2's "
                             f"n_positions={self.config.n_positions}")
        return KVCache.empty(batch, capacity, self.kv_spec)

    @property
    def kv_spec(self) -> KVSpec:
        """What its KV cache holds (jtgpt.kv_cache.KVSpec)."""
        c = self.config
        return KVSpec(num_layers=c.n_layer, num_heads=c.n_head, num_kv_heads=c.n_head,
                      head_dim=c.n_embd // c.n_head, dtype=self.compute.dtype)

    @property
    def max_context(self) -> int:
        """The most tokens a sequence can hold: the position table's n_positions."""
        return self.config.n_positions

    def _residual_stream(self, ids, positions, mask, dropout_key, cache=None):
        """(the residual stream after the last block [B, T, n_embd], the cache with the tokens'
        keys and values, or None without a cache)."""
        config = self.config
        seeds = dropout_seeds(dropout_key, 1 + 3 * config.n_layer)  # embeddings, 3 sites a block
        x = embedding(ids, self.compute.cast(self.wte.weight), positions,
                      self.compute.cast(self.wpe.weight),
                      **dropout_args(config.embd_pdrop, seeds, 0))
        for i, block in enumerate(self.h):
            site = 1 + 3 * i
            x, cache = block(x, mask, (dropout_args(config.attn_pdrop, seeds, site),
                                       dropout_args(config.resid_pdrop, seeds, site + 1),
                                       dropout_args(config.resid_pdrop, seeds, site + 2)),
                             cache, i)
        return x, cache

    def loss(self, input_ids, labels=None, attention_mask=None, position_ids=None, *,
             dropout_key=None, ignore_index: int = -100, reduction: str = "mean"):
        """Next-token cross-entropy, as Hugging Face's GPT2LMHeadModel computes it from `labels`
        (jtgpt.layers.causal_lm_loss): labels [B, T] (default: input_ids) are shifted inside and
        labels equal to ignore_index do not count; reduction "mean" (over counted tokens) or
        "sum". Dropout runs only with `dropout_key`, as in __call__."""
        h = self.hidden_states(input_ids, attention_mask, position_ids, dropout_key=dropout_key)
        return causal_lm_loss(h, self._head_weight(), input_ids, labels, ignore_index=ignore_index,
                              reduction=reduction, precision=self.compute.precision)

    def _head_weight(self):
        head = self.wte if self.lm_head is None else self.lm_head
        return self.compute.cast(head.weight)

    def flax_names(self) -> dict[str, str]:
        """FlaxGPT2's embedding tables are `embedding`s and its LayerNorm weights `scale`s."""
        names = {f"transformer.{t}.weight": f"transformer.{t}.embedding" for t in ("wte", "wpe")}
        norms = ["ln_f"] + [f"h.{i}.{ln}" for i in range(self.config.n_layer) for ln in ("ln_1", "ln_2")]
        names.update({f"transformer.{n}.weight": f"transformer.{n}.scale" for n in norms})
        return names
