"""Token selection for text generation, with Hugging Face `generate`'s semantics: the logits
processors (`process_logits`), then the choice of each row's next token (`select_tokens`). Both
run under jax.jit with the `Sampling` settings static.

Hugging Face's order (transformers 4.57.6, generation/utils.py: GenerationMixin.
_get_logits_processor appends the repetition penalty in every mode, and the warpers only when
do_sample, in this order; _sample casts the next token's logits to fp32 and applies the list),
on the fp32 logits x [B, V] of the next token:

    repetition_penalty r   x_i <- x_i r if x_i < 0 else x_i / r, for each token i seen so far
    temperature T          x <- x / T                                       (do_sample only)
    top_k k                x_i <- -inf where x_i < x_(k), the k-th largest     (do_sample only)
    top_p p                x_i <- -inf where c_i <= 1 - p, except the top one  (do_sample only)
    min_p m                x_i <- -inf where p_i < m max_j p_j, p = softmax(x) (do_sample only)

For top_p, the tokens are ordered by ascending logit and c_i is the softmax probability summed
over token i and everything before it, the tokens top_k filtered out adding nothing: the most
probable tokens whose mass reaches p are kept, and always the most probable one
(min_tokens_to_keep = 1). k is clamped to V, and every token tied with x_(k) stays. Filtered
tokens get -inf (filter_value). The no-ops are not applied, as in Hugging Face: temperature 1,
top_k 0 (or >= V), top_p 1, min_p 0. min_p is tested as x_i - max x < log(m), the same test on
the logits: the softmax's normaliser cancels. Each processor's math is its class's `__call__` in
generation/logits_process.py: RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
TopKLogitsWarper, TopPLogitsWarper, MinPLogitsWarper.

Then greedy decoding takes each row's argmax, the first on ties as
torch.argmax, and sampling draws a token from softmax(x), here with jax.random.categorical.

Cost (once per generated token, V up to 128256): top_k alone is lax.top_k's k-th value and a
compare; min_p a max and a compare. Hugging Face sorts the whole row for top_p; here it is
sorted only without top_k. With top_k, top_p works on lax.top_k's k candidates, plus a count of
the tokens tied with the k-th value that lax.top_k left out (top_k keeps them too, and each adds
the k-th's probability at the bottom of top_p's order): the same tokens as the full sort. Where
the cut falls inside a run of equal logits, a running count over the row (one scan, no sort)
says which of them go. XLA's lax.top_k sorts the whole row for k over 16 or so, so the top k are
found in two stages, over chunks of the row (_top_k_values). (Timings: bench/RESULTS.md.)

Per row (serving: every request its own settings, in one batch). RowSampling holds each row's
settings as arrays [S], traced under jit; RowFilters, static, says which processors any row
uses, so that the compiled program holds only those. process_logits_rows and select_tokens_rows
then give row i what process_logits and select_tokens give it alone, with the same math. A row
whose setting is off gets the identity: temperature 1, top_k 0, top_p's threshold -1 (no
cumulative sum is below it, so that not even the tokens whose probability underflows to 0 go),
log(min_p) = -inf; greedy rows keep the penalised logits. The thresholds 1 - top_p and
log(min_p) are computed in double on the host, as the static path has them. top_k: one
_top_k_values at a static cap, the least power of two >= every row's k (at most V), then each
row's k-th value (take_along_axis): the cost of top_k at the cap whatever the rows' k (two
stages over chunks for a cap up to 128; above, lax.top_k sorts the row). top_p after top_k:
where every top_p row has a top_k, on the cap's candidates as in the static path, each row
taking its own k largest (the others weigh 0); if some row uses top_p alone, every row is sorted
(at V = 128256, B = 64: 1.17 ms against 0.57 for top_k with top_p), after top_k's filter, whose
-inf add nothing to the cumulative sums. The values are the static path's to an ulp (a traced
temperature is a true division), the tokens kept the same but where fp32 rounding of the sums,
taken in another order, decides next to top_p's threshold. Sampled rows draw with their own
keys: a categorical over each row alone (vmapped), the random bits select_tokens draws for that
row.

Ties. top_k and min_p test values only, so ties are treated as in Hugging Face. top_p can cut
through a run of equal logits, keeping some of them: as many as Hugging Face keeps, but which
ones depends on torch.sort's order among equal values, which its default (stable=False) leaves
open; on CPU, torch 2.13 kept them in index order only in rows of at most 16 values. Here the
lowest indices go first, as under a stable ascending sort. Without ties, the tokens kept are
Hugging Face's up to fp32 rounding next to a threshold, and the values are its values to an ulp
(XLA divides by a constant as a product with its reciprocal).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

_CHUNK = 1024  # logits per chunk of the two-stage top_k (_top_k_values)


def _real(name: str, value, ok, expected: str) -> float:
    """float(value) after checking that it is a real number (not a bool) for which ok holds."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) \
            or not ok(float(value)):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return float(value)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. The fields and their defaults are Hugging Face
    GenerationConfig's, except that top_k is off by default here (Hugging Face's default is 50).
    None (and top_k 0) means off. temperature, top_k, top_p and min_p act only with do_sample;
    repetition_penalty acts in both modes and needs `seen` (see process_logits).

    Frozen and hashable: pass it to jax.jit as a static argument. Ints are accepted for floats and
    stored as floats.
    """
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None

    def __post_init__(self):
        if not isinstance(self.do_sample, (bool, np.bool_)):
            raise ValueError(f"do_sample must be a bool, got {self.do_sample!r}")
        fields = {"do_sample": bool(self.do_sample)}
        if self.do_sample:
            fields["temperature"] = _real("temperature", self.temperature,
                                          lambda t: 0 < t < math.inf,
                                          "a strictly positive finite float when do_sample=True")
        else:  # Hugging Face ignores it in greedy mode (with a warning); so does process_logits
            fields["temperature"] = _real("temperature", self.temperature, lambda t: True,
                                          "a float")
        if self.top_k is not None:
            if isinstance(self.top_k, (bool, np.bool_)) \
                    or not isinstance(self.top_k, numbers.Integral) or self.top_k < 0:
                raise ValueError(f"top_k must be a non-negative int (0 or None: off), "
                                 f"got {self.top_k!r}")
            fields["top_k"] = int(self.top_k)
        if self.top_p is not None:
            fields["top_p"] = _real("top_p", self.top_p, lambda p: 0 < p <= 1, "a float in (0, 1]")
        if self.min_p is not None:
            fields["min_p"] = _real("min_p", self.min_p, lambda m: 0 <= m <= 1,
                                    "a float in [0, 1]")
        if self.repetition_penalty is not None:
            fields["repetition_penalty"] = _real("repetition_penalty", self.repetition_penalty,
                                                 lambda r: 0 < r < math.inf,
                                                 "a strictly positive finite float")
        for name, value in fields.items():
            object.__setattr__(self, name, value)


def _check_sampling(sampling) -> None:
    if not isinstance(sampling, Sampling):
        raise ValueError(f"sampling must be a jtgpt.sampling.Sampling, "
                         f"got {type(sampling).__name__}")


def _check_logits(logits) -> None:
    if getattr(logits, "ndim", None) != 2 or not jnp.issubdtype(logits.dtype, jnp.floating):
        raise ValueError(f"logits must be a 2-D float array [B, V], got "
                         f"{getattr(logits, 'dtype', type(logits).__name__)}"
                         f"{list(getattr(logits, 'shape', ()))}")


def process_logits(logits, sampling: Sampling, seen=None):
    """The logits [B, V] (any float dtype) through Hugging Face's processors for `sampling`, in
    its order (module docstring): fp32 [B, V], -inf where a token is filtered out.

    seen [B, V] bool, required when sampling.repetition_penalty is set (even to 1.0): True for
    every token id in the row's sequence so far, prompt and padding included, as Hugging Face
    penalises every id in input_ids (seen_tokens, then mark_seen after each new token)."""
    _check_logits(logits)
    _check_sampling(sampling)
    x = jnp.asarray(logits, jnp.float32)
    if sampling.repetition_penalty is not None:
        x = _penalise_repetitions(x, seen, sampling.repetition_penalty,
                                  "when repetition_penalty is set")
    if not sampling.do_sample:
        return x
    if sampling.temperature != 1.0:
        x = x / sampling.temperature
    top_k, top_p = _active_top_k(sampling, x.shape[-1]), _active_top_p(sampling)
    if top_p is not None:
        # Hugging Face's threshold 1 - p, in double, rounded to fp32 as torch rounds a scalar
        x = jnp.where(_top_p_keep(x, 1.0 - top_p, top_k), x, -jnp.inf)
    elif top_k is not None:
        x = jnp.where(x >= _top_k_values(x, top_k)[:, -1:], x, -jnp.inf)
    if sampling.min_p:  # min_p 0 removes nothing
        x = jnp.where(_min_p_keep(x, math.log(sampling.min_p)), x, -jnp.inf)
    return x


def _active_top_k(sampling: Sampling, vocab_size: int) -> int | None:
    """The top_k that filters (sampling, 0 < top_k < V), or None: top_k >= V keeps every token."""
    k = sampling.top_k
    return k if sampling.do_sample and k and k < vocab_size else None


def _active_top_p(sampling: Sampling) -> float | None:
    """The top_p that filters (sampling, top_p < 1), or None."""
    p = sampling.top_p
    return p if sampling.do_sample and p is not None and p < 1.0 else None


def _penalise_repetitions(x, seen, penalty, when: str):
    """x with each seen token's logit penalised: x r if negative, x / r otherwise. penalty: a
    scalar or [B, 1]; `when` says in the error when seen is required."""
    if seen is None or getattr(seen, "shape", None) != x.shape or seen.dtype != jnp.bool_:
        raise ValueError(f"seen must be a bool array of the logits' shape {list(x.shape)} {when}, "
                         f"got {None if seen is None else f'{seen.dtype}{list(seen.shape)}'}")
    return jnp.where(seen, jnp.where(x < 0, x * penalty, x / penalty), x)


def _min_p_keep(x, log_min_p):
    """bool [B, V]: the tokens min_p keeps, log_min_p = log(min_p) (a scalar or [B, 1]).
    p_i >= m p_max  <=>  x_i - max x >= log(m): the softmax's normaliser cancels."""
    return x - jnp.max(x, axis=-1, keepdims=True) >= log_min_p


