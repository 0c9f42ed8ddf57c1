"""Flash attention (jtgpt.kernels.attention), forward and gradient, against
jtgpt.reference.attention and jax.vjp of it.

On CPU each case runs twice: with the GPU block sizes, where a tiny T is one partial block, and
with blocks shrunk to 32 x 16 ("small_blocks"; 16-query x 32-key blocks for dK/dV), so that the
same T crosses several query and key blocks: off-diagonal blocks, several blocks on the causal
diagonal (some with rows that see none of their keys), and a partial tail block.

Dropout has no reference stream: its tests recover the kernel's mask from the kernel itself (with
q = 0 and v = identity rows, out_i[j] is the kept probability z_ij) and check the output and the
gradient at random inputs against a jnp attention that takes that mask as input.
"""
import contextlib
import functools
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_close, shapes
from jtgpt import reference
from jtgpt.call import compile_only, gpu_capability
from jtgpt.kernels.attention import common, flash, hopper

DTYPES = [jnp.float32, jnp.float16, jnp.bfloat16]


@pytest.fixture(params=["gpu_blocks", "small_blocks"])
def blocks(request, monkeypatch):
    if request.param == "small_blocks":
        monkeypatch.setattr(flash, "_block_config", lambda *args: (32, 16, 4, 1))
        monkeypatch.setattr(flash, "_bwd_block_config",
                            lambda *args: ((16, 32, 4, 1), (32, 16, 4, 1)))


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
    fwd = jax.jit(lambda x, m: flash.attention_forward(x, attention_mask=m, **kwargs))
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


# tf32 keeps 10 mantissa bits: ~1e-3, like fp16; tf32x3 about fp32's accuracy (fp32's tolerance).
@pytest.mark.parametrize("precision,rtol", [("tf32x3", None), ("tf32", 2e-3)])
def test_tensor_core_fp32_precision(key, precision, rtol):
    B, T, H, D = 1, 37, 2, 64
    qkv = packed_qkv(key, B, T, H, H, D, jnp.float32)
    out, _, ref = run(qkv, num_heads=H, precision=precision)
    assert_close(out, ref, rtol=rtol)


