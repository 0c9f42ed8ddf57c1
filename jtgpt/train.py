"""Training jtgpt models (GPT, Llama): AdamW with gradient clipping, one jitted step with gradient
accumulation, on one device or data-parallel over several with ZeRO-2.

    optimizer = jtgpt.train.adamw(3e-4)
    state, step = jtgpt.train.init(model, optimizer, accum_steps=4)   # mesh=...: several devices
    for batch in batches:                       # {"input_ids": [B, T], optional "labels",
        state, metrics = step(state, batch, key)   #  "attention_mask"}, B divisible by accum_steps
    model = jtgpt.train.model_of(model, state)  # the trained module, for eval or save_pretrained
    jtgpt.train.save("run/ckpt", state); state = jtgpt.train.restore("run/ckpt", state)  # resume

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

With jtgpt's AdamW (`adamw` here, jtgpt.optim.adamw) the state keeps the parameters flat
(jtgpt.optim.FlatParams: every leaf end to end in one fp32 buffer) and one Triton launch updates
them and the moments in place; the clipping's scale is applied inside it. Any other optax
transformation gets the parameter tree.

ZeRO-2 (`mesh`, a jax.sharding.Mesh with a "data" axis of N devices; jtgpt's AdamW only). Every
leaf is split into N pieces, and the flat parameters and both moments into N equal shards, one a
device, shard d holding piece d of every leaf (optim.FlatLayout with N shards); the batch is
split too. A step runs on each device (shard_map, so every Triton kernel runs on its device's
shard): all-gather the parameters, forward and backward on the device's part of the batch,
reduce-scatter the gradient (each device gets the sum of its shard), update the shard. The
collectives go leaf by leaf, so that XLA can overlap them with the layers' compute: a layer's
gather with the layers before it, a leaf's reduce-scatter with the rest of the backward. The
update equals the one-device step's to rounding; each device holds 1/N of the parameters and
optimizer state between steps (ZeRO-3's storage; the gathered parameters live through the step,
as in ZeRO-2). A jtgpt model with a 16-bit compute dtype has its parameters gathered in it: half
the bytes, and the same forward (it reads each parameter rounded to that dtype anyway). The
collectives are JAX's (all_gather, psum_scatter), so the same step runs across hosts under
jax.distributed.
"""
from __future__ import annotations

import os
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jtgpt import optim
from jtgpt.kernels.adamw import sum_of_squares
from jtgpt.layers import Compute, next_token_targets

DATA = "data"  # the mesh axis a batch and the ZeRO shards are split over


class TrainState(NamedTuple):
    params: Any            # fp32 parameters (master copies of 16-bit ones): the nnx.Param tree,
    #                        or with jtgpt's AdamW an optim.FlatParams (sharded over a mesh)
    opt_state: Any
    step: jax.Array        # int32: updates applied so far


def adamw(learning_rate, *, weight_decay: float = 0.1, b1: float = 0.9, b2: float = 0.95,
          eps: float = 1e-8, clip_norm: float | None = 1.0) -> optim.AdamW:
    """jtgpt's AdamW (jtgpt.optim.adamw) after clipping the gradient's global norm to
    `clip_norm` (None: no clipping).

    learning_rate: a float or an optax schedule. Weight decay applies to parameters with two or
    more axes (the GEMM weights and the embeddings), not to biases or LayerNorm scales.
    """
    return optim.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                       mask=_decayed, clip_norm=clip_norm)


def optax_adamw(learning_rate, *, weight_decay: float = 0.1, b1: float = 0.9, b2: float = 0.95,
                eps: float = 1e-8, clip_norm: float | None = 1.0) -> optax.GradientTransformation:
    """adamw's settings in optax's own transformations (clip_by_global_norm, adamw): the same
    updates to rounding, on the parameter tree, one XLA kernel or more a leaf."""
    adam = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                       mask=_decayed)
    return adam if clip_norm is None else optax.chain(optax.clip_by_global_norm(clip_norm), adam)


