"""Llama (Llama-2 style and Llama-3.x) as a Flax NNX module whose every heavy op is a jtgpt Triton
kernel.

    h_0     = embed_tokens[ids]
    h_l'    = h_l  + o_proj(attention(rope(qkv_proj(rms_norm(h_l)), positions)))   for each layer
    h_l+1   = h_l' + down_proj(silu(gate(x)) * up(x)),  x = rms_norm(h_l')
    logits  = rms_norm(h_L) @ lm_head^T      (lm_head tied to embed_tokens, as in Llama-3.2 1B/3B,
                                              or its own weight, as in Llama-3.1 8B)

Attention is causal with grouped-query heads (num_key_value_heads of them) and the key padding
mask; rope rotates q and k by the token's position (Hugging Face's rotate-half layout, rope_theta,
and rope_scaling of type "llama3" or "linear": jtgpt.kernels.rope). Dropout exists only on the
attention probabilities (attention_dropout, 0 in every Llama checkpoint), in training mode.

Parameters follow Hugging Face's LlamaModel names and nn.Linear's [out, in] layout, with two
packings for the kernels: a layer's q, k and v projections are one qkv_proj weight
[(Hq + 2 Hkv) D, hidden] (one GEMM, whose output is the packed qkv flash attention reads), and
gate and up are one gate_up_proj weight [2F, hidden] (one GEMM with the SwiGLU epilogue:
jtgpt.kernels.matmul.linear(activation="swiglu")). `packed_tensors` tells the checkpoint code.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
from flax import nnx

from jtgpt.kernels.attention import flash_attention
from jtgpt.kernels.embedding import embedding
from jtgpt.kernels.rope import RopeScaling, apply_rope
from jtgpt.kv_cache import KVCache, KVSpec
from jtgpt.layers import (Compute, Embedding, Linear, RMSNorm, causal_lm_loss, check_ids_in_range,
                          dropout_args, dropout_seeds, lm_logits, model_inputs)
from jtgpt.models.pretrained import (PretrainedModel, check_model_type, check_positive, check_rate,
                                     fields_from_hf, token_ids)

TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """The fields of Hugging Face's LlamaConfig that the model uses (same names and defaults).
    num_key_value_heads None means num_attention_heads, head_dim None hidden_size // heads."""
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    attention_dropout: float = 0.0
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // max(self.num_attention_heads, 1))
        check_positive(self, "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                       "num_attention_heads", "num_key_value_heads", "head_dim",
                       "max_position_embeddings", "rms_norm_eps", "rope_theta")
        check_rate(self, "attention_dropout")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"config num_attention_heads ({self.num_attention_heads}) must be a "
                             f"multiple of num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ValueError(f"config head_dim must be even (RoPE rotates pairs), got {self.head_dim}")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise ValueError(f"config rope_scaling must be a jtgpt.kernels.rope.RopeScaling or None "
                             f"(from_hf reads Hugging Face's dict), got {self.rope_scaling!r}")

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> LlamaConfig:
        """From a Hugging Face Llama config.json, transformers 4.x's (rope_theta, rope_scaling) or
        newer (rope_parameters holding both) alike; what the kernels do not implement refused."""
        check_model_type(hf, "llama")
        for name, supported in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
            if hf.get(name, supported) != supported:
                raise ValueError(f"config {name}={hf[name]!r} is not supported (only {supported!r})")
        rope = hf.get("rope_parameters")
        if rope is not None and not isinstance(rope, dict):
            raise ValueError(f"config rope_parameters must be a dict, got {rope!r}")
        if rope is not None and "rope_theta" in rope:
            hf = {**hf, "rope_theta": rope["rope_theta"]}
        fields = fields_from_hf(cls, hf, skip=TOKEN_IDS + ("rope_scaling",))
        fields["rope_scaling"] = RopeScaling.from_hf(hf.get("rope_scaling") or rope)
        fields.update({name: token_ids(hf[name], name) for name in TOKEN_IDS if name in hf})
        return cls(**fields)

    @property
    def num_params(self) -> int:
        """Parameters of the model (a tied LM head counted once, with embed_tokens)."""
        d, f, D = self.hidden_size, self.intermediate_size, self.head_dim
        attention = d * (self.num_attention_heads + 2 * self.num_key_value_heads) * D \
            + self.num_attention_heads * D * d
        layer = attention + 3 * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.num_hidden_layers * layer + d + head

    def to_hf(self) -> dict[str, Any]:
        config = dataclasses.asdict(self)
        config["rope_scaling"] = None if self.rope_scaling is None else self.rope_scaling.to_hf()
        if isinstance(self.eos_token_id, tuple):
            config["eos_token_id"] = list(self.eos_token_id)
        return {**config, "model_type": "llama", "architectures": ["LlamaForCausalLM"],
                "hidden_act": "silu", "attention_bias": False, "mlp_bias": False}


