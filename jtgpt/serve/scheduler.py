"""The continuous-batching scheduler: which requests run in the next engine step, and with which
tokens, under a budget of sequences, tokens and KV-cache pages.

Each step packs into one batch (at most `max_seqs` sequences, `max_batch_tokens` new tokens):
1. the running sequences, oldest first: one token each when decoding, or the next chunk of a
   prompt that did not fit into earlier steps (chunked prefill);
2. then waiting requests, first come first served, while the budgets last. A request's prompt
   first takes what the prefix cache holds of it (jtgpt.serve.pages), so only the rest is
   computed.

A sequence's pages are allocated as its tokens need them. When a running sequence needs a page
and none is free, the most recently admitted running sequence is preempted: its pages go back to
the pool and it waits again, first in line, to be recomputed from its prompt and the tokens it
has generated so far (recompute, as vLLM's default: nothing is swapped out). The preempted
request keeps every token it produced; recomputing them gives the same cache.

Multi-step decode. When every entry of a batch is one decode token, `schedule(decode_steps=k)`
lets the batch run up to k steps on the device without coming back (each step's tokens fed to
the next, vLLM's multi-step scheduling): the host's schedule, pack and dispatch are paid once for
k tokens a sequence. Each entry runs its own steps, k or fewer when its request reaches
max_new_tokens sooner (the run lasts as long as its longest entry; an entry that is done repeats
its last step, writing the same keys and values again), and a run is made only if the pool has
the pages for all of them (lookahead pages, allocated now, never by preempting); a request that
emits eos in the middle keeps the tokens up to it, and the rest of the run's work on it is
thrown away. Waiting requests join at the next schedule(), so a run delays them by at most k
steps.

Overlap. `schedule_ahead(batch)` gives the batch that follows one in which every sequence
samples (a decode run, or prefills that reach the end of their prompts) before the batch's
tokens are known: the sequences that go on decode, their input tokens taken on the device from
batch's output, and waiting requests take the places of those that finish by length. The engine
queues it on the device behind the running one, so the device does not wait for the host's
update and schedule in between; only a prompt chunk that does not sample, a shortage of pages or
a sequence's eos (its place is taken at the next schedule) make it wait.

The scheduler never runs the model: `schedule()` says what to compute and `update()` takes what
came out (for each sequence whose batch entry reached the end of its known tokens, one new token
a step the entry ran).
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
from typing import Hashable, Sequence

from jtgpt.serve.pages import OutOfPages, PageAllocator, PageKey


@dataclasses.dataclass(eq=False)  # a request is itself: compared by identity
class Request:
    """One request's state, as the scheduler keeps it. tokens: the prompt, then every generated
    token; computed: how many of them have their keys and values in the cache (pages: the block
    table)."""
    request_id: int
    tokens: list[int]
    prompt_len: int
    max_new_tokens: int
    eos_token_ids: frozenset[int]
    pages: list[int] = dataclasses.field(default_factory=list)
    computed: int = 0
    cached_keys: int = 0  # how many of its full pages were offered to the prefix cache
    last_key: PageKey | None = None  # the prefix-cache key of page cached_keys - 1
    finished: bool = False

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len:]


@dataclasses.dataclass(frozen=True)
class Entry:
    """A sequence's part of a batch: tokens[start:start + count] are computed this step, at
    positions start.. (the cache holds positions < start). samples: whether the model's output
    after the entry's last token is a new token (the entry reaches the end of the known tokens).
    steps: decode steps the entry runs (module docstring; > 1 only in a batch of one-token decode
    entries): step j computes position start + j and samples one token, fed to step j + 1."""
    seq: Request
    start: int
    count: int
    samples: bool
    steps: int = 1


def _entry(seq: Request, count: int) -> Entry:
    return Entry(seq, seq.computed, count, seq.computed + count == len(seq.tokens))


class Scheduler:
    """Admission, chunked prefill, decode and preemption over one PageAllocator."""

    def __init__(self, pages: PageAllocator, *, max_seqs: int, max_batch_tokens: int,
                 max_len: int, namespace: Hashable = None, prefix_caching: bool = True):
        for name, value in (("max_seqs", max_seqs), ("max_batch_tokens", max_batch_tokens),
                            ("max_len", max_len)):
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.pages = pages
        self.max_seqs, self.max_batch_tokens, self.max_len = max_seqs, max_batch_tokens, max_len
        self.namespace = namespace
        self.prefix_caching = prefix_caching  # off: no page is matched or offered to the cache
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []  # in admission order
        self._ids = itertools.count()

    def add(self, prompt: Sequence[int], *, max_new_tokens: int,
            eos_token_ids: Sequence[int] = ()) -> Request:
        """A new request, waiting; ValueError if it cannot ever run (empty, too long, or more
        pages than the whole pool)."""
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError("prompt must hold at least one token")
        if not (isinstance(max_new_tokens, int) and max_new_tokens >= 1):
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        total = len(prompt) + max_new_tokens
        if total > self.max_len:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) "
                             f"= {total} exceeds the context of {self.max_len} tokens")
        if -(-total // self.pages.page_size) > self.pages.num_pages:
            raise ValueError(f"{total} tokens need more pages than the pool's "
                             f"{self.pages.num_pages}")
        seq = Request(next(self._ids), prompt, len(prompt), max_new_tokens,
                        frozenset(int(t) for t in eos_token_ids))
        self.waiting.append(seq)
        return seq

    def abort(self, seq: Request) -> None:
        """Stop seq wherever it is; its pages go back to the pool."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.running:
            self.running.remove(seq)
        self._release(seq)
        seq.finished = True

    def schedule(self, decode_steps: int = 1) -> list[Entry]:
        """This step's batch (module docstring), its entries running up to decode_steps steps
        when all of them decode; empty when nothing can run."""
        batch, budget = [], self.max_batch_tokens
        for seq in list(self.running):
            if seq not in self.running:  # preempted while making room for an older one
                continue
            count = min(len(seq.tokens) - seq.computed, budget)
            if count == 0 or not self._make_room(seq, seq.computed + count):
                continue
            batch.append(_entry(seq, count))
            budget -= count
        self._admit(batch, budget, self.max_seqs - len(self.running))
        if decode_steps > 1:
            batch = self._look_ahead(batch, decode_steps)
        return batch

    def schedule_ahead(self, batch: Sequence[Entry], decode_steps: int = 1) -> list[Entry]:
        """The batch after `batch`, made before batch's tokens are known (so that it can be
        queued on the device behind batch), when every running sequence is in batch and samples
        there: those that do not finish by length in batch decode on, their inputs the tokens
        batch gives; with waiting requests and places left, as one step with the waiting
        requests admitted (their pages from the free pool: the finishing sequences' come back
        only at update), else as a run of up to decode_steps steps. [] where it cannot be made
        ahead: batch holds a prompt chunk that does not sample or misses a running sequence,
        the pool lacks the pages (this never preempts), or nothing can be admitted while
        requests wait; the caller then waits for update() and schedule(). A sequence that emits
        eos in batch is in the next one: it computes tokens that update() drops."""
        if not batch or not all(e.samples for e in batch):
            return []
        if {id(e.seq) for e in batch} != {id(seq) for seq in self.running}:
            return []
        left = [e.seq.max_new_tokens - len(e.seq.generated) - e.steps for e in batch]
        go_on = [(e, n) for e, n in zip(batch, left) if n > 0]
        admit = bool(self.waiting) and len(go_on) < self.max_seqs
        if not (go_on or admit) or len(go_on) > self.max_batch_tokens:
            return []
        entries = [Entry(e.seq, e.start + e.count + e.steps - 1, 1, True,
                         1 if admit else min(decode_steps, n)) for e, n in go_on]
        if not self._take_run_pages([(e.seq, e.start + e.steps) for e in entries]):
            return []
        if admit and not self._admit(entries, self.max_batch_tokens - len(entries),
                                     self.max_seqs - len(entries)):
            return []
        return entries

    def update(self, batch: Sequence[Entry], new_tokens: dict[int, Sequence[int]]
               ) -> list[Request]:
        """After the step ran `batch`: each entry's tokens are in the cache, and each sampling
        entry's sequence gets new_tokens[request_id] (one token a step it ran), up to its first
        eos or its max_new_tokens. Full pages go to the prefix cache; the sequences that finished
        leave with their pages released, and are returned."""
        finished = []
        for entry in batch:
            seq = entry.seq
            if seq.finished or seq not in self.running:
                continue  # aborted or preempted meanwhile
            if entry.samples:
                for token in new_tokens[seq.request_id][:entry.steps]:
                    seq.tokens.append(int(token))
                    if token in seq.eos_token_ids or len(seq.generated) >= seq.max_new_tokens:
                        seq.finished = True
                        break
            # The cache holds the entry's positions, the newest token not yet (a run's steps past
            # an eos computed tokens that seq does not have).
            seq.computed = min(entry.start + entry.count + entry.steps - 1, len(seq.tokens) - 1)
            if self.prefix_caching:
                self._offer_full_pages(seq)
            if seq.finished:
                self.running.remove(seq)
                self._release(seq)
                finished.append(seq)
        return finished

    # ---------------------------------------------------------------------------- internals

    def _pages_for(self, tokens: int) -> int:
        return -(-tokens // self.pages.page_size)

    def _admit(self, batch: list[Entry], budget: int, places: int) -> int:
        """Waiting requests into batch, first come first served, while `budget` tokens, `places`
        sequences and the pool's free pages last; how many were admitted."""
        admitted = 0
        while self.waiting and budget > 0 and admitted < places:
            seq = self.waiting[0]
            matched = (self.pages.match_prefix(seq.tokens, self.namespace)
                       if self.prefix_caching else [])
            seq.pages, seq.computed = matched, len(matched) * self.pages.page_size
            seq.cached_keys = len(matched)
            seq.last_key = self.pages.key_of(matched[-1]) if matched else None
            count = min(len(seq.tokens) - seq.computed, budget)
            try:
                seq.pages += self.pages.allocate(self._pages_for(seq.computed + count)
                                                 - len(seq.pages))
            except OutOfPages:
                self._release(seq)  # try again next step, still first in line
                break
            self.waiting.popleft()
            self.running.append(seq)
            batch.append(_entry(seq, count))
            budget -= count
            admitted += 1
        return admitted

    def _look_ahead(self, batch: list[Entry], decode_steps: int) -> list[Entry]:
        """The batch with steps > 1 (module docstring) if every entry decodes one token and the
        pool holds the lookahead pages; else the batch as it is."""
        if not batch or not all(e.count == 1 and e.samples for e in batch):
            return batch
        run = [dataclasses.replace(e, steps=min(decode_steps, e.seq.max_new_tokens
                                                - len(e.seq.generated))) for e in batch]
        if max(e.steps for e in run) < 2 or not self._take_run_pages(
                [(e.seq, e.start + e.steps) for e in run]):
            return batch
        return run

    def _take_run_pages(self, runs: list[tuple[Request, int]]) -> bool:
        """For each (seq, end) of a multi-step run, the pages of seq's first `end` positions,
        all from the free pool or none (a run never preempts); whether they were taken."""
        need = [max(0, self._pages_for(end) - len(seq.pages)) for seq, end in runs]
        if sum(need) > self.pages.num_free_pages:
            return False
        for (seq, _), n in zip(runs, need):
            seq.pages += self.pages.allocate(n)
        return True

    def _make_room(self, seq: Request, tokens: int) -> bool:
        """Pages for seq's first `tokens` tokens, preempting younger running sequences if need
        be; False if seq itself had to be preempted (it was the youngest)."""
        need = self._pages_for(tokens) - len(seq.pages)
        while need > self.pages.num_free_pages:
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        seq.pages += self.pages.allocate(max(0, need))
        return True

    def _preempt(self, seq: Request) -> None:
        self.running.remove(seq)
        self._release(seq)
        self.waiting.appendleft(seq)

    def _release(self, seq: Request) -> None:
        self.pages.release(seq.pages)
        seq.pages, seq.computed, seq.cached_keys, seq.last_key = [], 0, 0, None

    def _offer_full_pages(self, seq: Request) -> None:
        """Every page of seq now full of computed tokens goes to the prefix cache."""
        P = self.pages.page_size
        full = seq.computed // P
        if full <= seq.cached_keys:
            return
        keys = self.pages.page_keys(seq.tokens[seq.cached_keys * P:full * P], self.namespace,
                                    parent=seq.last_key)
        for page, key in zip(seq.pages[seq.cached_keys:full], keys):
            self.pages.cache_page(page, key)
        seq.cached_keys, seq.last_key = full, keys[-1]