def _decayed(params):
    """The weight-decay mask of adamw and optax_adamw: the leaves with two or more axes."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def init(model: nnx.Module, optimizer: optax.GradientTransformation, *, accum_steps: int = 1,
         ignore_index: int = -100, mesh: jax.sharding.Mesh | None = None
         ) -> tuple[TrainState, Callable]:
    """(the initial TrainState, a jitted step(state, batch, key) -> (state, metrics)).

    metrics: "loss" (mean over the batch's labelled tokens, before the update), "grad_norm"
    (global norm before clipping) and "tokens" (labelled tokens in the batch). The step donates
    the state's buffers: do not reuse a state after passing it in. `model` itself is not changed.
    mesh: train data-parallel with ZeRO-2 over its "data" axis (module docstring); the batch
    must then divide into accum_steps micro-batches on each device.
    """
    if accum_steps < 1:
        raise ValueError(f"accum_steps must be >= 1, got {accum_steps}")
    fused = isinstance(optimizer, optim.AdamW)
    if mesh is not None:
        if DATA not in mesh.axis_names:
            raise ValueError(f"mesh must have a {DATA!r} axis, got axes {mesh.axis_names}")
        if not fused:
            raise ValueError("mesh (ZeRO-2) needs jtgpt's AdamW (jtgpt.train.adamw or "
                             "jtgpt.optim.adamw) as the optimizer")
    graphdef, params = nnx.split(model, nnx.Param)
    # A copy (the step donates the state's buffers, and the caller's model must stay usable), in
    # fp32: master weights for 16-bit parameters (module docstring).
    params = jax.tree.map(lambda p: jnp.array(p, jnp.promote_types(p.dtype, jnp.float32)), params)

    def loss_sum(params, micro, key):
        """(summed loss, labelled tokens) of one micro-batch."""
        model = nnx.merge(graphdef, params)
        total = model.loss(micro["input_ids"], micro.get("labels"), micro.get("attention_mask"),
                           dropout_key=key, ignore_index=ignore_index, reduction="sum")
        return total, _labelled_tokens(micro, ignore_index)

    def summed_grads(params, batch: dict, key: jax.Array):
        """(summed loss, labelled tokens, summed fp32 gradient) of a batch, micro-batch by
        micro-batch."""
        micro_batches = {name: _split(name, value, accum_steps) for name, value in batch.items()}
        grad_fn = jax.value_and_grad(loss_sum, has_aux=True)

        def accumulate(carry, xs):
            loss, tokens, grads = carry
            micro, i = xs
            (micro_loss, micro_tokens), micro_grads = grad_fn(params, micro,
                                                              jax.random.fold_in(key, i))
            grads = jax.tree.map(lambda g, m: g + m.astype(jnp.float32), grads, micro_grads)
            return (loss + micro_loss.astype(jnp.float32), tokens + micro_tokens, grads), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        init_carry = (jnp.float32(0), jnp.int32(0), zeros)
        (loss, tokens, grads), _ = jax.lax.scan(
            accumulate, init_carry, (micro_batches, jnp.arange(accum_steps)))
        return loss, tokens, grads

    if not fused:
        def step(state: TrainState, batch: dict, key: jax.Array):
            loss, tokens, grads = summed_grads(state.params, batch, key)
            scale = 1.0 / jnp.maximum(tokens, 1).astype(jnp.float32)
            grads = jax.tree.map(lambda g, p: (g * scale).astype(p.dtype), grads, state.params)
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            metrics = {"loss": loss * scale, "grad_norm": global_norm(grads), "tokens": tokens}
            return TrainState(params, opt_state, state.step + 1), metrics

        state = TrainState(params, optimizer.init(params), jnp.int32(0))
        return state, jax.jit(step, donate_argnums=0)
    return _init_flat(params, optimizer.settings, summed_grads, mesh, _gather_dtype(model))


def _gather_dtype(model: nnx.Module):
    """The dtype ZeRO-2 all-gathers parameters in: a jtgpt model's 16-bit compute dtype (it reads
    every parameter through Compute.cast, so it sees only the rounded values: gathering them
    rounded gives the same forward for half the bytes), fp32 otherwise."""
    compute = getattr(model, "compute", None)
    if isinstance(compute, Compute) and compute.dtype.itemsize == 2:
        return compute.dtype
    return jnp.dtype(jnp.float32)


def _init_flat(params, settings: optim.AdamWSettings, summed_grads, mesh, gather_dtype):
    """init's state and step for jtgpt's AdamW: flat parameters and moments, updated by one
    kernel, over mesh's "data" axis when given (ZeRO-2, module docstring)."""
    shards = 1 if mesh is None else mesh.shape[DATA]
    layout = settings.layout(params, shards)
    if layout.shard_size >= 2**31:
        raise ValueError(f"{layout.size} parameters over {shards} devices: a shard of "
                         f"{layout.shard_size} values passes the kernel's int32 element index")

    def local_step(buffer, opt_state, batch, key):
        """One device's step: buffer, the moments and the gradient are its shard."""
        if mesh is None:
            params = layout.unflatten(buffer)
        else:
            key = jax.random.fold_in(key, jax.lax.axis_index(DATA))  # each device's own dropout
            params = _gathered(layout, buffer, gather_dtype)
        loss, tokens, grads = summed_grads(params, batch, key)
        if mesh is None:
            grads = layout.flatten(grads, jnp.float32)
        else:
            grads = _reduce_scattered(layout, grads)
            loss, tokens = jax.lax.psum((loss, tokens), DATA)
        scale = 1.0 / jnp.maximum(tokens, 1).astype(jnp.float32)
        # The kernel scales the summed gradient itself: scaling here would write a copy of it.
        squares = sum_of_squares(grads)
        norm = jnp.sqrt(squares if mesh is None else jax.lax.psum(squares, DATA)) * scale
        buffer, opt_state = optim.apply_flat(settings, buffer, grads, opt_state,
                                             decay_end=layout.decay_end, norm=norm,
                                             grad_scale=scale)
        return buffer, opt_state, {"loss": loss * scale, "grad_norm": norm, "tokens": tokens}

    if mesh is None:
        run = local_step
    else:
        state_specs = (P(DATA), optim.AdamWState(P(), P(DATA), P(DATA)))
        # check_vma off: the kernels' custom_vjp rules give cotangents without shard_map's
        # varying-axis annotations, which its type check would refuse.
        run = jax.shard_map(local_step, mesh=mesh, in_specs=(*state_specs, P(DATA), P()),
                            out_specs=(*state_specs, P()), check_vma=False)

    def step(state: TrainState, batch: dict, key: jax.Array):
        if mesh is not None:
            for name, value in batch.items():
                _check_divisible(name, value, shards)
        buffer, opt_state, metrics = run(state.params.buffer, state.opt_state, batch, key)
        return TrainState(optim.FlatParams(buffer, layout), opt_state, state.step + 1), metrics

    buffer = layout.flatten(params, jnp.float32)
    state = TrainState(optim.FlatParams(buffer, layout),
                       optim.AdamWState(jnp.zeros([], jnp.int32), jnp.zeros_like(buffer),
                                        jnp.zeros_like(buffer)),
                       jnp.int32(0))
    if mesh is not None:
        state = jax.device_put(state, state_shardings(state, mesh))
    return state, jax.jit(step, donate_argnums=0)