def _top_k_values(x, top_k: int):
    """[B, top_k]: the top_k largest logits of each row, descending, as lax.top_k gives them.

    For a small top_k and a long row, from the top_k largest of each chunk of _CHUNK logits: the
    same values, since each of a row's top_k largest is among its chunk's top_k largest. The
    chunks sort faster than the row: on an H200 at V = 128256, top_k = 50, 1.03 ms -> 0.45 ms at
    B = 64, 0.25 -> 0.11 ms at B = 8."""
    B, V = x.shape
    if V < 4 * _CHUNK or top_k > _CHUNK // 8:
        return jax.lax.top_k(x, top_k)[0]
    chunks = -(-V // _CHUNK)
    x = jnp.pad(x, ((0, 0), (0, chunks * _CHUNK - V)), constant_values=-jnp.inf)
    best = jax.lax.top_k(x.reshape(B, chunks, _CHUNK), top_k)[0]
    return jax.lax.top_k(best.reshape(B, chunks * top_k), top_k)[0]


@functools.partial(jax.jit, static_argnames="top_k")  # called eagerly: one compile, not one per op
def _top_p_keep(x, threshold, top_k: int | None, row_top_k=None):
    """bool [B, V]: the tokens that top_k (if not None, < V) and then top_p keep, threshold being
    1 - top_p (a scalar or [B, 1]). row_top_k (int32 [B, 1] in [1, top_k], or None: top_k for
    every row): each row's own k, top_k then being a static cap on them.

    From a sort of the row or from the top-k candidates, the same three numbers: where top_p
    cuts Hugging Face's ascending order (`removed`, the number of positions before the cut), the
    logit v at the cut, and `rank`, how many of the tokens equal to v lie before it: everything
    above v is kept, and of the tokens equal to v all but the first `rank`. A negative threshold
    removes nothing (no cumulative sum is below it), leaving top_k's filter alone."""
    if top_k is None:
        ascending = jnp.sort(x, axis=-1)  # Hugging Face's order
        cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
        removed = jnp.minimum(jnp.sum(cumulative <= threshold, axis=-1, keepdims=True),
                              x.shape[-1] - 1)
        v = jnp.take_along_axis(ascending, removed, axis=-1)
        below = jnp.sum(ascending < v, axis=-1, keepdims=True)
    else:
        top = _top_k_values(x, top_k)[:, ::-1]  # [B, top_k] ascending
        k = top_k if row_top_k is None else row_top_k
        # A row's candidates are its k largest logits: the last k of `top`, from `first` on.
        first = top_k - k
        candidate = jnp.arange(top_k) >= first
        kth = jnp.take_along_axis(top, jnp.broadcast_to(first, (x.shape[0], 1)), axis=-1)
        # top_k keeps every token tied with the k-th largest. The ones left out of the
        # candidates, `extra`, sit at the bottom of top_p's ascending order, each with
        # probability p_kth.
        extra = jnp.sum(x >= kth, axis=-1, keepdims=True) - k
        w = jnp.where(candidate, jnp.exp(top - top[:, -1:]), 0.0)
        w_kth = jnp.exp(kth - top[:, -1:])
        z = jnp.sum(w, axis=-1, keepdims=True) + extra * w_kth
        p_kth = w_kth / z
        cumulative = extra * p_kth + jnp.cumsum(w / z, axis=-1)
        removed_top = jnp.minimum(
            jnp.sum(candidate & (cumulative <= threshold), axis=-1, keepdims=True), k - 1)
        # The extras' own cumulative sums are j p_kth, j = 1..extra (p_kth = 0: all are removed).
        removed_extra = jnp.clip(jnp.floor(threshold / p_kth), 0, extra).astype(jnp.int32)
        # A candidate removed means every extra below it is removed too.
        removed = jnp.where(removed_top > 0, extra + removed_top, removed_extra)
        v = jnp.take_along_axis(top, first + removed_top, axis=-1)  # removed_top = 0: kth
        below = jnp.sum(candidate & (top < v), axis=-1, keepdims=True) \
            + jnp.where(v > kth, extra, 0)
    rank = removed - below  # of the tokens equal to v, this many are removed
    tied = x == v
    # A stable sort removes the lowest indices of a tie first (module docstring, "Ties").
    return (x > v) | (tied & (jnp.cumsum(tied, axis=-1, dtype=jnp.int32) > rank))


def select_tokens(logits, sampling: Sampling, key=None):
    """int32 [B]: each row's next token from logits [B, V] already through process_logits.
    Greedy (not sampling.do_sample): the argmax, the first index on ties, as torch.argmax.
    Sampling: a draw from softmax(logits) with jax.random.categorical; `key` (a jax.random key,
    required) makes it reproducible, the same key giving the same tokens."""
    _check_logits(logits)
    _check_sampling(sampling)
    if not sampling.do_sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if key is None:
        raise ValueError("key (a jax.random key) is required when do_sample=True")
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def seen_tokens(ids, vocab_size: int):
    """bool [B, vocab_size]: True where a token id occurs in that row of ids [B, T] (integer,
    every id in [0, vocab_size): jtgpt.generate checks the prompt's). The `seen` of
    process_logits at the start of generation: ids is the whole prompt, padding included."""
    if isinstance(vocab_size, (bool, np.bool_)) or not isinstance(vocab_size, numbers.Integral) \
            or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
    ids = jnp.asarray(ids)
    if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"ids must be a 2-D integer array [B, T], "
                         f"got {ids.dtype}{list(ids.shape)}")
    B = ids.shape[0]
    return jnp.zeros((B, int(vocab_size)), jnp.bool_).at[jnp.arange(B)[:, None], ids].set(True)


