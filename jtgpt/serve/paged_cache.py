"""The paged KV cache on the device: a page pool per layer and one batch's view of it (block
tables, ragged offsets, the tile plan), in the form a model's attention takes a cache.

Layout, per layer: pages [num_pages, page_size, 2 Hkv D] in the compute dtype, slot s of page p
holding one token's [k heads | v heads], the k|v tail of its packed qkv row (as jtgpt.kv_cache's
contiguous cache, so both caches store a token with one copy). Token t of a sequence lives in
page block_table[t // page_size], slot t % page_size; which pages a sequence holds is host
bookkeeping (jtgpt.serve.pages).

A batch is ragged and flat: the model runs on input_ids [1, T], sequence s's new tokens at rows
[cu_q[s], cu_q[s + 1]), its context_lens[s] tokens (the new ones last) in its pages. Each layer's
`attend` runs jtgpt.kernels.attention.paged_attention, which reads the cached keys through the
block table and stores the new tokens' keys and values into their pages in the same launch.
Everything that changes from step to step is data: one compiled program serves every batch of
the same shapes.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jtgpt.kernels.attention.paged import paged_attention
from jtgpt.kv_cache import KVSpec


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedKVCache:
    layers: tuple[jax.Array, ...]  # per layer: pages [num_pages, page_size, 2 Hkv D]
    block_tables: jax.Array        # int32 [num_seqs, max_pages]
    cu_q: jax.Array                # int32 [num_seqs + 1]
    context_lens: jax.Array        # int32 [num_seqs]
    tile_seqs: jax.Array           # int32 [num_tiles]: paged.plan_tiles' work split
    tile_starts: jax.Array         # int32 [num_tiles]
    block_q: int = dataclasses.field(metadata=dict(static=True))  # the plan's tokens a tile

    @staticmethod
    def empty_pages(num_pages: int, page_size: int, spec: KVSpec) -> tuple[jax.Array, ...]:
        """A pool of num_pages blank pages per layer, for a model's KVSpec."""
        return tuple(jnp.zeros((num_pages, page_size, spec.token_width), spec.dtype)
                     for _ in range(spec.num_layers))

    def add_tokens(self, count: int) -> PagedKVCache:
        """The batch's context lengths already count its new tokens: nothing to add."""
        return self

    def attend(self, layer: int, qkv, *, num_heads: int, num_kv_heads: int, precision: str):
        """(attention output [1, T, Hq D], the cache with this layer's new keys and values) for
        qkv [1, T, (Hq + 2 Hkv) D], the batch's new tokens (module docstring)."""
        if qkv.ndim != 3 or qkv.shape[0] != 1:
            raise ValueError(f"a paged cache takes the batch's tokens flat, qkv [1, T, width]; got "
                             f"shape {tuple(qkv.shape)}")
        y, pages = paged_attention(qkv[0], self.layers[layer], self.block_tables, self.cu_q,
                                   self.context_lens, self.tile_seqs, self.tile_starts,
                                   num_heads=num_heads, num_kv_heads=num_kv_heads,
                                   precision=precision, block_q=self.block_q)
        layers = self.layers[:layer] + (pages,) + self.layers[layer + 1:]
        return y[None], dataclasses.replace(self, layers=layers)
