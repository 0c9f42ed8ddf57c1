"""The serving engine: continuous batching over a paged KV cache, one compiled step per batch.

Three rooms, each readable alone: the scheduler (jtgpt.serve.scheduler) decides which requests
run in a step and with which tokens; the page allocator (jtgpt.serve.pages) says which pages hold
them and shares prompt prefixes; this module packs the scheduler's batch into fixed-shape arrays
and runs the model on them, then hands the sampled tokens back.

    engine = Engine(model, page_size=16, max_seqs=64, max_batch_tokens=2048)
    rid = engine.add_request(prompt_ids, max_new_tokens=64, temperature=0.8, do_sample=True)
    while engine.has_unfinished:
        for rid, tokens in engine.step().items(): ...
    engine.pop_finished()   # {request id: "stop" | "length" | "abort"}

A step: schedule() gives entries (a sequence, the positions [start, start + count) it computes
now); their tokens go flat into input_ids [1, T], each sequence's block table into a row of
block_tables, and the model (PretrainedModel.next_token_logits on a PagedKVCache) computes every
entry's tokens in one pass, prefill chunks and decode tokens alike, storing their keys and values
into their pages. Each entry that reached the end of its known tokens gets a new token, chosen
with its own request's sampling settings (jtgpt.sampling's per-row path) and key:
fold_in(key(seed), number of tokens generated before), so a request's tokens do not depend on what
it was batched with, nor on a preemption that recomputed it.

A batch of decoding sequences alone runs up to `decode_steps` steps in one call (the scheduler's
multi-step decode): a device loop feeds each step's tokens to the next, so the host's schedule,
pack, dispatch and update (about 2 ms a call for 64 GPT-2 sequences on an H100, 1.4 of them the
dispatch, against 0.75 ms of device time a step) are paid once for all of them. The tokens are the same as one step a call
gives. The loop's trip count is static (a power of two, part of the program's shape): XLA runs a
loop of data-dependent length by reading its condition back to the host every iteration, which
would make the dispatch wait for the device. A sequence with fewer steps to go than the run repeats
its last step (its position, context and input stay; it writes the same keys and values again).

Overlap. When every sequence of a call samples, step() dispatches the next call (the
scheduler's schedule_ahead: the sequences decoding on, and waiting requests admitted into the
places of those that finish by length) before it waits for the current call's tokens, the
decoding sequences' input ids taken on the device from the current call's last tokens. The device
then runs one call after the other while the host reads tokens, updates the scheduler and packs;
what a sequence computes past an eos in the queued call is dropped.

Shapes. T is rounded up to a power of two (at most max_batch_tokens), the sequences to min(T,
max_seqs), the block-table width to a power of two of pages, a decode run's steps to a power of
two (at most decode_steps): a long run compiles a bounded number of programs (about
log2(max_batch_tokens) x log2(max_len / page_size), plus the decode runs' step counts, times the
sampling processors in use; `num_compiled`). A decode step of up to 4 sequences stays at 1-4
rows, so its GEMMs take the GEMV path as in generate. A step's input ids, its other integer
arrays and its sampling settings travel in one int32 buffer: one host-to-device copy a call (each
copy and each extra dispatch is host time, which the device waits for between short calls).

The engine snapshots the model's parameters when it is made, and is not thread-safe: one thread
drives it (jtgpt.serve.server runs it in its own thread).
"""
from __future__ import annotations

import functools
import itertools
import math
import os
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jtgpt.generate import eos_token_ids
from jtgpt.kernels.attention import paged
from jtgpt.layers import check_ids_in_range
from jtgpt.sampling import (RowFilters, RowSampling, Sampling, mark_seen, process_logits_rows,
                            seen_tokens, select_tokens_rows)
from jtgpt.serve.paged_cache import PagedKVCache
from jtgpt.serve.pages import PageAllocator
from jtgpt.serve.scheduler import Entry, Request, Scheduler

MEMORY_FRACTION = 0.8  # of the free device memory the pool takes (num_pages=None): the rest is
#                        the step's activations and logits
FINISH_REASONS = ("stop", "length", "abort")