def mark_seen(seen, tokens):
    """seen [B, V] bool with each row's new token (tokens [B], integer ids in [0, V)) marked."""
    if getattr(seen, "ndim", None) != 2 or seen.dtype != jnp.bool_:
        raise ValueError(f"seen must be a 2-D bool array [B, V], got "
                         f"{getattr(seen, 'dtype', type(seen).__name__)}"
                         f"{list(getattr(seen, 'shape', ()))}")
    tokens = jnp.asarray(tokens)
    if tokens.shape != seen.shape[:1] or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be integer ids [B] = [{seen.shape[0]}], got "
                         f"{tokens.dtype}{list(tokens.shape)}")
    return seen.at[jnp.arange(seen.shape[0]), tokens].set(True)


class RowSampling(NamedTuple):
    """Each row's sampling settings as arrays [S] (a pytree: traced under jit), off values where a
    row does not use a processor, and for greedy rows (which use only repetition_penalty).
    `of` builds them (numpy) from one Sampling per row. top_p and min_p are held as the
    thresholds the processors compare with, computed in double as process_logits computes them,
    so that each row's threshold is the static path's to the bit."""
    do_sample: jax.Array           # bool
    temperature: jax.Array         # fp32, 1 when off
    top_k: jax.Array               # int32, 0 when off (k >= V also keeps every token)
    top_p_threshold: jax.Array     # fp32 1 - top_p, 0 when off
    log_min_p: jax.Array           # fp32 log(min_p), -inf when off
    repetition_penalty: jax.Array  # fp32, 1 when off

    @classmethod
    def of(cls, settings: Sequence[Sampling]) -> RowSampling:
        for sampling in settings:
            _check_sampling(sampling)
        f32 = functools.partial(np.array, dtype=np.float32)
        top_p = [_active_top_p(s) for s in settings]
        return cls(
            np.array([s.do_sample for s in settings], bool),
            f32([s.temperature if s.do_sample else 1.0 for s in settings]),
            np.array([(s.top_k or 0) if s.do_sample else 0 for s in settings], np.int32),
            f32([0.0 if p is None else 1.0 - p for p in top_p]),
            f32([math.log(s.min_p) if s.do_sample and s.min_p else -math.inf for s in settings]),
            f32([1.0 if s.repetition_penalty is None else s.repetition_penalty
                 for s in settings]))


