"""Hugging Face GPT-2 checkpoints in and out, as plain numpy state dicts.

A state dict maps the parameter names of Hugging Face's PyTorch `GPT2Model` (no "transformer."
prefix) to numpy arrays in PyTorch layouts, in the dtype stored (bf16 as `ml_dtypes.bfloat16`):

    wte.weight [V, D]     wpe.weight [P, D]     ln_f.weight, ln_f.bias [D]
    h.{i}.ln_1.weight/.bias [D]                 h.{i}.ln_2.weight/.bias [D]
    h.{i}.attn.c_attn.weight [D, 3D] + bias     h.{i}.attn.c_proj.weight [D, D] + bias
    h.{i}.mlp.c_fc.weight [D, F] + bias         h.{i}.mlp.c_proj.weight [F, D] + bias   (F = 4D)

Conv1D weights are [in, out]. The LM head is tied to wte, so "lm_head.weight" is dropped on load
and never written; so are the attention-mask buffers "h.{i}.attn.bias" / "h.{i}.attn.masked_bias"
that old .bin files carry.

Formats read, first present wins: model.safetensors, model.safetensors.index.json (shards),
pytorch_model.bin, pytorch_model.bin.index.json (shards), flax_model.msgpack,
flax_model.msgpack.index.json (shards). Keys may carry the "transformer." prefix (what
GPT2LMHeadModel.save_pretrained writes) or not (the hub's "gpt2").

Flax names (FlaxGPT2LMHeadModel, transformers 4.57): the tree is {"transformer": {"wte":
{"embedding"}, "h": {"0": {"attn": {"c_attn": {"kernel", "bias"}}, "ln_1": {"scale", "bias"},
...}}}}. `FlaxConv1D` stores its kernel as [out, in] (`(features, in)`, transposed in __call__),
so kernel -> weight is a transpose; scale -> weight and embedding -> weight are renames. The same
rule reads a model.safetensors that Flax wrote (keys like "transformer.h.0.attn.c_attn.kernel").

Writing (`save_state_dict`) produces GPT2LMHeadModel's layout ("transformer." prefix), loadable by
transformers' GPT2LMHeadModel / FlaxGPT2LMHeadModel.from_pretrained: "safetensors" (metadata
{"format": "pt"}), "pytorch" (torch.save) or "flax" (msgpack), each sharded HF-style when
`max_shard_size` is exceeded. bf16 needs no detour for safetensors (safetensors >= 0.4's numpy
API and flax's msgpack take ml_dtypes.bfloat16); torch goes through an int16 view.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import warnings
from typing import Callable

import ml_dtypes
import numpy as np

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
BIN_NAME = "pytorch_model.bin"
BIN_INDEX_NAME = "pytorch_model.bin.index.json"
MSGPACK_NAME = "flax_model.msgpack"
MSGPACK_INDEX_NAME = "flax_model.msgpack.index.json"
WEIGHT_NAMES = (SAFETENSORS_NAME, SAFETENSORS_INDEX_NAME, BIN_NAME, BIN_INDEX_NAME,
                MSGPACK_NAME, MSGPACK_INDEX_NAME)
FORMATS = ("safetensors", "pytorch", "flax")

PREFIX = "transformer."
_PARAM = re.compile(r"(wte|wpe)\.weight|ln_f\.(weight|bias)|h\.\d+\.(ln_1|ln_2)\.(weight|bias)"
                    r"|h\.\d+\.attn\.(c_attn|c_proj)\.(weight|bias)|h\.\d+\.mlp\.(c_fc|c_proj)\.(weight|bias)")
_DROPPED = re.compile(r"lm_head\.(weight|kernel)|h\.\d+\.attn\.(bias|masked_bias)")
_CONV1D = ("c_attn", "c_proj", "c_fc")
# Files save_state_dict replaces (ours and transformers' shard names), so no stale file shadows it.
_STALE = re.compile(r"(model|pytorch_model|flax_model)(-\d+-of-\d+)?\.(safetensors|bin|msgpack)"
                    r"|(model\.safetensors|pytorch_model\.bin|flax_model\.msgpack)\.index\.json")
# torch dtypes numpy lacks -> (ml_dtypes dtype, same-width integer view)
_TORCH_VIEWS = {"bfloat16": (ml_dtypes.bfloat16, "int16"),
                "float8_e4m3fn": (ml_dtypes.float8_e4m3fn, "uint8"),
                "float8_e5m2": (ml_dtypes.float8_e5m2, "uint8")}


# ---------------------------------------------------------------------------------------------
# Finding a checkpoint


def _is_true(value: str | None) -> bool:
    return (value or "").upper() in ("1", "ON", "YES", "TRUE")


def _hub_cache_dir() -> pathlib.Path:
    """The Hugging Face hub cache, from the environment as it is now (huggingface_hub reads it once)."""
    env = os.environ
    if env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE"):
        cache = env.get("HF_HUB_CACHE") or env["HUGGINGFACE_HUB_CACHE"]
    else:
        home = env.get("HF_HOME") or os.path.join(
            env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
        cache = os.path.join(home, "hub")
    return pathlib.Path(os.path.expandvars(os.path.expanduser(cache)))


def _offline() -> bool:
    from huggingface_hub import constants
    return (_is_true(os.environ.get("HF_HUB_OFFLINE")) or _is_true(os.environ.get("TRANSFORMERS_OFFLINE"))
            or constants.HF_HUB_OFFLINE)


def _is_repo_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    if name.startswith(("/", ".", "~")) or "\\" in name:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _weight_file(directory: pathlib.Path) -> pathlib.Path | None:
    return next((directory / n for n in WEIGHT_NAMES if (directory / n).is_file()), None)


def _files_to_download(files: list[str]) -> list[str]:
    """config.json and the files of the first weight format the repo has (root folder only)."""
    root = [f for f in files if "/" not in f]
    if SAFETENSORS_NAME in root:
        weights = [SAFETENSORS_NAME]
    elif SAFETENSORS_INDEX_NAME in root:
        weights = [f for f in root if f.endswith(".safetensors") or f == SAFETENSORS_INDEX_NAME]
    elif BIN_NAME in root:
        weights = [BIN_NAME]
    elif BIN_INDEX_NAME in root:
        weights = [f for f in root if re.fullmatch(r"pytorch_model.*\.bin(\.index\.json)?", f)]
    elif MSGPACK_NAME in root:
        weights = [MSGPACK_NAME]
    elif MSGPACK_INDEX_NAME in root:
        weights = [f for f in root if re.fullmatch(r"flax_model.*\.msgpack(\.index\.json)?", f)]
    else:
        raise FileNotFoundError(f"the repo has none of {', '.join(WEIGHT_NAMES)}")
    return [CONFIG_NAME, *weights]


def resolve(name_or_path: str | os.PathLike) -> pathlib.Path:
    """A checkpoint directory: a local one, else a hub repo from the local HF cache, else the hub.

    Downloads only config.json and one weight format, and never when HF_HUB_OFFLINE is set.
    """
    path = pathlib.Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(f"{path} is a file: pass the checkpoint directory that holds it")
    name = os.fspath(name_or_path)
    tried = f"{name!r}: no such local directory {path.absolute()}"
    if not isinstance(name_or_path, str) or not _is_repo_id(name):
        raise FileNotFoundError(f"{tried} (and not a Hugging Face hub repo id)")

    from huggingface_hub import HfApi, snapshot_download
    cache = _hub_cache_dir()
    snapshot = None
    try:
        snapshot = pathlib.Path(snapshot_download(name, cache_dir=cache, local_files_only=True))
    except (OSError, ValueError):  # LocalEntryNotFoundError is both
        pass
    if snapshot is not None and (_offline() or (
            (snapshot / CONFIG_NAME).is_file() and _weight_file(snapshot) is not None)):
        return snapshot
    if snapshot is None:
        tried += f"; not in the Hugging Face cache at {cache}"
    else:
        tried += f"; cached at {snapshot} without config.json or weights"
    if _offline():
        raise FileNotFoundError(f"{tried}; the hub was not tried (HF_HUB_OFFLINE is set)")
    try:
        files = _files_to_download(HfApi().list_repo_files(name))
        return pathlib.Path(snapshot_download(name, cache_dir=cache, allow_patterns=files))
    except Exception as e:  # network down, repo not found, gated, no weights: all "not found" here
        raise FileNotFoundError(f"{tried}; hub download failed: {type(e).__name__}: {e}") from e


# ---------------------------------------------------------------------------------------------
# Reading


def load_config(path: str | os.PathLike) -> dict:
    """config.json of a checkpoint (directory or hub name) as a dict."""
    file = resolve(path) / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"could not read {file}: not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise ValueError(f"could not read {file}: expected a JSON object, got {type(config).__name__}")
    return config


def _reading(file: pathlib.Path, read: Callable[[], dict]) -> dict:
    """read(), with any failure of the parser turned into ValueError naming the file."""
    try:
        out = read()
    except Exception as e:
        hint = ""
        try:
            if file.read_bytes()[:40].startswith(b"version https://git-lfs"):
                hint = " (a Git LFS pointer, not the weights: run `git lfs pull`)"
        except OSError:
            pass
        raise ValueError(f"could not read {file}{hint}: {type(e).__name__}: {e}") from e
    if not isinstance(out, dict):
        raise ValueError(f"could not read {file}: expected a mapping of tensors, got {type(out).__name__}")
    return out


def _read_safetensors(file: pathlib.Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    def read():
        with safe_open(file, framework="np") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    return _reading(file, read)


def _torch_to_numpy(t) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    name = str(t.dtype).removeprefix("torch.")
    if name in _TORCH_VIEWS:
        dtype, view = _TORCH_VIEWS[name]
        import torch
        return t.view(getattr(torch, view)).numpy().view(dtype)
    return t.numpy()


def _import_torch():
    try:
        import torch
    except ImportError as e:
        raise ImportError("reading or writing PyTorch .bin checkpoints needs torch "
                          "(pip install torch; the CPU build is enough)") from e
    return torch


def _read_bin(file: pathlib.Path) -> dict[str, np.ndarray]:
    torch = _import_torch()

    def read():
        state = torch.load(file, map_location="cpu", weights_only=True)
        return {k: _torch_to_numpy(v) for k, v in state.items()}
    return _reading(file, read)


def _flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    flat = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = np.asarray(v)
    return flat


def _read_msgpack(file: pathlib.Path) -> dict[str, np.ndarray]:
    from flax.serialization import msgpack_restore

    def read():
        tree = msgpack_restore(file.read_bytes())
        if not isinstance(tree, dict):
            raise TypeError(f"expected a tree of arrays, got {type(tree).__name__}")
        return _flatten(tree["params"] if set(tree) == {"params"} else tree)
    return _reading(file, read)


def _read_sharded(index: pathlib.Path, read_shard: Callable) -> dict[str, np.ndarray]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        shards = list(dict.fromkeys(weight_map.values()))
    except Exception as e:
        raise ValueError(f"could not read {index}: not a shard index ({type(e).__name__}: {e})") from e
    missing = [s for s in shards if not (index.parent / s).is_file()]
    if missing:
        raise FileNotFoundError(f"{index} names shard(s) that do not exist: {', '.join(missing)}")
    flat = {}
    for shard in shards:
        flat.update(read_shard(index.parent / shard))
    return flat


_READERS = {
    SAFETENSORS_NAME: _read_safetensors,
    SAFETENSORS_INDEX_NAME: lambda f: _read_sharded(f, _read_safetensors),
    BIN_NAME: _read_bin,
    BIN_INDEX_NAME: lambda f: _read_sharded(f, _read_bin),
    MSGPACK_NAME: _read_msgpack,
    MSGPACK_INDEX_NAME: lambda f: _read_sharded(f, _read_msgpack),
}


def _from_hf(flat: dict[str, np.ndarray], file: pathlib.Path) -> dict[str, np.ndarray]:
    """HF names (PyTorch or Flax, with or without "transformer.") -> our names, PyTorch layouts."""
    state, ignored = {}, []
    for key, value in flat.items():
        name = key.removeprefix(PREFIX)
        module, _, leaf = name.rpartition(".")
        if leaf == "kernel" and module.rpartition(".")[2] in _CONV1D:
            name, value = f"{module}.weight", np.asarray(value).T  # FlaxConv1D: [out, in] -> [in, out]
        elif leaf in ("scale", "embedding"):
            name = f"{module}.weight"
        if _DROPPED.fullmatch(name):
            continue
        if not _PARAM.fullmatch(name):
            ignored.append(key)
            continue
        if name in state:
            raise ValueError(f"{file}: parameter {name} appears twice (with and without {PREFIX!r}?)")
        state[name] = value
    if not state:
        raise ValueError(f"{file}: no GPT-2 parameters found (keys: {', '.join(list(flat)[:5])}, ...)")
    if ignored:
        warnings.warn(f"{file}: ignoring {len(ignored)} entries that are not GPT-2 parameters: "
                      f"{', '.join(ignored[:5])}{', ...' if len(ignored) > 5 else ''}", stacklevel=3)
    return state


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """GPT-2 weights of a checkpoint (directory or hub name): our names, PyTorch layouts, dtype as stored."""
    directory = resolve(path)
    file = _weight_file(directory)
    if file is None:
        raise FileNotFoundError(f"no weight files in {directory}: looked for {', '.join(WEIGHT_NAMES)}")
    return _from_hf(_READERS[file.name](file), file)


# ---------------------------------------------------------------------------------------------
# Writing


def _shards(arrays: dict[str, np.ndarray], max_shard_size: int | None) -> list[list[str]]:
    """Names grouped greedily, in order, into shards of at most max_shard_size bytes (or one
    array, if that alone is bigger)."""
    groups, size = [[]], 0
    for name, a in arrays.items():
        if max_shard_size is not None and groups[-1] and size + a.nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += a.nbytes
    return groups


def _to_torch(a: np.ndarray):
    torch = _import_torch()
    for name, (dtype, view) in _TORCH_VIEWS.items():
        if a.dtype == dtype:
            return torch.from_numpy(a.view(view).copy()).view(getattr(torch, name))
    return torch.from_numpy(a.copy())


def _flax_path(name: str) -> tuple[list[str], bool]:
    """Our name -> its path in the Flax tree, and whether the array is transposed there."""
    *modules, leaf = name.split(".")
    transpose = False
    if leaf == "weight":
        if modules[-1] in ("wte", "wpe"):
            leaf = "embedding"
        elif modules[-1].startswith("ln_"):
            leaf = "scale"
        else:  # Conv1D [in, out] -> FlaxConv1D [out, in]
            leaf, transpose = "kernel", True
    return ["transformer", *modules, leaf], transpose


def _write_flax(arrays: dict[str, np.ndarray], file: pathlib.Path) -> None:
    from flax.serialization import msgpack_serialize
    tree = {}
    for name, a in arrays.items():
        keys, transpose = _flax_path(name)
        node = tree
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = np.ascontiguousarray(a.T) if transpose else a
    file.write_bytes(msgpack_serialize(tree))


def save_state_dict(state: dict[str, np.ndarray], path: str | os.PathLike, config: dict,
                    format: str = "safetensors", max_shard_size: int | None = None) -> None:
    """Write config.json and the weights as a GPT2LMHeadModel checkpoint transformers can load.

    format: "safetensors", "pytorch" (.bin) or "flax" (.msgpack); sharded with an index when the
    weights exceed max_shard_size bytes. Weight files already in `path` (any format) are removed.
    """
    if format not in FORMATS:
        raise ValueError(f"format={format!r}: expected one of {', '.join(map(repr, FORMATS))}")
    if max_shard_size is not None and (not isinstance(max_shard_size, int) or max_shard_size <= 0):
        raise ValueError(f"max_shard_size={max_shard_size!r}: expected a positive number of bytes or None")
    arrays = {}
    for key, value in state.items():
        name = key.removeprefix(PREFIX)
        if not _PARAM.fullmatch(name):
            raise ValueError(f"state: {key!r} is not a GPT-2 parameter name (e.g. 'h.0.attn.c_attn.weight')")
        if name in arrays:
            raise ValueError(f"state: {name!r} given twice (with and without {PREFIX!r})")
        arrays[name] = np.ascontiguousarray(np.asarray(value))
    if format == "pytorch":
        _import_torch()  # fail before touching the directory

    directory = pathlib.Path(path).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    config = dict(config)
    config.setdefault("model_type", "gpt2")
    config.setdefault("architectures", ["GPT2LMHeadModel"])
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    for old in directory.iterdir():
        if _STALE.fullmatch(old.name) and old.is_file():
            old.unlink()

    stem, ext, index_name = {"safetensors": ("model", "safetensors", SAFETENSORS_INDEX_NAME),
                             "pytorch": ("pytorch_model", "bin", BIN_INDEX_NAME),
                             "flax": ("flax_model", "msgpack", MSGPACK_INDEX_NAME)}[format]
    groups = _shards(arrays, max_shard_size)
    weight_map = {}
    for i, names in enumerate(groups):
        file = directory / (f"{stem}.{ext}" if len(groups) == 1 else f"{stem}-{i + 1:05d}-of-{len(groups):05d}.{ext}")
        part = {n: arrays[n] for n in names}
        if format == "safetensors":
            from safetensors.numpy import save_file
            save_file({PREFIX + n: a for n, a in part.items()}, file, metadata={"format": "pt"})
        elif format == "pytorch":
            _import_torch().save({PREFIX + n: _to_torch(a) for n, a in part.items()}, file)
        else:
            _write_flax(part, file)
        for n in names:  # Flax indexes name leaves by their "/"-joined tree path
            weight_map["/".join(_flax_path(n)[0]) if format == "flax" else PREFIX + n] = file.name
    if len(groups) > 1:
        index = {"metadata": {"total_size": sum(a.nbytes for a in arrays.values())}, "weight_map": weight_map}
        (directory / index_name).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
