"""RoPE (jtgpt.kernels.rope) vs jtgpt.reference.rope on the split q and k heads, and its
frequencies vs Hugging Face's own, on random inputs.

Tiny shapes: the kernel runs in Triton's interpreter on CPU. The Llama-sized launch configs are
checked by building them for sm_90 (compile_only) at the end.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from conftest import assert_close, relative_error, shapes
from jtgpt import reference
from jtgpt.call import compile_only
from jtgpt.kernels.rope import RopeScaling, apply_rope, rope_frequencies

DTYPES = [jnp.float32, jnp.float16, jnp.bfloat16]
LLAMA31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 8192}
LLAMA32 = {**LLAMA31, "factor": 32.0}
# original_max_position_embeddings=16: at head_dim 16 the band (4, 16) holds a wavelength, and
# the positions of a tiny test already pass it.
TINY_LLAMA3 = {**LLAMA31, "original_max_position_embeddings": 16}

# (B, T, Hq, Hkv, D). Odd T; 6 and 5 rotated heads (not multiples of the kernel's BLOCK_H = 4);
# tokens over more than one program at D=64 and 128 (BLOCK_T 8 to 32), the last one ragged;
# D=48 pads its 24 frequencies to 32.
SHAPES = shapes(small=[(2, 7, 4, 2, 16), (2, 9, 4, 1, 128), (3, 11, 2, 2, 64), (1, 5, 2, 1, 48)],
                large=[(8, 2048, 32, 8, 64), (2, 4096, 32, 8, 128)])


def _qkv(key, b, t, hq, hkv, d, dtype):
    return jax.random.normal(key, (b, t, (hq + 2 * hkv) * d)).astype(dtype)


def _padded_positions(b, t):
    """Row i: i + 1 zeros (left padding), then 0, 1, 2, ...: different positions per row."""
    pad = np.minimum(np.arange(b)[:, None] + 1, t - 1)
    return jnp.asarray(np.maximum(np.arange(t)[None, :] - pad, 0), jnp.int32)


@functools.partial(jax.jit, static_argnums=(2, 3))  # one XLA compile, not one per op
def _reference(qkv, positions, hq, hkv, inv_freq):
    """reference.rope on the q heads and on the k heads of the packed qkv; v as it is."""
    b, t, width = qkv.shape
    x = qkv.reshape(b, t, hq + 2 * hkv, width // (hq + 2 * hkv))
    q, k, v = x[:, :, :hq], x[:, :, hq:hq + hkv], x[:, :, hq + hkv:]
    rotated = [reference.rope(q, positions, inv_freq), reference.rope(k, positions, inv_freq), v]
    return jnp.concatenate(rotated, axis=2).reshape(qkv.shape)


def _check_forward(qkv, positions, hq, hkv, theta=10000.0, scaling=None):
    d = qkv.shape[-1] // (hq + 2 * hkv)
    out = jax.jit(lambda x, p: apply_rope(x, p, num_heads=hq, num_kv_heads=hkv, theta=theta,
                                          scaling=scaling))(qkv, positions)
    expected = _reference(qkv, positions, hq, hkv, rope_frequencies(d, theta, scaling))
    assert out.shape == qkv.shape and out.dtype == qkv.dtype
    qk = (hq + hkv) * d
    assert_close(out[..., :qk], expected[..., :qk], what="q and k heads")
    np.testing.assert_array_equal(np.asarray(out[..., qk:]), np.asarray(qkv[..., qk:]))  # v
    return out


# --------------------------------------------------------------------------------- frequencies

@pytest.mark.parametrize("head_dim, theta, rope_scaling", [
    (64, 10000.0, None), (128, 500000.0, None),
    (64, 10000.0, {"rope_type": "linear", "factor": 4.0}),
    (128, 500000.0, LLAMA31), (64, 500000.0, LLAMA32), (16, 10000.0, TINY_LLAMA3),
], ids=["default", "default-500k", "linear", "llama3.1", "llama3.2", "llama3-tiny"])
def test_frequencies_match_hf(head_dim, theta, rope_scaling):
    config = transformers.LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4,
                                      head_dim=head_dim, rope_theta=theta,
                                      rope_scaling=rope_scaling, max_position_embeddings=131072)
    rope_type = (rope_scaling or {}).get("rope_type", "default")
    hf, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    ours = rope_frequencies(head_dim, theta, RopeScaling.from_hf(rope_scaling))
    assert ours.dtype == np.float32 and ours.shape == (head_dim // 2,)
    np.testing.assert_allclose(ours, hf.numpy(), rtol=1e-6, atol=0)
    # No scaling of cos and sin is needed for any supported type.
    assert attention_scaling == 1.0


@pytest.mark.parametrize("head_dim, theta, rope_scaling, bands", [
    (128, 500000.0, LLAMA31, {"kept", "smoothed", "divided"}),
    (16, 10000.0, TINY_LLAMA3, {"smoothed", "divided"}),  # every wavelength is >= 2 pi > 16 / 4
], ids=["llama3.1", "llama3-tiny"])
def test_llama3_cases_cover_its_bands(head_dim, theta, rope_scaling, bands):
    """The cases above test llama3's band logic only where they reach the bands: wavelengths
    below original / high_freq_factor kept, above original / low_freq_factor divided by factor,
    and smoothed between."""
    plain = rope_frequencies(head_dim, theta)
    scaled = rope_frequencies(head_dim, theta, RopeScaling.from_hf(rope_scaling))
    kept = scaled == plain
    divided = np.isclose(scaled, plain / rope_scaling["factor"], rtol=1e-6)
    found = {"kept": kept.any(), "divided": divided.any(), "smoothed": (~kept & ~divided).any()}
    assert {band for band, hit in found.items() if hit} == bands


# ------------------------------------------------------------------------------------ forward

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rope_matches_reference(key, shape, dtype):
    b, t = shape[:2]
    _check_forward(_qkv(key, *shape, dtype), _padded_positions(b, t), *shape[2:4])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: d.__name__)
def test_rope_large_positions(key, dtype):
    """Positions up to 2^17 (Llama-3.1's 128K context and past it): angles up to ~1.3e5 rad."""
    kx, kp = jax.random.split(key)
    shape = (2, 9, 4, 2, 64)
    positions = jax.random.randint(kp, shape[:2], 0, 2**17 + 1, jnp.int32)
    _check_forward(_qkv(kx, *shape, dtype), positions, 4, 2, theta=500000.0)


def test_rope_llama3_scaling(key):
    kx, kp = jax.random.split(key)
    qkv = _qkv(kx, 2, 7, 4, 2, 16, jnp.float32)
    positions = jax.random.randint(kp, (2, 7), 0, 200, jnp.int32)
    scaled = _check_forward(qkv, positions, 4, 2, scaling=RopeScaling.from_hf(TINY_LLAMA3))
    plain = jax.jit(lambda x, p: apply_rope(x, p, num_heads=4, num_kv_heads=2))(qkv, positions)
    assert relative_error(scaled, plain) > 0.1  # the scaling is applied, not ignored


def test_rope_extreme_positions_fp32(key):
    """Any int32 position: cos and sin of the fp32 angle to fp32 accuracy, checked in float64
    (numpy's cos reduces huge arguments exactly) at positions up to +-2^31."""
    kx, kp = jax.random.split(key)
    hq, hkv, d = 2, 1, 16
    qkv = _qkv(kx, 2, 8, hq, hkv, d, jnp.float32)
    positions = np.array(jax.random.randint(kp, (2, 8), -2**31, 2**31 - 1, jnp.int32))
    positions[0, :4] = [2**31 - 1, -2**31, 105616, -1]  # 105616: past libdevice's fast path
    out = jax.jit(lambda x, p: apply_rope(x, p, num_heads=hq, num_kv_heads=hkv))(qkv, positions)

    inv_freq = rope_frequencies(d, 10000.0)
    angle = positions.astype(np.float32)[..., None, None] * inv_freq  # fp32, as HF
    cos, sin = np.cos(angle.astype(np.float64)), np.sin(angle.astype(np.float64))
    x = np.asarray(qkv, np.float64).reshape(2, 8, hq + 2 * hkv, d)[:, :, :hq + hkv]
    x1, x2 = x[..., :d // 2], x[..., d // 2:]
    expected = np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    got = np.asarray(out).reshape(2, 8, hq + 2 * hkv, d)[:, :, :hq + hkv]
    # Each output may carry the fp32 rounding of cos and sin and of the rotation's two products
    # and sum: under 2 ulp (2.4e-7) of |x1| + |x2|, element by element. A reduction without
    # pi/2's third part (7e-5) or a Taylor series of 3 terms (2.5e-6) fails.
    magnitude = np.abs(x1) + np.abs(x2)
    error = np.abs(got - expected) / np.concatenate([magnitude, magnitude], axis=-1)
    assert np.isfinite(got).all() and error.max() <= 2.4e-7, error.max()


def test_rope_new_positions_do_not_recompile(key):
    traces = []

    @jax.jit
    def f(qkv, positions):
        traces.append(None)
        return apply_rope(qkv, positions, num_heads=4, num_kv_heads=2)

    qkv = _qkv(key, 2, 5, 4, 2, 16, jnp.float32)
    first, second = _padded_positions(2, 5), _padded_positions(2, 5) + 1000
    out1, out2 = f(qkv, first), f(qkv, second)
    assert len(traces) == 1
    inv_freq = rope_frequencies(16, 10000.0)
    assert_close(out1, _reference(qkv, first, 4, 2, inv_freq))
    assert_close(out2, _reference(qkv, second, 4, 2, inv_freq))


# ----------------------------------------------------------------------------------- backward

@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: d.__name__)
@pytest.mark.parametrize("shape", [(2, 9, 4, 2, 64), (2, 7, 4, 1, 16)], ids=str)
def test_rope_grad_matches_reference(key, shape, dtype):
    kx, kdy = jax.random.split(key)
    b, t, hq, hkv, d = shape
    qkv, positions = _qkv(kx, *shape, dtype), _padded_positions(b, t) * 37
    dy = jax.random.normal(kdy, qkv.shape).astype(dtype)
    inv_freq = rope_frequencies(d, 10000.0)

    ours = lambda x, p: apply_rope(x, p, num_heads=hq, num_kv_heads=hkv)  # noqa: E731
    ref = lambda x, p: _reference(x, p, hq, hkv, inv_freq)  # noqa: E731
    vjp = lambda f: jax.jit(lambda x, p, g: jax.vjp(f, x, p)[1](g))  # noqa: E731
    dqkv, dpos = vjp(ours)(qkv, positions, dy)
    expected, _ = vjp(ref)(qkv, positions, dy)
    assert dqkv.shape == qkv.shape and dqkv.dtype == qkv.dtype
    assert dpos.dtype == jax.dtypes.float0 and dpos.shape == positions.shape
    qk = (hq + hkv) * d
    assert_close(dqkv[..., :qk], expected[..., :qk], what="dq and dk")
    np.testing.assert_array_equal(np.asarray(dqkv[..., qk:]), np.asarray(dy[..., qk:]))  # dv


def test_rope_backward_inverts_forward_fp32(key):
    """The backward is the inverse rotation: applied to the forward's output it gives qkv back."""
    kx, kp = jax.random.split(key)
    qkv = _qkv(kx, 2, 9, 4, 2, 64, jnp.float32)
    positions = jax.random.randint(kp, (2, 9), 0, 2**17, jnp.int32)
    rotate = lambda x: apply_rope(x, positions, num_heads=4, num_kv_heads=2)  # noqa: E731
    out, inverse = jax.vjp(rotate, qkv)
    assert relative_error(out, qkv) > 0.5  # it did rotate
    (back,) = inverse(out)
    assert_close(back, qkv, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(back[..., 6 * 64:]), np.asarray(qkv[..., 6 * 64:]))


# -------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("qkv_shape, qkv_dtype, pos_shape, pos_dtype, heads, kwargs, match", [
    ((2, 5 * 16), jnp.float32, (2, 5), jnp.int32, (3, 1), {}, "qkv must be 3-D"),
    ((2, 5, 5 * 16), jnp.int32, (2, 5), jnp.int32, (3, 1), {}, "qkv dtype"),
    ((2, 5, 5 * 16 + 2), jnp.float32, (2, 5), jnp.int32, (3, 1), {}, "last dim"),
    ((2, 5, 5 * 15), jnp.float32, (2, 5), jnp.int32, (3, 1), {}, "must be even"),
    ((2, 5, 7 * 16), jnp.float32, (2, 5), jnp.int32, (3, 2), {}, "multiple of num_kv_heads"),
    ((2, 5, 5 * 16), jnp.float32, (2, 4), jnp.int32, (3, 1), {}, r"positions must have shape"),
    ((2, 5, 5 * 16), jnp.float32, (5,), jnp.int32, (3, 1), {}, r"positions must have shape"),
    ((2, 5, 5 * 16), jnp.float32, (2, 5), jnp.float32, (3, 1), {}, "positions must be an integer"),
    ((2, 5, 5 * 16), jnp.float32, (2, 5), jnp.int32, (3, 1), {"scaling": LLAMA31},
     "scaling must be a RopeScaling"),
    ((2, 5, 5 * 16), jnp.float32, (2, 5), jnp.int32, (3, 1), {"theta": 0.0},
     "theta must be positive"),
], ids=["2d", "int-qkv", "width", "odd-head-dim", "gqa-ratio", "pos-shape", "pos-1d", "float-pos",
        "dict-scaling", "theta"])
