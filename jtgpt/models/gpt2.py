"""GPT-2 as a Flax NNX module whose every heavy op is a jtgpt Triton kernel.

    h_0     = dropout(wte[ids] + wpe[positions])
    h_l'    = h_l  + dropout(c_proj(attention(c_attn(ln_1(h_l)))))      for each of n_layer blocks
    h_l+1   = h_l' + dropout(c_proj(gelu_tanh(c_fc(ln_2(h_l')))))
    logits  = ln_f(h_L) @ wte^T                                          (LM head tied to wte)
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

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jtgpt import checkpoint
from jtgpt.kernels import check_float_dtype
from jtgpt.kernels.attention import flash_attention
from jtgpt.kernels.cross_entropy import linear_cross_entropy
from jtgpt.kernels.embedding import embedding
from jtgpt.kernels.layernorm import layer_norm
from jtgpt.kernels.matmul import linear


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

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> GPTConfig:
        activation = hf.get("activation_function", "gelu_new")
        if activation != "gelu_new":
            raise ValueError(f"config activation_function must be 'gelu_new' (GPT-2's tanh GELU), "
                             f"got {activation!r}")
        if hf.get("n_inner") not in (None, 4 * hf.get("n_embd", cls.n_embd)):
            raise ValueError(f"config n_inner must be None or 4 * n_embd, got {hf['n_inner']}")
        # Variants of GPT-2's attention scaling that the kernels do not implement.
        for name, supported in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False)):
            if hf.get(name, supported) != supported:
                raise ValueError(f"config {name}={hf[name]} is not supported (only {supported})")
        return cls(**{f.name: hf[f.name] for f in dataclasses.fields(cls) if f.name in hf})

    @property
    def num_params(self) -> int:
        """Parameters of the model (the LM head is tied to wte: counted once)."""
        D, L = self.n_embd, self.n_layer
        return self.vocab_size * D + self.n_positions * D + L * (12 * D * D + 13 * D) + 2 * D

    def to_hf(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "model_type": "gpt2", "activation_function": "gelu_new",
                "architectures": ["GPT2LMHeadModel"]}


PRESETS = {
    "gpt2": GPTConfig(),
    "gpt2-medium": GPTConfig(n_embd=1024, n_layer=24, n_head=16),
    "gpt2-large": GPTConfig(n_embd=1280, n_layer=36, n_head=20),
    "gpt2-xl": GPTConfig(n_embd=1600, n_layer=48, n_head=25),
}


@dataclasses.dataclass(frozen=True)
class Compute:
    """How a module computes: its dtype, and the fp32 dot precision ("ieee" or "tf32")."""
    dtype: Any
    precision: str = "ieee"

    def __post_init__(self):
        check_float_dtype("dtype", self.dtype)
        if self.precision not in ("ieee", "tf32"):
            raise ValueError(f"precision must be 'ieee' or 'tf32', got {self.precision!r}")
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype))

    def cast(self, param: nnx.Param):
        return param[...].astype(self.dtype)


class Embedding(nnx.Module):
    def __init__(self, num: int, dim: int, param_dtype, rngs: nnx.Rngs):
        self.weight = nnx.Param(0.02 * jax.random.normal(rngs.params(), (num, dim), param_dtype))


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, param_dtype, compute: Compute):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype))
        self.eps = eps
        self.compute = compute

    def __call__(self, x):
        return layer_norm(x, self.compute.cast(self.weight), self.compute.cast(self.bias),
                          eps=self.eps)


class Conv1D(nnx.Module):
    """GPT-2's dense layer: weight [in, out], bias [out]; epilogue options go to the GEMM."""

    def __init__(self, n_in: int, n_out: int, param_dtype, compute: Compute, rngs: nnx.Rngs):
        self.weight = nnx.Param(0.02 * jax.random.normal(rngs.params(), (n_in, n_out), param_dtype))
        self.bias = nnx.Param(jnp.zeros((n_out,), param_dtype))
        self.compute = compute

    def __call__(self, x, **epilogue):
        return linear(x, self.compute.cast(self.weight), self.compute.cast(self.bias),
                      precision=self.compute.precision, **epilogue)


class Attention(nnx.Module):
    def __init__(self, config: GPTConfig, param_dtype, compute: Compute, rngs: nnx.Rngs):
        D = config.n_embd
        self.c_attn = Conv1D(D, 3 * D, param_dtype, compute, rngs)
        self.c_proj = Conv1D(D, D, param_dtype, compute, rngs)
        self.n_head = config.n_head
        self.precision = compute.precision

    def __call__(self, x, residual, attention_mask, prob_dropout, dropout):
        qkv = self.c_attn(x)
        y = flash_attention(qkv, num_heads=self.n_head, attention_mask=attention_mask,
                            causal=True, precision=self.precision, **prob_dropout)
        return self.c_proj(y, residual=residual, **dropout)


