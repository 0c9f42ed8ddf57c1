"""Hugging Face checkpoints in and out: the weight formats, and finding a checkpoint on the hub.

Nothing here knows a model. Each model maps its own parameters onto the tensors read here
(`jtgpt.models.pretrained`); this module reads and writes named tensors.

A checkpoint is a directory with config.json and the weights in one of these formats, the first
present winning: model.safetensors, model.safetensors.index.json (shards), pytorch_model.bin,
pytorch_model.bin.index.json (shards), flax_model.msgpack, flax_model.msgpack.index.json (shards).

Names and layouts are the PyTorch model's, whatever the format. Flax checkpoints (msgpack, and
safetensors whose metadata says {"format": "flax"}) are read through the rule transformers itself
converts by: a 2-D `kernel` is the transposed `weight` ([in, out] -> [out, in] for nn.Dense,
[out, in] -> [in, out] for GPT-2's Conv1D), and `scale` and `embedding` are renamed `weight`.

`Checkpoint(directory)` reads one tensor at a time, in the dtype stored (bf16 as
ml_dtypes.bfloat16): safetensors through `safe_open`, .bin through torch's memory map, so a model
loads without a second copy of its weights in host memory. A Flax msgpack file has no lazy
reader: each shard is read whole when its first tensor is asked for.

`save_state_dict` writes "safetensors" (metadata {"format": "pt"}), "pytorch" (torch.save) or
"flax" (msgpack), sharded Hugging Face-style above `max_shard_size`. bf16 needs no detour for
safetensors and msgpack (both take ml_dtypes.bfloat16); torch goes through an int16 view.

`resolve` finds a checkpoint: a local directory, else a snapshot in the Hugging Face cache, else a
download of config.json and one weight format through huggingface_hub, with its `revision`,
`cache_dir`, `local_files_only` and `token` passed through (and its own HF_HUB_OFFLINE setting).
"""
from __future__ import annotations

import json
import os
import pathlib
import re
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

# Files save_state_dict replaces (ours and transformers' shard names), so no stale file shadows it.
_STALE = re.compile(r"(model|pytorch_model|flax_model)(-\d+-of-\d+)?\.(safetensors|bin|msgpack)"
                    r"|(model\.safetensors|pytorch_model\.bin|flax_model\.msgpack)\.index\.json")
# torch dtypes numpy lacks -> (ml_dtypes dtype, same-width integer view)
_TORCH_VIEWS = {"bfloat16": (ml_dtypes.bfloat16, "int16"),
                "float8_e4m3fn": (ml_dtypes.float8_e4m3fn, "uint8"),
                "float8_e5m2": (ml_dtypes.float8_e5m2, "uint8")}


# ---------------------------------------------------------------------------------------------
# Finding a checkpoint


def _is_repo_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    if name.startswith(("/", ".", "~")) or "\\" in name:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def weight_file(directory: pathlib.Path) -> pathlib.Path | None:
    """The directory's weights (a file or a shard index), in WEIGHT_NAMES' order of preference."""
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


