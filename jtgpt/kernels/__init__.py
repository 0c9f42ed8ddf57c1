"""Triton kernels, one op family per module, and the argument checks and dropout masks they
share."""
import jax.numpy as jnp
import triton
import triton.language as tl

FLOAT_DTYPES = tuple(map(jnp.dtype, (jnp.float32, jnp.float16, jnp.bfloat16)))
# How fp32 operands are multiplied (16-bit operands always run on the tensor cores as they are):
# "ieee", true fp32 products on the FMA units; "tf32x3", each operand split into a tf32 high part
# and a tf32 remainder, three tensor-core products (hi*hi + hi*lo + lo*hi) that keep about fp32's
# accuracy; "tf32", one tensor-core product of operands rounded to tf32 (10-bit mantissa, ~1e-3).
PRECISIONS = ("ieee", "tf32x3", "tf32")


def check_float_dtype(what: str, dtype) -> None:
    """ValueError naming `what` (e.g. "x dtype") unless dtype is float32, float16 or bfloat16."""
    if jnp.dtype(dtype) not in FLOAT_DTYPES:
        raise ValueError(f"{what} must be float32, float16 or bfloat16, got {jnp.dtype(dtype).name}")


def check_precision(op: str, precision) -> None:
    """ValueError naming op (the function called) unless precision is one of PRECISIONS."""
    if precision not in PRECISIONS:
        raise ValueError(f"{op}: precision must be one of {PRECISIONS}, got {precision!r}")


def packed_qkv_heads(qkv, num_heads: int, num_kv_heads: int | None) -> tuple[int, int]:
    """(num_kv_heads, head_dim) of a packed qkv [B, T, (num_heads + 2 num_kv_heads) head_dim]
    (num_kv_heads None: num_heads), after checking qkv's rank, dtype and width and the heads."""
    if getattr(qkv, "ndim", None) != 3:
        raise ValueError(f"qkv must be 3-D [B, T, (num_heads + 2 * num_kv_heads) * head_dim], "
                         f"got shape {getattr(qkv, 'shape', None)}")
    check_float_dtype("qkv dtype", qkv.dtype)
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if num_kv_heads < 1 or num_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a positive multiple of num_kv_heads "
                         f"({num_kv_heads})")
    heads = num_heads + 2 * num_kv_heads
    if qkv.shape[-1] % heads:
        raise ValueError(f"qkv's last dim ({qkv.shape[-1]}) must be (num_heads + 2 * num_kv_heads) "
                         f"* head_dim = {heads} * head_dim")
    return num_kv_heads, qkv.shape[-1] // heads


def dropout_seed(dropout_rate: float, seed):
    """The int32 seed array a dropout kernel loads, after checking rate and seed.

    dropout_rate must be in [0, 1); above 0, seed (an integer array of shape (), traced or not: a
    new seed does not recompile) is required. Without dropout the kernel never reads the seed.
    """
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}")
    if dropout_rate == 0.0:
        return jnp.zeros((), jnp.int32)
    if seed is None:
        raise ValueError("seed (an integer array of shape ()) is required when dropout_rate > 0")
    seed = jnp.asarray(seed)
    if seed.shape != () or not jnp.issubdtype(seed.dtype, jnp.integer):
        raise ValueError(f"seed must be an integer scalar array, got {seed.dtype}{list(seed.shape)}")
    return seed.astype(jnp.int32)


@triton.jit
def kept_draw(u, DROPOUT_P: tl.constexpr):
    """Whether dropout keeps the element of the 16-bit draw u (an integer in [0, 2**16)):
    u / 2**16 >= DROPOUT_P. Every dropout mask here decides through this one comparison."""
    return u.to(tl.float32) * (1.0 / 65536) >= DROPOUT_P


@triton.jit
def keep_from_philox(r0, r1, r2, r3, DROPOUT_P: tl.constexpr, ROWS: tl.constexpr,
                     COLS: tl.constexpr):
    """[ROWS, COLS] bool, which elements dropout keeps, from one Philox call's four 32-bit words
    [ROWS, COLS // 8] per eight elements: each word cut into two 16-bit draws u (column 8j + 2i + h
    takes half h of word i of call j), kept where kept_draw(u), so the rate is rounded
    up to a multiple of 2**-16. Half the Philox calls of 32-bit draws: their rounds' integer
    multiplies, more than the dots, bound attention with dropout at head_dim 64 (GPT-2's training
    shape ran 25% faster forward and 13% forward + backward with 16-bit draws than 32-bit, on an
    H100)."""
    words = tl.join(tl.join(r0, r2), tl.join(r1, r3))  # [ROWS, COLS // 8, 2, 2]: r0 .. r3
    halves = tl.join(words & 0xFFFF, words >> 16)
    return kept_draw(halves.reshape(ROWS, COLS), DROPOUT_P)


@triton.jit
def dropout_keep(seed_ptr, rows, col0, N: tl.constexpr, DROPOUT_P: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Which elements of an [M, N] array's tile (rows, columns col0 + [0, BLOCK_N); col0 a
    multiple of 8) dropout keeps: a function of the seed at seed_ptr and of (m, n) alone, so a
    backward kernel regenerates the forward's mask with tiles of its own. One Philox call makes
    eight draws (keep_from_philox): columns 8j..8j+7 of row m share the int32 counter
    m * ceil(N / 8) + j (distinct for M * N < 2**34).
    (tl.rand, one call per element, kept four 32-bit words live per element and spilled
    kilobytes in the GEMM epilogue.)"""
    octets = col0 // 8 + tl.arange(0, BLOCK_N // 8)
    counters = rows[:, None] * ((N + 7) // 8) + octets[None, :]
    r0, r1, r2, r3 = tl.randint4x(tl.load(seed_ptr), counters)
    return keep_from_philox(r0, r1, r2, r3, DROPOUT_P, BLOCK_M, BLOCK_N)


@triton.jit
def dropout(x, seed_ptr, rows, col0, N: tl.constexpr, DROPOUT_P: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """x [BLOCK_M, BLOCK_N], the tile of an [M, N] array at (rows, col0 + [0, BLOCK_N)), times
    keep / (1 - p) with dropout_keep's mask: a forward's dropout, and equally its backward's on
    the cotangent (the derivative is the same mask and scale)."""
    keep = dropout_keep(seed_ptr, rows, col0, N, DROPOUT_P, BLOCK_M, BLOCK_N)
    return tl.where(keep, x * (1.0 / (1.0 - DROPOUT_P)), 0.0)
