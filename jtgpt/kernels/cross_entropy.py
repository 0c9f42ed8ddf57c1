"""Cross-entropy over the vocabulary, and the tied LM head fused with it: Triton kernels.

For row i of logits x [N, V] with target t_i:

    lse_i  = log sum_v exp(x_iv)                      (fp32, streamed: see below)
    loss_i = lse_i - x_i[t_i]
    dx_iv  = (exp(x_iv - lse_i) - [v == t_i]) * scale_i,   scale_i = g / n_valid ("mean"),
                                                                     g ("sum"), g_i ("none")

A row whose target equals `ignore_index` has loss 0, gradient 0, and is not counted in n_valid.
"mean" over no counted row (every target ignored) is 0 with a zero gradient, the
`sum / max(n_valid, 1)` convention of JAX training loops, where PyTorch returns NaN: a batch of
pure padding then leaves the parameters alone instead of turning them into NaN. A target outside
[0, V) that is not ignore_index is a bug in the data that a kernel cannot raise on (under jit the
targets are traced): its row's loss is NaN, so the reduced loss is NaN, and its gradient is the
softmax without the one-hot term (what jax.grad of the jnp reference with NaN-filled gathers gives).

One program owns one row. V (50257 for GPT-2, 128256 for Llama-3) does not fit a block, so the
forward streams the row in blocks of BLOCK_V, keeping a running max m and a running sum s of
exp(x - m) in fp32, rescaled by exp(m_old - m_new) whenever a block raises the max (online
softmax); lse = m + log s. The gradient pass streams the row once more. Ignored rows read nothing.

`cross_entropy(logits, targets)`: the forward kernel writes loss_i and lse_i; the custom_vjp saves
(logits, targets, lse) and the backward kernel writes dx in logits' dtype.

`linear_cross_entropy(h, w, targets)`: logits = h @ w^T (GPT-2's head tied to wte [V, D]) fused with
the loss, never holding the logits of the whole batch. The N tokens go in chunks of C rows; per
chunk, one GEMM makes the logits, the forward kernel (in its gradient mode) writes loss_c and dx_c
in one go (two reads of the chunk's logits, one write), and two GEMMs give dh_c = dx_c @ w and
dw += dx_c^T h_c (fp32 accumulation across chunks, added in the GEMM's epilogue into dw's
buffer: add_matmul). The gradient is thus computed in the forward rule of the custom_vjp, with
the cotangent g taken as 1 (as Liger Kernel does): the logits are made once per training step,
and the backward rule only scales the saved (dh, dw) by g. The primal
(no-grad) path runs only the logits GEMM and the loss. w is padded with zero rows to a multiple of
VOCAB_ALIGN first, so that every logits row is aligned for the GEMMs that read it (_padded_vocab).
"""
from __future__ import annotations

import functools
import math
import numbers

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from jtgpt.call import on_gpu, triton_call
from jtgpt.kernels import check_float_dtype, check_precision
from jtgpt.kernels.matmul import add_matmul, linear, matmul

REDUCTIONS = ("mean", "sum", "none")
# Default linear_cross_entropy chunk: the logits of one chunk take about this many bytes (and its
# gradient as many again). 256 MiB is 2560 bf16 rows at GPT-2's V = 50257 (1.6 GB for the full
# logits of a 16 x 1024 batch), enough rows that the logits GEMM fills an H100 (20 x 197 tiles).
CHUNK_BYTES = 256 * 2**20
# Chunks are whole GEMM row tiles (BLOCK_M = 128) where the batch allows.
CHUNK_ALIGN = 128
# linear_cross_entropy pads the vocabulary to a multiple of this (50257 -> 50304 for GPT-2) so
# every logits row is 128-byte aligned in bf16 (see _padded_vocab).
VOCAB_ALIGN = 64


# ------------------------------------------------------------------------------------- kernels

