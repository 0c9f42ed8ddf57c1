"""jtgpt.checkpoint: the weight formats (safetensors, .bin, Flax msgpack; sharded) and resolve.

The formats know no model: a checkpoint reads back under the PyTorch names transformers wrote.
Every checkpoint here is a tiny random one made with transformers' save_pretrained; nothing is
downloaded (the hub is replaced by fakes, and sockets are blocked).
"""
import copy
import socket

import ml_dtypes
import numpy as np
import pytest
import torch
import transformers

from jtgpt import checkpoint as ck

N_LAYER, D, V, P = 2, 32, 97, 64
SHARD = 30_000  # bytes: the tiny model (~120 kB) splits into several shards
PREFIX = "transformer."


def assert_state_equal(actual, expected):
    assert set(actual) == set(expected), set(actual) ^ set(expected)
    for k, e in expected.items():
        assert actual[k].dtype == e.dtype, (k, actual[k].dtype, e.dtype)
        assert actual[k].shape == e.shape, (k, actual[k].shape, e.shape)
        np.testing.assert_array_equal(actual[k], e, err_msg=k)


def read_back(directory):
    """The checkpoint's tensors, without the tied head's copy that some formats keep."""
    state = ck.load_state_dict(directory)
    state.pop("lm_head.weight", None)
    return state


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """A tiny random GPT2LMHeadModel, its tensors as numpy (PyTorch names), and save_pretrained
    directories in every format."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=N_LAYER, n_embd=D, n_head=4, n_positions=P, vocab_size=V)
    model = transformers.GPT2LMHeadModel(config).eval()
    ref = {PREFIX + k: v.detach().numpy().copy() for k, v in model.transformer.named_parameters()}
    root = tmp_path_factory.mktemp("hf")
    dirs = {}
    for name, kw in {"safetensors": dict(safe_serialization=True),
                     "bin": dict(safe_serialization=False),
                     "safetensors_sharded": dict(safe_serialization=True, max_shard_size=SHARD),
                     "bin_sharded": dict(safe_serialization=False, max_shard_size=SHARD)}.items():
        model.save_pretrained(root / name, **kw)
        dirs[name] = root / name
    with _quiet():
        flax_model = transformers.FlaxGPT2LMHeadModel.from_pretrained(dirs["bin"], from_pt=True)
    for name, kw in {"msgpack": {}, "msgpack_sharded": dict(max_shard_size=SHARD),
                     "flax_safetensors": dict(safe_serialization=True)}.items():
        flax_model.save_pretrained(root / name, **kw)
        dirs[name] = root / name
    bf16 = copy.deepcopy(model).to(torch.bfloat16)  # .to() is in place
    bf16.save_pretrained(root / "bf16_safetensors", safe_serialization=True)
    bf16.save_pretrained(root / "bf16_bin", safe_serialization=False)
    dirs["bf16_safetensors"], dirs["bf16_bin"] = root / "bf16_safetensors", root / "bf16_bin"
    return {"config": config.to_dict(), "ref": ref, "dirs": dirs}


class _quiet:
    """transformers' logging off (the expected "lm_head not used" notes) inside a with block."""

    def __enter__(self):
        self.level = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()

    def __exit__(self, *exc):
        transformers.logging.set_verbosity(self.level)


# ---------------------------------------------------------------------------------------------
# Reading transformers' checkpoints


@pytest.mark.parametrize("kind", ["safetensors", "bin", "safetensors_sharded", "bin_sharded",
                                  "msgpack", "msgpack_sharded", "flax_safetensors"])
def test_load_transformers_checkpoint(hf, kind):
    """PyTorch and Flax checkpoints read back as the same PyTorch names and layouts (Flax's 2-D
    kernels transposed, scale and embedding renamed weight)."""
    directory = hf["dirs"][kind]
    if kind.endswith("sharded"):  # the fixture really made shards
        assert any(p.name.endswith(".index.json") for p in directory.iterdir())
    assert_state_equal(read_back(directory), hf["ref"])


@pytest.mark.parametrize("kind", ["bf16_safetensors", "bf16_bin"])
def test_load_bf16_checkpoint(hf, kind):
    assert_state_equal(read_back(hf["dirs"][kind]),
                       {k: v.astype(ml_dtypes.bfloat16) for k, v in hf["ref"].items()})