@dataclasses.dataclass(frozen=True)
class RowFilters:
    """Which processors any row of a batch uses: static (hashable, a jax.jit static argument), so
    that the compiled program skips the others. `of` builds it from the batch's settings.

    top_k_cap: None if no sampled row has 0 < top_k < V, else a bound on those k: the least power
    of two >= the largest, at most V (one compiled program per power of two, not per k).
    top_p_sorts: some row uses top_p without top_k, so top_p sorts whole rows; otherwise every
    top_p row's top_p works on its top_k candidates, as process_logits does."""
    sample: bool = False
    repetition_penalty: bool = False  # some row has one, even 1.0: seen is required
    temperature: bool = False
    top_k_cap: int | None = None
    top_p: bool = False
    top_p_sorts: bool = False
    min_p: bool = False

    def __post_init__(self):
        cap = self.top_k_cap
        if cap is not None and (isinstance(cap, (bool, np.bool_))
                                or not isinstance(cap, numbers.Integral) or cap < 1):
            raise ValueError(f"top_k_cap must be a positive int or None, got {cap!r}")
        if self.top_p and not self.top_p_sorts and cap is None:
            raise ValueError("top_p without top_p_sorts works on top_k's candidates: it needs "
                             "top_k_cap")
        if self.top_p_sorts and not self.top_p:
            raise ValueError("top_p_sorts needs top_p")

    @classmethod
    def of(cls, settings: Sequence[Sampling], vocab_size: int) -> RowFilters:
        for sampling in settings:
            _check_sampling(sampling)
        if isinstance(vocab_size, (bool, np.bool_)) \
                or not isinstance(vocab_size, numbers.Integral) or vocab_size < 1:
            raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
        sampled = [s for s in settings if s.do_sample]
        ks = [k for k in (_active_top_k(s, vocab_size) for s in sampled) if k is not None]
        top_p = [s for s in sampled if _active_top_p(s) is not None]
        return cls(
            sample=bool(sampled),
            repetition_penalty=any(s.repetition_penalty is not None for s in settings),
            temperature=any(s.temperature != 1.0 for s in sampled),
            top_k_cap=min(1 << (max(ks) - 1).bit_length(), vocab_size) if ks else None,
            top_p=bool(top_p),
            top_p_sorts=any(_active_top_k(s, vocab_size) is None for s in top_p),
            min_p=any(bool(s.min_p) for s in sampled))