class MLP(nnx.Module):
    def __init__(self, config: GPTConfig, param_dtype, compute: Compute, rngs: nnx.Rngs):
        self.c_fc = Conv1D(config.n_embd, 4 * config.n_embd, param_dtype, compute, rngs)
        self.c_proj = Conv1D(4 * config.n_embd, config.n_embd, param_dtype, compute, rngs)

    def __call__(self, x, residual, dropout):
        return self.c_proj(self.c_fc(x, activation="gelu_tanh"), residual=residual, **dropout)


class Block(nnx.Module):
    def __init__(self, config: GPTConfig, param_dtype, compute: Compute, rngs: nnx.Rngs):
        eps = config.layer_norm_epsilon
        self.ln_1 = LayerNorm(config.n_embd, eps, param_dtype, compute)
        self.attn = Attention(config, param_dtype, compute, rngs)
        self.ln_2 = LayerNorm(config.n_embd, eps, param_dtype, compute)
        self.mlp = MLP(config, param_dtype, compute, rngs)

    def __call__(self, x, attention_mask, dropout):
        """dropout: the kwargs of the three dropout sites, (attention probabilities, attention
        output, MLP output)."""
        prob_dropout, attn_dropout, mlp_dropout = dropout
        x = self.attn(self.ln_1(x), x, attention_mask, prob_dropout, attn_dropout)
        return self.mlp(self.ln_2(x), x, mlp_dropout)