class _Shapes(NamedTuple):
    """A step's static shapes: one compiled program per distinct value (and RowFilters)."""
    tokens: int  # T: rows of input_ids
    seqs: int    # S: sequences (block-table rows)
    table: int   # pages a block-table row holds
    tiles: int   # the attention kernel's tiles
    block_q: int  # tokens a tile holds (fewer for a batch that only decodes)
    seen: int    # token ids per row for the repetition penalty (0: no row uses it)
    steps: int   # steps the call runs (> 1 only for a batch that only decodes)
    feed: int    # F: the engine's max_seqs, the width of every call's last tokens (_run_batch)

    def fields(self) -> list[tuple[str, int, int]]:
        """The fields of the step's int32 buffer, its one host-to-device copy, in order: (name,
        offset, size). The sampling settings' floats travel in it bit for bit. Each field starts
        16-byte aligned: XLA may hand a field to a Triton kernel as a slice of the buffer, without
        a copy, and the kernels are compiled for 16-byte aligned pointers."""
        T, S = self.tokens, self.seqs
        sizes = [("input_ids", T), ("positions", T), ("block_tables", S * self.table),
                 ("cu_q", S + 1), ("context_lens", S), ("tile_seqs", self.tiles),
                 ("tile_starts", self.tiles), ("sample_rows", S), ("seeds", S), ("generated", S),
                 ("top_k", S), ("do_sample", S), ("seen_ids", S * self.seen), ("row_steps", S),
                 ("fed_from", S), ("floats", len(FLOAT_FIELDS) * S)]
        fields, offset = [], 0
        for name, size in sizes:
            fields.append((name, offset, size))
            offset += -(-size // 4) * 4
        return fields


FLOAT_FIELDS = ("temperature", "top_p_threshold", "log_min_p", "repetition_penalty")


def _power_of_two(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def _unpack(buffer, shapes: _Shapes) -> dict:
    """The int32 buffer's fields (views of buffer: a numpy one's, or slices of a traced one)."""
    fields = {name: buffer[offset:offset + size] for name, offset, size in shapes.fields()}
    fields["block_tables"] = fields["block_tables"].reshape(shapes.seqs, shapes.table)
    fields["seen_ids"] = fields["seen_ids"].reshape(shapes.seqs, shapes.seen)
    fields["floats"] = fields["floats"].reshape(len(FLOAT_FIELDS), shapes.seqs)
    return fields


def _run_batch(graphdef, treedef, params, pages, buffer, fed, *, shapes: _Shapes,
               filters: RowFilters):
    """(the tokens of each block-table row, int32 [steps, S], row j those of step j; the last
    step's tokens, int32 [F], zero past S; the pages with the batch's keys and values): the model
    over one packed batch (its input ids and every other integer array in buffer), then each
    row's sampling, shapes.steps times (> 1 only for a decode batch, whose tokens are fed back as
    the next step's: one token a sequence, at rows cu_q[s] = sample_rows[s]; row s advances
    row_steps[s] - 1 times, then repeats its last step). A row s with fed_from[s] >= 0 decodes
    the token fed[fed_from[s]], the last tokens of the call queued ahead of this one."""
    model = nnx.merge(graphdef, jax.tree.unflatten(treedef, params))
    b = _unpack(buffer, shapes)
    floats = jax.lax.bitcast_convert_type(b["floats"], jnp.float32)
    rows = RowSampling(b["do_sample"] != 0, floats[0], b["top_k"], *floats[1:])
    S, T, V = shapes.seqs, shapes.tokens, model.config.vocab_size
    live = b["context_lens"] > 0  # block-table rows that hold a sequence
    seen = seen_tokens(b["seen_ids"], V) if shapes.seen else None
    fed_at = jnp.where(b["fed_from"] >= 0, b["sample_rows"], T)  # T: nowhere
    ids = b["input_ids"].at[fed_at].set(fed[jnp.maximum(b["fed_from"], 0)], mode="drop")

    def step(j, state):
        pages, ids, positions, context_lens, seen, out = state
        cache = PagedKVCache(pages, b["block_tables"], b["cu_q"], context_lens, b["tile_seqs"],
                             b["tile_starts"], shapes.block_q)
        logits, cache = model.next_token_logits(ids[None], positions[None], cache,
                                                rows=b["sample_rows"])
        keys = jax.vmap(lambda seed, n: jax.random.fold_in(jax.random.key(seed), n))(
            b["seeds"], b["generated"] + j)
        tokens = select_tokens_rows(process_logits_rows(logits, rows, filters, seen), rows,
                                    filters, keys)
        if seen is not None:
            seen = mark_seen(seen, tokens)
        advance = live & (j + 1 < b["row_steps"])  # the row computes its next position
        fed = jnp.where(advance, b["sample_rows"], T)  # where its token goes (T: nowhere)
        return (cache.layers, ids.at[fed].set(tokens, mode="drop"),
                positions.at[fed].add(1, mode="drop"), context_lens + advance, seen,
                out.at[j].set(tokens))

    state = (pages, ids, b["positions"], b["context_lens"], seen,
             jnp.zeros((shapes.steps, S), jnp.int32))
    state = jax.lax.fori_loop(0, shapes.steps, step, state)
    tokens = state[-1]
    return tokens, jnp.zeros(shapes.feed, jnp.int32).at[:S].set(tokens[-1]), state[0]


@functools.cache
def _jitted_step(graphdef, treedef):
    """_run_batch jitted for one model structure: engines of the same model (or of models of
    the same config and dtype, whose parameters are the arguments) share its compiled programs,
    so a second engine starts warm."""
    return jax.jit(functools.partial(_run_batch, graphdef, treedef),
                   static_argnames=("shapes", "filters"), donate_argnums=(1,))


class _Call(NamedTuple):
    """A batch dispatched to the device, and what it will give: the tokens [steps, S] and the
    last step's [F] (_run_batch)."""
    batch: list[Entry]
    filters: RowFilters
    tokens: jax.Array
    last: jax.Array


class _Settings(NamedTuple):
    """A request's sampling: validated settings, its seed, and its row of RowSampling's arrays
    (made once, at add_request: a step only copies them)."""
    sampling: Sampling
    seed: int
    row: tuple


class Engine:
    """Continuous batching of generation requests over a paged KV cache (module docstring).

    page_size: token slots a page holds; num_pages: pages per layer in the pool (None: as many as
    MEMORY_FRACTION of the free device memory holds); max_seqs: sequences in a step;
    max_batch_tokens: tokens computed in a step (prefill chunks + decode tokens); max_len: the
    context of a request, prompt + new tokens (default the model's max_context, capped by the
    pool); prefix_caching: share the pages of common prompt prefixes between requests;
    decode_steps: decode steps a batch of decoding sequences runs on the device in one call (the
    scheduler's multi-step decode; 1: one step a call); seed: where the seeds of requests that
    give none come from.
    """

    def __init__(self, model, *, page_size: int = 16, num_pages: int | None = None,
                 max_seqs: int = 64, max_batch_tokens: int = 2048, max_len: int | None = None,
                 prefix_caching: bool = True, decode_steps: int = 8, seed: int = 0):
        for name, value in (("page_size", page_size), ("max_seqs", max_seqs),
                            ("max_batch_tokens", max_batch_tokens), ("decode_steps", decode_steps)):
            _check_positive(name, value)
        self.model = model
        self.spec = model.kv_spec
        max_len = model.max_context if max_len is None else max_len
        _check_positive("max_len", max_len)
        if max_len > model.max_context:
            raise ValueError(f"max_len ({max_len}) exceeds the model's context of "
                             f"{model.max_context} tokens")
        if num_pages is None:
            num_pages = _pages_from_memory(self.spec, page_size,
                                           max_seqs * -(-max_len // page_size))
        _check_positive("num_pages", num_pages)
        self.page_size = page_size
        self.max_len = min(max_len, num_pages * page_size)
        self.pages = PageAllocator(num_pages, page_size)
        namespace = (type(model).__name__, model.config, jnp.dtype(self.spec.dtype).name)
        self.scheduler = Scheduler(self.pages, max_seqs=max_seqs,
                                   max_batch_tokens=max_batch_tokens, max_len=self.max_len,
                                   namespace=namespace, prefix_caching=prefix_caching)
        graphdef, state = nnx.split(model)
        self._params, treedef = jax.tree.flatten(state)
        self.decode_steps = decode_steps
        self._step = _jitted_step(graphdef, treedef)
        self._programs: set[tuple[_Shapes, RowFilters]] = set()
        self._kv = PagedKVCache.empty_pages(num_pages, page_size, self.spec)
        self._next: _Call | None = None  # the call queued behind the last one (step)
        self._no_feed = jnp.zeros(max_seqs, jnp.int32)  # a call's fed tokens when none are
        self._live: dict[int, Request] = {}
        self._settings: dict[int, _Settings] = {}
        self._finished: dict[int, str] = {}
        self._issued = 0
        self._seeds = np.random.default_rng(seed)

    # -------------------------------------------------------------------------------- state

    @property
    def num_pages(self) -> int:
        return self.pages.num_pages

    @property
    def num_free_pages(self) -> int:
        """Pages no live request holds (prefix-cache pages without a holder count as free)."""
        return self.pages.num_free_pages

    @property
    def has_unfinished(self) -> bool:
        """Some request is waiting or running."""
        return bool(self._live)

    @property
    def num_compiled(self) -> int:
        """Programs this engine's steps have needed so far: one per distinct batch shape and
        filters (compiled once for all engines of models of the same structure)."""
        return len(self._programs)

    # ----------------------------------------------------------------------------- requests

    def add_request(self, prompt_ids: Sequence[int], *, max_new_tokens: int = 16,
                    do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
                    top_p: float | None = None, min_p: float | None = None,
                    repetition_penalty: float | None = None, eos_token_id=None,
                    seed: int | None = None) -> int:
        """A new request's id. Sampling arguments as model.generate's; eos_token_id an int or a
        list (None: the model config's; [] never stops); seed makes a sampled request
        reproducible (None: one drawn from the engine's seed). ValueError, naming the argument,
        for anything the request cannot run with."""
        sampling = Sampling(do_sample, temperature, top_k, top_p, min_p, repetition_penalty)
        prompt = _prompt_list(prompt_ids, self.model.config.vocab_size)
        eos = eos_token_ids(self.model.config, eos_token_id)
        if seed is None:
            seed = int(self._seeds.integers(2 ** 31))
        elif isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) \
                or not 0 <= seed < 2 ** 31:
            raise ValueError(f"seed must be an int in [0, 2**31), got {seed!r}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)):
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        seq = self.scheduler.add(prompt, max_new_tokens=int(max_new_tokens), eos_token_ids=eos)
        self._live[seq.request_id] = seq
        self._issued = seq.request_id + 1  # the scheduler numbers requests 0, 1, ...
        row = tuple(a[0] for a in RowSampling.of([sampling]))
        self._settings[seq.request_id] = _Settings(sampling, int(seed), row)
        return seq.request_id

    def abort(self, request_id: int) -> None:
        """Stop a request wherever it is (its pages go back to the pool); a finished one is left
        as it is. ValueError for an id the engine never gave."""
        seq = self._live.pop(request_id, None)
        if seq is None:
            if not (isinstance(request_id, int) and 0 <= request_id < self._issued):
                raise ValueError(f"request_id {request_id!r} is not a request of this engine")
            return
        self.scheduler.abort(seq)
        del self._settings[request_id]
        self._finished[request_id] = "abort"

    def pop_finished(self) -> dict[int, str]:
        """The requests that finished since the last call: id -> "stop" (emitted an eos),
        "length" (max_new_tokens) or "abort"."""
        finished, self._finished = self._finished, {}
        return finished

    # --------------------------------------------------------------------------------- step

    def step(self) -> dict[int, list[int]]:
        """Run one batch; the new tokens of each request that got some (module docstring)."""
        call, self._next = self._next, None
        if call is None:
            batch = self.scheduler.schedule(self.decode_steps)
            if not batch:
                return {}
            call = self._dispatch(batch)
        self._next = self._follow(call)  # queued before the host waits for call's tokens
        tokens = np.asarray(call.tokens).T  # [S, steps]: a row's tokens, step by step
        batch = call.batch
        known = [(e.seq, len(e.seq.tokens)) for e in batch if e.samples]
        for seq in self.scheduler.update(batch, {e.seq.request_id: tokens[i].tolist()
                                                 for i, e in enumerate(batch) if e.samples}):
            rid = seq.request_id
            self._finished[rid] = "stop" if seq.tokens[-1] in seq.eos_token_ids else "length"
            del self._live[rid], self._settings[rid]
        return {seq.request_id: seq.tokens[n:] for seq, n in known if len(seq.tokens) > n}

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens=16, *,
                 progress: bool = True, **sampling) -> list[list[int]]:
        """The new tokens of each prompt (token id lists), all served together; max_new_tokens an
        int or one per prompt, sampling as add_request's. Needs an idle engine. progress: a tqdm
        bar over the finished requests."""
        if self.has_unfinished:
            raise ValueError("generate needs an idle engine: requests added with add_request are "
                             "still running")
        prompts = list(prompts)
        limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, (int, np.integer)) \
            else list(max_new_tokens)
        if len(limits) != len(prompts):
            raise ValueError(f"max_new_tokens must be an int or one per prompt ({len(prompts)}), "
                             f"got {len(limits)}")
        ids = []
        try:
            for prompt, limit in zip(prompts, limits):
                ids.append(self.add_request(prompt, max_new_tokens=limit, **sampling))
        except ValueError as e:
            for rid in ids:
                self.abort(rid)
            self.pop_finished()
            raise ValueError(f"prompt {len(ids)}: {e}") from e
        from tqdm.auto import tqdm
        out = {rid: [] for rid in ids}
        with tqdm(total=len(ids), disable=not progress, unit="request") as bar:
            while self.has_unfinished:
                for rid, tokens in self.step().items():
                    out[rid] += tokens
                bar.update(len(self.pop_finished()))
        return [out[rid] for rid in ids]

    # ---------------------------------------------------------------------------- internals

    def _dispatch(self, batch: list[Entry], fed_from: _Call | None = None) -> _Call:
        """Run batch on the device (asynchronously); its input ids from the host, but for the
        sequences of fed_from (a call queued ahead of them): theirs from fed_from's output."""
        rows_of = {} if fed_from is None else {id(e.seq): i for i, e in enumerate(fed_from.batch)}
        shapes, filters, buffer = self._pack(batch, rows_of)
        self._programs.add((shapes, filters))
        fed = self._no_feed if fed_from is None else fed_from.last
        tokens, last, self._kv = self._step(self._params, self._kv, buffer, fed, shapes=shapes,
                                            filters=filters)
        return _Call(batch, filters, tokens, last)

    def _follow(self, call: _Call) -> _Call | None:
        """The call that follows call, dispatched before call's tokens are read (the
        scheduler's schedule_ahead), or None. Not after a call with a repetition penalty: the
        seen tokens of its sequences come from the host."""
        if call.filters.repetition_penalty:
            return None
        batch = self.scheduler.schedule_ahead(call.batch, self.decode_steps)
        return self._dispatch(batch, fed_from=call) if batch else None

    def _pack(self, batch: list[Entry], rows_of: dict[int, int]):
        """(shapes, filters, the int32 buffer) of a batch. The entries of the sequences in
        rows_of (id(seq) -> block-table row of the call queued ahead) decode a token that is not
        on the host yet: their input id is 0 here, and fed_from names the row whose last token
        _run_batch puts in its place."""
        P = self.page_size
        counts = [e.count for e in batch]
        T = min(_power_of_two(sum(counts)), self.scheduler.max_batch_tokens)
        S = min(T, self.scheduler.max_seqs)
        width = min(_power_of_two(max(len(e.seq.pages) for e in batch)), -(-self.max_len // P))
        settings = [self._settings[e.seq.request_id] for e in batch]
        filters = RowFilters.of([s.sampling for s in settings], self.model.config.vocab_size)
        penalised = [sorted(set(e.seq.tokens)) if s.sampling.repetition_penalty is not None
                     else [] for e, s in zip(batch, settings)]
        seen = _power_of_two(max(map(len, penalised))) if filters.repetition_penalty else 0
        cu_q = np.zeros(S + 1, np.int32)
        cu_q[1:len(batch) + 1] = np.cumsum(counts)
        cu_q[len(batch) + 1:] = cu_q[len(batch)]
        # A batch that only decodes takes one small tile a sequence (paged.query_block).
        decode = all(count == 1 for count in counts)
        block_q = paged.query_block(self.spec.num_heads, self.spec.num_kv_heads, decode=decode)
        tile_seqs, tile_starts = paged.plan_tiles(
            cu_q, block_q, S if decode else paged.max_tiles(T, S, block_q))
        steps = min(_power_of_two(max(e.steps for e in batch)), self.decode_steps)
        shapes = _Shapes(T, S, width, tile_seqs.size, block_q, seen, steps,
                         self.scheduler.max_seqs)
        _, offset, size = shapes.fields()[-1]
        buffer = np.zeros(offset + size, np.int32)
        f = _unpack(buffer, shapes)  # views: writing a field writes the buffer
        f["cu_q"][:], f["tile_seqs"][:], f["tile_starts"][:] = cu_q, tile_seqs, tile_starts
        tables, seen_ids = f["block_tables"], f["seen_ids"]
        n = len(batch)
        rows = RowSampling(*map(np.array, zip(*(s.row for s in settings))))
        floats = f["floats"].view(np.float32)
        floats[:] = np.array([1.0, 0.0, -np.inf, 1.0], np.float32)[:, None]  # all off
        for i, name in enumerate(FLOAT_FIELDS):
            floats[i, :n] = getattr(rows, name)
        f["do_sample"][:n], f["top_k"][:n] = rows.do_sample, rows.top_k
        starts = np.array([e.start for e in batch], np.int32)
        used = int(cu_q[n])
        f["fed_from"][:] = -1
        f["fed_from"][:n] = [rows_of.get(id(e.seq), -1) for e in batch]
        f["input_ids"][:used] = np.fromiter(itertools.chain.from_iterable(
            (0,) if id(e.seq) in rows_of else e.seq.tokens[e.start:e.start + e.count]
            for e in batch), np.int32, used)  # a fed entry is one token
        f["positions"][:used] = np.arange(used) - np.repeat(cu_q[:n] - starts, counts)
        f["context_lens"][:n] = starts + counts
        f["sample_rows"][:n] = cu_q[1:n + 1] - 1
        f["seeds"][:n] = [s.seed for s in settings]
        f["generated"][:n] = [e.start + e.count - e.seq.prompt_len for e in batch]
        f["row_steps"][:n] = [e.steps for e in batch]
        for i, e in enumerate(batch):
            tables[i, :len(e.seq.pages)] = e.seq.pages
            if penalised[i]:
                # Padded with a repeat of its first id, which marks nothing new. The other
                # rows' zeros mark token 0, under their penalty of 1: no change.
                seen_ids[i] = penalised[i][0]
                seen_ids[i, :len(penalised[i])] = penalised[i]
        return shapes, filters, buffer


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _prompt_list(prompt_ids, vocab_size: int) -> list[int]:
    """prompt_ids as a list of ints, each in [0, vocab_size); ValueError naming it otherwise."""
    try:
        ids = np.asarray(prompt_ids)
    except ValueError as e:
        raise ValueError(f"prompt_ids must be a list of token ids, got {prompt_ids!r}") from e
    if ids.ndim != 1 or not (np.issubdtype(ids.dtype, np.integer) or ids.size == 0):
        raise ValueError(f"prompt_ids must be a flat list of int token ids, got {ids.dtype} "
                         f"shape {list(ids.shape)}")
    if ids.size == 0:
        raise ValueError("prompt_ids must hold at least one token")
    check_ids_in_range("prompt_ids", ids, vocab_size)
    return ids.tolist()


def _pages_from_memory(spec, page_size: int, most: int) -> int:
    """Pages per layer that MEMORY_FRACTION of the free device memory holds (on a device without
    memory statistics, the CPU: a quarter of the available RAM), at most `most`."""
    page_bytes = spec.num_layers * page_size * spec.token_width * jnp.dtype(spec.dtype).itemsize
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        free = MEMORY_FRACTION * (stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 4
    pages = min(int(free // page_bytes), most)
    if pages < 1:
        raise ValueError(f"the free device memory holds no page of {page_bytes} bytes: pass "
                         f"num_pages, or free memory")
    return pages