# Each RowSampling field's dtype, as a kind jnp.issubdtype checks and a word for the error
_ROW_KINDS = {"do_sample": (jnp.bool_, "bool"), "top_k": (jnp.integer, "integer")}
_FLOAT_KIND = (jnp.floating, "float")


def _check_rows(logits, rows: RowSampling, filters: RowFilters) -> None:
    _check_logits(logits)
    if not isinstance(rows, RowSampling):
        raise ValueError(f"rows must be a jtgpt.sampling.RowSampling, got {type(rows).__name__}")
    if not isinstance(filters, RowFilters):
        raise ValueError(f"filters must be a jtgpt.sampling.RowFilters, "
                         f"got {type(filters).__name__}")
    S, V = logits.shape
    for name, value in rows._asdict().items():
        kind, word = _ROW_KINDS.get(name, _FLOAT_KIND)
        dtype, shape = getattr(value, "dtype", None), getattr(value, "shape", None)
        if shape != (S,) or dtype is None or not jnp.issubdtype(dtype, kind):
            got = f"{dtype}{list(shape)}" if dtype is not None else type(value).__name__
            raise ValueError(f"rows.{name} must be a {word} array [S] = [{S}], got {got}")
    if not any(isinstance(value, jax.core.Tracer) for value in rows):
        _check_filters_cover(RowSampling(*map(np.asarray, rows)), filters, V)


