"""GEMM with a fused epilogue: y = dropout(act(x @ W + bias)) + residual.

    x [M, K] (any leading dims, flattened), W [K, N] (or [N, K] read transposed: the tied LM head
    multiplies by wte [V, D] without a transposed copy), bias [N], residual [M, N].
    act is identity or GPT-2's tanh-GELU:
        gelu_tanh(y) = 0.5 y (1 + tanh(u)) = y * sigmoid(2u),   u = sqrt(2/pi) (y + 0.044715 y^3)
    dropout keeps an element with probability 1 - p, drawn from tl.rand(seed, m * N + n), and
    scales it by 1 / (1 - p).

The products accumulate in fp32 and every epilogue step runs in fp32 on the accumulator, so the
activation, bias and residual cost no extra pass over memory; the result is cast once to x.dtype.
fp32 inputs use true IEEE fp32 products by default (`precision="ieee"`); `precision="tf32"` opts
into the tensor cores' tf32 (Triton's own default for fp32, chosen explicitly here).
"""
import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from jtgpt.call import on_gpu, triton_call
from jtgpt.kernels import check_float_dtype, dropout_seed

SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)  # kernels read globals only as constexprs
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _matmul_kernel(x_ptr, w_ptr, bias_ptr, residual_ptr, seed_ptr, out_ptr,
                   M: tl.constexpr, N: tl.constexpr, K: tl.constexpr,
                   stride_wk: tl.constexpr, stride_wn: tl.constexpr,
                   HAS_BIAS: tl.constexpr, GELU: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                   DROPOUT_P: tl.constexpr, FP32_IEEE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   GROUP_M: tl.constexpr):
    # Grouped tile order: GROUP_M row-tiles share each column-tile of W while it sits in L2.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * tiles_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * tiles_n)) % group_size
    pid_n = (pid % (GROUP_M * tiles_n)) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Out-of-range rows and columns wrap onto valid ones so the loads in the K loop need no mask;
    # the store below drops them. Rows go 64-bit: the LM head's M * N passes 2**31.
    rows = (offs_m % M).to(tl.int64)
    cols = offs_n % N
    x_ptrs = x_ptr + rows[:, None] * K + offs_k[None, :]
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + cols[None, :] * stride_wn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if K % BLOCK_K == 0:
            a = tl.load(x_ptrs)
            b = tl.load(w_ptrs)
        else:
            k_left = K - k * BLOCK_K
            a = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            b = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        if FP32_IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk

    y = acc
    if HAS_BIAS:
        y += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
    if GELU:
        u = SQRT_2_OVER_PI * (y + 0.044715 * y * y * y)
        y = y / (1.0 + tl.exp2(-2.0 * LOG2E * u))
    out_offsets = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    if DROPOUT_P > 0.0:
        seed = tl.load(seed_ptr)
        keep = tl.rand(seed, out_offsets.to(tl.int32)) >= DROPOUT_P
        y = tl.where(keep, y * (1.0 / (1.0 - DROPOUT_P)), 0.0)
    in_bounds = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if HAS_RESIDUAL:
        y += tl.load(residual_ptr + out_offsets, mask=in_bounds, other=0.0).to(tl.float32)
    tl.store(out_ptr + out_offsets, y.to(out_ptr.dtype.element_ty), mask=in_bounds)


def _block_config(M: int, N: int, K: int, dtype) -> dict:
    """Tile sizes and launch shape per dtype, shrunk to the problem for small matrices."""
    if not on_gpu():  # the interpreter: fewest program instances, smallest tiles that fit
        return dict(BLOCK_M=_fit(M, 64), BLOCK_N=_fit(N, 64), BLOCK_K=_fit(K, 32), GROUP_M=8,
                    num_warps=4, num_stages=1)
    if dtype == jnp.float32:
        cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3)
    else:
        # bf16 128x256x64, 8 warps, 3 stages: 619 TFLOP/s on an H100 at 8192^3 (DESIGN.md).
        # With the residual epilogue this tile spills 32 bytes a thread (255 registers, seen with
        # compile_only); 256x128 does not. `python bench/kernels.py --sweep` on a GPU decides.
        cfg = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
    cfg["BLOCK_M"] = _fit(M, cfg["BLOCK_M"])
    cfg["BLOCK_N"] = _fit(N, cfg["BLOCK_N"])
    cfg["BLOCK_K"] = _fit(K, cfg["BLOCK_K"])
    return cfg


def _fit(size: int, block: int) -> int:
    """The block, or the next power of two >= size if smaller (tl.dot needs at least 16)."""
    return max(16, min(block, triton.next_power_of_2(size)))


def linear(x, w, bias=None, *, residual=None, activation=None, dropout_rate=0.0, seed=None,
           transpose_w=False, precision="ieee"):
    """dropout(act(x @ w + bias)) + residual in one Triton GEMM; returns [..., N] in x.dtype.

    x [..., K]; w [K, N], or [N, K] with `transpose_w=True`; bias [N]; residual [..., N];
    activation None or "gelu_tanh"; dropout with rate `dropout_rate` needs `seed`, an int32 array
    of shape () (a new seed does not recompile); precision "ieee" or "tf32" for fp32 inputs.
    """
    x = jnp.asarray(x)
    if x.ndim < 2:
        raise ValueError(f"linear: x must be [..., K] with at least 2 dims, got shape {x.shape}")
    check_float_dtype("linear: x dtype", x.dtype)
    if w.ndim != 2 or w.dtype != x.dtype:
        raise ValueError(f"linear: w must be a 2-D {x.dtype} matrix, got {w.dtype}{list(w.shape)}")
    K = x.shape[-1]
    N, w_k = (w.shape[0], w.shape[1]) if transpose_w else (w.shape[1], w.shape[0])
    if w_k != K:
        layout = "[N, K]" if transpose_w else "[K, N]"
        raise ValueError(f"linear: w must be {layout} with K={K} (x's last dim), got {list(w.shape)}")
    out_shape = (*x.shape[:-1], N)
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"linear: bias must have shape ({N},), got {bias.shape}")
    if residual is not None and residual.shape != out_shape:
        raise ValueError(f"linear: residual must have shape {out_shape}, got {residual.shape}")
    if activation not in (None, "gelu_tanh"):
        raise ValueError(f"linear: activation must be None or 'gelu_tanh', got {activation!r}")
    seed = dropout_seed(dropout_rate, seed)
    if precision not in ("ieee", "tf32"):
        raise ValueError(f"linear: precision must be 'ieee' or 'tf32', got {precision!r}")

    M = x.size // K
    cfg = _block_config(M, N, K, x.dtype)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    placeholder = jnp.zeros((1,), x.dtype)  # stands in for an absent operand; never read
    out = triton_call(
        x.reshape(M, K), w,
        placeholder if bias is None else bias.astype(x.dtype),
        placeholder if residual is None else residual.reshape(M, N),
        seed,
        kernel=_matmul_kernel, out_shape=jax.ShapeDtypeStruct((M, N), x.dtype), grid=grid,
        M=M, N=N, K=K, stride_wk=1 if transpose_w else N, stride_wn=K if transpose_w else 1,
        HAS_BIAS=bias is not None, GELU=activation == "gelu_tanh",
        HAS_RESIDUAL=residual is not None, DROPOUT_P=float(dropout_rate),
        FP32_IEEE=x.dtype == jnp.float32 and precision == "ieee", **cfg)
    return out.reshape(out_shape)
