"""Text generation for any jtgpt model: a prefill of the prompt into a KV cache, then one decode step
per new token, with Hugging Face `generate`'s semantics, as one compiled program.

    logits_0        = model(prompt)                       prefill: flash attention, cache written
    token_i         = select(process(logits_i, seen))     greedy or sampled (jtgpt.sampling)
    token_i         = pad            for a row that has already emitted eos
    logits_{i+1}    = model(token_i | cache)               one decode step: the decode kernel

The loop runs until max_new_tokens tokens have been chosen or every row has finished (emitted one
of eos_token_id); what is left of the output is then pad. The model brings two methods:
`empty_cache(batch, capacity)` and `next_token_logits(ids, positions, cache)` (GPT and Llama).

Left-padded prompts (attention_mask 0 at the padding) behave as in Hugging Face: a row's positions
count from its first real token (position_ids = cumsum(mask) - 1, padding at 1), its padding is
masked out of every attention, and each new token's position is the row's real token count.
"""
from __future__ import annotations

import functools
from typing import Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jtgpt.kv_cache import KVCache
from jtgpt.layers import check_ids_in_range, model_inputs, with_k_contiguous_weights
from jtgpt.sampling import Sampling, mark_seen, process_logits, seen_tokens, select_tokens


class Decoding(NamedTuple):
    """The state the decode loop carries from one token to the next."""
    step: jax.Array            # int32 (): new tokens chosen so far
    tokens: jax.Array          # [B, T + max_new_tokens] int32: the prompt, the chosen tokens, pad
    logits: jax.Array          # [B, V] fp32: the model's logits for the next token
    cache: KVCache
    positions: jax.Array       # [B] int32: the position of the next token
    finished: jax.Array        # [B] bool: the row has emitted eos
    key: jax.Array | None      # the sampling key (do_sample) or None
    seen: jax.Array | None     # [B, V] bool: the tokens in each row so far (repetition_penalty)


class _Tokens(NamedTuple):
    """The special tokens of a generation, static: the loop is compiled for them."""
    prompt_len: int
    eos: tuple[int, ...]
    pad: int


def _start(model, ids, mask, key, sampling: Sampling, special: _Tokens, max_new_tokens: int):
    """Prefill: the prompt through the model into an empty cache, the first logits."""
    B, T = ids.shape
    if mask is None:
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        next_positions = jnp.full((B,), T, jnp.int32)
    else:
        positions = jnp.where(mask != 0, jnp.cumsum(mask, axis=1) - 1, 1).astype(jnp.int32)
        next_positions = jnp.sum(mask != 0, axis=1, dtype=jnp.int32)
    cache = model.empty_cache(B, T + max_new_tokens).add_prompt(mask)
    logits, cache = model.next_token_logits(ids, positions, cache)
    tokens = jnp.full((B, T + max_new_tokens), special.pad, jnp.int32).at[:, :T].set(ids)
    seen = seen_tokens(ids, logits.shape[-1]) if sampling.repetition_penalty is not None else None
    return Decoding(jnp.zeros((), jnp.int32), tokens, logits, cache, next_positions,
                    jnp.zeros((B,), bool), key, seen)


def _choose(state: Decoding, sampling: Sampling, special: _Tokens) -> tuple[Decoding, jax.Array]:
    """The next token of every row from the state's logits, written into the output."""
    key, draw = (None, None) if state.key is None else jax.random.split(state.key)
    token = select_tokens(process_logits(state.logits, sampling, state.seen), sampling, draw)
    token = jnp.where(state.finished, special.pad, token).astype(jnp.int32)
    finished = state.finished | jnp.isin(token, jnp.asarray(special.eos, jnp.int32))
    tokens = jax.lax.dynamic_update_slice(state.tokens, token[:, None],
                                          (0, special.prompt_len + state.step))
    seen = None if state.seen is None else mark_seen(state.seen, token)
    return state._replace(step=state.step + 1, tokens=tokens, finished=finished, key=key,
                          seen=seen), token


DECODE_CHUNK = 8  # decode steps generate's loop runs between its checks of "every row finished"


def _decode(model, state: Decoding, until, sampling: Sampling, special: _Tokens,
            chunk: int = 1) -> Decoding:
    """Choose tokens and run a decode step for each until `until` tokens are chosen or every row
    has finished; the logits of the next token are then in the state, not yet chosen.

    The loop's condition is checked every `chunk` steps (a static loop of chunk steps in its
    body), then every step for the last ones: XLA runs a loop of data-dependent length by reading
    its condition back to the host after every iteration, so the device idles while the host
    decides and launches the next one. Rows that finish inside a chunk emit pad for its rest."""
    def step(state):
        state, token = _choose(state, sampling, special)
        logits, cache = model.next_token_logits(token[:, None], state.positions[:, None],
                                                state.cache)
        return state._replace(logits=logits, cache=cache, positions=state.positions + 1)

    def going(steps):
        return lambda s: (s.step + steps <= until) & ~jnp.all(s.finished)

    if chunk > 1:
        steps = lambda s: jax.lax.fori_loop(0, chunk, lambda _, s: step(s), s)
        state = jax.lax.while_loop(going(chunk), steps, state)
    return jax.lax.while_loop(going(1), step, state)


@functools.partial(jax.jit, static_argnames=("sampling", "special", "max_new_tokens"))
def _generate(model, ids, mask, key, sampling, special, max_new_tokens):
    model = with_k_contiguous_weights(model)
    state = _start(model, ids, mask, key, sampling, special, max_new_tokens)
    state = _decode(model, state, max_new_tokens - 1, sampling, special, DECODE_CHUNK)
    return _choose(state, sampling, special)[0].tokens


