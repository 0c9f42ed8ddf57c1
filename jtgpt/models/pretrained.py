"""What a jtgpt model shares as a Hugging Face model: configs read from config.json, and weights
loaded from, listed under and saved to Hugging Face's names.

Each model family declares the map between its parameters and a checkpoint's tensors:

- a parameter named like its Hugging Face tensor (without the base model's prefix,
  "transformer." for GPT-2, "model." for Llama) is that tensor, in the same layout;
- `packed_tensors()` lists the parameters made of several tensors concatenated along axis 0 (Llama's
  q, k and v projections are one qkv weight [(Hq + 2 Hkv) D, hidden] for one GEMM), with the rows
  each one takes; `state_dict` and `save_pretrained` split them again.

Loading streams: each parameter is read from the checkpoint (jtgpt.checkpoint.Checkpoint: one
tensor at a time), packed, and put on the device in its dtype before the next one is read, so the
host never holds a second copy of the weights.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
import warnings
from typing import Any, Callable, ClassVar

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jtgpt import checkpoint
from jtgpt import generate as generation
from jtgpt.layers import lm_logits


# ---------------------------------------------------------------------------------- configs

def check_model_type(hf: dict, model_type: str) -> None:
    """ValueError unless config.json's model_type is `model_type`."""
    found = hf.get("model_type")
    if found is None:
        raise ValueError(f"config has no model_type (expected {model_type!r}): not a Hugging "
                         f"Face config.json?")
    if found != model_type:
        raise ValueError(f"config model_type is {found!r}, not {model_type!r}: load it with "
                         f"jtgpt.from_pretrained, which picks the model class from model_type")


def _type_ok(value, hint) -> bool:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    raise TypeError(f"no check for the annotation {hint}")


def fields_from_hf(cls, hf: dict, aliases: dict[str, str] | None = None,
                   skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The fields of the config dataclass `cls` that a Hugging Face config dict sets, under their
    own names or Hugging Face's aliases of them (GPT2Config's hidden_size for n_embd), each checked
    against the field's type. Keys that are no field are left alone (config.json holds many);
    `skip` names fields the caller reads itself."""
    if not isinstance(hf, dict):
        raise ValueError(f"config must be a dict (config.json's object), got {type(hf).__name__}")
    hints = typing.get_type_hints(cls)
    found = {}
    for alias, field in (aliases or {}).items():
        if alias in hf:
            if field in hf and hf[field] != hf[alias]:
                raise ValueError(f"config has {alias}={hf[alias]!r} and {field}={hf[field]!r}, "
                                 f"two names of one setting that disagree")
            found[field] = hf[alias]
    for f in dataclasses.fields(cls):
        if f.name in hf and f.name not in skip:
            found[f.name] = hf[f.name]
    for name, value in found.items():
        if not _type_ok(value, hints[name]):
            raise ValueError(f"config {name} must be {_type_name(hints[name])}, got "
                             f"{type(value).__name__} {value!r}")
    return found


def _type_name(hint) -> str:
    if typing.get_args(hint):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    return "null" if hint is type(None) else hint.__name__


def check_positive(config, *names: str) -> None:
    for name in names:
        if not getattr(config, name) > 0:
            raise ValueError(f"config {name} must be positive, got {getattr(config, name)}")


def check_rate(config, *names: str) -> None:
    for name in names:
        if not 0.0 <= getattr(config, name) < 1.0:
            raise ValueError(f"config {name} must be in [0, 1), got {getattr(config, name)}")


def token_ids(value, name: str) -> int | tuple[int, ...] | None:
    """A config's bos/eos/pad token id: None, an int, or (eos_token_id) a list of ints."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    if isinstance(value, (list, tuple)) and value and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        return tuple(value)
    raise ValueError(f"config {name} must be an int, a list of ints or null, got {value!r}")


# ----------------------------------------------------------------------------------- models