def _gathered(layout: optim.FlatLayout, shard, dtype):
    """The fp32 parameter tree from this device's shard: each leaf all-gathered from its pieces
    on its own, so that XLA can run a leaf's collective while earlier layers compute, in dtype
    (see _gather_dtype). Back in fp32 the leaves get fp32 gradients, so that a leaf read twice
    (GPT-2's tied wte) sums its two in fp32, as on one device."""
    leaves = [None] * len(layout.order)
    for j, i in enumerate(layout.order):
        piece = shard[layout.offsets[j]:layout.offsets[j] + layout.pieces[j]].astype(dtype)
        gathered = jax.lax.all_gather(piece, DATA, tiled=True)
        leaves[i] = layout.joined(gathered, j).astype(jnp.float32)
    return layout.treedef.unflatten(leaves)


def _reduce_scattered(layout: optim.FlatLayout, grads):
    """This device's shard of the gradient summed over the devices: each leaf reduce-scattered
    on its own (so XLA can start it as soon as the backward has made it), fp32."""
    leaves = layout.treedef.flatten_up_to(grads)
    pieces = [jax.lax.psum_scatter(layout.split(leaves[i].astype(jnp.float32), j), DATA,
                                   scatter_dimension=0, tiled=True)
              for j, i in enumerate(layout.order)]
    return layout.joined_blocks(pieces, jnp.float32)


def state_shardings(state: TrainState, mesh: jax.sharding.Mesh):
    """The NamedShardings of a flat TrainState over mesh: the parameters and moments split over
    its "data" axis, the counters replicated."""
    split, whole = NamedSharding(mesh, P(DATA)), NamedSharding(mesh, P())
    return TrainState(optim.FlatParams(split, state.params.layout),
                      optim.AdamWState(whole, split, split), whole)


