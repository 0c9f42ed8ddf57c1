"""The KV cache of generation: every key and value a layer has computed so far, so that each new
token attends to them without recomputing the prompt.

Layout, per layer: kv [B, S, 2 Hkv D] in the compute dtype, row s of batch row b holding slot s's
[k heads | v heads] (each head D contiguous values). That is the k|v tail of the packed qkv row
the QKV GEMM writes ([q heads | k heads | v heads]), so storing a token's keys and values is one
copy of a contiguous slice of its qkv row, and the decode kernel reads a slot's k and v heads from
one row. S, the capacity, is static (prompt + new tokens); what changes every step is data:

    lengths  [B] int32   slots written in each row; the next token goes to slot lengths[b]
    key_mask [B, S] int32  1 where a slot holds a token to attend to: 0 at the prompt's padding
                           (left-padded batches), 1 at every generated token; None when the
                           prompt has no padding (the kernels then read no mask at all)

so one compiled decode step serves every position. A model's attention calls `attend` with its
layer's qkv: a prompt (T > 1 tokens, into an empty cache) runs flash attention over the prompt
and stores its keys and values; one token (T = 1) runs the decode kernel
(jtgpt.kernels.attention.decode_attention) over the row's slots, which also stores the token's.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jtgpt.kernels.attention import decode_attention, flash_attention


@dataclasses.dataclass(frozen=True)
class KVSpec:
    """What a model's KV cache holds: per layer, each token's keys and values of num_kv_heads
    heads of head_dim in dtype (num_heads query heads read them)."""
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: Any

    @property
    def token_width(self) -> int:
        """Values a token takes in one layer: its k and v heads."""
        return 2 * self.num_kv_heads * self.head_dim


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    layers: tuple[jax.Array, ...]  # per layer: kv [B, S, 2 Hkv D]
    key_mask: jax.Array | None     # [B, S] int32, or None: no padding
    lengths: jax.Array             # [B] int32

    @classmethod
    def empty(cls, batch: int, capacity: int, spec: KVSpec) -> KVCache:
        """A cache of `capacity` slots per row, none written yet."""
        kv = jnp.zeros((batch, capacity, spec.token_width), spec.dtype)
        return cls(layers=(kv,) * spec.num_layers, key_mask=None,
                   lengths=jnp.zeros((batch,), jnp.int32))

    @property
    def capacity(self) -> int:
        return self.layers[0].shape[1]

    def add_prompt(self, attention_mask=None) -> KVCache:
        """The empty cache made ready for a prompt whose padding attention_mask [B, T] marks (None:
        no padding), before the prompt's forward pass: every slot after the prompt will hold a
        generated token."""
        if attention_mask is None:
            return self
        B, T = attention_mask.shape
        key_mask = jnp.ones((B, self.capacity), jnp.int32).at[:, :T].set(attention_mask)
        return dataclasses.replace(self, key_mask=key_mask)

    def add_tokens(self, count: int) -> KVCache:
        """The cache with `count` more slots per row, to be written by this forward pass's layers
        (called before they run)."""
        return dataclasses.replace(self, lengths=self.lengths + count)

    def attend(self, layer: int, qkv, *, num_heads: int, num_kv_heads: int, precision: str):
        """(attention output [B, T, Hq D], the cache with this layer's new keys and values) for
        qkv [B, T, (Hq + 2 Hkv) D] of the tokens `add_tokens` made room for: a prompt of T > 1
        tokens starting at slot 0 (causal flash attention over it), or T = 1 new token per row at
        slot lengths - 1 (the decode kernel over slots [0, lengths))."""
        T = qkv.shape[1]
        heads = dict(num_heads=num_heads, num_kv_heads=num_kv_heads, precision=precision)
        if T == 1:  # the kernel stores the token's keys and values too
            y, kv = decode_attention(qkv, self.layers[layer], self.lengths,
                                     key_mask=self.key_mask, **heads)
        else:
            new_kv = qkv[..., qkv.shape[-1] - self.layers[layer].shape[-1]:]
            kv = jax.lax.dynamic_update_slice(self.layers[layer], new_kv, (0, 0, 0))
            mask = None if self.key_mask is None else self.key_mask[:, :T]
            y = flash_attention(qkv, attention_mask=mask, causal=True, **heads)
        layers = self.layers[:layer] + (kv,) + self.layers[layer + 1:]
        return y, dataclasses.replace(self, layers=layers)
