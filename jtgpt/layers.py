"""The building blocks both model families are made of: how a module computes (dtype, precision),
dense layers, norms, embedding tables, dropout seeds, the inputs' checks, and the causal-LM loss.

Every block calls a jtgpt Triton kernel (jtgpt.kernels); parameters are Flax NNX `Param`s named
and laid out as Hugging Face stores them, so a checkpoint maps onto a model by name
(jtgpt.models.pretrained). Each block casts its parameters to the compute dtype where it uses
them: fp32 parameters with bf16 compute is the mixed mode, and the gradient of the cast brings
the parameters' gradients back in their own dtype.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jtgpt.kernels import check_float_dtype, check_precision
from jtgpt.kernels.cross_entropy import linear_cross_entropy
from jtgpt.kernels.layernorm import layer_norm, rms_norm
from jtgpt.kernels.matmul import Norm, linear

INIT_STD = 0.02  # Hugging Face's initializer_range for GPT-2 and Llama: normal(0, 0.02) weights


@dataclasses.dataclass(frozen=True)
class Compute:
    """How a module computes: its dtype, and the fp32 dot precision (jtgpt.kernels.PRECISIONS:
    "ieee", "tf32x3" or "tf32")."""
    dtype: Any
    precision: str = "ieee"

    def __post_init__(self):
        check_float_dtype("dtype", self.dtype)
        check_precision("Compute", self.precision)
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype))

    def cast(self, param: nnx.Param):
        """The parameter in the compute dtype. Every module reads its parameters through here
        and only here: jtgpt.train relies on it to all-gather them already rounded."""
        return param[...].astype(self.dtype)


class Embedding(nnx.Module):
    """A lookup table weight [num, dim] (looked up by jtgpt.kernels.embedding at the model)."""

    def __init__(self, num: int, dim: int, param_dtype, rngs: nnx.Rngs):
        self.weight = nnx.Param(INIT_STD * jax.random.normal(rngs.params(), (num, dim), param_dtype))


class Linear(nnx.Module):
    """A dense layer y = x W (+ b), its weight stored as Hugging Face stores it: [out, in] as
    torch.nn.Linear does (Llama, the LM heads), or [in, out] with `in_out=True` (GPT-2's Conv1D).
    The GEMM reads either in place; `epilogue` goes to jtgpt.kernels.matmul.linear (activation,
    residual, dropout)."""

    def __init__(self, n_in: int, n_out: int, param_dtype, compute: Compute, rngs: nnx.Rngs, *,
                 bias: bool, in_out: bool = False):
        shape = (n_in, n_out) if in_out else (n_out, n_in)
        self.weight = nnx.Param(INIT_STD * jax.random.normal(rngs.params(), shape, param_dtype))
        self.bias = nnx.Param(jnp.zeros((n_out,), param_dtype)) if bias else None
        self.in_out = in_out
        self.compute = compute

    def __call__(self, x, norm: Norm | None = None, **epilogue):
        """The layer on x, or with `norm` (a norm module's `as_prologue()`) on norm(x)."""
        bias = None if self.bias is None else self.compute.cast(self.bias)
        return linear(x, self.compute.cast(self.weight), bias, transpose_w=not self.in_out,
                      precision=self.compute.precision, norm=norm, **epilogue)


def with_k_contiguous_weights(model: nnx.Module) -> nnx.Module:
    """A copy of `model` whose [in, out] Linear weights (GPT-2's Conv1D layout) are transposed
    once into [out, in] and read transposed: the same function, each output column's K values
    contiguous in memory. For decoding, where each GEMM at a few rows streams its weight once:
    the GEMV reads K-contiguous columns as whole rows (on an H200 it moved Llama's [out, in]
    weights at 2-4 TB/s, GPT-2's strided [in, out] columns at 0.5-1.1). Holds a second copy of
    those weights while it lives."""
    model = nnx.clone(model)
    for _, module in nnx.iter_modules(model):
        if isinstance(module, Linear) and module.in_out:
            module.weight = nnx.Param(module.weight[...].T)
            module.in_out = False
    return model


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, param_dtype, compute: Compute):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype))
        self.eps = eps
        self.compute = compute

    def __call__(self, x):
        return layer_norm(x, self.compute.cast(self.weight), self.compute.cast(self.bias),
                          eps=self.eps)

    def as_prologue(self) -> Norm:
        """This norm as the prologue of the linear that reads its output: `linear(x,
        norm=...)` applies it inside its GEMM (jtgpt.kernels.matmul.linear)."""
        return Norm("layer", self.compute.cast(self.weight), self.compute.cast(self.bias), self.eps)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, param_dtype, compute: Compute):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps
        self.compute = compute

    def __call__(self, x):
        return rms_norm(x, self.compute.cast(self.weight), eps=self.eps)

    def as_prologue(self) -> Norm:
        """This norm as the prologue of the linear that reads its output: `linear(x,
        norm=...)` applies it inside its GEMM (jtgpt.kernels.matmul.linear)."""
        return Norm("rms", self.compute.cast(self.weight), None, self.eps)


