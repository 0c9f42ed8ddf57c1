"""The serving engine (jtgpt.serve.Engine) on tiny random GPT-2 and Llama models (fp32): each
request's greedy tokens equal model.generate on its prompt alone, with more requests than the pool
holds at once (waiting, chunked prefill, preemption); prefix-cache hits give the tokens misses
give; every page comes back; aborts; finish reasons; sampled requests reproducible and independent
of their batch; a bounded number of compiled programs; bad arguments refused."""
import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

import jtgpt
from jtgpt.serve import Engine
from jtgpt.serve.engine import _Shapes

CONFIGS = {
    "gpt2": jtgpt.GPTConfig(vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                            eos_token_id=1, bos_token_id=1),
    "llama": jtgpt.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=40,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=64, eos_token_id=1, bos_token_id=1),
}


def _spread_weights(model):
    """Every parameter random and O(1) so that greedy choices are far from ties (the engine's
    kernels round differently from generate's) and depend on the context: norm weights around
    1, biases around 0, matrices scaled by their fan-in (embedding rows of norm ~1)."""
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    spread = []
    for key, (path, x) in zip(keys, leaves):
        name, noise = jax.tree_util.keystr(path), jax.random.normal(key, x.shape)
        if x.ndim == 1:
            spread.append(0.2 * noise + (0.0 if "bias" in name else 1.0))
        else:
            # GPT-2's Conv1D weights are [in, out]; Llama's and the embeddings [out or vocab, in]
            spread.append(noise / x.shape[0 if "['c_" in name else -1] ** 0.5)
    nnx.update(model, jax.tree.unflatten(treedef, spread))
    return model


@pytest.fixture(scope="module", params=list(CONFIGS))
def model(request):
    cls = jtgpt.GPT if request.param == "gpt2" else jtgpt.Llama
    return _spread_weights(cls(CONFIGS[request.param]))


@pytest.fixture(scope="module")
def gpt2():
    """For the engine's own mechanics, which do not depend on the model family (the greedy test
    runs both): one family keeps the interpreter's time down."""
    return _spread_weights(jtgpt.GPT(CONFIGS["gpt2"]))


def _prompts(count, lengths, seed=0, prefix=()):
    rng = np.random.default_rng(seed)
    return [list(prefix) + rng.integers(2, 97, int(rng.choice(lengths))).tolist()
            for _ in range(count)]


def _record_dispatches(engine):
    """The (batch, fed_from) of each call the engine dispatches from now on, in order."""
    calls, dispatch = [], engine._dispatch

    def record(batch, fed_from=None):
        calls.append((batch, fed_from))
        return dispatch(batch, fed_from=fed_from)

    engine._dispatch = record
    return calls


def _alone(model, prompt, new, **options):
    out = model.generate(np.array([prompt]), max_new_tokens=new, **options)
    return np.asarray(out)[0, len(prompt):].tolist()


def test_greedy_equals_generate_with_a_pool_too_small_for_all(model):
    # 4 requests of up to 19 + 5 tokens (6 pages of 4 slots) for 3 sequence slots: one waits, a
    # 10-page pool runs out (one is preempted), and 16 tokens a step chunk the 19-token prompt.
    engine = Engine(model, page_size=4, num_pages=10, max_seqs=3, max_batch_tokens=16)
    preempted = []
    preempt = engine.scheduler._preempt
    engine.scheduler._preempt = lambda seq: (preempted.append(seq), preempt(seq))
    prompts = _prompts(4, [3, 9, 19])
    out = engine.generate(prompts, max_new_tokens=5, eos_token_id=[], progress=False)
    for prompt, tokens in zip(prompts, out):
        assert tokens == _alone(model, prompt, 5, eos_token_id=[], pad_token_id=0)
    assert preempted, "the pool was meant to run out and preempt"
    assert engine.num_free_pages == engine.num_pages and not engine.has_unfinished


def test_prefix_cache_hits_give_the_same_tokens(gpt2):
    prefix = list(range(2, 14))  # 3 full pages of 4
    prompts = _prompts(3, [2, 5], seed=1, prefix=prefix)
    engines = {on: Engine(gpt2, page_size=4, num_pages=40, max_seqs=4, max_batch_tokens=32,
                          prefix_caching=on) for on in (True, False)}
    first = engines[True].generate(prompts[:1], max_new_tokens=3, eos_token_id=[],
                                   progress=False)
    assert engines[True].pages.num_cached_pages >= 3
    hits = engines[True].generate(prompts, max_new_tokens=3, eos_token_id=[], progress=False)
    misses = engines[False].generate(prompts, max_new_tokens=3, eos_token_id=[], progress=False)
    assert hits == misses and hits[0] == first[0]
    assert engines[False].pages.num_cached_pages == 0
    for engine in engines.values():
        assert engine.num_free_pages == engine.num_pages