_k_contiguous_jit = jax.jit(with_k_contiguous_weights)
_start_jit = jax.jit(_start, static_argnames=("sampling", "special", "max_new_tokens"))
_decode_jit = jax.jit(_decode, static_argnames=("sampling", "special"))
_choose_jit = jax.jit(lambda state, sampling, special: _choose(state, sampling, special)[0],
                      static_argnames=("sampling", "special"))


def _arguments(model, input_ids, attention_mask, max_new_tokens, sampling, eos_token_id,
               pad_token_id, key):
    """(ids, mask or None, _Tokens) after checking every argument of generate."""
    ids, mask, _ = model_inputs(input_ids, attention_mask)
    vocab_size = model.config.vocab_size
    check_ids_in_range("input_ids", ids, vocab_size)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) \
            or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if sampling.do_sample and key is None:
        raise ValueError("key (a jax.random key) is required when do_sample=True")
    # As Hugging Face's generation config: pad defaulting to the first eos.
    eos = eos_token_ids(model.config, eos_token_id)
    pad = model.config.pad_token_id if pad_token_id is None else pad_token_id
    pad = (eos[0] if eos else 0) if pad is None else pad
    _check_token_id("pad_token_id", pad, vocab_size)
    return ids, mask, _Tokens(ids.shape[1], eos, int(pad))


def eos_token_ids(config, eos_token_id) -> tuple[int, ...]:
    """The tokens that end a sequence: eos_token_id an int or a list, None meaning the model
    config's (as Hugging Face's generation config), [] none. ValueError for ids outside the
    vocabulary."""
    eos = config.eos_token_id if eos_token_id is None else eos_token_id
    eos = () if eos is None else (eos,) if isinstance(eos, (int, np.integer)) else tuple(eos)
    for value in eos:
        _check_token_id("eos_token_id", value, config.vocab_size)
    return tuple(int(e) for e in eos)


def _check_token_id(name: str, value, vocab_size: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
            or not 0 <= value < vocab_size:
        raise ValueError(f"{name} must be token ids in [0, {vocab_size}), got {value!r}")


def generate(model, input_ids, attention_mask=None, *, max_new_tokens: int, do_sample=False,
             temperature=1.0, top_k=None, top_p=None, min_p=None, repetition_penalty=None,
             eos_token_id=None, pad_token_id=None, key=None):
    """Token ids int32 [B, T + max_new_tokens]: the prompt input_ids [B, T], then each row's new
    tokens, pad after the row's eos (and everywhere once every row has finished).

    Hugging Face `generate` semantics and names: greedy unless do_sample; temperature, top_k,
    top_p, min_p (sampling only) and repetition_penalty as jtgpt.sampling.Sampling applies them;
    eos_token_id an int or a list (None: the model config's; [] never stops), pad_token_id
    (None: the config's, else the first eos); key, a jax.random key, makes sampling
    reproducible. attention_mask [B, T] (1 = token, 0 = padding) for left-padded prompts.
    The prefill and the whole loop run as one compiled program (jax.jit; a call under an outer
    jax.jit with the model as an argument works the same); one is compiled per prompt shape,
    max_new_tokens and sampling settings. GPT-2's [in, out] weights are read from a transposed
    copy made at the start (jtgpt.layers.with_k_contiguous_weights), which lives as long as the
    call.
    """
    sampling = Sampling(do_sample, temperature, top_k, top_p, min_p, repetition_penalty)
    ids, mask, special = _arguments(model, input_ids, attention_mask, max_new_tokens, sampling,
                                    eos_token_id, pad_token_id, key)
    return _generate(model, ids, mask, key, sampling, special, int(max_new_tokens))


def stream(model, input_ids, attention_mask=None, *, max_new_tokens: int, chunk_size: int = 8,
           do_sample=False, temperature=1.0, top_k=None, top_p=None, min_p=None,
           repetition_penalty=None, eos_token_id=None, pad_token_id=None,
           key=None) -> Iterator[np.ndarray]:
    """generate's new tokens as they are produced: yields int32 numpy arrays [B, n] of the next
    n <= chunk_size tokens of every row (pad for finished rows), until max_new_tokens are out or
    every row has finished. Arguments as generate's; the same tokens as generate gives.
    Each chunk runs as one compiled loop (compiled once: the chunk's end is data), so the host
    waits on the device once per chunk, not per token."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    sampling = Sampling(do_sample, temperature, top_k, top_p, min_p, repetition_penalty)
    ids, mask, special = _arguments(model, input_ids, attention_mask, max_new_tokens, sampling,
                                    eos_token_id, pad_token_id, key)
    T, last = special.prompt_len, int(max_new_tokens) - 1
    model = _k_contiguous_jit(model)  # once, not in every chunk's program
    state = _start_jit(model, ids, mask, key, sampling, special, int(max_new_tokens))
    done = 0
    while done < last:
        state = _decode_jit(model, state, jnp.int32(min(done + chunk_size, last)), sampling,
                            special)
        step, finished = jax.device_get((state.step, jnp.all(state.finished)))
        yield np.asarray(state.tokens[:, T + done:T + step])
        done = int(step)
        if finished:
            return
    state = _choose_jit(state, sampling, special)
    yield np.asarray(state.tokens[:, T + last:T + last + 1])
