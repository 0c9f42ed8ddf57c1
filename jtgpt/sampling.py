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
        if seen is None or getattr(seen, "shape", None) != x.shape or seen.dtype != jnp.bool_:
            raise ValueError(f"seen must be a bool array of the logits' shape {list(x.shape)} "
                             f"when repetition_penalty is set, got "
                             f"{None if seen is None else f'{seen.dtype}{list(seen.shape)}'}")
        r = sampling.repetition_penalty
        x = jnp.where(seen, jnp.where(x < 0, x * r, x / r), x)
    if not sampling.do_sample:
        return x
    if sampling.temperature != 1.0:
        x = x / sampling.temperature
    V = x.shape[-1]
    top_k = sampling.top_k if sampling.top_k and sampling.top_k < V else None
    top_p = sampling.top_p if sampling.top_p is not None and sampling.top_p < 1.0 else None
    if top_p is not None:
        # Hugging Face's threshold 1 - p, in double, rounded to fp32 as torch rounds a scalar
        x = jnp.where(_top_p_keep(x, 1.0 - top_p, top_k), x, -jnp.inf)
    elif top_k is not None:
        x = jnp.where(x >= _top_k_values(x, top_k)[:, -1:], x, -jnp.inf)
    if sampling.min_p:  # min_p 0 removes nothing
        # p_i < m p_max  <=>  exp(x_i - max x) < m: the softmax's normaliser cancels.
        x = jnp.where(x - jnp.max(x, axis=-1, keepdims=True) >= math.log(sampling.min_p),
                      x, -jnp.inf)
    return x


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
def _top_p_keep(x, threshold, top_k: int | None):
    """bool [B, V]: the tokens that top_k (if not None, < V) and then top_p keep, threshold being
    1 - top_p.

    From a sort of the row or from the top-k candidates, the same three numbers: where top_p
    cuts Hugging Face's ascending order (`removed`, the number of positions before the cut), the
    logit v at the cut, and `rank`, how many of the tokens equal to v lie before it: everything
    above v is kept, and of the tokens equal to v all but the first `rank`."""
    if top_k is None:
        ascending = jnp.sort(x, axis=-1)  # Hugging Face's order
        cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
        removed = jnp.minimum(jnp.sum(cumulative <= threshold, axis=-1, keepdims=True),
                              x.shape[-1] - 1)
        v = jnp.take_along_axis(ascending, removed, axis=-1)
        below = jnp.sum(ascending < v, axis=-1, keepdims=True)
    else:
        top = _top_k_values(x, top_k)[:, ::-1]  # [B, k] ascending: the candidates
        kth = top[:, :1]
        # top_k keeps every token tied with the k-th largest. The ones lax.top_k left out,
        # `extra`, sit at the bottom of top_p's ascending order, each with probability p_kth.
        extra = jnp.sum(x >= kth, axis=-1, keepdims=True) - top_k
        w = jnp.exp(top - top[:, -1:])
        z = jnp.sum(w, axis=-1, keepdims=True) + extra * w[:, :1]
        p_kth = w[:, :1] / z
        cumulative = extra * p_kth + jnp.cumsum(w / z, axis=-1)
        removed_top = jnp.minimum(jnp.sum(cumulative <= threshold, axis=-1, keepdims=True),
                                  top_k - 1)
        # The extras' own cumulative sums are j p_kth, j = 1..extra (p_kth = 0: all are removed).
        removed_extra = jnp.clip(jnp.floor(threshold / p_kth), 0, extra).astype(jnp.int32)
        # A candidate removed means every extra below it is removed too.
        removed = jnp.where(removed_top > 0, extra + removed_top, removed_extra)
        v = jnp.take_along_axis(top, removed_top, axis=-1)  # removed_top = 0: kth, as the extras
        below = jnp.sum(top < v, axis=-1, keepdims=True) + jnp.where(v > kth, extra, 0)
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
