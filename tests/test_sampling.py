"""Token selection (jtgpt.sampling) against Hugging Face's logits processors (transformers 4.57.6,
torch on CPU), composed as `generate` composes them, on the same random fp32 logits and input
ids: the same tokens filtered out (-inf), the same values elsewhere. Also: greedy choices, the
sampled frequencies against the filtered softmax (a chi-square test), keys, jax.jit, the seen
masks and the argument checks; then the per-row path (every row its own settings) against the
static one, row by row.

Random logits have no ties. The tie tests use rows of at most 16 values, the longest that
torch's CPU sort kept stable (torch 2.13), so that Hugging Face's choice among equal logits is
defined there. For longer rows only the number of tokens kept and their values are compared.
"""
import dataclasses
import functools
import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import GenerationConfig, LogitsProcessorList
from transformers.generation import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                     TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)
from transformers.generation.utils import GenerationMixin

from jtgpt.sampling import (RowFilters, RowSampling, Sampling, mark_seen, process_logits,
                            process_logits_rows, seen_tokens, select_tokens, select_tokens_rows)

B, T = 3, 12


def hf_processors(s: Sampling) -> LogitsProcessorList:
    """Hugging Face's processors for s, built under the conditions and in the order of
    GenerationMixin._get_logits_processor (generation/utils.py, lines 1141 and 1251-1280)."""
    processors = LogitsProcessorList()
    if s.repetition_penalty is not None and s.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(s.repetition_penalty))
    if s.do_sample:
        if s.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(s.temperature))
        if s.top_k:
            processors.append(TopKLogitsWarper(s.top_k))
        if s.top_p is not None and s.top_p < 1.0:
            processors.append(TopPLogitsWarper(s.top_p))
        if s.min_p is not None:
            processors.append(MinPLogitsWarper(s.min_p))
    return processors


def hf_process(logits, ids, s: Sampling) -> np.ndarray:
    scores = torch.from_numpy(np.array(logits, np.float32))
    return hf_processors(s)(torch.from_numpy(np.asarray(ids, np.int64)), scores).numpy()


def random_case(seed, V):
    """(logits fp32 [B, V], ids [B, T]): logits 3 N(0, 1), whose softmax is peaked enough for
    top_p and min_p to cut; row 2 has one token 12 above the rest, so that top_p < 1 keeps only it.
    ids repeat tokens within a row and share some across rows."""
    rng = np.random.default_rng(seed)
    logits = (3 * rng.standard_normal((B, V))).astype(np.float32)
    top = rng.integers(V)
    logits[2, top] = logits[2].max() + 12
    ids = rng.integers(0, V, (B, T))
    ids[:, -3:] = ids[:, :3]
    ids[1, :4] = ids[0, :4]
    ids[2][ids[2] == top] = (top + 1) % V  # unpenalised, so that it stays on top
    return logits, ids


def assert_same_as_hf(ours, expected, what=""):
    ours = np.asarray(ours)
    assert ours.dtype == np.float32 and ours.shape == expected.shape, what
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(expected),
                                  err_msg=f"{what}: the filtered tokens differ")
    finite = np.isfinite(expected)
    np.testing.assert_allclose(ours[finite], expected[finite], rtol=1e-6, atol=0, err_msg=what)


# (Sampling, V): each processor alone, its no-op settings, then several together. Mostly V = 257
# and few top_k values: eager JAX compiles each op once per shape, and that is most of the time.
ALONE = [
    (Sampling(repetition_penalty=1.3), 257),
    (Sampling(do_sample=True, repetition_penalty=0.7), 257),
    (Sampling(do_sample=True, temperature=0.7), 257),
    (Sampling(do_sample=True, temperature=1.6), 257),
    (Sampling(do_sample=True, top_k=10), 257),
    (Sampling(do_sample=True, top_k=1), 257),
    (Sampling(do_sample=True, top_k=300), 257),  # > V: clamped to V, keeps everything
    (Sampling(do_sample=True, top_k=0), 257),
    (Sampling(do_sample=True, top_p=0.8), 257),
    (Sampling(do_sample=True, top_p=0.3), 257),
    (Sampling(do_sample=True, top_p=1.0), 257),
    (Sampling(do_sample=True, min_p=0.1), 257),
    (Sampling(do_sample=True, min_p=0.0), 257),
    (Sampling(do_sample=True, min_p=1.0), 257),
]
TOGETHER = [
    (Sampling(do_sample=True, top_k=40, top_p=0.9), 257),  # top_p cuts inside the top 40
    (Sampling(do_sample=True, top_k=40, top_p=0.5), 257),
    (Sampling(do_sample=True, top_k=40, top_p=0.9999), 257),  # top_p keeps all 40
    (Sampling(do_sample=True, top_k=300, top_p=0.8), 257),  # top_k > V: top_p sorts the row
    (Sampling(do_sample=True, top_p=0.9, min_p=0.05), 257),
    (Sampling(do_sample=True, top_k=10, min_p=0.2), 257),
    # V >= 4096: top_k in two stages, over chunks of 1024 logits
    (Sampling(do_sample=True, temperature=0.8, top_k=40, top_p=0.9, min_p=0.05,
              repetition_penalty=1.2), 5000),
    (Sampling(do_sample=True, temperature=2.5, top_k=40, top_p=0.7, min_p=0.01,
              repetition_penalty=0.8), 257),
    (Sampling(do_sample=True, temperature=1.3, top_p=0.6, min_p=0.1, repetition_penalty=1.5),
     257),
    # greedy: only the repetition penalty acts
    (Sampling(temperature=0.5, top_k=5, top_p=0.5, min_p=0.5, repetition_penalty=1.5), 257),
]


