"""Rotary position embedding (RoPE) for Llama, Hugging Face's semantics: a Triton kernel that
rotates the q and k heads of the packed qkv in place, behind a jax.custom_vjp.

For a token at position p, every q head and k head x (D values, x1 = x[:D/2], x2 = x[D/2:]) is
rotated pairwise, column j with column j + D/2, by the angle a_j (Hugging Face's rotate-half):

    a_j      = float32(p) * inv_freq_j                  (an fp32 product, as Hugging Face forms it)
    out[j]       = x1_j cos(a_j) - x2_j sin(a_j)        j < D/2
    out[j + D/2] = x2_j cos(a_j) + x1_j sin(a_j)

cos, sin and the rotation are fp32 whatever qkv's dtype; the result is rounded once to it. v heads
are left as they are. inv_freq [D/2] is Hugging Face's (`rope_frequencies`: rope_theta, and
rope_scaling of type "linear" or "llama3"). Hugging Face also returns an `attention_scaling` that
multiplies cos and sin: it is 1.0 for every supported type, so there is none here.

Backward: the rotation R(a) of each (x1_j, x2_j) pair is orthogonal, so the gradient is the
inverse rotation of the cotangent, dx = R(a)^T dy = R(-a) dy: the same kernel with sin negated,
on dy in place, its v columns (dv = dy's v part) passed through untouched. Positions are integers
and get no gradient. The custom_vjp saves nothing but positions: the map is linear in qkv.

Layout: qkv [B, T, (Hq + 2 Hkv) D], each token's row [q heads | k heads | v heads], each head D
contiguous values (the qkv projection's output, as jtgpt.kernels.attention reads it): the q and
k heads of a token are the first (Hq + Hkv) D values of its row. The output aliases qkv
(input_output_aliases), so the kernel reads and writes only those columns, and the v columns never
move; XLA copies qkv first only if something else still needs it.

Grid: one program per BLOCK_T consecutive tokens of the B T flattened ones. It computes cos and
sin of its [BLOCK_T, D/2] angles once, into registers, then loops over the Hq + Hkv rotated heads,
BLOCK_H at a time, in tiles [BLOCK_T, BLOCK_H, D/2] (twice: the x1 and x2 halves). The threads
run along the frequencies and tokens, BLOCK_T D/2 values being one 16-byte vector per thread, and
the heads are repeats within a thread, so each thread holds the same (token, frequency) pairs for
every head it rotates and reuses its cos and sin across them: no thread computes another's. The positions are a runtime array (they differ per
row with left padding and per decode step: a new position never recompiles); inv_freq, computed
on the host from the static arguments, is a small array constant.

cos and sin are computed here rather than with tl.cos / tl.sin, which compile to libdevice's cosf
and sinf: for |a| > 105615 (reached by the highest frequency, inv_freq_0 = 1, at Llama-3.1's 128K
context) those take a Payne-Hanek reduction that keeps a 32-byte array on the stack, local memory
in every program. `_cos_sin` instead reduces the fp32 angle exactly in fp64 (Cody-Waite, pi/2 in
three parts) and evaluates Taylor polynomials in fp64: cos and sin of the fp32 angle rounded to
fp32 at any int32 position, in registers only. About 45 fp64 operations per (token, frequency):
25M a layer for Llama-3.2-1B at B=8, T=2048, ~1.5 us of an H200's fp64 units, under the memory
time below.

Why a kernel of its own: it moves the q/k columns once each way and nothing else. For
Llama-3.2-1B (Hq=32, Hkv=8, D=64, bf16) at B=8, T=2048 that is 16384 tokens x 40 heads x 64 x
2 bytes = 84 MB read and 84 MB written, 168 MB a layer: ~35 us at the H200's 4.8 TB/s, 0.56 ms
over 16 layers, about 1% of a ~55 ms forward. The alternatives that would save even that:
- the qkv GEMM's epilogue: rotate-half pairs column d with d + D/2, which sit in other threads of
  the accumulator tile (or other tiles), unless the q/k weight rows are permuted to interleaved
  pairs (and the attention kernels read the permuted heads, since q.k is unchanged by it);
- the attention kernels' q/k loads: k would be rotated again for every query block that reads it,
  and the Hopper Gluon kernels copy k straight from global to shared memory (cp.async), with no
  registers to rotate it in on the way.
Measured on an H200 (bench/RESULTS.md, 2026-12-01): 0.71 ms of a 58.8 ms Llama-3.2-1B forward at
that shape (1.2%), 0.6% of its training step: the most either alternative could save, so RoPE
stays a kernel of its own.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from decimal import Decimal
from fractions import Fraction
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import triton
import triton.language as tl

from jtgpt.call import triton_call
from jtgpt.kernels import packed_qkv_heads

NUM_WARPS = 4
BLOCK_H = 4  # heads rotated per loop step: 2 x 4 x 16 bytes in flight per thread


# ------------------------------------------------------------------------------ frequencies

SUPPORTED_TYPES = ("default", "linear", "llama3")
_UNSUPPORTED = {
    "dynamic": "dynamic NTK scaling's frequencies depend on the longest sequence the model has "
               "seen so far, state that a functional model does not keep",
    "yarn": "YaRN is not implemented",
    "longrope": "LongRoPE is not implemented",
    "su": "'su' (LongRoPE's old name) is not implemented",
}
_KEYS = {"linear": ("factor",),
         "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                    "original_max_position_embeddings")}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """A supported Hugging Face rope_scaling: "linear" (factor) or "llama3" (all four fields).

    Frozen and hashable: it sits in model configs that jax.jit hashes. Plain RoPE is None, not a
    RopeScaling. Build it from Hugging Face's dict with `from_hf`; `to_hf` gives the dict back.
    """
    rope_type: str
    factor: float
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None

    def __post_init__(self):
        if self.rope_type not in _KEYS:
            raise ValueError(f"RopeScaling rope_type must be one of {tuple(_KEYS)}, "
                             f"got {self.rope_type!r}")
        for key in _KEYS["llama3"]:
            value = getattr(self, key)
            if key not in _KEYS[self.rope_type]:
                if value is not None:
                    raise ValueError(f"rope_scaling {key} is not a parameter of "
                                     f"{self.rope_type!r} scaling")
            elif key == "original_max_position_embeddings":
                if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
                    raise ValueError(f"rope_scaling {key} must be a positive int, got {value!r}")
                object.__setattr__(self, key, int(value))
            else:
                if (not isinstance(value, numbers.Real) or isinstance(value, bool)
                        or not math.isfinite(value) or value <= 0):
                    raise ValueError(f"rope_scaling {key} must be a positive number, got {value!r}")
                object.__setattr__(self, key, float(value))
        if self.factor < 1:
            # Hugging Face requires it too; below 1 the angles would also outgrow _cos_sin's range.
            raise ValueError(f"rope_scaling factor must be >= 1, got {self.factor}")
        if self.rope_type == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            # llama3 interpolates over (low, high): an empty band divides by zero.
            raise ValueError(f"rope_scaling high_freq_factor ({self.high_freq_factor}) must be "
                             f"greater than low_freq_factor ({self.low_freq_factor})")

    @classmethod
    def from_hf(cls, d: dict | None) -> RopeScaling | None:
        """From a Hugging Face config's `rope_scaling` (or newer `rope_parameters`) dict.

        The type is under "rope_type" (or the legacy "type"); None and type "default" are plain
        RoPE (None). A "rope_theta" key is not read (the config reads it), nor are keys the type
        does not use, as in Hugging Face. ValueError for an unsupported type and for a missing or
        ill-typed key, naming it.
        """
        if d is None:
            return None
        if not isinstance(d, dict):
            raise ValueError(f"rope_scaling must be a dict or None, got {d!r}")
        rope_type = d.get("rope_type", d.get("type"))
        if rope_type is None:
            raise ValueError(f"rope_scaling has no 'rope_type' (or legacy 'type') key: {d!r}")
        if rope_type == "default":
            return None
        if rope_type not in _KEYS:
            why = _UNSUPPORTED.get(rope_type, "unknown type")
            raise ValueError(f"rope_scaling type {rope_type!r} is not supported ({why}); "
                             f"supported: {SUPPORTED_TYPES}")
        missing = [key for key in _KEYS[rope_type] if key not in d]
        if missing:
            raise ValueError(f"rope_scaling of type {rope_type!r} needs {missing[0]!r}, "
                             f"missing from {d!r}")
        return cls(rope_type, **{key: d[key] for key in _KEYS[rope_type]})

    def to_hf(self) -> dict:
        """transformers 4.x's rope_scaling dict: {"rope_type": ..., and the type's keys}."""
        return {"rope_type": self.rope_type,
                **{key: getattr(self, key) for key in _KEYS[self.rope_type]}}


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> np.ndarray:
    """inv_freq, fp32 [head_dim // 2]: Hugging Face's, computed in fp32 in its order of operations
    (transformers.modeling_rope_utils: _compute_default_rope_parameters, then the linear or
    llama3 scaling)."""
    if not isinstance(head_dim, numbers.Integral) or head_dim < 2 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even int, got {head_dim!r}")
    if not theta > 0:
        raise ValueError(f"theta must be positive, got {theta!r}")
    f32 = np.float32
    inv_freq = f32(1.0) / f32(theta) ** (np.arange(0, head_dim, 2).astype(f32) / f32(head_dim))
    if scaling is None:
        return inv_freq
    factor = f32(scaling.factor)
    if scaling.rope_type == "linear":
        return inv_freq / factor
    # llama3: wavelengths above original / low are divided by factor, those below original / high
    # kept, and the band between interpolated smoothly in 1 / wavelength.
    old = scaling.original_max_position_embeddings
    low, high = scaling.low_freq_factor, scaling.high_freq_factor
    low_wavelen, high_wavelen = f32(old / low), f32(old / high)
    wavelen = f32(2 * math.pi) / inv_freq
    inv_freq = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (f32(old) / wavelen - f32(low)) / f32(high - low)
    smoothed = (f32(1) - smooth) * inv_freq / factor + smooth * inv_freq
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, inv_freq).astype(f32)


# ------------------------------------------------------------------------------------- kernel

def _pio2_parts(bits: int = 21) -> tuple[float, float, float]:
    """pi/2 = P1 + P2 + P3 to ~2^-95, P1 and P2 of `bits` significant bits each: their products
    with any integer j < 2^(53 - bits) are exact in fp64."""
    rest = Fraction(Decimal("1.5707963267948966192313216916397514420985846996875529"))  # 53 digits
    parts = []
    for _ in range(2):
        exponent = math.frexp(float(rest))[1] - bits
        parts.append(math.ldexp(math.floor(math.ldexp(float(rest), -exponent)), exponent))
        rest -= Fraction(parts[-1])
    return parts[0], parts[1], float(rest)


PIO2_1, PIO2_2, PIO2_3 = map(tl.constexpr, _pio2_parts())
TWO_OVER_PI = tl.constexpr(2 / math.pi)
# Terms up to r^13 / 13! (sin) and r^12 / 12! (cos): the first left out is < 4e-13 on |r| <= pi/4,
# so cos and sin round to fp32 as the exact values would but for near-ties.
TAYLOR_TERMS = tl.constexpr(6)


@triton.jit
def _f64(value: tl.constexpr):
    """value as an fp64 constant: a bare Python float in a Triton expression is rounded to fp32."""
    return tl.full([], value, tl.float64)


@triton.jit
def _cos_sin(angle):
    """(cos, sin) of the fp32 tensor `angle`, each rounded to fp32, in registers only (module
    docstring). The reduction is exact for |angle| < 2^32: any int32 position, since every
    inv_freq is <= 1 (theta^0 = 1 is the largest, divided by a scaling factor >= 1) for theta >= 1.

    angle = j pi/2 + r, |r| <= pi/4: j * P1 and j * P2 are exact, angle - j P1 is exact (the two
    are within a factor of 2), so r carries the fp64 rounding of the last two steps only.
    """
    x = angle.to(tl.float64)
    j = tl.floor(x * _f64(TWO_OVER_PI) + 0.5)
    r = x - j * _f64(PIO2_1) - j * _f64(PIO2_2) - j * _f64(PIO2_3)
    rr = r * r
    # Horner on the Taylor series: sin r = r (1 - r^2/(2 3) (1 - r^2/(4 5) (...))), cos alike.
    sin_r = tl.full(r.shape, 1.0, tl.float64)
    cos_r = tl.full(r.shape, 1.0, tl.float64)
    for i in tl.static_range(TAYLOR_TERMS, 0, -1):
        sin_r = 1.0 - rr * sin_r * _f64(1.0 / ((2 * i) * (2 * i + 1)))
        cos_r = 1.0 - rr * cos_r * _f64(1.0 / ((2 * i - 1) * (2 * i)))
    sin_r = r * sin_r
    # cos(j pi/2 + r) = cos r, -sin r, -cos r, sin r and sin(j pi/2 + r) = sin r, cos r, -sin r,
    # -cos r for j = 0, 1, 2, 3 mod 4 (two's complement & 3 is the mod for negative j too).
    quadrant = j.to(tl.int64) & 3
    odd = (quadrant & 1) == 1
    cos = tl.where(odd, sin_r, cos_r)
    sin = tl.where(odd, cos_r, sin_r)
    cos = tl.where((quadrant == 1) | (quadrant == 2), -cos, cos)
    sin = tl.where(quadrant >= 2, -sin, sin)
    return cos.to(tl.float32), sin.to(tl.float32)


@triton.jit
def _rope_kernel(x_ptr, pos_ptr, freq_ptr, out_ptr,
                 N_TOKENS: tl.constexpr, ROW: tl.constexpr, HEADS: tl.constexpr,
                 HALF: tl.constexpr, INVERSE: tl.constexpr, BLOCK_T: tl.constexpr,
                 BLOCK_H: tl.constexpr, BLOCK_J: tl.constexpr):
    """Program i: tokens [i BLOCK_T, (i + 1) BLOCK_T) of x [N_TOKENS, ROW], its first HEADS heads
    (of 2 HALF values each) rotated by their positions' angles (-angles if INVERSE) into out,
    which is x's buffer (aliased): the rest of each row is never touched.

    pos_ptr: int32 [N_TOKENS]; freq_ptr: fp32 inv_freq [HALF]. Grid (cdiv(N_TOKENS, BLOCK_T),).
    """
    first = tl.program_id(0) * BLOCK_T
    t = tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_J)
    t_ok = first + t < N_TOKENS
    col_ok = cols < HALF  # BLOCK_J is HALF rounded up to a power of two
    pos = tl.load(pos_ptr + first + t, mask=t_ok, other=0).to(tl.float32)
    inv_freq = tl.load(freq_ptr + cols, mask=col_ok, other=0.0)
    cos, sin = _cos_sin(pos[:, None] * inv_freq[None, :])  # [BLOCK_T, BLOCK_J], once per program
    if INVERSE:
        sin = -sin  # R(-a): cos(-a) = cos a, sin(-a) = -sin a
    # Tiles are [BLOCK_T, BLOCK_H, BLOCK_J]. Triton orders a tile's threads by the pointers'
    # contiguity, ties (tokens and heads, both strided) going to the lower axis: lanes and warps
    # run along freqs, then tokens, and the heads are register repeats of one thread's cos/sin.
    # Heads first instead, the lanes go along heads and each thread recomputes 4x as many angles.
    cos = cos[:, None, :]
    sin = sin[:, None, :]

    heads = tl.arange(0, BLOCK_H)
    # int64 program offset: N_TOKENS * ROW can pass 2**31 (64 x 8192 x 6144 for Llama-3-8B);
    # offsets within the program's BLOCK_T rows stay int32.
    base = first.to(tl.int64) * ROW
    offs = t[:, None, None] * ROW + heads[None, :, None] * (2 * HALF) + cols[None, None, :]
    tile_ok = t_ok[:, None, None] & col_ok[None, None, :]
    for h in range(0, HEADS, BLOCK_H):
        mask = tile_ok & (h + heads < HEADS)[None, :, None]
        x1_ptrs = x_ptr + base + h * (2 * HALF) + offs
        x1 = tl.load(x1_ptrs, mask=mask).to(tl.float32)
        x2 = tl.load(x1_ptrs + HALF, mask=mask).to(tl.float32)
        out1_ptrs = out_ptr + base + h * (2 * HALF) + offs
        tl.store(out1_ptrs, (x1 * cos - x2 * sin).to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(out1_ptrs + HALF, (x2 * cos + x1 * sin).to(out_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------ the op

class _Config(NamedTuple):
    num_heads: int
    num_kv_heads: int
    head_dim: int
    theta: float
    scaling: RopeScaling | None


def _launch_config(n_tokens: int, half: int, itemsize: int) -> tuple[int, int]:
    """(BLOCK_T, BLOCK_J): a [BLOCK_T, BLOCK_J] tile is one 16-byte vector per thread of
    NUM_WARPS warps (fewer tokens for a short input), so that BLOCK_H heads of it load at once."""
    block_j = triton.next_power_of_2(half)
    per_program = NUM_WARPS * 32 * (16 // itemsize)
    block_t = max(1, min(per_program // block_j, triton.next_power_of_2(n_tokens)))
    return block_t, block_j


def _rotate(qkv, positions, cfg: _Config, inverse: bool):
    """qkv with its q and k heads rotated by the positions' angles (-angles if inverse)."""
    B, T, row = qkv.shape
    n_tokens, half = B * T, cfg.head_dim // 2
    if n_tokens == 0:  # a grid of zero programs is not a valid GPU launch
        return qkv
    inv_freq = jnp.asarray(rope_frequencies(cfg.head_dim, cfg.theta, cfg.scaling))
    block_t, block_j = _launch_config(n_tokens, half, jnp.dtype(qkv.dtype).itemsize)
    out = triton_call(
        qkv.reshape(n_tokens, row), positions.reshape(n_tokens), inv_freq,
        kernel=_rope_kernel, out_shape=jax.ShapeDtypeStruct((n_tokens, row), qkv.dtype),
        input_output_aliases={0: 0}, grid=(triton.cdiv(n_tokens, block_t),), num_warps=NUM_WARPS,
        N_TOKENS=n_tokens, ROW=row, HEADS=cfg.num_heads + cfg.num_kv_heads, HALF=half,
        INVERSE=inverse, BLOCK_T=block_t, BLOCK_H=BLOCK_H, BLOCK_J=block_j)
    return out.reshape(qkv.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _rope(qkv, positions, cfg: _Config):
    return _rotate(qkv, positions, cfg, inverse=False)


def _rope_fwd(qkv, positions, cfg):
    return _rotate(qkv, positions, cfg, inverse=False), positions


def _rope_bwd(cfg, positions, dout):
    # The inverse rotation of the cotangent, in place: its v columns are dv as they are.
    return _rotate(dout, positions, cfg, inverse=True), np.zeros(positions.shape, jax.dtypes.float0)


_rope.defvjp(_rope_fwd, _rope_bwd)


def apply_rope(qkv, positions, *, num_heads, num_kv_heads=None, theta=10000.0, scaling=None):
    """Rotary position embedding of the q and k heads of a packed qkv; returns an array like qkv.

    qkv [B, T, (Hq + 2 Hkv) D] packed as [q heads | k heads | v heads], fp32/fp16/bf16, D even;
    num_heads Hq, num_kv_heads Hkv (default Hq; Hq must be a multiple of it). positions [B, T]
    integer (cast to int32): each token's position, any int32 value (past
    max_position_embeddings too, as in Hugging Face), a runtime array (new values do not
    recompile). theta: rope_theta; scaling: a RopeScaling or None (plain RoPE); together they
    give inv_freq (`rope_frequencies`).
    v heads come back unchanged. Differentiable wrt qkv (the inverse rotation of the cotangent,
    the same kernel); positions get no gradient. See the module docstring for the math.
    """
    num_kv_heads, head_dim = packed_qkv_heads(qkv, num_heads, num_kv_heads)
    B, T, _ = qkv.shape
    if head_dim % 2:
        raise ValueError(f"head_dim = qkv.shape[-1] / (num_heads + 2 * num_kv_heads) = {head_dim} "
                         f"must be even (rotate-half pairs column j with j + head_dim / 2)")
    positions = jnp.asarray(positions)
    if tuple(positions.shape) != (B, T):
        raise ValueError(f"positions must have shape [B, T] = {(B, T)}, "
                         f"got {tuple(positions.shape)}")
    if not jnp.issubdtype(positions.dtype, jnp.integer):
        raise ValueError(f"positions must be an integer array, got {positions.dtype}")
    if scaling is not None and not isinstance(scaling, RopeScaling):
        raise ValueError(f"scaling must be a RopeScaling or None (RopeScaling.from_hf reads "
                         f"Hugging Face's dict), got {scaling!r}")
    rope_frequencies(head_dim, theta, scaling)  # theta's check, before any tracing
    cfg = _Config(num_heads, num_kv_heads, head_dim, float(theta), scaling)
    return _rope(qkv, positions.astype(jnp.int32), cfg)