@triton.jit
def _row_logsumexp(x_ptr, target, V: tl.constexpr, BLOCK_V: tl.constexpr):
    """(lse, x[target]) of the V logits at x_ptr, in fp32; x[target] is NaN outside [0, V)."""
    m = tl.full((), float("-inf"), tl.float32)  # running max
    s = tl.zeros((), tl.float32)  # running sum of exp(x - m)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(x_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)  # exp(-inf) = 0 on the first block
        m = m_new
    in_range = (target >= 0) & (target < V)
    x_target = tl.load(x_ptr + target, mask=in_range, other=float("nan")).to(tl.float32)
    return m + tl.log(s), x_target


@triton.jit
def _row_grad(x_ptr, dx_ptr, target, valid, lse, scale, V: tl.constexpr, ROW: tl.constexpr,
              BLOCK_V: tl.constexpr):
    """dx = (softmax(x) - onehot(target)) * scale over one row of V logits, and 0 in the padding
    columns [V, ROW) of a padded row; zeros (nothing read) if not valid."""
    for start in range(0, ROW, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_row = cols < ROW
        # An ignored row, and the padding, load -inf (no memory traffic): exp(-inf - lse) = 0.
        x = tl.load(x_ptr + cols, mask=(cols < V) & valid, other=float("-inf")).to(tl.float32)
        onehot = tl.where((cols == target) & valid, 1.0, 0.0)
        dx = (tl.exp(x - lse) - onehot) * scale
        tl.store(dx_ptr + cols, dx.to(dx_ptr.dtype.element_ty), mask=in_row)


@triton.jit
def _cross_entropy_fwd_kernel(logits_ptr, targets_ptr, scale_ptr, loss_ptr, lse_ptr, dlogits_ptr,
                              V: tl.constexpr, ROW: tl.constexpr, IGNORE_INDEX: tl.constexpr,
                              WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    """Row program: loss and lse (fp32 [N]); with WRITE_GRAD also dlogits [N, ROW] from scale [N].

    Rows hold V logits at a stride of ROW >= V elements (see _padded_vocab). An ignored row
    stores loss 0 and lse 0 (which the gradient pass never uses).
    """
    row = tl.program_id(0).to(tl.int64)  # int64: N * V passes 2**31 (16k tokens x 128256)
    target = tl.load(targets_ptr + row)
    valid = target != IGNORE_INDEX
    x_ptr = logits_ptr + row * ROW
    lse = tl.zeros((), tl.float32)
    loss = tl.zeros((), tl.float32)
    if valid:
        lse, x_target = _row_logsumexp(x_ptr, target, V, BLOCK_V)
        loss = lse - x_target
    tl.store(loss_ptr + row, loss)
    tl.store(lse_ptr + row, lse)
    if WRITE_GRAD:
        _row_grad(x_ptr, dlogits_ptr + row * ROW, target, valid, lse, tl.load(scale_ptr + row),
                  V, ROW, BLOCK_V)


@triton.jit
def _cross_entropy_bwd_kernel(logits_ptr, targets_ptr, lse_ptr, scale_ptr, dlogits_ptr,
                              V: tl.constexpr, IGNORE_INDEX: tl.constexpr, BLOCK_V: tl.constexpr):
    """Row program: dlogits [N, V] from the forward's lse and the per-row scale (fp32 [N])."""
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(targets_ptr + row)
    _row_grad(logits_ptr + row * V, dlogits_ptr + row * V, target, target != IGNORE_INDEX,
              tl.load(lse_ptr + row), tl.load(scale_ptr + row), V, V, BLOCK_V)


# ------------------------------------------------------------------------------------ launchers

def _block_config(v: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for rows of v logits.

    GPU: 4096 logits a block (8 KB of bf16 in flight per program, 16 values a thread at 8
    warps); a row program is pure bandwidth and many rows run per SM, so the block only needs to
    keep loads in flight. CPU interpreter: small blocks, so the tests' tiny rows still take
    several blocks and the online rescaling runs.
    """
    block_v = min(triton.next_power_of_2(v), 4096 if on_gpu() else 256)
    return block_v, max(1, min(8, block_v // 512))


def _ce_forward(logits, targets, ignore_index: int, scale=None, vocab=None):
    """Forward kernel on logits [N, ROW] whose first `vocab` (default ROW) columns are the
    logits, targets int32 [N]: (loss, lse) fp32 [N], and dlogits [N, ROW] in logits' dtype (0 in
    the padding) when `scale` (fp32 [N], the gradient's per-row factor) is given."""
    n, row = logits.shape
    v = row if vocab is None else vocab
    block_v, num_warps = _block_config(v)
    write_grad = scale is not None
    rows = jax.ShapeDtypeStruct((n,), jnp.float32)
    # Without the gradient a one-element stand-in takes the unused dlogits pointer (never written).
    dlogits = jax.ShapeDtypeStruct((n, row) if write_grad else (1,), logits.dtype)
    loss, lse, dlogits = triton_call(
        logits, targets, scale if write_grad else jnp.zeros((1,), jnp.float32),
        kernel=_cross_entropy_fwd_kernel, out_shape=(rows, rows, dlogits), grid=(n,),
        num_warps=num_warps, V=v, ROW=row, IGNORE_INDEX=ignore_index, WRITE_GRAD=write_grad,
        BLOCK_V=block_v)
    return loss, lse, dlogits if write_grad else None


def _ce_backward(logits, targets, lse, scale, ignore_index: int):
    n, v = logits.shape
    block_v, num_warps = _block_config(v)
    return triton_call(
        logits, targets, lse, scale,
        kernel=_cross_entropy_bwd_kernel, out_shape=jax.ShapeDtypeStruct((n, v), logits.dtype),
        grid=(n,), num_warps=num_warps, V=v, IGNORE_INDEX=ignore_index, BLOCK_V=block_v)


def _n_valid(targets, ignore_index: int):
    """The rows "mean" divides by, as fp32, at least 1 (so no rows at all give 0, not NaN)."""
    return jnp.maximum(jnp.sum(targets != ignore_index), 1).astype(jnp.float32)


def _reduce(loss_rows, targets, ignore_index: int, reduction: str):
    if reduction == "none":
        return loss_rows
    total = jnp.sum(loss_rows)
    return total / _n_valid(targets, ignore_index) if reduction == "mean" else total


def _row_scale(g, targets, ignore_index: int, reduction: str):
    """Per-row factor of the gradient (fp32 [N]) for the loss's cotangent g ([N] for "none")."""
    valid = (targets != ignore_index).astype(jnp.float32)
    if reduction == "mean":
        return valid * (g / _n_valid(targets, ignore_index))
    return valid * g


# ------------------------------------------------------------------------------- cross_entropy

@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _cross_entropy(logits, targets, ignore_index, reduction):
    loss_rows, _, _ = _ce_forward(logits, targets, ignore_index)
    return _reduce(loss_rows, targets, ignore_index, reduction)


def _cross_entropy_fwd(logits, targets, ignore_index, reduction):
    loss_rows, lse, _ = _ce_forward(logits, targets, ignore_index)
    return _reduce(loss_rows, targets, ignore_index, reduction), (logits, targets, lse)


def _cross_entropy_bwd(ignore_index, reduction, residuals, g):
    logits, targets, lse = residuals
    scale = _row_scale(g, targets, ignore_index, reduction)
    return _ce_backward(logits, targets, lse, scale, ignore_index), None


_cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)


def _check_common(targets, rows_shape, ignore_index, reduction, reductions=REDUCTIONS) -> None:
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise ValueError(f"targets must be integer, got {targets.dtype}")
    if tuple(targets.shape) != tuple(rows_shape):
        raise ValueError(f"targets shape {tuple(targets.shape)} must be {tuple(rows_shape)} (one "
                         f"target per row of logits)")
    if not isinstance(ignore_index, numbers.Integral) or not -2**31 <= ignore_index < 2**31:
        raise ValueError(f"ignore_index must be an int in the int32 range, got {ignore_index!r}")
    if reduction not in reductions:
        raise ValueError(f"reduction must be one of {reductions}, got {reduction!r}")


def cross_entropy(logits, targets, *, ignore_index=-100, reduction="mean"):
    """Softmax cross-entropy of integer targets, computed in fp32 by Triton kernels.

    logits [..., V] float32/float16/bfloat16; targets [...] integer, class indices in [0, V) or
    ignore_index (that row counts for nothing). reduction: "mean" over the rows not ignored (0 if
    there is none), "sum", or "none" (the per-row losses, shape [...], ignored rows 0). The loss is
    float32 whatever logits' dtype; the gradient has logits' dtype. Out-of-range targets: see the
    module docstring (NaN loss). Differentiable in logits; the forward saves (logits, targets, lse).
    """
    if getattr(logits, "ndim", 0) < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must be [..., V] with V >= 1, got shape {getattr(logits, 'shape', None)}")
    check_float_dtype("logits dtype", logits.dtype)
    _check_common(targets, logits.shape[:-1], ignore_index, reduction)
    rows_shape, v = logits.shape[:-1], logits.shape[-1]
    n = math.prod(rows_shape)
    if n == 0:  # a grid of zero programs is not a valid GPU launch
        return jnp.zeros(rows_shape if reduction == "none" else (), jnp.float32)
    loss = _cross_entropy(logits.reshape(n, v), targets.reshape(n).astype(jnp.int32),
                          int(ignore_index), reduction)
    return loss.reshape(rows_shape) if reduction == "none" else loss


# ------------------------------------------------------------------------ linear_cross_entropy

def _chunked(step, carry, arrays, chunk: int):
    """Run `step(carry, *chunk_arrays) -> (carry, out)` over row chunks of `arrays` ([N, ...]).

    The full chunks go through lax.scan, so their buffers are those of one chunk however many
    chunks there are; a partial last chunk runs once after it. Returns (carry, outs concatenated
    back to N rows, or None when step returns None).
    """
    n = arrays[0].shape[0]
    n_full, rest = divmod(n, chunk)
    split = n_full * chunk
    carry, out = jax.lax.scan(lambda c, xs: step(c, *xs), carry,
                              tuple(a[:split].reshape(n_full, chunk, *a.shape[1:]) for a in arrays))
    if out is not None:
        out = out.reshape(split, *out.shape[2:])
    if rest:
        carry, out_rest = step(carry, *(a[split:] for a in arrays))
        if out is not None:
            out = jnp.concatenate([out, out_rest])
    return carry, out


def _padded_vocab(w):
    """w [V, D] with zero rows appended up to a multiple of VOCAB_ALIGN, and V.

    Logits rows of V = 50257 (odd) start at odd element offsets, which no GEMM or row kernel can
    load in aligned 16-byte vectors: the dlogits @ w and dlogits^T @ h GEMMs would read their A
    operand element by element. With the padded w, the logits and dlogits rows are VOCAB_ALIGN
    aligned; the padding columns are logits 0 that the CE kernel leaves out of the softmax, and
    their dlogits are 0, so dh is exact and dw's extra rows are dropped.
    """
    v = w.shape[0]
    return jnp.pad(w, ((0, -v % VOCAB_ALIGN), (0, 0))), v


def _linear_ce_loss_sum(h, w, targets, ignore_index, chunk, precision):
    """Sum of the row losses of logits = h @ w^T, chunk by chunk (no gradient work)."""
    w, v = _padded_vocab(w)

    def step(total, h_c, t_c):
        logits = linear(h_c, w, transpose_w=True, precision=precision)
        loss_rows, _, _ = _ce_forward(logits, t_c, ignore_index, vocab=v)
        return total + jnp.sum(loss_rows), None

    total, _ = _chunked(step, jnp.zeros((), jnp.float32), (h, targets), chunk)
    return total


def _linear_ce_with_grads(h, w, targets, scale, ignore_index, chunk, precision):
    """(sum of row losses, dh in h's dtype, dw fp32) for per-row gradient factors `scale`."""
    w, v = _padded_vocab(w)

    def step(carry, h_c, t_c, s_c):
        total, dw = carry
        logits = linear(h_c, w, transpose_w=True, precision=precision)
        loss_rows, _, dlogits = _ce_forward(logits, t_c, ignore_index, s_c, vocab=v)
        dh = matmul(dlogits, w, precision=precision)
        dw = add_matmul(dw, dlogits, h_c, transpose_a=True, precision=precision)
        return (total + jnp.sum(loss_rows), dw), dh

    init = (jnp.zeros((), jnp.float32), jnp.zeros(w.shape, jnp.float32))
    (total, dw), dh = _chunked(step, init, (h, targets, scale), chunk)
    return total, dh, dw[:v]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _linear_cross_entropy(h, w, targets, ignore_index, reduction, chunk, precision):
    total = _linear_ce_loss_sum(h, w, targets, ignore_index, chunk, precision)
    return _reduce(total, targets, ignore_index, reduction)


def _linear_cross_entropy_fwd(h, w, targets, ignore_index, reduction, chunk, precision):
    scale = _row_scale(1.0, targets, ignore_index, reduction)
    total, dh, dw = _linear_ce_with_grads(h, w, targets, scale, ignore_index, chunk, precision)
    # dw is saved in w's dtype: half the bytes of fp32, and exact for the usual g = 1 (any other g
    # rounds twice, g * round(dw), well inside bf16's own error).
    return _reduce(total, targets, ignore_index, reduction), (dh, dw.astype(w.dtype))


def _linear_cross_entropy_bwd(ignore_index, reduction, chunk, precision, residuals, g):
    dh, dw = residuals
    return (dh * g).astype(dh.dtype), (dw * g).astype(dw.dtype), None


_linear_cross_entropy.defvjp(_linear_cross_entropy_fwd, _linear_cross_entropy_bwd)


def default_chunk_size(vocab_size: int, dtype) -> int:
    """Rows per chunk so that a chunk's logits take about CHUNK_BYTES, in whole CHUNK_ALIGN tiles."""
    rows = CHUNK_BYTES // (vocab_size * jnp.dtype(dtype).itemsize)
    return max(CHUNK_ALIGN, rows // CHUNK_ALIGN * CHUNK_ALIGN)


def linear_cross_entropy(h, w, targets, *, ignore_index=-100, reduction="mean", chunk_size=None,
                         precision="ieee"):
    """cross_entropy(h @ w^T, targets) without ever holding the logits of the whole batch.

    h [..., D] hidden states (float32/float16/bfloat16); w [V, D] the (tied) output embedding, in
    h's dtype, read transposed in place; targets [...] integer. ignore_index and reduction ("mean"
    or "sum") as in `cross_entropy`; "none" is refused: dw sums g_i-weighted rows over the chunks,
    which the forward-computed gradient cannot apply afterwards. chunk_size: tokens per chunk,
    default `default_chunk_size(V, h.dtype)` (a chunk's logits ~256 MiB: 2560 rows for bf16 GPT-2);
    the peak extra memory is about twice one chunk's logits (logits and their gradient) plus dw,
    one fp32 [V, D] buffer that each chunk's product is added into (add_matmul). precision:
    "ieee", "tf32x3" or "tf32" for float32 GEMMs. Returns the float32 loss; gradients in h's and
    w's dtypes (dw accumulated in fp32). Under differentiation the forward computes dh and dw too (see the module docstring).
    """
    if getattr(h, "ndim", 0) < 2:
        raise ValueError(f"h must be [..., D] with at least 2 dims, got shape {getattr(h, 'shape', None)}")
    check_float_dtype("h dtype", h.dtype)
    d = h.shape[-1]
    if getattr(w, "ndim", 0) != 2 or w.shape[1] != d or w.shape[0] < 1:
        raise ValueError(f"w must be [V, D] with D={d} (h's last dim) and V >= 1, "
                         f"got shape {getattr(w, 'shape', None)}")
    if w.dtype != h.dtype:
        raise ValueError(f"w dtype must be h's dtype {h.dtype}, got {w.dtype}")
    _check_common(targets, h.shape[:-1], ignore_index, reduction, reductions=("mean", "sum"))
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    check_precision("linear_cross_entropy", precision)
    n = math.prod(h.shape[:-1])
    if n == 0:
        return jnp.zeros((), jnp.float32)
    chunk = min(n, chunk_size or default_chunk_size(w.shape[0], h.dtype))
    return _linear_cross_entropy(h.reshape(n, d), w, targets.reshape(n).astype(jnp.int32),
                                 int(ignore_index), reduction, chunk, precision)