def test_flash_attention_returns_out(key):
    B, T, H, D = 1, 19, 2, 16
    qkv = packed_qkv(key, B, T, H, H, D, jnp.float16)
    out = jax.jit(functools.partial(flash.flash_attention, num_heads=H))(qkv)
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
    """Each is refused while tracing (eval_shape: nothing runs, nothing is allocated)."""
    kwargs = {"num_heads": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(lambda qkv: flash.flash_attention(qkv, **kwargs),
                       jax.ShapeDtypeStruct(shape, dtype))


# ------------------------------------------------------------------------------------ gradient

def grads(key, qkv, mask=None, **kwargs):
    """(dqkv of flash_attention under jax.jit, dqkv of reference.attention in fp32) for one
    random cotangent."""
    Hq, Hkv = kwargs["num_heads"], kwargs.get("num_kv_heads") or kwargs["num_heads"]
    B, T, _ = qkv.shape
    D = qkv.shape[-1] // (Hq + 2 * Hkv)
    causal = kwargs.get("causal", True)
    dout = jax.random.normal(key, (B, T, Hq * D), jnp.float32)

    def ours(x):
        return flash.flash_attention(x, attention_mask=mask, **kwargs)

    def ref(x):
        out = reference.attention(*split_heads(x, Hq, Hkv), attention_mask=mask, causal=causal,
                                  sm_scale=kwargs.get("sm_scale"))
        return out.reshape(B, T, Hq * D)

    dqkv = jax.jit(lambda x, g: jax.vjp(ours, x)[1](g)[0])(qkv, dout.astype(qkv.dtype))
    expected = jax.vjp(ref, qkv.astype(jnp.float32))[1](dout)[0]
    assert dqkv.dtype == qkv.dtype and dqkv.shape == qkv.shape
    return dqkv, expected


def assert_grads_close(dqkv, expected, Hq, Hkv, dtype, rtol=None):
    """dq, dk and dv compared one by one (each has its own scale)."""
    D = dqkv.shape[-1] // (Hq + 2 * Hkv)
    for name, lo, hi in (("dq", 0, Hq), ("dk", Hq, Hq + Hkv), ("dv", Hq + Hkv, Hq + 2 * Hkv)):
        assert_close(dqkv[..., lo * D:hi * D], expected[..., lo * D:hi * D], dtype, rtol, what=name)


GRAD_TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("B,T,H,D", shapes(
    [(2, 37, 2, 64), (1, 40, 1, 32), (1, 64, 2, 32)],  # T = 64: whole blocks, the unmasked loads
    [(2, 1000, 12, 64), (1, 1023, 4, 128), (1, 515, 2, 256)]))
def test_gradient_matches_reference(key, blocks, dtype, causal, B, T, H, D):
    qkv = packed_qkv(key, B, T, H, H, D, dtype)
    dqkv, expected = grads(jax.random.fold_in(key, 1), qkv, num_heads=H, causal=causal)
    assert_grads_close(dqkv, expected, H, H, dtype, GRAD_TOLERANCE[dtype])


@pytest.mark.parametrize("head_group", [4, 5])
def test_head_groups_cover_every_program(key, blocks, head_group, monkeypatch):
    """Causal programs start in groups of HEAD_GROUP heads (common.program_in_group). With B * H = 6 the
    last group is partial, and with Hkv = 1 the dK/dV grid's B * Hkv = 2 heads are one partial
    group: every block of every head is still computed exactly once, forward and gradient."""
    monkeypatch.setattr(common, "HEAD_GROUP", head_group)
    qkv = packed_qkv(key, 2, 40, 3, 3, 32, jnp.float32)
    out, _, ref = run(qkv, num_heads=3)
    assert_close(out, ref)
    for Hkv in (3, 1):
        qkv = packed_qkv(key, 2, 40, 3, Hkv, 32, jnp.float32)
        dqkv, expected = grads(jax.random.fold_in(key, 1), qkv, num_heads=3, num_kv_heads=Hkv)
        assert_grads_close(dqkv, expected, 3, Hkv, jnp.float32, GRAD_TOLERANCE[jnp.float32])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("B,T,Hq,Hkv,D", shapes(
    [(1, 37, 4, 2, 32), (2, 21, 4, 1, 16)],
    [(1, 2048, 8, 2, 128)]))
def test_gradient_grouped_query_heads(key, blocks, dtype, B, T, Hq, Hkv, D):
    """dk, dv of a kv head sum over the query heads of its group."""
    qkv = packed_qkv(key, B, T, Hq, Hkv, D, dtype)
    dqkv, expected = grads(jax.random.fold_in(key, 1), qkv, num_heads=Hq, num_kv_heads=Hkv,
                           sm_scale=0.3)
    assert_grads_close(dqkv, expected, Hq, Hkv, dtype, GRAD_TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("padding", MASKS)
def test_gradient_attention_mask(key, blocks, dtype, causal, padding):
    """Rows that see no key (lse = +inf) get dq = 0, not NaN; padded keys get dk = dv = 0."""
    B, T, H, D = 3, 37, 2, 32
    mask = padding_mask(T, **MASKS[padding])
    qkv = packed_qkv(key, B, T, H, H, D, dtype)
    dqkv, expected = grads(jax.random.fold_in(key, 1), qkv, mask, num_heads=H, causal=causal)
    assert_grads_close(dqkv, expected, H, H, dtype, GRAD_TOLERANCE[dtype])
    dqkv = np.asarray(dqkv, np.float32).reshape(B, T, 3 * H, D)
    no_key = ~visible(mask, causal).any(-1)  # [B, T]
    assert no_key.any() and (dqkv[:, :, :H][no_key] == 0).all()
    padded = ~np.asarray(mask, bool)
    assert padded.any() and (dqkv[:, :, H:][padded] == 0).all()


def test_gradient_has_no_xla_dot(key):
    """The backward is Triton only: no dot_general in the jaxpr of the gradient."""
    qkv = packed_qkv(key, 1, 19, 4, 2, 16, jnp.float32)
    mask = padding_mask(19, [15], left=True)
    loss = lambda x: flash.flash_attention(  # noqa: E731
        x, num_heads=4, num_kv_heads=2, attention_mask=mask, dropout_rate=0.1,
        seed=jnp.int32(7)).sum()
    jaxpr = str(jax.make_jaxpr(jax.grad(loss))(qkv))
    assert "dot_general" not in jaxpr
    assert "pure_callback" in jaxpr or "triton" in jaxpr  # the kernels are in it


BWD_KERNELS = {"_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"}


@pytest.mark.parametrize("dtype,precision,D", [
    (jnp.bfloat16, "ieee", 64), (jnp.bfloat16, "ieee", 128),
    (jnp.float32, "tf32", 64), (jnp.float32, "tf32x3", 64)], ids=str)
def test_backward_builds_for_hopper(dtype, precision, D, monkeypatch, tmp_path):
    """The backward kernels of causal (GPT-2), padded + dropout, and non-causal attention build
    for sm_90: registers and shared memory fit an H100 SM; bf16 dQ does not spill and dK/dV only
    a little (its tiles won the GPU timing, bench/attention.py --sweep, spills and all), and no
    wgmma is serialized (ptxas warning C7515, read from its log on a cold Triton cache). The
    Gluon dQ kernel that replaces _attn_bwd_dq_kernel for some of these cases on Hopper is held
    off here: test_hopper_kernels_build checks it."""
    monkeypatch.setattr(hopper, "supported", lambda *args: False)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TRITON_DUMP_PTXAS_LOG", "1")
    B, T, H = 4, 1024, 4
    qkv = jax.ShapeDtypeStruct((B, T, 3 * H * D), dtype)
    mask = jax.ShapeDtypeStruct((B, T), jnp.int32)
    variants = [(True, None, 0.0), (True, mask, 0.1), (False, mask, 0.0)]  # causal, mask, rate
    log = io.StringIO()
    with contextlib.redirect_stdout(log), compile_only(capability=90) as built:
        for causal, m, rate in variants:
            loss = lambda x, m, causal=causal, rate=rate: flash.flash_attention(  # noqa: E731
                x, num_heads=H, attention_mask=m, causal=causal, precision=precision,
                dropout_rate=rate, seed=jnp.int32(1) if rate else None).astype(jnp.float32).sum()
            jax.eval_shape(jax.grad(loss), qkv, m)
    backward = [k for k in built if k.name in BWD_KERNELS]
    assert {k.name for k in backward} == BWD_KERNELS and len(backward) == 2 * len(variants)
    for k in backward:
        assert 0 < k.registers <= 255 and k.shared_bytes <= 227 * 1024, k
        if dtype == jnp.bfloat16:
            assert k.spill_bytes <= (256 if k.name == "_attn_bwd_dkdv_kernel" else 0), k
    assert "registers" in log.getvalue()  # ptxas -v wrote its log
    assert "C7515" not in log.getvalue()


# ----------------------------------------------------------------- Hopper forward and dQ (Gluon)

ON_HOPPER = gpu_capability() is not None and gpu_capability() // 10 == 9
needs_hopper = pytest.mark.skipif(not ON_HOPPER, reason="Gluon kernels run on Hopper GPUs only; "
                                  "test_hopper_kernels_build checks the build on CPU")
HOPPER_SHAPES = [(2, 128, 2, 2), (1, 384, 4, 2), (2, 256, 4, 1)]  # one and several blocks, GQA


@needs_hopper
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("B,T,Hq,Hkv", HOPPER_SHAPES)
def test_hopper_forward_matches_reference(key, dtype, causal, B, T, Hq, Hkv, monkeypatch):
    """Its out against the reference, its lse against the Triton kernel's (checked elsewhere)."""
    qkv = packed_qkv(key, B, T, Hq, Hkv, 128, dtype)
    _, _, _, cfg = flash._checked(qkv, Hq, Hkv, None, causal, None, "ieee", 0.0, None)
    assert hopper.supported(qkv, None, cfg)
    out, lse, ref = run(qkv, num_heads=Hq, num_kv_heads=Hkv, causal=causal)
    assert_close(out, ref, dtype)
    monkeypatch.setattr(hopper, "supported", lambda *args: False)
    _, triton_lse, _ = run(qkv, num_heads=Hq, num_kv_heads=Hkv, causal=causal)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(triton_lse), rtol=1e-5, atol=1e-5)


@needs_hopper
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("B,T,Hq,Hkv", HOPPER_SHAPES)
def test_hopper_dq_matches_triton(key, dtype, causal, B, T, Hq, Hkv, monkeypatch):
    """The Gluon dQ kernel's dq and delta against the Triton dQ kernel's, on the same out, lse and
    random dO (the Triton kernel is checked against the reference elsewhere). Both sum the same
    fp32 block products in the same order, so they agree to fp32 rounding."""
    qkv = packed_qkv(key, B, T, Hq, Hkv, 128, dtype)
    dout = jax.random.normal(jax.random.fold_in(key, 1), (B, T, Hq * 128)).astype(dtype)
    qkv, _, seed, cfg = flash._checked(qkv, Hq, Hkv, None, causal, None, "ieee", 0.0, None)
    out, lse, _ = flash._forward(qkv, None, seed, cfg)

    def dq_and_delta():
        dq, delta = jax.jit(lambda *a: flash._dq_and_delta(*a, cfg))(
            qkv, None, None, out, lse, dout)  # no mask, no dropout bits
        return np.asarray(dq[..., :Hq * 128], np.float32), np.asarray(delta)

    assert hopper.supported(qkv, None, cfg)
    dq, delta = dq_and_delta()
    monkeypatch.setattr(hopper, "supported", lambda *args: False)
    triton_dq, triton_delta = dq_and_delta()
    np.testing.assert_allclose(delta, triton_delta, rtol=1e-5, atol=1e-5)
    eps = float(jnp.finfo(dtype).eps)  # numpy's finfo does not know bfloat16
    np.testing.assert_allclose(dq, triton_dq, rtol=eps, atol=eps * np.abs(triton_dq).max())


@needs_hopper
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("B,T,Hq,Hkv", HOPPER_SHAPES)
def test_hopper_gradient(key, causal, B, T, Hq, Hkv):
    """The whole gradient through the Gluon forward and dQ kernels (and the Triton dK/dV
    kernel) against the reference's."""
    qkv = packed_qkv(key, B, T, Hq, Hkv, 128, jnp.bfloat16)
    dqkv, expected = grads(jax.random.fold_in(key, 1), qkv, num_heads=Hq, num_kv_heads=Hkv,
                           causal=causal)
    assert_grads_close(dqkv, expected, Hq, Hkv, jnp.bfloat16, GRAD_TOLERANCE[jnp.bfloat16])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=lambda d: jnp.dtype(d).name)
