"""jtgpt.checkpoint: HF GPT-2 checkpoints (safetensors, .bin, Flax msgpack; sharded) in and out.

Every checkpoint here is a tiny random one made with transformers' save_pretrained; nothing is
downloaded (the resolve tests run with HF_HUB_OFFLINE=1 and sockets blocked).
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


def expected_shapes():
    shapes = {"wte.weight": (V, D), "wpe.weight": (P, D), "ln_f.weight": (D,), "ln_f.bias": (D,)}
    for i in range(N_LAYER):
        h = f"h.{i}."
        shapes.update({
            h + "ln_1.weight": (D,), h + "ln_1.bias": (D,), h + "ln_2.weight": (D,), h + "ln_2.bias": (D,),
            h + "attn.c_attn.weight": (D, 3 * D), h + "attn.c_attn.bias": (3 * D,),
            h + "attn.c_proj.weight": (D, D), h + "attn.c_proj.bias": (D,),
            h + "mlp.c_fc.weight": (D, 4 * D), h + "mlp.c_fc.bias": (4 * D,),
            h + "mlp.c_proj.weight": (4 * D, D), h + "mlp.c_proj.bias": (D,),
        })
    return shapes


def assert_state_equal(actual, expected):
    assert set(actual) == set(expected), set(actual) ^ set(expected)
    for k, e in expected.items():
        assert actual[k].dtype == e.dtype, (k, actual[k].dtype, e.dtype)
        assert actual[k].shape == e.shape, (k, actual[k].shape, e.shape)
        np.testing.assert_array_equal(actual[k], e, err_msg=k)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """A tiny random GPT2LMHeadModel, its parameters as numpy, and save_pretrained directories."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=N_LAYER, n_embd=D, n_head=4, n_positions=P, vocab_size=V)
    model = transformers.GPT2LMHeadModel(config).eval()
    ref = {k: v.detach().numpy().copy() for k, v in model.transformer.named_parameters()}
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
    return {"config": config.to_dict(), "ref": ref, "dirs": dirs, "model": model}


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
    directory = hf["dirs"][kind]
    if kind.endswith("sharded"):  # the fixture really made shards
        assert any(p.name.endswith(".index.json") for p in directory.iterdir())
    state = ck.load_state_dict(directory)
    assert {k: v.shape for k, v in state.items()} == expected_shapes()
    assert_state_equal(state, hf["ref"])


@pytest.mark.parametrize("kind", ["bf16_safetensors", "bf16_bin"])
def test_load_bf16_checkpoint(hf, kind):
    state = ck.load_state_dict(hf["dirs"][kind])
    assert_state_equal(state, {k: v.astype(ml_dtypes.bfloat16) for k, v in hf["ref"].items()})


def test_load_hub_style_bin(hf, tmp_path):
    """Like the hub's gpt2 pytorch_model.bin: no "transformer." prefix, attention-mask buffers."""
    sd = {k: torch.from_numpy(v) for k, v in hf["ref"].items()}
    for i in range(N_LAYER):
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(P, P)).view(1, 1, P, P)
        sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    sd["lm_head.weight"] = sd["wte.weight"]
    torch.save(sd, tmp_path / "pytorch_model.bin")
    assert_state_equal(ck.load_state_dict(tmp_path), hf["ref"])


def test_load_warns_on_extra_entries(hf, tmp_path):
    ck.save_state_dict(hf["ref"], tmp_path, hf["config"])
    from safetensors.numpy import load_file, save_file
    flat = load_file(tmp_path / "model.safetensors")
    flat["score.weight"] = np.zeros((2, D), np.float32)
    save_file(flat, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="score.weight"):
        assert_state_equal(ck.load_state_dict(tmp_path), hf["ref"])


def test_load_config(hf):
    config = ck.load_config(hf["dirs"]["safetensors"])
    assert config["n_layer"] == N_LAYER and config["n_embd"] == D and config["model_type"] == "gpt2"