def _check_filters_cover(rows: RowSampling, filters: RowFilters, vocab_size: int) -> None:
    """ValueError if concrete rows use a processor that filters skip, which would silently leave
    it out of those rows. (Traced rows, under jit, cannot be checked.)"""
    sampled = rows.do_sample
    k = np.where(sampled & (rows.top_k < vocab_size), rows.top_k, 0).max(initial=0)
    top_p = sampled & (rows.top_p_threshold > 0)
    used = {"sample": sampled.any(),
            "repetition_penalty": (rows.repetition_penalty != 1).any(),
            "temperature": (sampled & (rows.temperature != 1)).any(),
            "top_p": top_p.any(),
            "top_p_sorts": (top_p & ~((rows.top_k > 0) & (rows.top_k < vocab_size))).any(),
            "min_p": (sampled & (rows.log_min_p > -np.inf)).any()}
    missing = [f"filters.{name}" for name, needed in used.items()
               if needed and not getattr(filters, name)]
    if k > (filters.top_k_cap or 0):
        missing.append(f"filters.top_k_cap >= {k}")
    if missing:
        raise ValueError(f"filters do not cover rows: rows need {', '.join(missing)} (build both "
                         f"from the same settings: RowFilters.of, RowSampling.of)")


def process_logits_rows(logits, rows: RowSampling, filters: RowFilters, seen=None):
    """The logits [S, V] (any float dtype) through Hugging Face's processors, row i with its own
    settings: fp32 [S, V], row i as process_logits gives it for that row's Sampling alone.
    rows: RowSampling.of(settings); filters: RowFilters.of(settings, V), or any RowFilters that
    covers them. seen [S, V] bool as for process_logits, required when filters.repetition_penalty.
    """
    _check_rows(logits, rows, filters)
    x = jnp.asarray(logits, jnp.float32)
    column = lambda a: jnp.asarray(a)[:, None]  # noqa: E731  [S] -> [S, 1], against [S, V]
    if filters.repetition_penalty:
        x = _penalise_repetitions(x, seen, column(rows.repetition_penalty),
                                  "when filters.repetition_penalty is set")
    if not filters.sample:
        return x
    y = x / column(rows.temperature) if filters.temperature else x
    V = x.shape[-1]
    top_k = column(rows.top_k)
    # Rows without top_p get a negative threshold, which removes nothing. Not 0: that would
    # remove the tokens whose probability underflows to 0, their cumulative sum being 0.
    threshold = column(jnp.where(rows.top_p_threshold > 0, rows.top_p_threshold, -1.0))
    if filters.top_k_cap is not None:
        cap = filters.top_k_cap
        k = jnp.clip(top_k, 1, cap)
        if filters.top_p and not filters.top_p_sorts:
            # Every top_p row has a top_k: as process_logits, on the candidates. A row without
            # top_p gets exactly top_k's filter (threshold -1).
            keep = _top_p_keep(y, threshold, cap, k)
        else:
            keep = y >= jnp.take_along_axis(_top_k_values(y, cap), k - 1, axis=-1)
        y = jnp.where((top_k > 0) & (top_k < V) & ~keep, -jnp.inf, y)
    if filters.top_p_sorts:
        # top_k's -inf add nothing to the cumulative sums: the same cut as over its candidates.
        y = jnp.where(_top_p_keep(y, threshold, None), y, -jnp.inf)
    if filters.min_p:  # log_min_p = -inf (off) keeps every token
        y = jnp.where(_min_p_keep(y, column(rows.log_min_p)), y, -jnp.inf)
    return jnp.where(column(rows.do_sample), y, x)  # greedy rows: the penalty only


def select_tokens_rows(logits, rows: RowSampling, filters: RowFilters, keys=None):
    """int32 [S]: each row's next token from logits [S, V] already through process_logits_rows.
    Greedy rows: the argmax, the first index on ties. Sampled rows: a draw from the row's
    softmax with the row's own key, keys being a jax key array [S] (required when
    filters.sample; e.g. jax.random.split, or a vmapped fold_in): the token select_tokens gives
    for that row alone ([1, V]) with that key."""
    _check_rows(logits, rows, filters)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if not filters.sample:
        return greedy
    S = logits.shape[0]
    if getattr(keys, "shape", None) != (S,) \
            or not jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key):
        raise ValueError(f"keys must be a jax key array [S] = [{S}] (e.g. jax.random.split(key, "
                         f"{S})) when filters.sample, got "
                         f"{getattr(keys, 'dtype', type(keys).__name__)}"
                         f"{list(getattr(keys, 'shape', ()))}")
    # One categorical per row over [1, V], as select_tokens draws for a row alone: the same
    # random bits from the same key.
    drawn = jax.vmap(lambda key, row: jax.random.categorical(key, row[None], axis=-1)[0])(
        keys, logits)
    return jnp.where(rows.do_sample, drawn.astype(jnp.int32), greedy)