@pytest.mark.parametrize("s, V", ALONE + TOGETHER, ids=lambda c: repr(c))
def test_process_logits_matches_hugging_face(s, V):
    logits, ids = random_case(zlib.crc32(repr(s).encode()), V)
    expected = hf_process(logits, ids, s)
    seen = seen_tokens(ids, V) if s.repetition_penalty is not None else None
    assert_same_as_hf(process_logits(jnp.asarray(logits), s, seen), expected, repr(s))
    filters = s.do_sample and ((s.top_k or V) < V or (s.top_p or 1.0) < 1.0 or s.min_p)
    assert (np.isneginf(expected).any() if filters else np.isfinite(expected).all()), \
        "a case that filters should filter something; the no-ops nothing"
    if s.do_sample and s.top_p is not None and s.top_p < 1.0:
        assert np.isfinite(expected[2]).sum() == 1, "row 2's top token should hold mass > top_p"


def test_repetition_penalty_acts_in_both_directions():
    """The penalty changes exactly the seen tokens: a positive logit shrinks under 1.3, a negative
    one grows in magnitude; under 0.7 the other way round."""
    logits, ids = random_case(0, 257)
    seen = np.asarray(seen_tokens(ids, 257))
    for r in (1.3, 0.7):
        out = np.asarray(process_logits(jnp.asarray(logits), Sampling(repetition_penalty=r),
                                        jnp.asarray(seen)))
        np.testing.assert_array_equal(out[~seen], logits[~seen])
        x = logits[seen]
        np.testing.assert_allclose(out[seen], np.where(x < 0, x * np.float32(r), x / np.float32(r)),
                                   rtol=1e-6)  # XLA divides by a constant as x * (1 / r)


def test_reference_is_hugging_faces_generate_order():
    """hf_processors builds what GenerationMixin._get_logits_processor builds for the same
    GenerationConfig: the same processors, parameters and order."""
    class Generator(GenerationMixin):
        pass

    for s, _ in ALONE + TOGETHER:
        config = GenerationConfig(do_sample=s.do_sample, temperature=s.temperature, top_k=s.top_k,
                                  top_p=s.top_p, min_p=s.min_p,
                                  repetition_penalty=s.repetition_penalty)
        built = Generator()._get_logits_processor(config)
        assert [(type(p), vars(p)) for p in built] == \
            [(type(p), vars(p)) for p in hf_processors(s)], repr(s)


# ------------------------------------------------------------------------------------ ties

def _tie_rows():
    """[4, 12] logits with deliberate ties, ids [4, 2]. Row 0: 5 at index 7, seven 2s (indices
    0, 1, 2, 4, 8, 9, 11), 0 elsewhere. Row 1: 6 at index 3, three 3s (1, 5, 10), 1 elsewhere.
    Rows 2, 3: rows 0, 1 permuted."""
    rows = np.zeros((2, 12), np.float32)
    rows[0, 7], rows[0, [0, 1, 2, 4, 8, 9, 11]] = 5, 2
    rows[1], rows[1, 3], rows[1, [1, 5, 10]] = 1, 6, 3
    perm = np.random.default_rng(3).permutation(12)
    return np.concatenate([rows, rows[:, perm]]), np.zeros((4, 2), np.int64)