class GPT(nnx.Module):
    """GPT-2 language model.

    `GPT(config, dtype=..., param_dtype=..., precision=..., rngs=...)` makes one with random
    weights; `GPT.from_pretrained(name_or_path, ...)` loads a Hugging Face checkpoint.
    `dtype` is the compute dtype (float32, bfloat16 or float16) and `param_dtype` the storage dtype
    (default: `dtype`); fp32 params with bf16 compute is the mixed mode. For float32 compute,
    `precision="ieee"` gives true fp32 products and `"tf32"` the tensor cores' tf32.
    """

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

    def __call__(self, input_ids, attention_mask=None, position_ids=None, *, dropout_key=None):
        """Logits [B, T, vocab_size] in the compute dtype.

        input_ids [B, T] int; attention_mask [B, T] (1 = token, 0 = padding) masks keys, and
        position_ids [B, T] defaults to 0..T-1 in every row, as in Hugging Face's Flax GPT-2 (pass
        cumsum(mask) - 1 for left-padded batches). Dropout runs only when `dropout_key` (a
        jax.random key) is given: that is training mode; without it the model is in eval mode.
        """
        h = self.hidden_states(input_ids, attention_mask, position_ids, dropout_key=dropout_key)
        return linear(h, self.compute.cast(self.wte.weight), transpose_w=True,
                      precision=self.compute.precision)

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None, *, dropout_key=None):
        """The final layer-normed hidden states [B, T, n_embd]: the model without its LM head."""
        config = self.config
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(f"input_ids must be an integer array [batch, seq], got "
                             f"{input_ids.dtype}{list(input_ids.shape)}")
        B, T = input_ids.shape
        if T > config.n_positions:
            raise ValueError(f"input_ids has {T} positions, more than n_positions={config.n_positions}")
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        elif jnp.shape(position_ids) != (B, T):
            raise ValueError(f"position_ids must have shape {(B, T)}, got {jnp.shape(position_ids)}")
        if attention_mask is not None and jnp.shape(attention_mask) != (B, T):
            raise ValueError(f"attention_mask must have shape {(B, T)}, got {jnp.shape(attention_mask)}")

        seeds = self._dropout_seeds(dropout_key)
        x = embedding(input_ids.astype(jnp.int32), jnp.asarray(position_ids, jnp.int32),
                      self.compute.cast(self.wte.weight), self.compute.cast(self.wpe.weight),
                      **_dropout(config.embd_pdrop, seeds, 0))
        for i, block in enumerate(self.h):
            site = 1 + 3 * i
            x = block(x, attention_mask, (_dropout(config.attn_pdrop, seeds, site),
                                          _dropout(config.resid_pdrop, seeds, site + 1),
                                          _dropout(config.resid_pdrop, seeds, site + 2)))
        return self.ln_f(x)

    def loss(self, input_ids, labels=None, attention_mask=None, position_ids=None, *,
             dropout_key=None, ignore_index: int = -100, reduction: str = "mean"):
        """Next-token cross-entropy, as Hugging Face's GPT2LMHeadModel computes it from `labels`.

        labels [B, T] (default: input_ids) are shifted inside: the logits at position t are
        scored against labels[:, t + 1]; labels equal to `ignore_index` (e.g. padding) do not
        count. reduction "mean" (over counted tokens) or "sum". The LM head runs fused with the
        cross-entropy (jtgpt.kernels.cross_entropy): the [B, T, vocab] logits never exist.
        Dropout runs only with `dropout_key`, as in __call__.
        """
        h = self.hidden_states(input_ids, attention_mask, position_ids, dropout_key=dropout_key)
        labels = jnp.asarray(input_ids if labels is None else labels)
        if labels.shape != h.shape[:2] or not jnp.issubdtype(labels.dtype, jnp.integer):
            raise ValueError(f"labels must be an integer array of input_ids' shape {h.shape[:2]}, "
                             f"got {labels.dtype}{list(labels.shape)}")
        targets = next_token_targets(labels, ignore_index)
        return linear_cross_entropy(h, self.compute.cast(self.wte.weight), targets.astype(jnp.int32),
                                    ignore_index=ignore_index, reduction=reduction,
                                    precision=self.compute.precision)

    def _dropout_seeds(self, dropout_key):
        if dropout_key is None:
            return None
        sites = 1 + 3 * self.config.n_layer  # embeddings, then three sites a block
        return jax.random.randint(dropout_key, (sites,), 0, jnp.iinfo(jnp.int32).max, jnp.int32)

    # ------------------------------------------------------------------------- checkpoints

    @classmethod
    def from_pretrained(cls, name_or_path, *, dtype=jnp.float32, param_dtype=None,
                        precision: str = "ieee") -> GPT:
        """Load a Hugging Face GPT-2 checkpoint: a local directory, the local HF cache (offline),
        or the hub; safetensors (sharded too), pytorch_model.bin or flax_model.msgpack."""
        path = checkpoint.resolve(name_or_path)
        config = GPTConfig.from_hf(checkpoint.load_config(path))
        model = nnx.eval_shape(lambda: cls(config, dtype=dtype, param_dtype=param_dtype,
                                           precision=precision))
        model.load_state_dict(checkpoint.load_state_dict(path), source=str(path))
        return model

    def state_dict(self) -> dict[str, np.ndarray]:
        """Parameters as numpy arrays under Hugging Face's GPT2Model names."""
        return {_name(path): np.asarray(var[...]) for path, var in _params(self)}

    def load_state_dict(self, state: dict[str, np.ndarray], source: str = "state dict") -> None:
        """Set every parameter from `state` (names as in `state_dict`), cast to the param dtype."""
        params = _params(self)
        names = {_name(path) for path, _ in params}
        missing = sorted(names - state.keys())
        unexpected = sorted(state.keys() - names)
        if missing or unexpected:
            raise ValueError(f"{source}: missing tensors {missing[:8]}, unexpected tensors "
                             f"{unexpected[:8]} for a GPT-2 with {self.config}")
        for path, var in params:
            name = _name(path)
            value = state[name]
            if tuple(value.shape) != tuple(var.shape):
                raise ValueError(f"{source}: tensor {name} has shape {tuple(value.shape)}, "
                                 f"expected {tuple(var.shape)}")
            var.set_value(jnp.asarray(value, var.dtype))

    def save_pretrained(self, path, format: str = "safetensors", max_shard_size: int | None = None):
        """Write config.json and the weights in Hugging Face's GPT-2 layout."""
        checkpoint.save_state_dict(self.state_dict(), path, self.config.to_hf(), format=format,
                                   max_shard_size=max_shard_size)


def next_token_targets(labels, ignore_index: int = -100):
    """[B, T]: what the logits at each position are scored against, labels[:, t + 1], and
    ignore_index at the last position (it has no next token). Shifting the labels rather than
    the hidden states spares a copy of h[:, :-1]."""
    return jnp.concatenate(
        [labels[:, 1:], jnp.full((labels.shape[0], 1), ignore_index, labels.dtype)], axis=1)


def _params(model: nnx.Module):
    return list(nnx.to_flat_state(nnx.state(model, nnx.Param)))


def _name(path) -> str:
    return ".".join(str(p) for p in path)


def _dropout(rate: float, seeds, site: int) -> dict:
    if seeds is None or rate == 0.0:
        return {}
    return {"dropout_rate": rate, "seed": seeds[site]}
