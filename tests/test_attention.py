"""Flash attention forward (jtgpt.kernels.attention) against jtgpt.reference.attention.

On CPU each case runs twice: with the GPU block sizes, where a tiny T is one partial block, and
with blocks shrunk to 32 x 16 ("small_blocks"), so that the same T crosses several query and key
blocks: off-diagonal blocks, several blocks on the causal diagonal (some with rows that see none
of their keys), and a partial tail block.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_close, shapes
from jtgpt import reference
from jtgpt.kernels import attention

DTYPES = [jnp.float32, jnp.float16, jnp.bfloat16]


@pytest.fixture(params=["gpu_blocks", "small_blocks"])
def blocks(request, monkeypatch):
    if request.param == "small_blocks":
        monkeypatch.setattr(attention, "_block_config", lambda *args: (32, 16, 4, 1))


def packed_qkv(key, B, T, Hq, Hkv, D, dtype):
    return jax.random.normal(key, (B, T, (Hq + 2 * Hkv) * D), jnp.float32).astype(dtype)


def split_heads(qkv, Hq, Hkv):
    """The packed [B, T, (Hq + 2 Hkv) D] as reference.attention's q [B,T,Hq,D], k, v [B,T,Hkv,D]."""
    B, T, W = qkv.shape
    D = W // (Hq + 2 * Hkv)
    q = qkv[..., :Hq * D].reshape(B, T, Hq, D)
    k = qkv[..., Hq * D:(Hq + Hkv) * D].reshape(B, T, Hkv, D)
    v = qkv[..., (Hq + Hkv) * D:].reshape(B, T, Hkv, D)
    return q, k, v


