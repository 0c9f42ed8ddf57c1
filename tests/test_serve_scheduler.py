"""The continuous-batching scheduler (jtgpt.serve.scheduler) driven by a fake model: budgets,
chunked prefill, prefix sharing, preemption by recompute, aborts, and that a request's tokens
do not depend on what it was batched with. The fake model's next token is a function of the whole
sequence so far, and a fake KV cache (a token per page slot) checks that every step's context
is in the sequence's pages."""
import random

import pytest

from jtgpt.serve import PageAllocator
from jtgpt.serve.scheduler import Scheduler

V = 50


def next_token(tokens):
    return hash(tuple(tokens)) % V


class FakeEngine:
    """Runs the scheduler's batches: writes each entry's tokens into a slot store by page, checks
    that the positions before the entry are in the sequence's pages, and samples next_token,
    `entry.steps` times (each step's token the next one's input, as the engine's device loop).
    With overlap, as the engine does, it asks schedule_ahead for the next batch before it
    updates the scheduler with this one's tokens, and runs that batch next."""

    def __init__(self, scheduler, decode_steps=1, overlap=False):
        self.scheduler = scheduler
        self.decode_steps = decode_steps
        self.overlap = overlap
        self.queued = []  # schedule_ahead's batch, to run next
        self.slots = {}  # (page, slot) -> token
        self.steps = 0

    def step(self):
        batch = self.queued or self.scheduler.schedule(self.decode_steps)
        P = self.scheduler.pages.page_size
        assert len(batch) <= self.scheduler.max_seqs
        assert sum(e.count for e in batch) <= self.scheduler.max_batch_tokens
        self.queued = self.scheduler.schedule_ahead(batch, self.decode_steps) \
            if self.overlap else []
        new = {}
        for entry in batch:
            if entry.seq.finished:  # stopped (eos, abort) while its batch was queued: the
                continue            # engine computes it into released pages, update drops it
            seq, tokens = entry.seq, list(entry.seq.tokens)
            assert entry.steps == 1 or (entry.count == 1 and entry.samples)
            assert len(seq.pages) * P >= entry.start + entry.count + entry.steps - 1
            for position in range(entry.start):  # the cache holds the context
                assert self.slots[seq.pages[position // P], position % P] == seq.tokens[position]
            for j in range(entry.steps):
                first = entry.start if j == 0 else entry.start + entry.count + j - 1
                for position in range(first, entry.start + entry.count + j):
                    self.slots[seq.pages[position // P], position % P] = tokens[position]
                if entry.samples:
                    tokens.append(next_token(tokens))
            new[seq.request_id] = tokens[len(seq.tokens):]
        self.steps += 1
        return batch, self.scheduler.update(batch, new)

    def run(self, limit=10_000):
        done = []
        while self.scheduler.waiting or self.scheduler.running:
            done += self.step()[1]
            assert self.steps < limit
        return done


def alone(prompt, max_new_tokens, eos=()):
    tokens = list(prompt)
    for _ in range(max_new_tokens):
        tokens.append(next_token(tokens))
        if tokens[-1] in eos:
            break
    return tokens[len(prompt):]


def test_one_step_packs_prefill_chunks_and_decodes():
    pool = PageAllocator(num_pages=32, page_size=4)
    sched = Scheduler(pool, max_seqs=8, max_batch_tokens=16, max_len=64)
    a = sched.add(list(range(10)), max_new_tokens=3)
    b = sched.add(list(range(3)), max_new_tokens=3)
    c = sched.add(list(range(20)), max_new_tokens=3)
    engine = FakeEngine(sched)
    batch, _ = engine.step()
    assert [(e.seq, e.start, e.count, e.samples) for e in batch] == [
        (a, 0, 10, True), (b, 0, 3, True), (c, 0, 3, False)]  # c: a chunk of its prompt
    batch, _ = engine.step()
    assert [(e.seq, e.start, e.count) for e in batch] == [(a, 10, 1), (b, 3, 1), (c, 3, 14)]
    batch, _ = engine.step()
    assert [(e.seq, e.start, e.count, e.samples) for e in batch] == [
        (a, 11, 1, True), (b, 4, 1, True), (c, 17, 3, True)]


def test_a_common_prefix_is_computed_once():
    pool = PageAllocator(num_pages=32, page_size=4)
    sched = Scheduler(pool, max_seqs=8, max_batch_tokens=64, max_len=64)
    prefix = list(range(20, 33))  # 13 tokens: 3 full pages
    first = sched.add(prefix + [1], max_new_tokens=2)
    engine = FakeEngine(sched)
    engine.run()
    second = sched.add(prefix + [2, 3], max_new_tokens=2)
    batch, _ = engine.step()
    assert [(e.seq, e.start) for e in batch] == [(second, 12)]
    assert first.generated == alone(prefix + [1], 2)
    engine.run()
    assert second.generated == alone(prefix + [2, 3], 2)
    assert pool.num_free_pages == 32


def test_preemption_recomputes_and_loses_nothing():
    """A pool too small for all: sequences are preempted and recomputed, and each request's
    tokens equal its tokens run alone; every page comes back."""
    pool = PageAllocator(num_pages=12, page_size=4)
    sched = Scheduler(pool, max_seqs=6, max_batch_tokens=32, max_len=48)
    rng = random.Random(0)
    prompts = [[rng.randrange(V) for _ in range(rng.randrange(3, 12))] for _ in range(6)]
    requests = [sched.add(p, max_new_tokens=12) for p in prompts]
    preempted = 0
    engine = FakeEngine(sched)
    while sched.waiting or sched.running:
        running_before = set(map(id, sched.running))
        engine.step()
        preempted += len(running_before & set(map(id, sched.waiting)))
    assert preempted > 0
    for prompt, request in zip(prompts, requests):
        assert request.generated == alone(prompt, 12)
    assert pool.num_free_pages == 12


@pytest.mark.parametrize("decode_steps,overlap", [(1, False), (4, False), (1, True), (4, True)])
def test_eos_and_random_arrivals(decode_steps, overlap):
    """Requests arriving between steps with eos tokens and random lengths: the same tokens as
    alone, stopped at eos or max_new_tokens, one decode step a batch or up to 4, with the next
    decode run made before the tokens of the last one are known or not."""
    pool = PageAllocator(num_pages=40, page_size=8)
    sched = Scheduler(pool, max_seqs=4, max_batch_tokens=24, max_len=80)
    rng = random.Random(1)
    engine, cases = FakeEngine(sched, decode_steps, overlap), []
    for _ in range(12):
        prompt = [rng.randrange(V) for _ in range(rng.randrange(1, 30))]
        n, eos = rng.randrange(1, 20), {rng.randrange(V) for _ in range(3)}
        cases.append((prompt, n, eos, sched.add(prompt, max_new_tokens=n, eos_token_ids=eos)))
        for _ in range(rng.randrange(0, 4)):
            engine.step()
    engine.run()
    for prompt, n, eos, request in cases:
        assert request.finished and request.generated == alone(prompt, n, eos)
    assert pool.num_free_pages == 40


def test_multi_step_decode_runs_only_decode_batches_with_lookahead_pages():
    pool = PageAllocator(num_pages=5, page_size=4)
    sched = Scheduler(pool, max_seqs=4, max_batch_tokens=16, max_len=64)
    a = sched.add(list(range(3)), max_new_tokens=6)
    engine = FakeEngine(sched, decode_steps=4)
    batch, _ = engine.step()
    assert [(e.start, e.count, e.steps) for e in batch] == [(0, 3, 1)]  # a prefill: one step
    batch, _ = engine.step()
    assert [(e.start, e.steps) for e in batch] == [(3, 4)] and len(a.pages) == 2
    b = sched.add(list(range(10)), max_new_tokens=9)
    batch, _ = engine.step()  # b's prefill joins: one step; a's last token then
    assert [(e.seq, e.steps) for e in batch] == [(a, 1), (b, 1)] and a.finished
    batch, _ = engine.step()  # b needs a 4th page for 4 steps: 2 of 5 are free
    assert [(e.seq, e.start, e.steps) for e in batch] == [(b, 10, 4)] and len(b.pages) == 4
    c = sched.add(list(range(3)), max_new_tokens=3)
    engine.step()  # c's prefill takes a page; b has one token left of its pages' 16 slots
    batch, _ = engine.step()  # 2 steps would need b's 5th page, and none is free: one step
    assert [(e.seq, e.steps) for e in batch] == [(b, 1), (c, 1)]
    engine.run()
    assert b.generated == alone(list(range(10)), 9) and c.generated == alone(list(range(3)), 3)
    assert pool.num_free_pages == 5
    d = sched.add([7, 8], max_new_tokens=3)
    engine.step()
    batch, _ = engine.step()  # d has 2 tokens left: 2 steps, not 4
    assert [(e.seq, e.steps) for e in batch] == [(d, 2)] and d.finished
    assert d.generated == alone([7, 8], 3)


def test_each_entry_of_a_run_takes_its_own_steps():
    """A run lasts as long as its longest entry: a request with fewer tokens to go takes fewer
    steps (and pages for them), without cutting the others' steps."""
    pool = PageAllocator(num_pages=16, page_size=4)
    sched = Scheduler(pool, max_seqs=4, max_batch_tokens=16, max_len=64)
    a = sched.add([1, 2, 3], max_new_tokens=20)
    b = sched.add([4, 5, 6], max_new_tokens=3)
    engine = FakeEngine(sched, decode_steps=8)
    engine.step()  # the prefills
    batch = engine.queued = sched.schedule(8)
    assert [(e.seq, e.start, e.steps) for e in batch] == [(a, 3, 8), (b, 3, 2)]
    assert (len(a.pages), len(b.pages)) == (3, 2)  # positions < 11 and < 5
    engine.step()
    assert b.finished and b.generated == alone([4, 5, 6], 3)
    engine.run()
    assert a.generated == alone([1, 2, 3], 20) and pool.num_free_pages == 16


def test_schedule_ahead_is_the_next_schedule():
    """The batch after one in which every sequence samples, made before update: what schedule()
    gives after it, without the sequences that finish by length; waiting requests take their
    places at once (one step with the decoding ones). [] when a waiting request finds no pages,
    when the pool lacks a run's lookahead pages, and after a prompt chunk that samples nothing."""
    sched = Scheduler(PageAllocator(num_pages=9, page_size=4), max_seqs=2, max_batch_tokens=16,
                      max_len=64)
    a = sched.add(list(range(3)), max_new_tokens=10)
    b = sched.add(list(range(5)), max_new_tokens=4)
    fields = lambda entries: [(e.seq, e.start, e.count, e.samples, e.steps) for e in entries]
    prefills = sched.schedule(2)
    after_prefills = sched.schedule_ahead(prefills, 2)
    assert fields(after_prefills) == [(a, 3, 1, True, 2), (b, 5, 1, True, 2)]
    sched.update(prefills, {a.request_id: [7], b.request_id: [8]})
    batch = sched.schedule(2)
    assert fields(batch) == fields(after_prefills)
    follow = sched.schedule_ahead(batch, 2)  # b has one token left after the run
    assert fields(follow) == [(a, 5, 1, True, 2), (b, 7, 1, True, 1)]
    sched.update(batch, {a.request_id: [1, 2], b.request_id: [3, 4]})
    assert fields(sched.schedule(2)) == fields(follow)

    sched = Scheduler(PageAllocator(num_pages=6, page_size=4), max_seqs=2, max_batch_tokens=16,
                      max_len=64)
    c = sched.add(list(range(3)), max_new_tokens=10)
    d = sched.add(list(range(3)), max_new_tokens=2)
    FakeEngine(sched).step()
    batch = sched.schedule(2)  # d's last token: one step of the run's two
    assert [(e.seq, e.steps) for e in batch] == [(c, 2), (d, 1)]
    e = sched.add([4, 5], max_new_tokens=3)  # it takes d's place in one step with c's next token
    assert fields(sched.schedule_ahead(batch, 2)) == [(c, 5, 1, True, 1), (e, 0, 2, True, 1)]
    assert e in sched.running and not sched.waiting

    pool = PageAllocator(num_pages=3, page_size=4)
    sched = Scheduler(pool, max_seqs=2, max_batch_tokens=16, max_len=64)
    c = sched.add(list(range(3)), max_new_tokens=8)
    d = sched.add(list(range(3)), max_new_tokens=2)
    FakeEngine(sched).step()
    batch = sched.schedule(2)  # c's run takes the last free page
    e = sched.add([4], max_new_tokens=3)
    assert pool.num_free_pages == 0 and sched.schedule_ahead(batch, 2) == []
    sched.abort(e)  # nothing waits: c runs on alone
    assert fields(sched.schedule_ahead(batch, 2)) == [(c, 5, 1, True, 2)]
    assert sched.schedule_ahead(batch, 8) == []  # 5 more steps need a page the pool lacks

    sched = Scheduler(PageAllocator(num_pages=9, page_size=4), max_seqs=2, max_batch_tokens=4,
                      max_len=64)
    sched.add(list(range(6)), max_new_tokens=4)
    chunk = sched.schedule(2)  # 4 of the prompt's 6 tokens: no token sampled yet
    assert [(e.count, e.samples) for e in chunk] == [(4, False)]
    assert sched.schedule_ahead(chunk, 2) == []


def test_abort_frees_pages():
    pool = PageAllocator(num_pages=16, page_size=4)
    sched = Scheduler(pool, max_seqs=4, max_batch_tokens=64, max_len=64)
    running = sched.add(list(range(9)), max_new_tokens=20)
    engine = FakeEngine(sched)
    engine.step()
    waiting = sched.add(list(range(5)), max_new_tokens=2)
    assert pool.num_free_pages < 16
    sched.abort(running)
    sched.abort(waiting)
    assert pool.num_free_pages == 16 and not sched.running and not sched.waiting
    assert engine.step()[0] == []


@pytest.mark.parametrize("prompt,max_new,match", [
    ([], 4, "at least one token"),
    ([1, 2], 0, "max_new_tokens"),
    (list(range(60)), 10, "exceeds the context of 64"),
    (list(range(40)), 10, "more pages than the pool"),
])
def test_requests_that_can_never_run_are_refused(prompt, max_new, match):
    sched = Scheduler(PageAllocator(num_pages=8, page_size=4), max_seqs=4, max_batch_tokens=16,
                      max_len=64)
    with pytest.raises(ValueError, match=match):
        sched.add(prompt, max_new_tokens=max_new)
    assert not sched.waiting