# ---------------------------------------------------------------------------------------------
# Writing


@pytest.mark.parametrize("shard", [None, SHARD], ids=["one_file", "sharded"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("format", ck.FORMATS)
def test_round_trip(hf, tmp_path, format, dtype, shard):
    state = {k: v.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32)
             for k, v in hf["ref"].items()}
    ck.save_state_dict(state, tmp_path, hf["config"], format=format, max_shard_size=shard)
    names = {p.name for p in tmp_path.iterdir()}
    assert any(n.endswith(".index.json") for n in names) == (shard is not None), names
    assert_state_equal(ck.load_state_dict(tmp_path), state)
    assert ck.load_config(tmp_path)["n_embd"] == D


def test_save_accepts_jax_arrays_and_prefix(hf, tmp_path):
    import jax.numpy as jnp
    state = {"transformer." + k: jnp.asarray(v, jnp.bfloat16) for k, v in hf["ref"].items()}
    ck.save_state_dict(state, tmp_path, hf["config"])
    assert_state_equal(ck.load_state_dict(tmp_path),
                       {k: v.astype(ml_dtypes.bfloat16) for k, v in hf["ref"].items()})


@pytest.mark.parametrize("format,shard", [("safetensors", None), ("safetensors", SHARD),
                                          ("pytorch", None), ("pytorch", SHARD)])
def test_transformers_torch_loads_ours(hf, tmp_path, format, shard):
    ck.save_state_dict(hf["ref"], tmp_path, hf["config"], format=format, max_shard_size=shard)
    with _quiet():
        model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    sd = model.state_dict()
    np.testing.assert_array_equal(sd["transformer.h.1.attn.c_attn.weight"].numpy(), hf["ref"]["h.1.attn.c_attn.weight"])
    np.testing.assert_array_equal(sd["lm_head.weight"].numpy(), hf["ref"]["wte.weight"])  # tied
    ids = torch.arange(10)[None] % V
    with torch.no_grad():
        np.testing.assert_allclose(model(ids).logits.numpy(), hf["model"](ids).logits.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("format,shard", [("flax", None), ("flax", SHARD), ("safetensors", None)])
def test_transformers_flax_loads_ours(hf, tmp_path, format, shard):
    ck.save_state_dict(hf["ref"], tmp_path, hf["config"], format=format, max_shard_size=shard)
    with _quiet():
        model = transformers.FlaxGPT2LMHeadModel.from_pretrained(tmp_path)
    layer = model.params["transformer"]["h"]["1"]
    np.testing.assert_array_equal(np.asarray(layer["attn"]["c_attn"]["kernel"]), hf["ref"]["h.1.attn.c_attn.weight"].T)
    np.testing.assert_array_equal(np.asarray(layer["ln_2"]["scale"]), hf["ref"]["h.1.ln_2.weight"])
    np.testing.assert_array_equal(np.asarray(model.params["transformer"]["wte"]["embedding"]), hf["ref"]["wte.weight"])


def test_save_config_defaults(hf, tmp_path):
    ck.save_state_dict(hf["ref"], tmp_path, {"n_embd": D})
    assert ck.load_config(tmp_path) == {"n_embd": D, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}
    ck.save_state_dict(hf["ref"], tmp_path, {"model_type": "gpt2", "architectures": ["GPT2Model"]})
    assert ck.load_config(tmp_path)["architectures"] == ["GPT2Model"]


def test_save_replaces_stale_weights(hf, tmp_path):
    ck.save_state_dict(hf["ref"], tmp_path, hf["config"], format="safetensors")
    new = {k: v + 1 for k, v in hf["ref"].items()}
    ck.save_state_dict(new, tmp_path, hf["config"], format="flax")  # model.safetensors would shadow it
    assert_state_equal(ck.load_state_dict(tmp_path), new)


def test_save_errors(hf, tmp_path):
    with pytest.raises(ValueError, match="format='onnx'"):
        ck.save_state_dict(hf["ref"], tmp_path, hf["config"], format="onnx")
    with pytest.raises(ValueError, match="lm_head.weight"):
        ck.save_state_dict({**hf["ref"], "lm_head.weight": hf["ref"]["wte.weight"]}, tmp_path, hf["config"])
    assert not list(tmp_path.iterdir())  # nothing written


# ---------------------------------------------------------------------------------------------
# resolve: local directory, offline Hugging Face cache, neither


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """An empty HF cache in tmp_path, HF_HUB_OFFLINE=1, and any socket connection recorded."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in this test")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    yield tmp_path / "hub"
    assert not attempts, f"network was tried: {attempts}"


def fake_cache(cache, repo_id, source, commit="0123456789abcdef0123456789abcdef01234567"):
    """huggingface_hub's cache layout: models--org--name/{refs/main, snapshots/<commit>/...}."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in source.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def test_resolve_local_dir(hf):
    d = hf["dirs"]["safetensors"]
    assert ck.resolve(d) == d and ck.resolve(str(d)) == d


def test_resolve_offline_cache(hf, offline):
    snapshot = fake_cache(offline, "org/tiny-gpt2", hf["dirs"]["safetensors"])
    assert ck.resolve("org/tiny-gpt2") == snapshot
    assert_state_equal(ck.load_state_dict("org/tiny-gpt2"), hf["ref"])
    assert ck.load_config("org/tiny-gpt2")["n_layer"] == N_LAYER


def test_resolve_hf_home(hf, offline, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    snapshot = fake_cache(tmp_path / "home" / "hub", "tiny-gpt2", hf["dirs"]["msgpack"])
    assert ck.resolve("tiny-gpt2") == snapshot


def test_resolve_not_found(offline, tmp_path):
    not_found = r"(?s)no such local directory.*not in the Hugging Face cache.*HF_HUB_OFFLINE"
    with pytest.raises(FileNotFoundError, match=not_found):
        ck.resolve("org/no-such-model")
    with pytest.raises(FileNotFoundError, match="not a Hugging Face hub repo id"):
        ck.resolve(tmp_path / "missing" / "dir")
    with pytest.raises(FileNotFoundError, match="no-such-dir"):
        ck.load_state_dict("./no-such-dir")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(NotADirectoryError, match="file.txt"):
        ck.resolve(tmp_path / "file.txt")


def test_resolve_online_downloads_one_format(hf, offline, monkeypatch):
    """The online path, with huggingface_hub's network calls replaced (sockets stay blocked)."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    calls = []

    def snapshot_download(repo_id, cache_dir, local_files_only=False, allow_patterns=None, **kwargs):
        calls.append((repo_id, local_files_only, allow_patterns))
        if local_files_only:
            raise LocalEntryNotFoundError("not cached")
        return str(fake_cache(cache_dir, repo_id, hf["dirs"]["safetensors"]))

    class HfApi:
        def list_repo_files(self, repo_id):
            if repo_id == "org/missing":
                raise RepositoryNotFoundError("404 Repository Not Found")
            return ["config.json", "model.safetensors", "pytorch_model.bin", "flax_model.msgpack",
                    "tf_model.h5", "onnx/model.safetensors", "tokenizer.json"]

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "HfApi", HfApi)
    assert ck.resolve("org/tiny").parent == offline / "models--org--tiny" / "snapshots"
    assert calls == [("org/tiny", True, None), ("org/tiny", False, ["config.json", "model.safetensors"])]
    failed = "(?s)not in the Hugging Face cache.*hub download failed.*RepositoryNotFoundError"
    with pytest.raises(FileNotFoundError, match=failed):
        ck.resolve("org/missing")


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
        ck.load_state_dict(tmp_path)


def test_error_not_gpt2(tmp_path):
    from safetensors.numpy import save_file
    save_file({"model.layers.0.mlp.gate_proj.weight": np.zeros((4, 4), np.float32)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.safetensors: no GPT-2 parameters"):
        ck.load_state_dict(tmp_path)


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