def test_a_shorter_entry_repeats_its_last_step_harmlessly(gpt2):
    """In a decode run, a request with fewer steps to go than the run repeats its last step
    (writing that position's keys and values again): the page holding it goes to the prefix
    cache, and a request that hits that page gets the tokens of a cache miss."""
    engine = Engine(gpt2, page_size=4, num_pages=40, max_seqs=4, max_batch_tokens=32,
                    decode_steps=8)
    calls = _record_dispatches(engine)
    short, long = _prompts(2, [6], seed=6)
    out = engine.generate([short, long], max_new_tokens=[3, 12], eos_token_id=[], progress=False)
    assert [(e.start, e.steps) for e in calls[1][0]] == [(6, 2), (6, 8)]  # short: positions 6, 7
    again, first = short + out[0] + [5], len(calls)  # 8 tokens of 2 pages cached by the run
    got = engine.generate([again], max_new_tokens=4, eos_token_id=[], progress=False)[0]
    assert calls[first][0][0].start == 8  # a prefix-cache hit of both pages
    assert got == _alone(gpt2, again, 4, eos_token_id=[], pad_token_id=0)
    assert engine.num_free_pages == engine.num_pages


def test_step_reports_tokens_finish_reasons_and_aborts(gpt2):
    engine = Engine(gpt2, page_size=4, num_pages=40, max_seqs=4, max_batch_tokens=32)
    prompt = _prompts(1, [6], seed=2)[0]
    expected = _alone(gpt2, prompt, 4, eos_token_id=[], pad_token_id=0)
    eos = expected[1]  # the second token: the request stops there
    stops = engine.add_request(prompt, max_new_tokens=4, eos_token_id=eos)
    runs = engine.add_request(prompt, max_new_tokens=4, eos_token_id=[])
    aborted = engine.add_request(prompt, max_new_tokens=4)
    got, finished = {stops: [], runs: []}, {}
    first = engine.step()
    assert set(first) == {stops, runs, aborted}  # a prefill of each: its first token
    engine.abort(aborted)
    for rid in (stops, runs):
        got[rid] += first[rid]
    while engine.has_unfinished:
        for rid, tokens in engine.step().items():
            assert rid != aborted
            got[rid] += tokens
        finished.update(engine.pop_finished())
    assert got[stops] == expected[:expected.index(eos) + 1]
    assert got[runs] == expected
    assert finished == {stops: "stop", runs: "length", aborted: "abort"}
    assert engine.num_free_pages == engine.num_pages
    engine.abort(stops)  # finished already: nothing happens
    with pytest.raises(ValueError, match="request_id 99"):
        engine.abort(99)


def test_decode_runs_queue_behind_each_other(gpt2):
    """With nothing waiting, step() dispatches the next decode run before it reads the current
    one's tokens: the tokens are still generate's, a request that stops at eos drops what its
    queued run computed past it, an abort while a run is queued frees its pages, and every page
    comes back."""
    engine = Engine(gpt2, page_size=4, num_pages=40, max_seqs=4, max_batch_tokens=32,
                    decode_steps=2)
    prompts = _prompts(3, [5, 7], seed=4)
    expected = [_alone(gpt2, p, 9, eos_token_id=[], pad_token_id=0) for p in prompts]
    eos = expected[0][3]
    stops = engine.add_request(prompts[0], max_new_tokens=9, eos_token_id=eos)
    runs = engine.add_request(prompts[1], max_new_tokens=9, eos_token_id=[])
    aborted = engine.add_request(prompts[2], max_new_tokens=9, eos_token_id=[])
    got, queued = {stops: [], runs: [], aborted: []}, 0
    while engine.has_unfinished:
        for rid, tokens in engine.step().items():
            got[rid] += tokens
        queued += engine._next is not None
        if queued == 2 and aborted in engine._live:
            engine.abort(aborted)  # its next run is on the device
    assert queued >= 2
    assert got[stops] == expected[0][:expected[0].index(eos) + 1]
    assert got[runs] == expected[1]
    assert 0 < len(got[aborted]) < 9 and got[aborted] == expected[2][:len(got[aborted])]
    assert engine.num_free_pages == engine.num_pages


def test_a_waiting_request_joins_the_call_queued_ahead(gpt2):
    """When a request finishes by length in a call, a waiting one takes its place in the call
    queued behind it, next to the sequences whose input tokens come from the call's output on
    the device: everyone's tokens are still generate's."""
    engine = Engine(gpt2, page_size=4, num_pages=40, max_seqs=2, max_batch_tokens=32,
                    decode_steps=2)
    calls = _record_dispatches(engine)
    prompts, limits = _prompts(3, [5, 7], seed=10), [3, 9, 4]
    out = engine.generate(prompts, max_new_tokens=limits, eos_token_id=[], progress=False)
    for prompt, limit, tokens in zip(prompts, limits, out):
        assert tokens == _alone(gpt2, prompt, limit, eos_token_id=[], pad_token_id=0)
    feeds = []  # (entries fed on the device, entries from the host) of each call
    for batch, fed_from in calls:
        fed = set() if fed_from is None else {id(e.seq) for e in fed_from.batch}
        from_device = sum(id(e.seq) in fed for e in batch)
        feeds.append((from_device, len(batch) - from_device))
    assert (1, 1) in feeds  # the second request's next token fed, the third's prompt from the host
    assert engine.num_free_pages == engine.num_pages


