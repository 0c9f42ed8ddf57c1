"""Training jtgpt models (GPT, Llama): AdamW with gradient clipping, one jitted step with gradient
accumulation.

    optimizer = jtgpt.train.adamw(3e-4)
    state, step = jtgpt.train.init(model, optimizer, accum_steps=4)
    for batch in batches:                       # {"input_ids": [B, T], optional "labels",
        state, metrics = step(state, batch, key)   #  "attention_mask"}, B divisible by accum_steps
    model = jtgpt.train.model_of(model, state)  # the trained module, for eval or save_pretrained

A step splits the batch into `accum_steps` micro-batches and scans over them, summing each one's
token-summed loss and gradient (so only one micro-batch's activations are alive at a time), then
divides by the number of labelled tokens of the whole batch: the same update as one big batch, to
rounding. Then the optimizer: the global norm of the gradient is clipped to `clip_norm`, and AdamW
decays the matrices only (not the biases and norm weights, as in GPT-2 and Llama practice).
Dropout is on in the step (a fresh key per micro-batch); evaluate with `model.loss(ids)`, which
has no key and so no dropout.

16-bit parameters train through fp32 copies of them (master weights): the state's parameters and
the optimizer's moments are fp32, and the model computes in its own dtype from them. In fp16,
AdamW's eps (1e-8) and the squared gradients underflow, so fp16 moments would turn the first
update into inf or NaN; in bf16 most updates would round away. `model_of` casts back.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jtgpt.layers import next_token_targets


class TrainState(NamedTuple):
    params: nnx.State      # the model's nnx.Param leaves, fp32 (master copies of 16-bit ones)
    opt_state: Any
    step: jax.Array        # int32: updates applied so far


def adamw(learning_rate, *, weight_decay: float = 0.1, b1: float = 0.9, b2: float = 0.95,
          eps: float = 1e-8, clip_norm: float | None = 1.0) -> optax.GradientTransformation:
    """optax AdamW after clipping the gradient's global norm to `clip_norm` (None: no clipping).

    learning_rate: a float or an optax schedule. Weight decay applies to parameters with two or
    more axes (the GEMM weights and the embeddings), not to biases or LayerNorm scales.
    """
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    adam = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                       mask=decay_mask)
    return adam if clip_norm is None else optax.chain(optax.clip_by_global_norm(clip_norm), adam)


def init(model: nnx.Module, optimizer: optax.GradientTransformation, *, accum_steps: int = 1,
         ignore_index: int = -100) -> tuple[TrainState, Callable]:
    """(the initial TrainState, a jitted step(state, batch, key) -> (state, metrics)).

    metrics: "loss" (mean over the batch's labelled tokens, before the update), "grad_norm"
    (global norm before clipping) and "tokens" (labelled tokens in the batch). The step donates
    the state's buffers: do not reuse a state after passing it in. `model` itself is not changed.
    """
    if accum_steps < 1:
        raise ValueError(f"accum_steps must be >= 1, got {accum_steps}")
    graphdef, params = nnx.split(model, nnx.Param)

    def loss_sum(params, micro, key):
        """(summed loss, labelled tokens) of one micro-batch."""
        model = nnx.merge(graphdef, params)
        total = model.loss(micro["input_ids"], micro.get("labels"), micro.get("attention_mask"),
                           dropout_key=key, ignore_index=ignore_index, reduction="sum")
        return total, _labelled_tokens(micro, ignore_index)

    def step(state: TrainState, batch: dict, key: jax.Array):
        micro_batches = {name: _split(name, value, accum_steps) for name, value in batch.items()}
        grad_fn = jax.value_and_grad(loss_sum, has_aux=True)

        def accumulate(carry, xs):
            loss, tokens, grads = carry
            micro, i = xs
            (micro_loss, micro_tokens), micro_grads = grad_fn(state.params, micro,
                                                              jax.random.fold_in(key, i))
            grads = jax.tree.map(lambda g, m: g + m.astype(jnp.float32), grads, micro_grads)
            return (loss + micro_loss.astype(jnp.float32), tokens + micro_tokens, grads), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        init_carry = (jnp.float32(0), jnp.int32(0), zeros)
        (loss, tokens, grads), _ = jax.lax.scan(
            accumulate, init_carry, (micro_batches, jnp.arange(accum_steps)))
        scale = 1.0 / jnp.maximum(tokens, 1).astype(jnp.float32)
        grads = jax.tree.map(lambda g, p: (g * scale).astype(p.dtype), grads, state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss * scale, "grad_norm": global_norm(grads), "tokens": tokens}
        return TrainState(params, opt_state, state.step + 1), metrics

    # A copy (the step donates the state's buffers, and the caller's model must stay usable), in
    # fp32: master weights for 16-bit parameters (module docstring).
    params = jax.tree.map(lambda p: jnp.array(p, jnp.promote_types(p.dtype, jnp.float32)), params)
    state = TrainState(params, optimizer.init(params), jnp.int32(0))
    return state, jax.jit(step, donate_argnums=0)


def model_of(model: nnx.Module, state: TrainState) -> nnx.Module:
    """A module like `model` holding the state's parameters, in the model's parameter dtypes."""
    graphdef, params = nnx.split(model, nnx.Param)
    return nnx.merge(graphdef, jax.tree.map(lambda s, p: s.astype(p.dtype), state.params, params))


def global_norm(tree) -> jax.Array:
    """sqrt of the sum of squares of every leaf, in fp32 (what clip_by_global_norm clips)."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def _labelled_tokens(micro: dict, ignore_index: int) -> jax.Array:
    """Tokens that count in model.loss: its targets that are not ignore_index."""
    targets = next_token_targets(jnp.asarray(micro.get("labels", micro["input_ids"])), ignore_index)
    return jnp.sum(targets != ignore_index, dtype=jnp.int32)


def _split(name: str, value, accum_steps: int):
    """[B, ...] -> [accum_steps, B / accum_steps, ...]."""
    value = jnp.asarray(value)
    if value.ndim < 1 or value.shape[0] % accum_steps:
        raise ValueError(f"batch[{name!r}] has shape {value.shape}: its batch axis must be "
                         f"divisible by accum_steps={accum_steps}")
    return value.reshape(accum_steps, value.shape[0] // accum_steps, *value.shape[1:])