def resolve(name_or_path: str | os.PathLike, *, revision: str | None = None,
            cache_dir: str | os.PathLike | None = None, local_files_only: bool = False,
            token: str | bool | None = None) -> pathlib.Path:
    """A checkpoint directory: a local one, else a hub repo's snapshot in the Hugging Face cache,
    else the hub (config.json and one weight format only).

    revision, cache_dir, local_files_only and token mean what they mean to huggingface_hub's
    snapshot_download (cache_dir None: huggingface_hub's own default). The hub is not asked with
    local_files_only=True or when huggingface_hub is offline (HF_HUB_OFFLINE). Errors: no such
    directory or repository, FileNotFoundError; a gated or unauthorized repository,
    PermissionError; the hub unreachable, ConnectionError; each says what was tried.
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

    import huggingface_hub as hub
    from huggingface_hub import errors
    where = f"revision {revision!r} of {name!r}" if revision else repr(name)
    try:
        snapshot = pathlib.Path(hub.snapshot_download(name, revision=revision, cache_dir=cache_dir,
                                                      local_files_only=True))
        if (snapshot / CONFIG_NAME).is_file() and weight_file(snapshot) is not None:
            return snapshot
        tried += f"; {where} is cached at {snapshot} without config.json or weights"
    except errors.LocalEntryNotFoundError:
        tried += f"; {where} is not in the Hugging Face cache"
    if local_files_only or hub.constants.HF_HUB_OFFLINE:
        why = "local_files_only=True" if local_files_only else "huggingface_hub is offline (HF_HUB_OFFLINE)"
        raise FileNotFoundError(f"{tried}; the hub was not asked: {why}")
    try:
        files = _files_to_download(hub.HfApi().list_repo_files(name, revision=revision, token=token))
        return pathlib.Path(hub.snapshot_download(name, revision=revision, cache_dir=cache_dir,
                                                  token=token, allow_patterns=files))
    except errors.GatedRepoError as e:
        raise PermissionError(
            f"{tried}; {name!r} is a gated repository: accept its terms at "
            f"https://huggingface.co/{name} and pass token= (or log in with `hf auth login`). "
            f"The hub said: {e}") from e
    except errors.RepositoryNotFoundError as e:
        raise FileNotFoundError(f"{tried}; the hub has no repository {name!r}, or it is private "
                                f"and needs token=. The hub said: {e}") from e
    except errors.RevisionNotFoundError as e:
        raise FileNotFoundError(f"{tried}; the hub has no {where}. The hub said: {e}") from e
    except errors.HfHubHTTPError as e:
        status = getattr(e.response, "status_code", None)
        if status in (401, 403):
            raise PermissionError(f"{tried}; the hub refused access to {name!r} (HTTP {status}): "
                                  f"pass a token= that may read it. The hub said: {e}") from e
        raise
    except (ConnectionError, OSError) as e:
        if isinstance(e, FileNotFoundError):  # the repo has no weights (_files_to_download)
            raise FileNotFoundError(f"{tried}; on the hub, {where}: {e}") from e
        raise ConnectionError(f"{tried}; the hub could not be reached: {type(e).__name__}: {e}") from e


def load_config(directory: str | os.PathLike) -> dict:
    """config.json of a checkpoint directory, as a dict."""
    file = pathlib.Path(directory) / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"could not read {file}: not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise ValueError(f"could not read {file}: expected a JSON object, got {type(config).__name__}")
    return config


# ---------------------------------------------------------------------------------------------
# Reading


def _reading(file: pathlib.Path, read: Callable):
    """read(), with any failure of the parser turned into ValueError naming the file (a missing
    torch stays the ImportError that says so)."""
    try:
        return read()
    except ImportError:
        raise
    except Exception as e:
        hint = ""
        try:
            if file.read_bytes()[:40].startswith(b"version https://git-lfs"):
                hint = " (a Git LFS pointer, not the weights: run `git lfs pull`)"
        except OSError:
            pass
        raise ValueError(f"could not read {file}{hint}: {type(e).__name__}: {e}") from e


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


def _torch_name(key: str) -> tuple[str, bool]:
    """A Flax tensor's PyTorch name, and whether its array is transposed (transformers' rule)."""
    module, _, leaf = key.rpartition(".")
    if leaf == "kernel":
        return f"{module}.weight", True
    if leaf in ("scale", "embedding"):
        return f"{module}.weight", False
    return key, False


class _SafetensorsShard:
    def __init__(self, file):
        from safetensors import safe_open
        self._file = _reading(file, lambda: safe_open(file, framework="np"))
        self.flax = (self._file.metadata() or {}).get("format") == "flax"
        self.keys = list(self._file.keys())

    def get(self, key):
        return self._file.get_tensor(key)


class _BinShard:
    def __init__(self, file):
        torch = _import_torch()
        # The memory map keeps the tensors on disk until each is read; the legacy (pre-zipfile)
        # format cannot be mapped and is loaded whole.
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            state = torch.load(file, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise TypeError(f"expected a mapping of tensors, got {type(state).__name__}")
        self._state, self.flax, self.keys = state, False, list(state)

    def get(self, key):
        return _torch_to_numpy(self._state[key])


class _MsgpackShard:
    def __init__(self, file):
        from flax.serialization import msgpack_restore
        tree = msgpack_restore(file.read_bytes())
        if not isinstance(tree, dict):
            raise TypeError(f"expected a tree of arrays, got {type(tree).__name__}")
        self._flat = _flatten(tree["params"] if set(tree) == {"params"} else tree)
        self.flax, self.keys = True, list(self._flat)

    def get(self, key):
        return self._flat[key]


def _flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    flat = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = np.asarray(v)
    return flat


_SHARDS = {"safetensors": _SafetensorsShard, "bin": _BinShard, "msgpack": _MsgpackShard}


class Checkpoint:
    """The tensors of a checkpoint directory, by PyTorch name, read one at a time.

    `names()` lists them; `read(name)` returns one numpy array in its PyTorch layout and the dtype
    stored. Shards are opened when their first tensor is read. A parse failure is a ValueError
    naming the file (with a hint when the file is a Git LFS pointer).
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = pathlib.Path(directory)
        self.file = weight_file(self.directory)
        if self.file is None:
            raise FileNotFoundError(f"no weight files in {self.directory}: looked for "
                                    f"{', '.join(WEIGHT_NAMES)}")
        self._format = self.file.name.split(".")[1]  # safetensors, bin or msgpack
        if self.file.name.endswith(".index.json"):
            self._shard_of = self._read_index()  # stored key -> shard file
        else:
            self._shard_of = None
        self._open: dict[pathlib.Path, object] = {}
        self._sources: dict[str, tuple[pathlib.Path, str, bool]] | None = None

    def _read_index(self) -> dict[str, pathlib.Path]:
        index = self.file
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = {key: index.parent / shard for key, shard in weight_map.items()}
        except Exception as e:
            raise ValueError(f"could not read {index}: not a shard index ({type(e).__name__}: {e})") from e
        missing = sorted({s.name for s in shards.values() if not s.is_file()})
        if missing:
            raise FileNotFoundError(f"{index} names shard(s) that do not exist: {', '.join(missing)}")
        # Flax indexes name tensors by their "/"-joined tree path.
        return {key.replace("/", "."): shard for key, shard in shards.items()}

    def _shard(self, file: pathlib.Path):
        if file not in self._open:
            self._open[file] = _reading(file, lambda: _SHARDS[self._format](file))
        return self._open[file]

    def _index(self) -> dict[str, tuple[pathlib.Path, str, bool]]:
        """PyTorch name -> (shard file, key stored there, transposed)."""
        if self._sources is None:
            files = (dict.fromkeys(self._shard_of.values()) if self._shard_of is not None
                     else [self.file])
            self._sources = {}
            for file in files:
                shard = self._shard(file)
                for key in shard.keys:
                    name, transpose = _torch_name(key) if shard.flax else (key, False)
                    if name in self._sources:
                        raise ValueError(f"{file}: tensor {name} appears twice (as {key} and "
                                         f"{self._sources[name][1]})")
                    self._sources[name] = (file, key, transpose)
        return self._sources

    def names(self) -> list[str]:
        return list(self._index())

    def read(self, name: str) -> np.ndarray:
        if name not in self._index():
            raise KeyError(f"{self.file}: no tensor {name!r}")
        file, key, transpose = self._index()[name]
        value = _reading(file, lambda: np.asarray(self._shard(file).get(key)))
        return value.T if transpose and value.ndim == 2 else value