def _llama3(factor: float) -> RopeScaling:
    return RopeScaling.from_hf({"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})


_LLAMA3 = dict(vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5,
               rope_theta=500000.0, bos_token_id=128000, eos_token_id=128001)
PRESETS = {
    "llama-3.2-1b": LlamaConfig(**_LLAMA3, hidden_size=2048, intermediate_size=8192,
                                num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                                head_dim=64, rope_scaling=_llama3(32.0), tie_word_embeddings=True),
    "llama-3.2-3b": LlamaConfig(**_LLAMA3, hidden_size=3072, intermediate_size=8192,
                                num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8,
                                head_dim=128, rope_scaling=_llama3(32.0), tie_word_embeddings=True),
    "llama-3.1-8b": LlamaConfig(**_LLAMA3, hidden_size=4096, intermediate_size=14336,
                                num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                head_dim=128, rope_scaling=_llama3(8.0), tie_word_embeddings=False),
}


class LlamaAttention(nnx.Module):
    def __init__(self, config: LlamaConfig, param_dtype, compute: Compute, rngs: nnx.Rngs):
        Hq, Hkv, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.qkv_proj = Linear(config.hidden_size, (Hq + 2 * Hkv) * D, param_dtype, compute, rngs,
                               bias=False)
        self.o_proj = Linear(Hq * D, config.hidden_size, param_dtype, compute, rngs, bias=False)
        self.num_heads, self.num_kv_heads = Hq, Hkv
        self.rope_theta, self.rope_scaling = config.rope_theta, config.rope_scaling
        self.precision = compute.precision

    def __call__(self, x, norm, positions, attention_mask, prob_dropout, cache=None, layer=0):
        """x + the attention of norm(x), and the cache; norm (a Norm): input_layernorm, applied
        by qkv_proj."""
        heads = dict(num_heads=self.num_heads, num_kv_heads=self.num_kv_heads)
        qkv, x = self.qkv_proj(x, norm=norm, return_input=True)
        qkv = apply_rope(qkv, positions, **heads, theta=self.rope_theta, scaling=self.rope_scaling)
        if cache is None:
            y = flash_attention(qkv, **heads, attention_mask=attention_mask, causal=True,
                                precision=self.precision, **prob_dropout)
        else:
            y, cache = cache.attend(layer, qkv, **heads, precision=self.precision)
        return self.o_proj(y, residual=x), cache


class LlamaMLP(nnx.Module):
    def __init__(self, config: LlamaConfig, param_dtype, compute: Compute, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        self.gate_up_proj = Linear(d, 2 * f, param_dtype, compute, rngs, bias=False)
        self.down_proj = Linear(f, d, param_dtype, compute, rngs, bias=False)

    def __call__(self, x, norm):
        """x + the MLP of norm(x); norm (a Norm): post_attention_layernorm, applied by
        gate_up_proj."""
        h, x = self.gate_up_proj(x, norm=norm, activation="swiglu", return_input=True)
        return self.down_proj(h, residual=x)


class LlamaBlock(nnx.Module):
    """Hugging Face's LlamaDecoderLayer."""

    def __init__(self, config: LlamaConfig, param_dtype, compute: Compute, rngs: nnx.Rngs):
        d, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(d, eps, param_dtype, compute)
        self.self_attn = LlamaAttention(config, param_dtype, compute, rngs)
        self.post_attention_layernorm = RMSNorm(d, eps, param_dtype, compute)
        self.mlp = LlamaMLP(config, param_dtype, compute, rngs)

    def __call__(self, x, positions, attention_mask, prob_dropout, cache=None, layer=0):
        """(x after the layer, the cache with this layer's keys and values or None)."""
        x, cache = self.self_attn(x, self.input_layernorm.as_prologue(), positions,
                                  attention_mask, prob_dropout, cache, layer)
        return self.mlp(x, self.post_attention_layernorm.as_prologue()), cache


class Llama(PretrainedModel):
    """Llama language model (Hugging Face's LlamaForCausalLM).

    `Llama(config, dtype=..., param_dtype=..., precision=..., rngs=...)` makes one with random
    weights; `Llama.from_pretrained(name_or_path, ...)` loads a Hugging Face checkpoint. dtype,
    param_dtype and precision as for jtgpt.GPT: fp32 (IEEE, 3xtf32 or tf32 products), bf16, fp16, or
    fp32 parameters with 16-bit compute (mixed).
    """

    config_class = LlamaConfig
    base_prefix = "model."
    ignored_tensors = r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq"  # older checkpoints' buffer

    def __init__(self, config: LlamaConfig, *, dtype=jnp.float32, param_dtype=None,
                 precision: str = "ieee", rngs: nnx.Rngs | None = None):
        rngs = nnx.Rngs(0) if rngs is None else rngs
        param_dtype = jnp.dtype(dtype if param_dtype is None else param_dtype)
        self.config = config
        self.compute = Compute(dtype, precision)
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, param_dtype, rngs)
        self.layers = nnx.List([LlamaBlock(config, param_dtype, self.compute, rngs)
                                for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype, self.compute)
        self.lm_head = None if config.tie_word_embeddings else Linear(
            config.hidden_size, config.vocab_size, param_dtype, self.compute, rngs, bias=False)

    def __call__(self, input_ids, attention_mask=None, position_ids=None, *, dropout_key=None):
        """Logits [B, T, vocab_size] in the compute dtype.

        input_ids [B, T] int; attention_mask [B, T] (1 = token, 0 = padding) masks keys;
        position_ids [B, T] (default 0..T-1 in every row, as Hugging Face's; left-padded batches
        pass cumsum(mask) - 1) place each token for RoPE, any non-negative position (past
        max_position_embeddings too, as in Hugging Face). Dropout (attention_dropout) runs only
        with `dropout_key`. Token ids outside [0, vocab_size) are a ValueError when concrete;
        under jax.jit (traced ids) such a token's logits are NaN (and possibly its sequence's).
        """
        h = self.hidden_states(input_ids, attention_mask, position_ids, dropout_key=dropout_key)
        return lm_logits(h, self._head_weight(), self.compute.precision)

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None, *, dropout_key=None):
        """The final normed hidden states [B, T, hidden_size]: the model without its LM head."""
        ids, mask, positions = model_inputs(input_ids, attention_mask, position_ids)
        check_ids_in_range("input_ids", ids, self.config.vocab_size)
        return self.norm(self._residual_stream(ids, positions, mask, dropout_key)[0])

    @property
    def final_norm(self) -> RMSNorm:
        return self.norm

    def empty_cache(self, batch: int, capacity: int) -> KVCache:
        """A KV cache for `batch` rows of up to `capacity` tokens (prompt + new ones)."""
        return KVCache.empty(batch, capacity, self.kv_spec)

    @property
    def kv_spec(self) -> KVSpec:
        """What its KV cache holds (jtgpt.kv_cache.KVSpec)."""
        c = self.config
        return KVSpec(num_layers=c.num_hidden_layers, num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads,
                      head_dim=c.head_dim, dtype=self.compute.dtype)

    @property
    def max_context(self) -> int:
        """The context a sequence is meant to hold: max_position_embeddings (RoPE itself takes
        any position)."""
        return self.config.max_position_embeddings

    def _residual_stream(self, ids, positions, mask, dropout_key, cache=None):
        """(the residual stream after the last layer [B, T, hidden_size], the cache with the
        tokens' keys and values, or None without a cache)."""
        config = self.config
        seeds = dropout_seeds(dropout_key, config.num_hidden_layers)
        x = embedding(ids, self.compute.cast(self.embed_tokens.weight))
        for i, layer in enumerate(self.layers):
            x, cache = layer(x, positions, mask, dropout_args(config.attention_dropout, seeds, i),
                             cache, i)
        return x, cache

    def loss(self, input_ids, labels=None, attention_mask=None, position_ids=None, *,
             dropout_key=None, ignore_index: int = -100, reduction: str = "mean"):
        """Next-token cross-entropy, as LlamaForCausalLM computes it from `labels`
        (jtgpt.layers.causal_lm_loss; the LM head fused with the loss: the [B, T, 128256] logits
        never exist)."""
        h = self.hidden_states(input_ids, attention_mask, position_ids, dropout_key=dropout_key)
        return causal_lm_loss(h, self._head_weight(), input_ids, labels, ignore_index=ignore_index,
                              reduction=reduction, precision=self.compute.precision)

    def _head_weight(self):
        head = self.embed_tokens if self.lm_head is None else self.lm_head
        return self.compute.cast(head.weight)

    def packed_tensors(self) -> dict[str, dict[str, int]]:
        c = self.config
        q, kv, f = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim, c.intermediate_size
        packed = {}
        for i in range(c.num_hidden_layers):
            a, m = f"layers.{i}.self_attn.", f"layers.{i}.mlp."
            packed[a + "qkv_proj.weight"] = {a + "q_proj.weight": q, a + "k_proj.weight": kv,
                                             a + "v_proj.weight": kv}
            packed[m + "gate_up_proj.weight"] = {m + "gate_proj.weight": f, m + "up_proj.weight": f}
        return packed

    def flax_names(self) -> dict[str, str]:
        """FlaxLlama's token table is an `embedding` (its RMSNorm weights keep `weight`)."""
        return {"model.embed_tokens.weight": "model.embed_tokens.embedding"}