# top_k=6: in row 0, lax.top_k's candidates are the 5 and five 2s, two more 2s (the extras) stay
# too; top_p's ascending cumulative sums over the seven 2s are 0.037 j, j = 1..7, then 1. In row
# 1 the candidates are 6, the 3s and two 1s, with six more 1s: sums 0.0056 j over the eight 1s,
# then 0.086, 0.128, 0.169 over the 3s, then 1.
TIE_SETTINGS = [
    Sampling(do_sample=True, top_k=6),               # row 0 keeps 8 tokens, row 1 all 12
    Sampling(do_sample=True, top_p=0.95),
    Sampling(do_sample=True, top_p=0.9),
    Sampling(do_sample=True, top_k=6, top_p=0.99),   # row 1: removes 1 of its 6 extras
    Sampling(do_sample=True, top_k=6, top_p=0.95),   # row 0: 1 of its 2 extras; row 1: all 1s
    Sampling(do_sample=True, top_k=6, top_p=0.9),    # row 0: both extras; row 1: 1s and a 3
    Sampling(do_sample=True, top_k=6, top_p=0.85),   # row 0: both extras and 2 candidates
    Sampling(do_sample=True, top_k=6, top_p=0.5),    # only the top token is left
    Sampling(do_sample=True, min_p=0.04),            # keeps the runs of 2s and 3s whole
]


@pytest.mark.parametrize("s", TIE_SETTINGS, ids=repr)
def test_ties_match_hugging_face_with_a_stable_sort(s):
    logits, ids = _tie_rows()
    expected = hf_process(logits, ids, s)
    assert_same_as_hf(process_logits(jnp.asarray(logits), s), expected, repr(s))


def test_ties_in_long_rows_keep_hugging_faces_count():
    """bf16-like logits (multiples of 1/4) over V=5000 have long runs of equal values, which top_p
    cuts through. torch's sort is not stable there, so which of the equal tokens stay may differ
    from Hugging Face's; how many stay and their values may not."""
    rng = np.random.default_rng(4)
    logits = (np.round(4 * rng.standard_normal((B, 5000))) / 4).astype(np.float32)
    for s in [Sampling(do_sample=True, top_k=40, top_p=0.9), Sampling(do_sample=True, top_p=0.6),
              Sampling(do_sample=True, top_k=40, top_p=0.5)]:
        expected = hf_process(logits, np.zeros((B, 1)), s)
        ours = np.asarray(process_logits(jnp.asarray(logits, jnp.bfloat16), s))
        assert ours.dtype == np.float32
        for row in range(B):
            np.testing.assert_array_equal(np.sort(ours[row][np.isfinite(ours[row])]),
                                          np.sort(expected[row][np.isfinite(expected[row])]),
                                          err_msg=repr(s))


# --------------------------------------------------------------------------------- choosing

def test_greedy_ignores_the_warpers_and_takes_the_first_maximum():
    logits, ids = random_case(5, 257)
    s = Sampling(temperature=0.3, top_k=2, top_p=0.1, min_p=0.9, repetition_penalty=1.4)
    processed = process_logits(jnp.asarray(logits), s, seen_tokens(ids, 257))
    expected = hf_process(logits, ids, s)
    assert_same_as_hf(processed, expected)
    tokens = select_tokens(processed, s)
    assert tokens.dtype == jnp.int32
    np.testing.assert_array_equal(tokens, torch.argmax(torch.from_numpy(expected), -1).numpy())
    logits[:, [3, 17, 200]] = logits.max() + 1  # a three-way tie for every row's maximum
    np.testing.assert_array_equal(select_tokens(jnp.asarray(logits), Sampling()), [3, 3, 3])
    np.testing.assert_array_equal(torch.argmax(torch.from_numpy(logits), -1).numpy(), [3, 3, 3])


