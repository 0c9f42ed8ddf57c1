"""AdamW as an optax transformation whose update is one Triton launch for the whole model.

    matrices = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    tx = jtgpt.optim.adamw(3e-4, weight_decay=0.1, mask=matrices)
    opt_state = tx.init(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)

optax.adamw's semantics and names (bias correction, decoupled weight decay on the leaves `mask`
selects, a float or an optax schedule as the learning rate), plus `clip_norm`: the gradient's
global norm clipped first, as optax.chain(optax.clip_by_global_norm(clip_norm), optax.adamw(...))
does, the scaling done inside the kernel. It composes with optax.chain and nnx.Optimizer.

The state keeps the moments flat: every leaf's m (and v) end to end in one fp32 buffer, in the
order of a FlatLayout (the decayed leaves first), so one launch of jtgpt.kernels.adamw updates
them all, whatever the number of leaves. Moments are fp32 whatever the parameters' dtype. The
learning rate and the bias corrections go to the kernel as runtime values: a schedule never
recompiles the step.

What an optax update costs here on top of the kernel: the gradients and parameters are
concatenated into flat buffers, and the updates split back into leaves, because optax hands over
trees (measured in bench/optim.py: more than the kernel saves). A training loop that keeps its
parameters flat skips those copies: `FlatParams` holds them so, and `apply_flat` updates them
and the moments in place (jtgpt.train does both).
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jtgpt.kernels.adamw import SCALARS, Hyper, adamw_update, sum_of_squares


class FlatLayout(NamedTuple):
    """Where each leaf of a tree lives in one flat buffer, possibly split into `shards` equal
    blocks (one a device, jtgpt.train's ZeRO-2). Each leaf is split into `shards` pieces of
    pieces[j] values (its last piece zero-padded); block d holds piece d of every leaf, leaf
    order[j] at [offsets[j], offsets[j] + pieces[j]) within the block. The decayed leaves come
    first: a block's elements [0, decay_end) get the weight decay. With one shard the buffer is
    the leaves end to end, unpadded."""
    treedef: Any
    shapes: tuple[tuple[int, ...], ...]  # per leaf, in the tree's order
    order: tuple[int, ...]
    pieces: tuple[int, ...]              # per leaf, in `order`
    offsets: tuple[int, ...]             # within a block, in `order`
    decay_end: int                       # within a block
    size: int                            # the tree's values, without padding
    shards: int = 1

    @property
    def shard_size(self) -> int:
        """Values in one block: the buffer holds shards * shard_size."""
        return sum(self.pieces)

    @staticmethod
    def of(tree, decayed, shards: int = 1) -> FlatLayout:
        """The layout of tree's leaves (arrays or shape-dtype structs); decayed: a bool per leaf,
        as a tree of tree's structure or a prefix of it (True: every leaf)."""
        leaves, treedef = jax.tree.flatten(tree)
        flags = jax.tree.leaves(jax.tree.map(lambda d, sub: jax.tree.map(lambda _: bool(d), sub),
                                             decayed, tree))
        if len(flags) != len(leaves):
            raise ValueError(f"mask must give one bool per parameter leaf ({len(leaves)}), got "
                             f"{len(flags)}")
        if shards < 1:
            raise ValueError(f"shards must be >= 1, got {shards}")
        return _layout(treedef, tuple(tuple(leaf.shape) for leaf in leaves), tuple(flags), shards)

    def flatten(self, tree, dtype=None):
        """tree's leaves in the buffer's layout [shards * shard_size] (in dtype, default their
        common dtype)."""
        leaves = self.treedef.flatten_up_to(tree)
        if dtype is None:
            dtype = jnp.result_type(*leaves) if leaves else jnp.float32
        return self.joined_blocks([self.split(leaves[i], j) for j, i in enumerate(self.order)],
                                  dtype)

    def joined_blocks(self, blocks, dtype):
        """blocks (one a leaf, in `order`, each [rows, pieces[j]]) side by side in dtype, flat
        [rows * shard_size]. Written into one buffer leaf by leaf (in place under jit), not by
        one concatenate: XLA splits a concatenate of GPT-2's 148 leaves into two fusions, the
        second copying the first's output again (2 x 0.59 ms in its training step on an H100,
        where these writes take 0.59 ms in all)."""
        rows = blocks[0].shape[0] if blocks else self.shards
        flat = jnp.zeros((rows, self.shard_size), dtype)
        for block, offset in zip(blocks, self.offsets):
            flat = jax.lax.dynamic_update_slice(flat, block.astype(dtype), (0, offset))
        return flat.reshape(-1)

    def unflatten(self, flat, dtypes=None):
        """The tree of flat's pieces (each leaf cast to dtypes[leaf], a list in the tree's leaf
        order, when given)."""
        blocks = flat.reshape(self.shards, self.shard_size)
        leaves = [None] * len(self.order)
        for j, i in enumerate(self.order):
            piece = blocks[:, self.offsets[j]:self.offsets[j] + self.pieces[j]]
            leaves[i] = self.joined(piece.reshape(-1), j)
            if dtypes is not None:
                leaves[i] = leaves[i].astype(dtypes[i])
        return self.treedef.unflatten(leaves)

    def split(self, leaf, j: int):
        """Leaf order[j] as its [shards, pieces[j]] pieces, the last one zero-padded."""
        flat = jnp.ravel(leaf)
        return jnp.pad(flat, (0, self.shards * self.pieces[j] - flat.shape[0])).reshape(
            self.shards, self.pieces[j])

    def joined(self, pieces, j: int):
        """Leaf order[j] from its pieces end to end [shards * pieces[j]] (the padding dropped)."""
        shape = self.shapes[self.order[j]]
        return pieces[:int(np.prod(shape, dtype=np.int64))].reshape(shape)


@jax.tree_util.register_pytree_node_class
class FlatParams:
    """Parameters as one flat buffer (fp32, in their FlatLayout: split into its shards, each
    leaf's last piece zero-padded) and that layout, which jit sees as static."""

    def __init__(self, buffer, layout: FlatLayout):
        self.buffer, self.layout = buffer, layout

    def tree_flatten(self):
        return (self.buffer,), self.layout

    @classmethod
    def tree_unflatten(cls, layout, children):
        return cls(children[0], layout)


class AdamWState(NamedTuple):
    count: jax.Array  # int32: updates applied so far
    mu: jax.Array     # fp32 [n]: first moments, flat (FlatLayout order)
    nu: jax.Array     # fp32 [n]: second moments


class AdamWSettings(NamedTuple):
    learning_rate: Any  # a float or an optax schedule
    hyper: Hyper
    mask: Any           # None, a tree of bools or a function of the parameters
    clip_norm: float | None

    def layout(self, params, shards: int = 1) -> FlatLayout:
        """The flat layout of params (in `shards` blocks), the leaves this mask decays first."""
        mask = self.mask(params) if callable(self.mask) else self.mask
        return FlatLayout.of(params, True if mask is None else mask, shards)


class AdamW(optax.GradientTransformation):
    """What jtgpt.optim.adamw returns: optax's (init, update) pair on trees, and `settings`, with
    which a loop that keeps its parameters flat updates them in place instead (apply_flat)."""
    settings: AdamWSettings  # set by adamw(): a NamedTuple subclass holds no other fields


def apply_flat(settings: AdamWSettings, params, grads, state: AdamWState, *, decay_end,
               norm=None, grad_scale=1.0):
    """(params, state) after one AdamW step on flat buffers: params fp32 [n] and the moments
    updated in place when donated; the gradient is grad_scale * grads (grads [n], any float
    dtype; grad_scale a float or an fp32 scalar array, applied in the kernel). decay_end: the
    elements [0, decay_end) that get the weight decay (an int, or an int32 array); norm: the
    global norm of grad_scale * grads over every shard (needed with clip_norm)."""
    if settings.clip_norm is not None and norm is None:
        raise ValueError("apply_flat: clip_norm is set, so the gradient's global norm is needed")
    b1, b2 = settings.hyper.b1, settings.hyper.b2
    scalars = bias_corrected_scalars(settings.learning_rate, state.count, b1, b2, norm,
                                     settings.clip_norm, grad_scale=grad_scale)
    params, mu, nu = adamw_update(params, grads, state.mu, state.nu, scalars, settings.hyper,
                                  decay_end=decay_end, clip=settings.clip_norm is not None)
    return params, AdamWState(optax.safe_increment(state.count), mu, nu)


def adamw(learning_rate, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          weight_decay: float = 1e-4, mask=None, *, eps_root: float = 0.0,
          clip_norm: float | None = None) -> optax.GradientTransformation:
    """optax.adamw (same arguments and defaults) updated by one Triton launch (module docstring).

    learning_rate: a float or an optax schedule (a function of the update count). mask: a tree
    of bools (of the parameters' structure or a prefix of it) or a function of the parameters
    giving one: the leaves that get the weight decay (None: all). clip_norm: clip the gradient's
    global norm to it first (None: no clipping).
    """
    for name, value in (("b1", b1), ("b2", b2)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    for name, value in (("eps", eps), ("eps_root", eps_root), ("weight_decay", weight_decay)):
        if value < 0.0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if clip_norm is not None and not clip_norm > 0.0:
        raise ValueError(f"clip_norm must be > 0 or None, got {clip_norm}")
    if not callable(learning_rate) and not learning_rate >= 0.0:
        raise ValueError(f"learning_rate must be >= 0 or a schedule, got {learning_rate}")
    settings = AdamWSettings(learning_rate, Hyper(b1, b2, eps, eps_root, weight_decay), mask,
                             clip_norm)

    def init(params):
        layout = settings.layout(params)
        return AdamWState(jnp.zeros([], jnp.int32), jnp.zeros(layout.size, jnp.float32),
                          jnp.zeros(layout.size, jnp.float32))

    def update(grads, state, params=None):
        if params is None:
            raise ValueError("jtgpt.optim.adamw's update needs params (the weight decay and the "
                             "layout read them)")
        layout = settings.layout(params)
        if state.mu.shape != (layout.size,):
            raise ValueError(f"the optimizer state holds {state.mu.shape[0]} values, the "
                             f"parameters {layout.size}: init it from these parameters")
        count = optax.safe_increment(state.count)
        g = layout.flatten(grads)
        norm = jnp.sqrt(sum_of_squares(g)) if clip_norm else None
        scalars = bias_corrected_scalars(learning_rate, state.count, b1, b2, norm, clip_norm)
        p = layout.flatten(params)
        updates, mu, nu = adamw_update(p, g, state.mu, state.nu, scalars, settings.hyper,
                                       decay_end=layout.decay_end, clip=clip_norm is not None,
                                       apply=False)
        dtypes = [leaf.dtype for leaf in jax.tree.leaves(params)]
        return layout.unflatten(updates, dtypes), AdamWState(count, mu, nu)

    tx = AdamW(init, update)
    tx.settings = settings
    return tx


def bias_corrected_scalars(learning_rate, count, b1: float, b2: float, norm=None,
                           clip_norm: float | None = None, *, grad_scale=1.0):
    """The kernel's runtime scalars (jtgpt.kernels.adamw.SCALARS) for the update after `count`
    updates: the learning rate at count (a schedule's value, as optax's scale_by_schedule reads
    it), 1 - b1^t and 1 - b2^t at t = count + 1 (optax's bias correction), the gradient's scale,
    and the norm and clip_norm (zeros without clipping)."""
    lr = learning_rate(count) if callable(learning_rate) else learning_rate
    t = optax.safe_increment(count)
    values = [lr, 1 - b1 ** t, 1 - b2 ** t, grad_scale, 0.0 if norm is None else norm,
              0.0 if clip_norm is None else clip_norm]
    assert len(values) == len(SCALARS)
    return jnp.stack([jnp.asarray(v, jnp.float32) for v in values])


@functools.lru_cache(maxsize=64)
def _layout(treedef, shapes: tuple, flags: tuple, shards: int) -> FlatLayout:
    """FlatLayout.of's result, made once per tree structure, leaf shapes, mask and shard count."""
    order = tuple(sorted(range(len(shapes)), key=lambda i: not flags[i]))  # stable
    sizes = [int(np.prod(shapes[i], dtype=np.int64)) for i in order]
    pieces = tuple(-(-size // shards) for size in sizes)
    offsets = tuple(int(o) for o in np.cumsum([0] + list(pieces))[:-1])
    decay_end = sum(piece for piece, i in zip(pieces, order) if flags[i])
    return FlatLayout(treedef, shapes, order, pieces, offsets, decay_end, sum(sizes), shards)