def test_sampled_tokens_follow_the_seed_not_the_batch(gpt2):
    """Alone (a prefill, then its 5 decode steps in one call) or batched with others (the others'
    shorter budgets cut its decode steps into more calls): the same tokens."""
    engine = Engine(gpt2, page_size=4, num_pages=40, max_seqs=4, max_batch_tokens=32)
    prompt, others = _prompts(1, [5], seed=3)[0], _prompts(3, [2, 8], seed=4)
    options = dict(do_sample=True, temperature=1.3, top_k=20, top_p=0.9, repetition_penalty=1.2,
                   seed=7)
    alone = engine.generate([prompt], max_new_tokens=6, progress=False, **options)[0]
    ids = [engine.add_request(p, max_new_tokens=6, temperature=0.0) for p in others[:2]]
    rid = engine.add_request(prompt, max_new_tokens=6, eos_token_id=None, **options)
    ids.append(engine.add_request(others[2], max_new_tokens=3, repetition_penalty=1.5))
    got, calls = [], 0
    while engine.has_unfinished:
        got += engine.step().get(rid, [])
        calls += 1
    assert got == alone  # (both stop after the config's eos, if it comes)
    assert calls < 6  # some calls ran several decode steps
    other = engine.generate([prompt], max_new_tokens=6, progress=False, **{**options, "seed": 8})
    assert other != alone  # (6 draws from ~20 tokens: equal by chance about never)


def test_a_long_run_compiles_a_bounded_number_of_programs():
    # A model of its own structure: no other test's engine shares its compiled step.
    model = jtgpt.GPT(dataclasses.replace(CONFIGS["gpt2"], n_positions=48))
    engine = Engine(model, page_size=4, num_pages=64, max_seqs=4, max_batch_tokens=16)
    engine.generate(_prompts(8, list(range(1, 30)), seed=5), max_new_tokens=list(range(1, 9)),
                    eos_token_id=[], progress=False)
    # token buckets 1, 2, 4, 8, 16 x table widths 1, 2, 4, 8 (sequences of up to 40 tokens),
    # and decode runs: 1, 2, 4 sequences x the widths x 2, 4, 8 steps
    assert 1 <= engine.num_compiled <= 5 * 4 + 3 * 4 * 3
    assert engine._step._cache_size() == engine.num_compiled  # one compile a bucket, no retrace
    again = Engine(model, page_size=4, num_pages=64, max_seqs=4, max_batch_tokens=16)
    assert again._step is engine._step  # a second engine of the model starts warm


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompt_ids=[]), "prompt_ids must hold at least one token"),
    (dict(prompt_ids=[5, 97]), r"prompt_ids\[1\] = 97 is outside \[0, 97\)"),
    (dict(prompt_ids=[[1, 2]]), "prompt_ids must be a flat list"),
    (dict(prompt_ids=[5] * 60, max_new_tokens=10), "exceeds the context of 64 tokens"),
    (dict(prompt_ids=[5], max_new_tokens=0), "max_new_tokens must be a positive int"),
    (dict(prompt_ids=[5], temperature=-1.0, do_sample=True), "temperature must be"),
    (dict(prompt_ids=[5], top_p=1.5), "top_p must be"),
    (dict(prompt_ids=[5], eos_token_id=[200]), "eos_token_id"),
    (dict(prompt_ids=[5], seed=-1), "seed must be"),
])
def test_bad_requests_are_refused(model, kwargs, match):
    engine = Engine(model, page_size=4, num_pages=32, max_seqs=2, max_batch_tokens=8)
    with pytest.raises(ValueError, match=match):
        engine.add_request(**kwargs)
    assert not engine.has_unfinished


@pytest.mark.parametrize("kwargs, match", [
    (dict(page_size=0), "page_size must be a positive int"),
    (dict(max_seqs=1.5), "max_seqs must be a positive int"),
    (dict(max_len=65), "exceeds the model's context of 64"),
    (dict(num_pages=0), "num_pages must be a positive int"),
    (dict(decode_steps=0), "decode_steps must be a positive int"),
])
def test_bad_engine_options_are_refused(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        Engine(model, **kwargs)


def test_num_pages_none_sizes_the_pool_from_memory(model):
    engine = Engine(model, page_size=4, max_seqs=2, max_batch_tokens=8)
    assert engine.num_pages == 2 * 16  # capped at what max_seqs sequences of max_len need
    assert engine.max_len == 64 and engine.num_free_pages == engine.num_pages


def test_every_int_field_starts_16_byte_aligned():
    """XLA may pass a field of the step's int32 buffer to a Triton kernel as a slice, without a
    copy; the kernels are compiled for 16-byte aligned pointers (a GPU launch refuses others)."""
    shapes = _Shapes(tokens=8, seqs=3, table=5, tiles=7, block_q=16, seen=3, steps=2, feed=4)
    fields = shapes.fields()
    assert all(offset % 4 == 0 for _, offset, _ in fields)
    assert all(a[1] + a[2] <= b[1] for a, b in zip(fields, fields[1:]))  # no overlap