def test_hopper_kernels_build(dtype):
    """On an H100 the supported cases (causal or not, grouped-query heads) run the Gluon forward
    and dQ kernels: they build for sm_90 into 12 warps (two consumer warpgroups and the producer)
    within the SM's shared memory; other cases (a mask, T % 128 != 0, head_dim 64) keep the
    Triton kernels. dK/dV is the Triton kernel in every case."""
    gluon = {"_attn_fwd_hopper_kernel", "_attn_bwd_dq_hopper_kernel", "_attn_bwd_dkdv_kernel"}
    triton = {"_attn_fwd_kernel", "_attn_bwd_dq_kernel", "_attn_bwd_dkdv_kernel"}
    cases = [((2, 256, 4, 4, 128), False, True, gluon),
             ((2, 256, 4, 2, 128), False, False, gluon),
             ((2, 256, 4, 4, 128), True, True, triton),
             ((2, 200, 4, 4, 128), False, True, triton),
             ((2, 256, 4, 4, 64), False, True, triton)]
    for (B, T, Hq, Hkv, D), masked, causal, names in cases:
        qkv = jax.ShapeDtypeStruct((B, T, (Hq + 2 * Hkv) * D), dtype)
        mask = jax.ShapeDtypeStruct((B, T), jnp.int32) if masked else None
        loss = lambda x, m, Hq=Hq, Hkv=Hkv, causal=causal: flash.flash_attention(  # noqa: E731
            x, num_heads=Hq, num_kv_heads=Hkv, attention_mask=m, causal=causal).sum(
                dtype=jnp.float32)
        with compile_only(capability=90) as built:
            jax.eval_shape(jax.grad(loss), qkv, mask)
        assert {k.name for k in built} == names, (B, T, Hq, Hkv, D, masked, causal)
        for k in built:
            if "hopper" in k.name:
                assert k.num_warps == 12 and k.shared_bytes <= 227 * 1024, k