class PretrainedModel(nnx.Module):
    """Base of jtgpt's models: from_pretrained, state_dict, load_state_dict and save_pretrained
    over Hugging Face's tensor names. A subclass sets the class attributes below, has a `config`
    with `from_hf()` / `to_hf()`, and may override `packed_tensors` and `flax_names`. For
    generation it has `empty_cache(batch, capacity)`, `kv_spec` and `max_context` (its cache's
    shape, for serving's page pool), `_residual_stream(ids, positions, mask, dropout_key, cache)`
    (the blocks, returning the residual stream and the cache), `final_norm` and
    `_head_weight()`."""

    config_class: ClassVar[type]
    base_prefix: ClassVar[str]          # "transformer." / "model.": the base model's names
    ignored_tensors: ClassVar[str] = ""  # regex of checkpoint tensors that are not parameters

    def packed_tensors(self) -> dict[str, dict[str, int]]:
        """{parameter: {Hugging Face tensor: its rows}} for each parameter made of several tensors
        concatenated along axis 0, in that order. Every other parameter is the tensor of its own
        name."""
        return {}

    def flax_names(self) -> dict[str, str]:
        """Flax names of the tensors (prefixed names) that checkpoint.save_state_dict's default
        rule does not name right (see its flax_names)."""
        return {}

    def generate(self, input_ids, attention_mask=None, **options):
        """Token ids [B, T + max_new_tokens]: the prompt and the tokens generated after it, with
        Hugging Face generate's options (max_new_tokens, do_sample, temperature, top_k, top_p,
        min_p, repetition_penalty, eos_token_id, pad_token_id, key): jtgpt.generate.generate."""
        return generation.generate(self, input_ids, attention_mask, **options)

    def stream(self, input_ids, attention_mask=None, **options):
        """generate's new tokens as they are produced, chunk by chunk: jtgpt.generate.stream."""
        return generation.stream(self, input_ids, attention_mask, **options)

    def next_token_logits(self, input_ids, positions, cache, rows=None):
        """(fp32 logits [B, vocab_size] of the token after input_ids [B, T], the cache holding
        their keys and values): a prompt (T > 1, into an empty KVCache; its padding is the
        cache's key_mask) or one new token per row (T = 1). Generation's forward pass
        (jtgpt.generate), in eval mode; positions [B, T] int32 as the model's __call__ takes
        them. rows (int [N]): the logits after these of the B * T tokens instead, [N, vocab_size]
        (a serving batch: input_ids [1, T] of many sequences in a PagedKVCache)."""
        x, cache = self._residual_stream(input_ids, positions, None, None,
                                         cache.add_tokens(input_ids.shape[1]))
        h = x[:, -1:] if rows is None else x.reshape(-1, x.shape[-1])[rows][:, None]
        logits = lm_logits(h, self._head_weight(), self.compute.precision,
                           norm=self.final_norm.as_prologue())
        return logits[:, 0].astype(jnp.float32), cache

    # --------------------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(cls, name_or_path, *, dtype=jnp.float32, param_dtype=None,
                        precision: str = "ieee", revision: str | None = None, cache_dir=None,
                        local_files_only: bool = False, token=None):
        """Load a Hugging Face checkpoint: a local directory, the Hugging Face cache, or the hub
        (jtgpt.checkpoint.resolve, which takes revision, cache_dir, local_files_only and token);
        safetensors (sharded too), pytorch_model.bin or flax_model.msgpack. dtype, param_dtype and
        precision as the model's constructor takes them."""
        directory = checkpoint.resolve(name_or_path, revision=revision, cache_dir=cache_dir,
                                       local_files_only=local_files_only, token=token)
        return cls.from_directory(directory, dtype=dtype, param_dtype=param_dtype,
                                  precision=precision)

    @classmethod
    def from_directory(cls, directory, **options):
        """The model of a resolved checkpoint directory (see from_pretrained)."""
        config = cls.config_class.from_hf(checkpoint.load_config(directory))
        model = nnx.eval_shape(lambda: cls(config, **options))
        ckpt = checkpoint.Checkpoint(directory)
        model._load(ckpt.names(), ckpt.read, str(ckpt.file))
        return model

    def load_state_dict(self, state: dict, source: str = "state dict") -> None:
        """Set every parameter from `state` (Hugging Face names, as state_dict gives them, with or
        without the base model's prefix), cast to the parameter's dtype."""
        self._load(list(state), lambda name: np.asarray(state[name]), source)

    def _load(self, names: list[str], read: Callable[[str], np.ndarray], source: str) -> None:
        """Set the parameters from the tensors `names` of a checkpoint, `read` giving one at a
        time; ValueError naming what is missing, surplus or misshapen."""
        stored = {}  # our name (no prefix) -> the checkpoint's
        for name in names:
            ours = name.removeprefix(self.base_prefix)
            if ours in stored:
                raise ValueError(f"{source}: tensor {ours} appears twice (with and without "
                                 f"{self.base_prefix!r}?)")
            stored[ours] = name
        params = _params(self)
        packed = self.packed_tensors()
        wanted = {name for p in params for name in packed.get(p, (p,))}
        missing = sorted(wanted - stored.keys())
        if missing:
            raise ValueError(f"{source}: missing tensors {missing[:8]}"
                             f"{' ...' if len(missing) > 8 else ''} for a {type(self).__name__} "
                             f"with {self.config}")
        ignore = re.compile(self.ignored_tensors + ("|" if self.ignored_tensors else "")
                            + "lm_head\\.weight")  # lm_head.weight: a tied head's copy
        surplus = [stored[n] for n in stored.keys() - wanted if not ignore.fullmatch(n)]
        if surplus:
            warnings.warn(f"{source}: ignoring {len(surplus)} tensors that are not parameters of "
                          f"{type(self).__name__}: {', '.join(sorted(surplus)[:5])}"
                          f"{', ...' if len(surplus) > 5 else ''}", stacklevel=3)
        for p, var in params.items():
            values = []
            for name, rows in (packed.get(p) or {p: None}).items():
                value = read(stored[name])
                expected = var.shape if rows is None else (rows, *var.shape[1:])
                if tuple(value.shape) != tuple(expected):
                    raise ValueError(f"{source}: tensor {stored[name]} has shape "
                                     f"{tuple(value.shape)}, expected {tuple(expected)}")
                values.append(value)
            value = values[0] if len(values) == 1 else np.concatenate(values)
            var.set_value(jnp.asarray(value).astype(var.dtype))

    # --------------------------------------------------------------------------- saving

    def state_dict(self) -> dict[str, np.ndarray]:
        """Parameters as numpy arrays under Hugging Face's names (without the base model's
        prefix), packed parameters split into their tensors."""
        packed = self.packed_tensors()
        state = {}
        for p, var in _params(self).items():
            value = np.asarray(var[...])
            if p not in packed:
                state[p] = value
                continue
            offsets = np.cumsum(list(packed[p].values()))[:-1]
            state.update(zip(packed[p], np.split(value, offsets)))
        return state

    def save_pretrained(self, path, format: str = "safetensors", max_shard_size: int | None = None):
        """Write config.json and the weights as the Hugging Face *ForCausalLM checkpoint that
        transformers' from_pretrained reads: format "safetensors", "pytorch" or "flax"."""
        def full(name):
            return name if name.startswith("lm_head.") else self.base_prefix + name
        state = {full(name): value for name, value in self.state_dict().items()}
        dtypes = {np.dtype(v.dtype).name for v in state.values()}
        config = self.config.to_hf()
        if len(dtypes) == 1:
            config["torch_dtype"] = dtypes.pop()
        checkpoint.save_state_dict(state, path, config, format=format,
                                   max_shard_size=max_shard_size, flax_names=self.flax_names())


def _params(model: nnx.Module) -> dict[str, nnx.Param]:
    """{dotted parameter name: variable}, in the module's order."""
    return {".".join(str(p) for p in path): var
            for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