def _chi2_threshold(df: int, false_alarm: float) -> float:
    """x with P(chi2_df > x) = false_alarm, for even df: that tail is the Poisson(x / 2)
    probability of fewer than df / 2 events, solved for x by bisection."""
    assert df % 2 == 0

    def tail(x):
        return math.exp(-x / 2) * sum((x / 2) ** j / math.factorial(j) for j in range(df // 2))

    lo, hi = 0.0, 1000.0
    for _ in range(100):
        lo, hi = ((lo + hi) / 2, hi) if tail((lo + hi) / 2) > false_alarm else (lo, (lo + hi) / 2)
    return hi


def test_sampled_frequencies_follow_the_filtered_softmax():
    """N = 20000 draws over V = 12, with temperature, top_k (removes 6 tokens) and top_p (1 more):
    the 5 kept tokens' counts against N softmax(processed logits) by Pearson's chi-square, 4
    degrees of freedom, at a false-alarm rate of 1e-6 (threshold 33.4, computed here; every
    expected count is over 1000). The filtered tokens are never drawn. The tie tests' shape and
    top_k: eager JAX compiles nothing new for process_logits."""
    N = 20000
    row = np.array([0.3, -1.0, 2.0, 0.0, 1.0, -0.5, 1.5, 0.7, -2.0, -1.5, 0.1, -0.3], np.float32)
    logits = np.tile(row, (4, 1))
    s = Sampling(do_sample=True, temperature=0.9, top_k=6, top_p=0.9)
    processed = process_logits(jnp.asarray(logits), s)
    assert_same_as_hf(processed, hf_process(logits, np.zeros((4, 1)), s))
    processed = np.asarray(processed[0])
    kept = np.isfinite(processed)
    assert kept.sum() == 5
    p = np.exp(processed[kept].astype(np.float64) - processed.max())
    expected = N * p / p.sum()
    tokens = select_tokens(jnp.broadcast_to(processed, (N, 12)), s, jax.random.key(0))
    counts = np.bincount(np.asarray(tokens), minlength=12)
    assert counts[~kept].sum() == 0, f"filtered tokens drawn: {counts}"
    chi2 = float(np.sum((counts[kept] - expected) ** 2 / expected))
    threshold = _chi2_threshold(4, 1e-6)
    assert 33 < threshold < 34
    assert chi2 < threshold, (chi2, counts, expected)


def test_the_key_decides_the_tokens():
    """Over a flat distribution (B = 3 rows, V = 5000, the shape of other tests: no new
    compilation), the same key gives the same tokens, and each of two other keys other tokens
    (all 3 equal by chance: probability 5000^-3 = 8e-12 each)."""
    s = Sampling(do_sample=True)
    logits = jnp.zeros((B, 5000))
    first = np.asarray(select_tokens(logits, s, jax.random.key(1)))
    np.testing.assert_array_equal(first, np.asarray(select_tokens(logits, s, jax.random.key(1))))
    for seed in (2, 3):
        assert (first != np.asarray(select_tokens(logits, s, jax.random.key(seed)))).any()


def test_under_jit_with_sampling_static_and_key_traced():
    """A jitted choice equals the eager one; another key, or an equal Sampling, does not retrace."""
    s = Sampling(do_sample=True, temperature=0.8, top_k=40, top_p=0.9, min_p=0.05,
                 repetition_penalty=1.2)
    logits, ids = random_case(6, 5000)
    logits, seen = jnp.asarray(logits), seen_tokens(ids, 5000)
    traces = []

    @functools.partial(jax.jit, static_argnames="sampling")
    def choose(logits, seen, key, sampling):
        traces.append(1)
        processed = process_logits(logits, sampling, seen)
        return processed, select_tokens(processed, sampling, key)

    for seed, sampling in [(0, s), (1, dataclasses.replace(s))]:
        key = jax.random.key(seed)
        processed, tokens = choose(logits, seen, key, sampling)
        eager = process_logits(logits, s, seen)
        assert_same_as_hf(processed, np.asarray(eager))
        np.testing.assert_array_equal(tokens, select_tokens(eager, s, key))
    assert len(traces) == 1


# ------------------------------------------------------------------------------------- seen

def test_seen_tokens_and_mark_seen():
    _, ids = random_case(7, 257)  # rows with repeated ids
    seen = np.asarray(seen_tokens(jnp.asarray(ids, jnp.int32), 257))
    expected = np.zeros((B, 257), bool)
    for row, tokens in enumerate(ids):
        expected[row, tokens] = True
    np.testing.assert_array_equal(seen, expected)
    new = np.array([ids[0, 0], 256, 0])  # one already seen
    marked = np.asarray(mark_seen(jnp.asarray(seen), jnp.asarray(new, jnp.int32)))
    expected[np.arange(B), new] = True
    np.testing.assert_array_equal(marked, expected)
    assert marked.dtype == np.bool_


# ------------------------------------------------------------------------------ bad arguments

@pytest.mark.parametrize("field, value", [
    ("do_sample", 1), ("do_sample", "yes"),
    ("temperature", 0.0), ("temperature", -1.0), ("temperature", math.nan),
    ("temperature", math.inf), ("temperature", True), ("temperature", "0.7"), ("temperature", None),
    ("top_k", -1), ("top_k", 2.0), ("top_k", True),
    ("top_p", 0.0), ("top_p", 1.5), ("top_p", -0.1), ("top_p", True), ("top_p", math.nan),
    ("min_p", -0.1), ("min_p", 1.01), ("min_p", False),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.2), ("repetition_penalty", True),
    ("repetition_penalty", math.inf),
])
def test_invalid_settings_raise_naming_the_field(field, value):
    settings = {"do_sample": True, field: value}
    with pytest.raises(ValueError, match=field):
        Sampling(**settings)


def test_valid_settings_are_normalised():
    s = Sampling(do_sample=np.bool_(True), temperature=2, top_k=np.int64(5), top_p=1,
                 min_p=0, repetition_penalty=1)
    assert (s.do_sample, s.temperature, s.top_k, s.top_p, s.min_p, s.repetition_penalty) == \
        (True, 2.0, 5, 1.0, 0.0, 1.0)
    assert type(s.temperature) is float and type(s.top_k) is int and type(s.do_sample) is bool
    assert hash(s) == hash(Sampling(True, 2.0, 5, 1.0, 0.0, 1.0))
    Sampling(temperature=0.0)  # ignored without do_sample, as Hugging Face ignores it


def test_bad_call_arguments_raise():
    logits = np.zeros((2, 10), np.float32)
    penalty = Sampling(repetition_penalty=1.1)
    with pytest.raises(ValueError, match="seen"):
        process_logits(logits, penalty)
    with pytest.raises(ValueError, match="seen"):
        process_logits(logits, penalty, np.zeros((2, 11), bool))
    with pytest.raises(ValueError, match="seen"):
        process_logits(logits, penalty, np.zeros((2, 10), np.int32))
    with pytest.raises(ValueError, match="key"):
        select_tokens(logits, Sampling(do_sample=True))
    with pytest.raises(ValueError, match="logits"):
        process_logits(np.zeros((10,), np.float32), Sampling())
    with pytest.raises(ValueError, match="logits"):
        select_tokens(np.zeros((2, 10), np.int32), Sampling())
    with pytest.raises(ValueError, match="sampling"):
        process_logits(logits, {"do_sample": True})
    with pytest.raises(ValueError, match="vocab_size"):
        seen_tokens(np.zeros((2, 3), np.int32), 0)
    with pytest.raises(ValueError, match="ids"):
        seen_tokens(np.zeros((2, 3), np.float32), 10)
    with pytest.raises(ValueError, match="tokens"):
        mark_seen(np.zeros((2, 10), bool), np.zeros((3,), np.int32))


# ------------------------------------------------------------------------------- per row

@functools.partial(jax.jit, static_argnums=2)  # rows and keys traced, filters static
def _choose_rows(logits, rows, filters, seen, keys):
    processed = process_logits_rows(logits, rows, filters, seen)
    return processed, select_tokens_rows(processed, rows, filters, keys)


def _mixed_logits(n, V, seed):
    """fp32 [n, V], 3 N(0, 1) (no zeros), with in every third row (from 0) one token 200 above
    the rest, so that every other token's probability underflows to 0, and every third row (from
    1) rounded to integers: long runs of equal logits, which top_k's k-th value and top_p's cut
    fall into."""
    logits = (3 * np.random.default_rng(seed).standard_normal((n, V))).astype(np.float32)
    logits[0::3, 7] = logits[0::3].max(axis=-1) + 200
    logits[1::3] = np.round(logits[1::3]) + 0.5  # halves: still no zeros
    return logits


def _rows_match_the_static_path(logits, settings, seen=None, keys=None):
    """process_logits_rows and select_tokens_rows on the batch (jitted: rows traced, filters
    static) against each row alone, process_logits then select_tokens with the row's key:
    (processed logits, tokens, filters). keys: default jax.random.split(jax.random.key(0), S)."""
    S = len(settings)
    rows, filters = RowSampling.of(settings), RowFilters.of(settings, logits.shape[1])
    keys = jax.random.split(jax.random.key(0), S) if keys is None else keys
    processed, tokens = map(np.asarray, _choose_rows(logits, rows, filters, seen, keys))
    assert tokens.dtype == np.int32 and tokens.shape == (S,)
    for i, s in enumerate(settings):
        alone = process_logits(logits[i:i + 1], s, None if seen is None else seen[i:i + 1])
        assert_same_as_hf(processed[i:i + 1], np.asarray(alone), what=f"row {i}: {s}")
        assert tokens[i] == int(select_tokens(alone, s, keys[i])[0]), f"row {i}: {s}"
    return processed, tokens, filters


# Every top_p row has a top_k (of several sizes): top_p works on the candidates. Few distinct
# top_k with top_p, since process_logits compiles its top_p once per k.
ON_CANDIDATES = [
    Sampling(),
    Sampling(temperature=0.5, top_k=5, top_p=0.5, min_p=0.5, repetition_penalty=1.5),  # greedy
    Sampling(do_sample=True, top_k=1),
    Sampling(do_sample=True, top_k=10),
    Sampling(do_sample=True, top_k=40, top_p=0.9),
    Sampling(do_sample=True, top_k=40, top_p=0.5),
    Sampling(do_sample=True, top_k=40, top_p=0.9999),  # keeps all 40
    Sampling(do_sample=True, temperature=0.7, top_k=10, top_p=0.3),
    Sampling(do_sample=True, top_k=300),  # >= V: off
    Sampling(do_sample=True, top_k=0, top_p=1.0, min_p=0.0),  # all off
    Sampling(do_sample=True, min_p=0.1),
    Sampling(do_sample=True, top_k=10, min_p=0.2),
    Sampling(do_sample=True, temperature=1.6, top_k=10, top_p=0.8, repetition_penalty=1.2),
    Sampling(do_sample=True, temperature=0.7),
    Sampling(do_sample=True, top_k=40, top_p=0.6, min_p=0.05, repetition_penalty=0.8),
    Sampling(repetition_penalty=0.7),
]
# The same with rows of top_p alone: top_p sorts every row, after top_k's filter.
SORTED = ON_CANDIDATES + [
    Sampling(do_sample=True, top_p=0.8),
    Sampling(do_sample=True, temperature=1.3, top_p=0.6, min_p=0.1, repetition_penalty=1.5),
    Sampling(do_sample=True, top_k=300, top_p=0.3),  # top_k >= V: top_p alone
]


@pytest.mark.parametrize("settings, sorts", [(ON_CANDIDATES, False), (SORTED, True)],
                         ids=["top_p_on_candidates", "top_p_sorts"])
def test_each_row_with_its_own_settings_equals_the_static_path(settings, sorts):
    """Every row as process_logits and select_tokens give it alone: the same tokens filtered out,
    the same values elsewhere, the same token, in a batch whose other rows use processors it
    does not and other top_k. Rows whose top_k, top_p and min_p are off keep every token, even
    where all but one probability underflows to 0 (_mixed_logits)."""
    V = 257
    logits = _mixed_logits(len(settings), V, seed=3)
    seen = np.asarray(seen_tokens(np.random.default_rng(4).integers(0, V, (len(settings), T)), V))
    ours, _, filters = _rows_match_the_static_path(logits, settings, seen)
    assert filters == RowFilters(sample=True, repetition_penalty=True, temperature=True,
                                 top_k_cap=64, top_p=True, top_p_sorts=sorts, min_p=True)
    off = [i for i, s in enumerate(settings)
           if (f := RowFilters.of([s], V)).top_k_cap is None and not (f.top_p or f.min_p)]
    assert any(i % 3 == 0 for i in off), "an off row whose tail underflows (_mixed_logits)"
    assert np.isfinite(ours[off]).all()


def test_each_row_equals_the_static_path_with_top_k_over_chunks():
    """V = 5000: top_k's cap (64) found in two stages over chunks of the row (_top_k_values).
    Three settings, each on the 3 rows of the V = 5000 case of the Hugging Face test, compared
    by blocks of 3 rows with process_logits on them (the shapes that test compiles)."""
    together = next(s for s, V in TOGETHER if V == 5000)
    cases = [together, Sampling(do_sample=True, top_k=7), Sampling(repetition_penalty=1.2)]
    logits, ids = random_case(zlib.crc32(repr(together).encode()), 5000)
    seen = seen_tokens(ids, 5000)
    settings = [s for s in cases for _ in logits]
    rows, filters = RowSampling.of(settings), RowFilters.of(settings, 5000)
    assert filters.top_k_cap == 64 and not filters.top_p_sorts
    ours = np.asarray(_choose_rows(np.tile(logits, (3, 1)), rows, filters, np.tile(seen, (3, 1)),
                                   jax.random.split(jax.random.key(0), 9))[0])
    for j, s in enumerate(cases):
        assert_same_as_hf(ours[3 * j:3 * j + 3], np.asarray(process_logits(logits, s, seen)),
                          repr(s))


@pytest.mark.parametrize("with_top_p_alone", [True, False], ids=["top_p_sorts", "on_candidates"])
def test_ties_per_row_equal_the_static_path(with_top_p_alone):
    """The 4 tie rows (_tie_rows) under each tie setting and a top_k of 3 (cap 8: some ties of a
    row's k-th value are among the cap's largest values but outside its own top k), all in one
    batch, with and without the settings of top_p alone (which make top_p sort every row). Each
    block of 4 rows against process_logits on the 4 tie rows with its setting."""
    cases = [s for s in TIE_SETTINGS if with_top_p_alone or s.top_k or s.top_p is None]
    cases.append(Sampling(do_sample=True, top_k=3, top_p=0.9))
    tie_logits, _ = _tie_rows()
    settings = [s for s in cases for _ in tie_logits]
    rows, filters = RowSampling.of(settings), RowFilters.of(settings, 12)
    assert filters.top_k_cap == 8 and filters.top_p_sorts == with_top_p_alone
    keys = jax.random.split(jax.random.key(0), len(settings))
    ours = np.asarray(_choose_rows(np.tile(tie_logits, (len(cases), 1)), rows, filters, None,
                                   keys)[0])
    for j, s in enumerate(cases):
        expected = np.asarray(process_logits(tie_logits, s))
        assert_same_as_hf(ours[4 * j:4 * j + 4], expected, repr(s))


def test_each_rows_token_is_its_own_draw():
    """On the top_p_on_candidates batch (the same compiled program): each row's token is the one
    it gets alone with its key (_rows_match_the_static_path); greedy rows take the first maximum
    on ties; the same keys give the same tokens, other keys other draws in sampled rows only."""
    settings, V = ON_CANDIDATES, 257
    logits = _mixed_logits(len(settings), V, seed=5)
    logits[0, 100] = logits[0, 7]  # row 0, greedy without penalty: its maximum tied at 7 and 100
    seen = np.asarray(seen_tokens(np.random.default_rng(6).integers(0, V, (len(settings), T)), V))
    keys = jax.random.split(jax.random.key(1), len(settings))
    _, tokens, _ = _rows_match_the_static_path(logits, settings, seen, keys)
    assert tokens[0] == 7
    rows = RowSampling.of(settings)
    filters = RowFilters.of(settings, V)
    again = np.asarray(_choose_rows(logits, rows, filters, seen, keys)[1])
    np.testing.assert_array_equal(again, tokens)
    other = np.asarray(_choose_rows(logits, rows, filters, seen,
                                    jax.random.split(jax.random.key(2), len(settings)))[1])
    sampled = np.asarray(rows.do_sample)
    np.testing.assert_array_equal(other[~sampled], tokens[~sampled])
    assert (other[sampled] != tokens[sampled]).sum() >= 3


def test_row_sampling_holds_each_rows_settings():
    rows = RowSampling.of([Sampling(do_sample=True, temperature=0.7, top_k=5, top_p=0.9,
                                    min_p=0.1, repetition_penalty=1.3),
                           Sampling(temperature=0.5, top_k=5, top_p=0.5, min_p=0.5),  # greedy
                           Sampling(do_sample=True, top_p=1.0, min_p=0.0)])
    assert [a.dtype for a in rows] == [np.bool_, np.float32, np.int32, np.float32, np.float32,
                                       np.float32]
    np.testing.assert_array_equal(rows.do_sample, [True, False, True])
    np.testing.assert_array_equal(rows.temperature, np.float32([0.7, 1.0, 1.0]))
    np.testing.assert_array_equal(rows.top_k, [5, 0, 0])
    # 1 - p and log(m) in double, then rounded, as process_logits has them: not fp32 arithmetic
    np.testing.assert_array_equal(rows.top_p_threshold, np.float32([1.0 - 0.9, 0.0, 0.0]))
    assert rows.top_p_threshold[0] != np.float32(1) - np.float32(0.9)
    np.testing.assert_array_equal(rows.log_min_p, np.float32([math.log(0.1), -np.inf, -np.inf]))
    np.testing.assert_array_equal(rows.repetition_penalty, np.float32([1.3, 1.0, 1.0]))


def test_row_filters_say_what_any_row_uses():
    of = RowFilters.of
    greedy = Sampling(temperature=0.5, top_k=5, top_p=0.5, min_p=0.5)
    assert of([Sampling(), greedy], 100) == RowFilters()
    assert of([Sampling(do_sample=True, top_k=100, top_p=1.0, min_p=0.0)], 100) == \
        RowFilters(sample=True)
    assert of([greedy, Sampling(repetition_penalty=1.0)], 100) == \
        RowFilters(repetition_penalty=True)  # seen is required even for 1.0, as process_logits
    # the cap: the least power of two >= every sampled row's top_k below V, at most V
    for ks, cap in [([1], 1), ([2], 2), ([33], 64), ([64, 3], 64), ([65], 100), ([99], 100),
                    ([100, 7], 8), ([0, 300], None)]:
        settings = [Sampling(do_sample=True, top_k=k) for k in ks] + [Sampling(top_k=99)]
        assert of(settings, 100).top_k_cap == cap, ks
    assert of([Sampling(do_sample=True, temperature=0.7)], 100) == \
        RowFilters(sample=True, temperature=True)
    assert of([Sampling(do_sample=True, top_k=5, top_p=0.9), Sampling(do_sample=True, min_p=0.1)],
              100) == RowFilters(sample=True, top_k_cap=8, top_p=True, min_p=True)
    assert of([Sampling(do_sample=True, top_k=5), Sampling(do_sample=True, top_k=100, top_p=0.9)],
              100) == RowFilters(sample=True, top_k_cap=8, top_p=True, top_p_sorts=True)
    hash(of([Sampling(do_sample=True, top_k=5)], 100))  # a static jit argument
    for bad, match in [(dict(top_k_cap=0), "top_k_cap"), (dict(top_k_cap=True), "top_k_cap"),
                       (dict(top_p=True), "top_k_cap"), (dict(top_p_sorts=True), "top_p")]:
        with pytest.raises(ValueError, match=match):
            RowFilters(sample=True, **bad)
    with pytest.raises(ValueError, match="vocab_size"):
        of([Sampling()], 0)
    with pytest.raises(ValueError, match="sampling"):
        of([{"do_sample": True}], 100)


def test_bad_row_arguments_raise():
    penalty = [Sampling(repetition_penalty=1.1)] * 2
    rows, filters = RowSampling.of(penalty), RowFilters.of(penalty, 10)
    logits = jnp.ones((2, 10))
    with pytest.raises(ValueError, match="seen must be a bool array .* when "
                                         "filters.repetition_penalty is set, got None"):
        process_logits_rows(logits, rows, filters)
    with pytest.raises(ValueError, match=r"seen .*got int32\[2, 10\]"):
        process_logits_rows(logits, rows, filters, np.zeros((2, 10), np.int32))
    with pytest.raises(ValueError, match=r"rows.do_sample must be a bool array \[S\] = \[3\], "
                                         r"got bool\[2\]"):
        process_logits_rows(jnp.ones((3, 10)), rows, filters)
    for field, value, word in [("top_k", np.zeros(2, np.float32), "integer"),
                               ("do_sample", np.zeros(2, np.int32), "bool"),
                               ("temperature", np.ones(2, np.int32), "float"),
                               ("log_min_p", [0.0, 0.0], "float")]:
        with pytest.raises(ValueError, match=f"rows.{field} must be a {word} array"):
            process_logits_rows(logits, rows._replace(**{field: value}), filters)
    with pytest.raises(ValueError, match="rows must be a jtgpt.sampling.RowSampling"):
        process_logits_rows(logits, tuple(rows), filters)
    with pytest.raises(ValueError, match="filters must be a jtgpt.sampling.RowFilters"):
        select_tokens_rows(logits, rows, penalty[0])
    with pytest.raises(ValueError, match="logits"):
        process_logits_rows(jnp.ones(10), rows, filters)
    sampled = [Sampling(do_sample=True)] * 2
    rows, filters = RowSampling.of(sampled), RowFilters.of(sampled, 10)
    for keys in [jax.random.split(jax.random.key(0), 3), jax.random.split(jax.random.PRNGKey(0)),
                 None]:
        with pytest.raises(ValueError, match=r"keys must be a jax key array \[S\] = \[2\]"):
            select_tokens_rows(logits, rows, filters, keys)
    select_tokens_rows(logits, RowSampling.of([Sampling()] * 2), RowFilters(), None)  # no keys


def test_filters_that_do_not_cover_the_rows_raise():
    """Filters built for other settings would silently skip a processor some row uses."""
    logits = jnp.ones((2, 100))
    for used, given, missing in [
            (Sampling(do_sample=True, top_k=20), Sampling(do_sample=True, top_k=10),
             "filters.top_k_cap >= 20"),
            (Sampling(do_sample=True, top_p=0.9), Sampling(do_sample=True, top_k=5, top_p=0.9),
             "filters.top_p_sorts"),
            (Sampling(do_sample=True, temperature=0.5), Sampling(do_sample=True), "temperature"),
            (Sampling(do_sample=True, min_p=0.1), Sampling(do_sample=True), "filters.min_p"),
            (Sampling(repetition_penalty=1.2), Sampling(), "filters.repetition_penalty"),
            (Sampling(do_sample=True), Sampling(), "filters.sample")]:
        with pytest.raises(ValueError, match=f"filters do not cover rows: rows need .*{missing}"):
            process_logits_rows(logits, RowSampling.of([Sampling(), used]),
                                RowFilters.of([Sampling(), given], 100), np.zeros((2, 100), bool))