@pytest.mark.parametrize("kind", ["safetensors_sharded", "bin_sharded"])
def test_read_opens_only_the_shard_it_needs(hf, kind, monkeypatch):
    """Checkpoint.read(name) parses the one shard that holds `name`, and takes one tensor."""
    directory = hf["dirs"][kind]
    index = ck.Checkpoint(directory)._shard_of
    name = PREFIX + "h.1.mlp.c_fc.weight"
    opened, taken = [], []
    shard_class = ck._SHARDS["safetensors" if kind.startswith("safetensors") else "bin"]
    monkeypatch.setitem(ck._SHARDS, "safetensors" if kind.startswith("safetensors") else "bin",
                        lambda file: opened.append(file.name) or _Spy(shard_class(file), taken))
    checkpoint = ck.Checkpoint(directory)
    checkpoint._sources = {name: (index[name], name, False)}  # as if listed already
    np.testing.assert_array_equal(checkpoint.read(name), hf["ref"][name])
    assert opened == [index[name].name] and taken == [name]


class _Spy:
    def __init__(self, shard, taken):
        self.shard, self.taken, self.flax, self.keys = shard, taken, shard.flax, shard.keys

    def get(self, key):
        self.taken.append(key)
        return self.shard.get(key)


def test_load_config(hf):
    config = ck.load_config(hf["dirs"]["safetensors"])
    assert config["n_layer"] == N_LAYER and config["n_embd"] == D and config["model_type"] == "gpt2"


# ---------------------------------------------------------------------------------------------
# Writing


def _state(hf, dtype=np.float32):
    return {k: v.astype(dtype) for k, v in hf["ref"].items()}