# ------------------------------------------------------------------------------------- dropout

def dropout_attention(qkv, z_mask, rate, Hq, Hkv, causal):
    """The reference attention with dropout mask z_mask [B, Hq, T, T] (1 = kept) as input."""
    q, k, v = (x.astype(jnp.float32) for x in split_heads(qkv, Hq, Hkv))
    B, T, _, D = q.shape
    k = jnp.repeat(k, Hq // Hkv, axis=2)
    v = jnp.repeat(v, Hq // Hkv, axis=2)
    s = jnp.einsum("bthd,bshd->bhts", q, k, precision=reference.HIGHEST) * D ** -0.5
    if causal:
        s = jnp.where(np.tri(T, dtype=bool), s, -jnp.inf)
    z = jax.nn.softmax(s, axis=-1) * z_mask / (1 - rate)
    return jnp.einsum("bhts,bshd->bthd", z, v, precision=reference.HIGHEST).reshape(B, T, Hq * D)


def kept(B, T, Hq, Hkv, causal, rate, seed):
    """The kernel's dropout mask [B, Hq, T, T] (bool) for this shape and seed: with q = 0 every
    visible p_ij is 1 / (number of visible keys), and with v_j = e_j (D = 64 >= T), out_i[j] is
    z_ij, zero exactly where dropped (or invisible)."""
    D = 64
    q = jnp.zeros((B, T, Hq * D), jnp.float32)
    k = jnp.ones((B, T, Hkv * D), jnp.float32)
    v = jnp.tile(jnp.eye(T, D, dtype=jnp.float32)[None, :, None, :], (B, 1, Hkv, 1))
    qkv = jnp.concatenate([q, k, v.reshape(B, T, Hkv * D)], axis=-1)
    out = jax.jit(functools.partial(flash.flash_attention, num_heads=Hq, num_kv_heads=Hkv,
                                    causal=causal, dropout_rate=rate))(qkv, seed=seed)
    z = np.asarray(out).reshape(B, T, Hq, D)[..., :T].transpose(0, 2, 1, 3)
    allowed = np.tri(T, dtype=bool) if causal else np.ones((T, T), bool)
    p = 1.0 / allowed.sum(-1, keepdims=True)
    assert np.allclose(z[:, :, allowed], 0.0) is False  # something is kept
    # Every visible z_ij is 0 (dropped) or p_ij / (1 - rate) (kept), nothing else.
    expected = np.where(z > 0, p / (1 - rate), 0.0)
    np.testing.assert_allclose(np.where(allowed, z, 0.0), np.where(allowed, expected, 0.0),
                               rtol=1e-5, atol=1e-7)
    return (z > 0) & allowed


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_dropout_matches_reference_given_its_mask(key, blocks, causal):
    """Output and gradient with dropout equal the reference's with the kernel's own mask: the
    backward regenerates exactly the forward's mask, in the dQ and in the (GQA) dK/dV kernel."""
    B, T, Hq, Hkv, D, rate = 2, 37, 4, 2, 32, 0.3
    seed = jnp.int32(1234)
    z_mask = kept(B, T, Hq, Hkv, causal, rate, seed)
    allowed = np.tri(T, dtype=bool) if causal else np.ones((T, T), bool)
    fraction = z_mask.sum() / (B * Hq * allowed.sum())
    assert abs(fraction - (1 - rate)) < 0.03, fraction  # ~5 standard deviations at 5.9k draws
    # Neighbouring keys (one Philox call draws eight) are dropped independently.
    pairs = allowed[:, :-1] & allowed[:, 1:]
    both = (~z_mask[..., :-1] & ~z_mask[..., 1:])[:, :, pairs]
    assert abs(both.mean() - rate ** 2) < 5 * np.sqrt(rate ** 2 * (1 - rate ** 2) / both.size)
    # Different (batch, head) pairs draw different masks.
    assert (z_mask[0, 0] != z_mask[1, 0]).any() and (z_mask[0, 0] != z_mask[0, 1]).any()

    qkv = packed_qkv(key, B, T, Hq, Hkv, D, jnp.float32)
    dout = jax.random.normal(jax.random.fold_in(key, 1), (B, T, Hq * D), jnp.float32)
    ours = functools.partial(flash.flash_attention, num_heads=Hq, num_kv_heads=Hkv,
                             causal=causal, dropout_rate=rate, seed=seed)
    out, dqkv = jax.jit(lambda x, g: (ours(x), jax.vjp(ours, x)[1](g)[0]))(qkv, dout)
    ref = lambda x: dropout_attention(x, z_mask, rate, Hq, Hkv, causal)  # noqa: E731
    assert_close(out, ref(qkv), rtol=1e-5, what="out")
    expected = jax.vjp(ref, qkv)[1](dout)[0]
    assert_grads_close(dqkv, expected, Hq, Hkv, jnp.float32, 2e-5)


def test_dropout_seed(key):
    """rate 0 ignores the seed; a seed reproduces its output and gradient; seeds differ."""
    B, T, H, D = 1, 19, 2, 16
    qkv = packed_qkv(key, B, T, H, H, D, jnp.float32)

    @functools.partial(jax.jit, static_argnums=1)
    def run(x, rate, seed):
        f = functools.partial(flash.flash_attention, num_heads=H, dropout_rate=rate, seed=seed)
        out, vjp = jax.vjp(f, x)
        return out, vjp(out)[0]

    plain = jax.jit(lambda x: flash.flash_attention(x, num_heads=H))(qkv)
    np.testing.assert_array_equal(run(qkv, 0.0, jnp.int32(5))[0], plain)
    a, b, c = (run(qkv, 0.5, jnp.int32(s)) for s in (5, 5, 6))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    for x, y in zip(a, c):
        assert not np.allclose(x, y)


@pytest.mark.parametrize("kwargs,match", [
    (dict(dropout_rate=1.0, seed=jnp.int32(1)), "dropout_rate"),
    (dict(dropout_rate=0.1), "seed"),
    (dict(dropout_rate=0.1, seed=jnp.zeros(2, jnp.int32)), "seed"),
])
def test_invalid_dropout(kwargs, match):
    with pytest.raises(ValueError, match=match):
        flash.flash_attention(jnp.ones((1, 8, 6 * 16), jnp.float32), num_heads=2, **kwargs)