def test_rope_bad_arguments(qkv_shape, qkv_dtype, pos_shape, pos_dtype, heads, kwargs, match):
    qkv, positions = jnp.ones(qkv_shape, qkv_dtype), jnp.zeros(pos_shape, pos_dtype)
    with pytest.raises(ValueError, match=match):
        apply_rope(qkv, positions, num_heads=heads[0], num_kv_heads=heads[1], **kwargs)


# --------------------------------------------------------------------------------- RopeScaling

def test_rope_scaling_from_and_to_hf():
    for hf in ({"rope_type": "linear", "factor": 2.0}, LLAMA31, LLAMA32):
        scaling = RopeScaling.from_hf(hf)
        assert scaling.to_hf() == hf and RopeScaling.from_hf(scaling.to_hf()) == scaling
    # The legacy "type" key, ints for floats, and keys it does not read (rope_theta, which the
    # config reads from a newer rope_parameters dict) give the same value, with the same hash.
    legacy = {"type": "llama3", "factor": 8, "low_freq_factor": 1, "high_freq_factor": 4,
              "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
    assert RopeScaling.from_hf(legacy) == RopeScaling.from_hf(LLAMA31)
    assert hash(RopeScaling.from_hf(legacy)) == hash(RopeScaling.from_hf(LLAMA31))
    assert RopeScaling.from_hf(legacy).to_hf() == LLAMA31
    for plain in (None, {"rope_type": "default", "rope_theta": 10000.0}, {"type": "default"}):
        assert RopeScaling.from_hf(plain) is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        RopeScaling.from_hf(LLAMA31).factor = 2.0


@pytest.mark.parametrize("hf, match", [
    ({"rope_type": "dynamic", "factor": 2.0}, "'dynamic' is not supported.*longest sequence"),
    ({"rope_type": "yarn", "factor": 2.0}, "'yarn' is not supported"),
    ({"rope_type": "longrope", "factor": 2.0}, "'longrope' is not supported"),
    ({"type": "su", "factor": 2.0}, "'su' is not supported"),
    ({"rope_type": "ntk", "factor": 2.0}, r"'ntk' is not supported.*'linear', 'llama3'"),
    ({"factor": 2.0}, "rope_type"),
    ({"rope_type": "linear"}, "'factor'"),
    ({"rope_type": "linear", "factor": "2"}, "factor must be a positive number"),
    ({"rope_type": "linear", "factor": True}, "factor must be a positive number"),
    ({"rope_type": "linear", "factor": 0.5}, "factor must be >= 1"),
    ({k: v for k, v in LLAMA31.items() if k != "original_max_position_embeddings"},
     "'original_max_position_embeddings'"),
    ({**LLAMA31, "original_max_position_embeddings": 8192.0},
     "original_max_position_embeddings must"),
    ({**LLAMA31, "low_freq_factor": None}, "low_freq_factor must be a positive number"),
    ({**LLAMA31, "high_freq_factor": 1.0}, "high_freq_factor .* greater than low_freq_factor"),
    ([("rope_type", "linear")], "must be a dict"),
], ids=["dynamic", "yarn", "longrope", "su", "unknown", "no-type", "no-factor", "str-factor",
        "bool-factor", "small-factor", "no-original", "float-original", "none-low", "empty-band",
        "list"])
def test_rope_scaling_errors(hf, match):
    with pytest.raises(ValueError, match=match):
        RopeScaling.from_hf(hf)


# ----------------------------------------------------------------------------------- GPU build

@pytest.mark.parametrize("head_dim", [64, 128], ids=["llama-3.2-1b", "llama-3.1-8b"])
def test_rope_builds_for_hopper(head_dim):
    """Forward and backward at Llama's shapes (Hq=32, Hkv=8, B=8, T=2048, bf16) fit an H100/H200
    without spilling: no stack at all (the point of _cos_sin, see the module docstring)."""
    qkv = jax.ShapeDtypeStruct((8, 2048, 48 * head_dim), jnp.bfloat16)
    positions = jax.ShapeDtypeStruct((8, 2048), jnp.int32)
    loss = lambda x, p: apply_rope(x, p, num_heads=32, num_kv_heads=8, theta=500000.0,  # noqa: E731
                                   scaling=RopeScaling.from_hf(LLAMA32)).astype(jnp.float32).sum()
    with compile_only(capability=90) as built:
        jax.eval_shape(jax.grad(loss), qkv, positions)
    assert sorted(k.constexprs["INVERSE"] for k in built) == [False, True]  # forward, backward
    for k in built:
        assert k.name == "_rope_kernel"
        assert 0 < k.registers <= 255 and k.spill_bytes == 0 and k.shared_bytes <= 227 * 1024, k