def run(qkv, mask=None, **kwargs):
    """(out, lse) of attention_forward under jax.jit, and the reference output [B, T, Hq * D]."""
    Hq, Hkv = kwargs["num_heads"], kwargs.get("num_kv_heads") or kwargs["num_heads"]
    fwd = jax.jit(lambda x, m: attention.attention_forward(x, attention_mask=m, **kwargs))
    out, lse = fwd(qkv, mask)
    ref = reference.attention(*split_heads(qkv, Hq, Hkv), attention_mask=mask,
                              causal=kwargs.get("causal", True), sm_scale=kwargs.get("sm_scale"))
    return out, lse, ref.reshape(out.shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("B,T,H,D", shapes(
    [(2, 37, 2, 64), (1, 19, 2, 128), (1, 40, 3, 32)],
    [(2, 1000, 12, 64), (1, 1023, 4, 256)]))
def test_matches_reference(key, blocks, dtype, causal, B, T, H, D):
    qkv = packed_qkv(key, B, T, H, H, D, dtype)
    out, lse, ref = run(qkv, num_heads=H, causal=causal)
    assert out.dtype == dtype and out.shape == (B, T, H * D) and lse.shape == (B, H, T)
    assert_close(out, ref)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("B,T,Hq,Hkv,D", shapes(
    [(1, 37, 4, 2, 64), (2, 21, 4, 1, 32)],
    [(1, 2048, 8, 2, 128)]))
def test_grouped_query_heads(key, blocks, dtype, B, T, Hq, Hkv, D):
    qkv = packed_qkv(key, B, T, Hq, Hkv, D, dtype)
    out, _, ref = run(qkv, num_heads=Hq, num_kv_heads=Hkv)
    assert out.shape == (B, T, Hq * D)
    assert_close(out, ref)


def padding_mask(T, lengths, left):
    """[B, T] int32: lengths[b] real tokens, at the end (left padding) or the start (right)."""
    pos = np.arange(T)[None, :]
    lengths = np.asarray(lengths)[:, None]
    return jnp.asarray(pos >= T - lengths if left else pos < lengths, jnp.int32)


def visible(mask, causal):
    """[B, T, T]: query i may see key j."""
    T = mask.shape[1]
    allowed = np.asarray(mask, bool)[:, None, :].repeat(T, 1)
    return allowed & np.tri(T, dtype=bool) if causal else allowed


# Batch row 2 is all padding; with left padding and causal, the leading pad queries of row 1
# see only padding too.
MASKS = {"left": dict(lengths=[37, 20, 0], left=True), "right": dict(lengths=[37, 11, 0], left=False)}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("padding", MASKS)
def test_attention_mask(key, blocks, dtype, causal, padding):
    B, T, H, D = 3, 37, 2, 32
    mask = padding_mask(T, **MASKS[padding])
    qkv = packed_qkv(key, B, T, H, H, D, dtype)
    out, _, ref = run(qkv, mask.astype(bool) if dtype == jnp.float16 else mask,
                      num_heads=H, causal=causal)
    assert_close(out, ref)
    no_key = ~visible(mask, causal).any(-1)  # [B, T]: query rows whose visible keys are all padding
    assert no_key.any()
    assert (np.asarray(out, np.float32)[no_key] == 0).all()


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_lse(key, blocks, causal):
    B, T, Hq, Hkv, D, sm_scale = 3, 37, 4, 2, 32, 0.3
    mask = padding_mask(T, **MASKS["left"])
    qkv = packed_qkv(key, B, T, Hq, Hkv, D, jnp.float32)
    out, lse, ref = run(qkv, mask, num_heads=Hq, num_kv_heads=Hkv, causal=causal, sm_scale=sm_scale)
    assert_close(out, ref)

    q, k, _ = split_heads(qkv, Hq, Hkv)
    k = jnp.repeat(k, Hq // Hkv, axis=2)
    s = jnp.einsum("bthd,bshd->bhts", q, k, precision=reference.HIGHEST) * sm_scale
    allowed = visible(mask, causal)[:, None]
    expected = np.asarray(jax.nn.logsumexp(jnp.where(allowed, s, -jnp.inf), axis=-1))
    lse = np.asarray(lse)
    seen = np.isfinite(expected)
    assert not seen.all()
    assert lse.dtype == np.float32 and lse.shape == (B, Hq, T)
    assert (lse[~seen] == np.inf).all()  # rows with no visible key: +inf, by design
    np.testing.assert_allclose(lse[seen], expected[seen], rtol=1e-5, atol=1e-5)


def test_tf32_precision(key):
    B, T, H, D = 1, 37, 2, 64
    qkv = packed_qkv(key, B, T, H, H, D, jnp.float32)
    out, _, ref = run(qkv, num_heads=H, precision="tf32")
    assert_close(out, ref, rtol=2e-3)  # tf32 keeps 10 mantissa bits: ~1e-3, like fp16


def test_flash_attention_returns_out(key):
    B, T, H, D = 1, 19, 2, 16
    qkv = packed_qkv(key, B, T, H, H, D, jnp.float16)
    out = jax.jit(functools.partial(attention.flash_attention, num_heads=H))(qkv)
    assert_close(out, run(qkv, num_heads=H)[2])


@pytest.mark.parametrize("shape,dtype,kwargs,match", [
    ((2, 8, 2, 192), jnp.float32, {}, "qkv must be 3-D"),
    ((2, 8, 190), jnp.float32, {}, "num_heads \\+ 2 \\* num_kv_heads"),
    ((2, 8, 4 * 48), jnp.float32, {"num_heads": 2, "num_kv_heads": 1}, "head_dim"),
    ((2, 8, 6 * 64), jnp.float32, {"num_heads": 3, "num_kv_heads": 2}, "num_kv_heads"),
    ((2, 8, 6 * 64), jnp.int32, {}, "qkv dtype"),
    ((2, 8, 6 * 64), jnp.float32, {"precision": "bf16"}, "precision"),
    ((2, 8, 6 * 64), jnp.float32, {"sm_scale": -1.0}, "sm_scale"),
    ((2, 8, 6 * 64), jnp.float32, {"attention_mask": jnp.ones((2, 9), jnp.int32)}, "attention_mask"),
    ((2, 8, 6 * 64), jnp.float32, {"attention_mask": jnp.ones((2, 8), jnp.float32)}, "attention_mask"),
    ((2731, 1, 3 * 24 * 16), jnp.float32, {"num_heads": 24}, "batch \\* num_heads"),
])
def test_invalid_arguments(shape, dtype, kwargs, match):
    kwargs = {"num_heads": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        attention.flash_attention(jnp.zeros(shape, dtype), **kwargs)