# ------------------------------------------------------------------------------------- inputs

def _concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_ids_in_range(name: str, ids, size: int) -> None:
    """ValueError if concrete `ids` hold a value outside [0, size). Traced ids (under jax.jit)
    cannot be checked here: the embedding kernel gives such a token a row of NaN instead."""
    if not _concrete(ids):
        return
    ids = np.asarray(ids)
    bad = (ids < 0) | (ids >= size)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{name}{list(where)} = {ids[where]} is outside [0, {size}) "
                         f"({int(bad.sum())} value(s) out of range)")


def model_inputs(input_ids, attention_mask=None, position_ids=None):
    """(ids int32 [B, T], mask int32 [B, T] or None, positions int32 [B, T]) from what a user may
    pass (arrays or nested lists), after checking shapes and dtypes. Positions default to 0..T-1
    in every row, as in Hugging Face (left-padded batches pass cumsum(mask) - 1)."""
    input_ids = jnp.asarray(input_ids)
    if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(f"input_ids must be an integer array [batch, seq], got "
                         f"{input_ids.dtype}{list(input_ids.shape)}")
    B, T = input_ids.shape
    if B == 0 or T == 0:
        raise ValueError(f"input_ids must hold at least one token in each of batch and seq, got "
                         f"shape {(B, T)}")
    if position_ids is None:
        position_ids = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    position_ids = jnp.asarray(position_ids)
    if position_ids.shape != (B, T) or not jnp.issubdtype(position_ids.dtype, jnp.integer):
        raise ValueError(f"position_ids must be an integer array of shape {(B, T)}, got "
                         f"{position_ids.dtype}{list(position_ids.shape)}")
    if attention_mask is not None:
        attention_mask = jnp.asarray(attention_mask)
        if attention_mask.shape != (B, T):
            raise ValueError(f"attention_mask must have shape {(B, T)}, got {attention_mask.shape}")
        if not (jnp.issubdtype(attention_mask.dtype, jnp.integer) or attention_mask.dtype == bool):
            raise ValueError(f"attention_mask must be int or bool (1 = token, 0 = padding), got "
                             f"{attention_mask.dtype}")
        attention_mask = attention_mask.astype(jnp.int32)
    return input_ids.astype(jnp.int32), attention_mask, position_ids.astype(jnp.int32)


# ------------------------------------------------------------------------------------ dropout

def dropout_seeds(dropout_key, sites: int):
    """One int32 seed per dropout site, from a jax.random key; None without a key (eval mode)."""
    if dropout_key is None:
        return None
    return jax.random.randint(dropout_key, (sites,), 0, jnp.iinfo(jnp.int32).max, jnp.int32)


def dropout_args(rate: float, seeds, site: int) -> dict:
    """The dropout keyword arguments of a kernel at `site`: none in eval mode or at rate 0."""
    if seeds is None or rate == 0.0:
        return {}
    return {"dropout_rate": rate, "seed": seeds[site]}


# --------------------------------------------------------------------------------------- loss

def next_token_targets(labels, ignore_index: int = -100):
    """[B, T]: what the logits at each position are scored against, labels[:, t + 1], and
    ignore_index at the last position (it has no next token). Shifting the labels rather than
    the hidden states spares a copy of h[:, :-1]."""
    return jnp.concatenate(
        [labels[:, 1:], jnp.full((labels.shape[0], 1), ignore_index, labels.dtype)], axis=1)


def causal_lm_loss(h, head_weight, input_ids, labels=None, *, ignore_index: int = -100,
                   reduction: str = "mean", precision: str = "ieee"):
    """Next-token cross-entropy as Hugging Face's *ForCausalLM models compute it from `labels`.

    h [B, T, D] the final hidden states, head_weight [V, D] the LM head (tied or not); labels
    [B, T] (default: input_ids) are shifted inside: the logits at position t are scored against
    labels[:, t + 1], and labels equal to ignore_index do not count. The head runs fused with the
    cross-entropy (jtgpt.kernels.cross_entropy): the [B, T, V] logits never exist.
    """
    labels = jnp.asarray(input_ids if labels is None else labels)
    if labels.shape != h.shape[:2] or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be an integer array of input_ids' shape {h.shape[:2]}, "
                         f"got {labels.dtype}{list(labels.shape)}")
    targets = next_token_targets(labels, ignore_index)
    return linear_cross_entropy(h, head_weight, targets.astype(jnp.int32),
                                ignore_index=ignore_index, reduction=reduction, precision=precision)


def lm_logits(h, head_weight, precision: str, norm: Norm | None = None):
    """Logits [B, T, V] = h @ head_weight^T, head_weight [V, D] read in place (of norm(h) with a
    norm: the final norm as the LM head's prologue)."""
    return linear(h, head_weight, transpose_w=True, precision=precision, norm=norm)