def load_state_dict(directory: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint directory at once, by PyTorch name (see Checkpoint)."""
    checkpoint = Checkpoint(directory)
    return {name: checkpoint.read(name) for name in checkpoint.names()}


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


def _flax_name(name: str, ndim: int, flax_names: dict[str, str]) -> tuple[str, bool]:
    """A PyTorch name's Flax name and whether its array is transposed there: what the model says
    (flax_names), else a 2-D weight is a transposed kernel and anything else keeps its name."""
    if name in flax_names:
        return flax_names[name], False
    module, _, leaf = name.rpartition(".")
    if leaf == "weight" and ndim == 2:
        return f"{module}.kernel", True
    return name, False


def _write_flax(arrays: dict[str, np.ndarray], file: pathlib.Path) -> None:
    from flax.serialization import msgpack_serialize
    tree = {}
    for name, a in arrays.items():
        *modules, leaf = name.split(".")
        node = tree
        for k in modules:
            node = node.setdefault(k, {})
        node[leaf] = a
    file.write_bytes(msgpack_serialize(tree))


def save_state_dict(state: dict, path: str | os.PathLike, config: dict, *,
                    format: str = "safetensors", max_shard_size: int | None = None,
                    flax_names: dict[str, str] | None = None) -> None:
    """Write config.json and the weights `state` (PyTorch names, as the checkpoint names them,
    -> numpy or jax arrays, PyTorch layouts) as a Hugging Face checkpoint directory.

    format: "safetensors", "pytorch" (.bin) or "flax" (.msgpack); sharded with an index when the
    weights exceed max_shard_size bytes. flax_names: for format="flax", the Flax names of the
    tensors whose name the default rule gets wrong (it makes a 2-D `weight` a transposed `kernel`
    and keeps every other name): embedding tables (`embedding`) and, in some models, norm scales
    (`scale`). Weight files already in `path` (any format) are removed first.
    """
    if format not in FORMATS:
        raise ValueError(f"format={format!r}: expected one of {', '.join(map(repr, FORMATS))}")
    if max_shard_size is not None and (not isinstance(max_shard_size, int) or max_shard_size <= 0):
        raise ValueError(f"max_shard_size={max_shard_size!r}: expected a positive number of bytes or None")
    arrays = {name: np.ascontiguousarray(np.asarray(value)) for name, value in state.items()}
    if format == "flax":
        renamed = {}
        for name, a in arrays.items():
            flax_name, transpose = _flax_name(name, a.ndim, flax_names or {})
            renamed[flax_name] = np.ascontiguousarray(a.T) if transpose else a
        arrays = renamed
    if format == "pytorch":
        _import_torch()  # fail before touching the directory

    directory = pathlib.Path(path).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n",
                                         encoding="utf-8")
    for old in directory.iterdir():
        if _STALE.fullmatch(old.name) and old.is_file():
            old.unlink()

    stem, ext, index_name = {"safetensors": ("model", "safetensors", SAFETENSORS_INDEX_NAME),
                             "pytorch": ("pytorch_model", "bin", BIN_INDEX_NAME),
                             "flax": ("flax_model", "msgpack", MSGPACK_INDEX_NAME)}[format]
    groups = _shards(arrays, max_shard_size)
    weight_map = {}
    for i, names in enumerate(groups):
        file = directory / (f"{stem}.{ext}" if len(groups) == 1
                            else f"{stem}-{i + 1:05d}-of-{len(groups):05d}.{ext}")
        part = {n: arrays[n] for n in names}
        if format == "safetensors":
            from safetensors.numpy import save_file
            save_file(part, file, metadata={"format": "pt"})
        elif format == "pytorch":
            _import_torch().save({n: _to_torch(a) for n, a in part.items()}, file)
        else:
            _write_flax(part, file)
        for n in names:  # Flax indexes name tensors by their "/"-joined tree path
            weight_map[n.replace(".", "/") if format == "flax" else n] = file.name
    if len(groups) > 1:
        index = {"metadata": {"total_size": sum(a.nbytes for a in arrays.values())},
                 "weight_map": weight_map}
        (directory / index_name).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n",
                                            encoding="utf-8")