@pytest.mark.parametrize("shard", [None, SHARD], ids=["one_file", "sharded"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("format", ck.FORMATS)
def test_round_trip(hf, tmp_path, format, dtype, shard):
    state = _state(hf, ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32)
    ck.save_state_dict(state, tmp_path, hf["config"], format=format, max_shard_size=shard)
    names = {p.name for p in tmp_path.iterdir()}
    assert any(n.endswith(".index.json") for n in names) == (shard is not None), names
    assert_state_equal(ck.load_state_dict(tmp_path), state)
    assert ck.load_config(tmp_path) == {**hf["config"], "id2label": {"0": "LABEL_0", "1": "LABEL_1"}}


def test_flax_names(hf, tmp_path):
    """The Flax tree: 2-D weights are transposed kernels unless flax_names names them."""
    state = _state(hf)
    wte = PREFIX + "wte.weight"
    ck.save_state_dict(state, tmp_path, hf["config"], format="flax",
                       flax_names={wte: PREFIX + "wte.embedding"})
    from flax.serialization import msgpack_restore
    tree = msgpack_restore((tmp_path / ck.MSGPACK_NAME).read_bytes())["transformer"]
    np.testing.assert_array_equal(tree["wte"]["embedding"], state[wte])
    np.testing.assert_array_equal(tree["h"]["1"]["attn"]["c_attn"]["kernel"],
                                  state[PREFIX + "h.1.attn.c_attn.weight"].T)
    np.testing.assert_array_equal(tree["ln_f"]["bias"], state[PREFIX + "ln_f.bias"])


def test_save_accepts_jax_arrays(hf, tmp_path):
    import jax.numpy as jnp
    state = {k: jnp.asarray(v, jnp.bfloat16) for k, v in hf["ref"].items()}
    ck.save_state_dict(state, tmp_path, hf["config"])
    assert_state_equal(ck.load_state_dict(tmp_path), _state(hf, ml_dtypes.bfloat16))


def test_save_replaces_stale_weights(hf, tmp_path):
    ck.save_state_dict(_state(hf), tmp_path, hf["config"], format="safetensors")
    new = {k: v + 1 for k, v in hf["ref"].items()}
    ck.save_state_dict(new, tmp_path, hf["config"], format="pytorch")  # model.safetensors would shadow it
    assert_state_equal(ck.load_state_dict(tmp_path), new)


def test_save_errors(hf, tmp_path):
    with pytest.raises(ValueError, match="format='onnx'"):
        ck.save_state_dict(hf["ref"], tmp_path, hf["config"], format="onnx")
    with pytest.raises(ValueError, match="max_shard_size"):
        ck.save_state_dict(hf["ref"], tmp_path, hf["config"], max_shard_size=0)
    assert not list(tmp_path.iterdir())  # nothing written


# ---------------------------------------------------------------------------------------------
# resolve: local directory, the Hugging Face cache, the hub


COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def no_network(monkeypatch):
    """Any socket connection fails the test."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in this test")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    yield
    assert not attempts, f"network was tried: {attempts}"


@pytest.fixture
def offline(monkeypatch, tmp_path, no_network):
    """huggingface_hub offline, its default cache an empty tmp_path/hub."""
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def fake_cache(cache, repo_id, source, commit=COMMIT, ref="main"):
    """huggingface_hub's cache layout: models--org--name/{refs/<ref>, snapshots/<commit>/...}."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in source.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return snapshot


def test_resolve_local_dir(hf):
    d = hf["dirs"]["safetensors"]
    assert ck.resolve(d) == d and ck.resolve(str(d)) == d


def test_resolve_default_cache(hf, offline):
    """huggingface_hub's own cache location is used when cache_dir is not given."""
    snapshot = fake_cache(offline, "org/tiny-gpt2", hf["dirs"]["safetensors"])
    assert ck.resolve("org/tiny-gpt2") == snapshot
    assert_state_equal(read_back(ck.resolve("org/tiny-gpt2")), hf["ref"])


def test_resolve_cache_dir_and_revision(hf, offline, tmp_path):
    cache = tmp_path / "elsewhere"
    main = fake_cache(cache, "tiny-gpt2", hf["dirs"]["msgpack"])
    v1 = fake_cache(cache, "tiny-gpt2", hf["dirs"]["bin"], commit="f" * 40, ref="v1")
    assert ck.resolve("tiny-gpt2", cache_dir=cache) == main
    assert ck.resolve("tiny-gpt2", cache_dir=cache, revision="v1") == v1
    with pytest.raises(FileNotFoundError, match="revision 'v2'.*not in the Hugging Face cache"):
        ck.resolve("tiny-gpt2", cache_dir=cache, revision="v2")


def test_resolve_not_found(offline, tmp_path):
    not_found = r"(?s)no such local directory.*not in the Hugging Face cache.*HF_HUB_OFFLINE"
    with pytest.raises(FileNotFoundError, match=not_found):
        ck.resolve("org/no-such-model")
    with pytest.raises(FileNotFoundError, match="not a Hugging Face hub repo id"):
        ck.resolve(tmp_path / "missing" / "dir")
    with pytest.raises(FileNotFoundError, match="no-such-dir"):
        ck.resolve("./no-such-dir")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(NotADirectoryError, match="file.txt"):
        ck.resolve(tmp_path / "file.txt")


@pytest.fixture
def fake_hub(hf, tmp_path, monkeypatch, no_network):
    """huggingface_hub online, with its network calls replaced by a fake hub holding "org/tiny"
    (every format), "org/gated" (gated), "org/down" (unreachable); the calls are recorded."""
    import huggingface_hub
    from huggingface_hub import errors
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    calls = []

    def snapshot_download(repo_id, *, revision=None, cache_dir=None, local_files_only=False,
                          allow_patterns=None, token=None):
        calls.append(("snapshot_download", repo_id, revision, local_files_only, allow_patterns, token))
        if local_files_only:
            raise errors.LocalEntryNotFoundError("not cached")
        if repo_id == "org/gated":
            raise errors.GatedRepoError("401 Client Error: access to model org/gated is restricted")
        return str(fake_cache(cache_dir or tmp_path / "hub", repo_id, hf["dirs"]["safetensors"]))

    class HfApi:
        def list_repo_files(self, repo_id, revision=None, token=None):
            calls.append(("list_repo_files", repo_id, revision, token))
            if repo_id == "org/missing":
                raise errors.RepositoryNotFoundError("404 Repository Not Found")
            if repo_id == "org/down":
                raise ConnectionError("Failed to establish a new connection")
            return ["config.json", "model.safetensors", "pytorch_model.bin", "flax_model.msgpack",
                    "tf_model.h5", "onnx/model.safetensors", "tokenizer.json"]

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "HfApi", HfApi)
    return calls


def test_resolve_online_downloads_one_format(fake_hub, tmp_path):
    """Cache first, then config.json and one weight format; revision and token passed through."""
    path = ck.resolve("org/tiny", revision="main", token="hf_secret")
    assert path.parent == tmp_path / "hub" / "models--org--tiny" / "snapshots"
    assert fake_hub == [
        ("snapshot_download", "org/tiny", "main", True, None, None),
        ("list_repo_files", "org/tiny", "main", "hf_secret"),
        ("snapshot_download", "org/tiny", "main", False, ["config.json", "model.safetensors"], "hf_secret")]


def test_resolve_online_errors_say_what_happened(fake_hub):
    with pytest.raises(PermissionError, match="(?s)gated repository.*token="):
        ck.resolve("org/gated")
    with pytest.raises(FileNotFoundError, match="(?s)no repository 'org/missing', or it is private"):
        ck.resolve("org/missing")
    with pytest.raises(ConnectionError, match="(?s)not in the Hugging Face cache.*could not be reached"):
        ck.resolve("org/down")


def test_resolve_local_files_only_never_asks_the_hub(fake_hub):
    with pytest.raises(FileNotFoundError, match="local_files_only=True"):
        ck.resolve("org/tiny", local_files_only=True)
    assert [c[0] for c in fake_hub] == ["snapshot_download"] and fake_hub[0][3] is True


def test_files_to_download():
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    assert ck._files_to_download(["config.json", *shards, "pytorch_model.bin"]) == ["config.json", *shards]
    assert ck._files_to_download(["config.json", "flax_model.msgpack", "tf_model.h5"]) == [
        "config.json", "flax_model.msgpack"]
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin"):
        ck._files_to_download(["config.json", "tf_model.h5"])


# ---------------------------------------------------------------------------------------------
# Broken checkpoints: each error names the file


def test_error_empty_dir(tmp_path):
    looked_for = r"no weight files in .*model\.safetensors.*pytorch_model\.bin.*flax_model\.msgpack"
    with pytest.raises(FileNotFoundError, match=looked_for):
        ck.load_state_dict(tmp_path)


def test_error_garbage_safetensors(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header at all")
    with pytest.raises(ValueError, match=r"could not read .*model\.safetensors"):
        ck.load_state_dict(tmp_path)


def test_error_git_lfs_pointer(tmp_path):
    (tmp_path / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 1\n")
    with pytest.raises(ValueError, match=r"model\.safetensors.*Git LFS"):
        ck.load_state_dict(tmp_path)


@pytest.mark.parametrize("name", ["flax_model.msgpack", "pytorch_model.bin"])
def test_error_truncated(hf, tmp_path, name):
    source = hf["dirs"]["msgpack" if name.endswith("msgpack") else "bin"] / name
    data = source.read_bytes()
    (tmp_path / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"could not read .*{name}"):
        ck.load_state_dict(tmp_path)


def test_error_missing_shard(hf, tmp_path):
    ck.save_state_dict(hf["ref"], tmp_path, hf["config"], max_shard_size=SHARD)
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2
    shards[1].unlink()
    with pytest.raises(FileNotFoundError, match=rf"model\.safetensors\.index\.json.*{shards[1].name}"):
        ck.Checkpoint(tmp_path)


def test_error_unknown_tensor(hf):
    with pytest.raises(KeyError, match="no tensor 'h.9.attn.c_attn.weight'"):
        ck.Checkpoint(hf["dirs"]["safetensors"]).read("h.9.attn.c_attn.weight")


def test_error_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        ck.load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"could not read .*config\.json"):
        ck.load_config(tmp_path)


def test_error_bin_without_torch(hf, tmp_path, monkeypatch):
    ck.save_state_dict(hf["ref"], tmp_path, hf["config"], format="pytorch")
    monkeypatch.setitem(__import__("sys").modules, "torch", None)
    with pytest.raises(ImportError, match="needs torch"):
        ck.load_state_dict(tmp_path)