def save(directory, state: TrainState) -> None:
    """Write the whole train state (parameters, optimizer state, step) to `directory` (a new
    directory, or one to overwrite) with orbax-checkpoint. Flat parameters and moments are written
    as trees of the model's leaves (without the shards' padding), so that `restore` can place
    them on any number of devices."""
    import orbax.checkpoint as ocp
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.abspath(directory), _portable(state), force=True)
        checkpointer.wait_until_finished()


def restore(directory, state: TrainState) -> TrainState:
    """The train state saved in `directory`, placed as `state` is: a state from `init` for the
    same model and optimizer, on the same or another mesh (or none). ValueError when the saved
    state does not fit it (another model or optimizer)."""
    import orbax.checkpoint as ocp
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          _portable(state))
    path = os.path.abspath(directory)
    with ocp.StandardCheckpointer() as checkpointer:
        if not os.path.isdir(path):
            raise ValueError(f"no train state in {directory}: not a directory")
        metadata = checkpointer.metadata(path).item_metadata.tree
        shapes = lambda tree: sorted(  # noqa: E731
            (tuple(x.shape), jnp.dtype(x.dtype).name) for x in jax.tree.leaves(tree))
        if shapes(metadata) != shapes(target):
            raise ValueError(f"the train state in {directory} does not fit this model and "
                             f"optimizer: it holds {len(jax.tree.leaves(metadata))} arrays of "
                             f"other shapes than this state's {len(jax.tree.leaves(target))}")
        saved = checkpointer.restore(path, target)
    if not isinstance(state.params, optim.FlatParams):
        return TrainState(saved["params"], saved["opt_state"], saved["step"])
    layout = state.params.layout
    flat = lambda tree: layout.flatten(tree, jnp.float32)  # noqa: E731
    restored = TrainState(optim.FlatParams(flat(saved["params"]), layout),
                          optim.AdamWState(saved["count"], flat(saved["mu"]), flat(saved["nu"])),
                          saved["step"])
    return jax.device_put(restored, jax.tree.map(lambda x: x.sharding, state))


def _portable(state: TrainState) -> dict:
    """The state as orbax writes it: trees of the model's leaves, whatever the device count."""
    if not isinstance(state.params, optim.FlatParams):
        return {"params": state.params, "opt_state": state.opt_state, "step": state.step}
    layout = state.params.layout
    return {"params": layout.unflatten(state.params.buffer),
            "count": state.opt_state.count, "mu": layout.unflatten(state.opt_state.mu),
            "nu": layout.unflatten(state.opt_state.nu), "step": state.step}


def model_of(model: nnx.Module, state: TrainState) -> nnx.Module:
    """A module like `model` holding the state's parameters, in the model's parameter dtypes."""
    graphdef, params = nnx.split(model, nnx.Param)
    trained = state.params
    if isinstance(trained, optim.FlatParams):
        trained = trained.layout.unflatten(jax.device_put(trained.buffer, jax.devices()[0]))
    return nnx.merge(graphdef, jax.tree.map(lambda s, p: s.astype(p.dtype), trained, params))


def global_norm(tree) -> jax.Array:
    """sqrt of the sum of squares of every leaf, in fp32 (what clip_by_global_norm clips)."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def _labelled_tokens(micro: dict, ignore_index: int) -> jax.Array:
    """Tokens that count in model.loss: its targets that are not ignore_index."""
    targets = next_token_targets(jnp.asarray(micro.get("labels", micro["input_ids"])), ignore_index)
    return jnp.sum(targets != ignore_index, dtype=jnp.int32)


def _check_divisible(name: str, value, shards: int) -> None:
    if jnp.ndim(value) < 1 or jnp.shape(value)[0] % shards:
        raise ValueError(f"batch[{name!r}] has shape {jnp.shape(value)}: its batch axis must be "
                         f"divisible by the mesh's {shards} {DATA!r} devices")


def _split(name: str, value, accum_steps: int):
    """[B, ...] -> [accum_steps, B / accum_steps, ...]."""
    value = jnp.asarray(value)
    if value.ndim < 1 or value.shape[0] % accum_steps:
        raise ValueError(f"batch[{name!r}] has shape {value.shape}: its batch axis must be "
                         f"divisible by accum_steps={accum_steps}")
    return value.reshape(accum_steps, value.shape[0] // accum_steps, *value.shape[1:])
