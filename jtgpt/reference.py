"""Pure-jnp references: the math of every jtgpt kernel in a few lines each.

The tests check each Triton kernel against these on random inputs. They compute in float32 and
cast the result to the input dtype, which is what the kernels do (fp32 accumulation and fp32
statistics whatever the storage dtype). Dropout is left out here: its random stream is the
kernel's own, and the tests check it by its statistics instead.
"""
import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST  # true fp32 dots on every backend (no tf32 or bf16 passes)


def embedding(ids, positions, wte, wpe):
    """wte[ids] + wpe[positions]; ids and positions [B, T] int, wte [V, D], wpe [P, D] -> [B, T, D]."""
    out = wte[ids].astype(jnp.float32) + wpe[positions].astype(jnp.float32)
    return out.astype(wte.dtype)


def layer_norm(x, weight, bias, eps=1e-5):
    """(x - mean) / sqrt(var + eps) * weight + bias over the last axis, statistics in fp32."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps) * weight.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(x.dtype)


def gelu_tanh(x):
    """GPT-2's `gelu_new`: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return 0.5 * x * (1.0 + jnp.tanh(0.7978845608028654 * (x + 0.044715 * x ** 3)))


def linear(x, w, bias=None, residual=None, activation=None, transpose_w=False):
    """act(x @ w + bias) + residual; x [..., K], w [K, N] (or [N, K] with transpose_w) -> [..., N]."""
    w32 = w.astype(jnp.float32)
    y = jnp.matmul(x.astype(jnp.float32), w32.T if transpose_w else w32, precision=HIGHEST)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    if activation == "gelu_tanh":
        y = gelu_tanh(y)
    if residual is not None:
        y = y + residual.astype(jnp.float32)
    return y.astype(x.dtype)


def attention(q, k, v, attention_mask=None, causal=True, sm_scale=None):
    """softmax(q k^T * sm_scale + mask) v per head, with grouped-query heads.

    q [B, T, Hq, D], k and v [B, S, Hkv, D] with Hq a multiple of Hkv (query head h reads kv head
    h // (Hq // Hkv)); attention_mask [B, S] (1 = attend, 0 = padding) masks keys. Causal aligns
    the last query with the last key. A query row with every key masked returns zeros.
    """
    B, T, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    sm_scale = D ** -0.5 if sm_scale is None else sm_scale
    group = Hq // Hkv
    k = jnp.repeat(k.astype(jnp.float32), group, axis=2)
    v = jnp.repeat(v.astype(jnp.float32), group, axis=2)
    s = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), k, precision=HIGHEST) * sm_scale
    allowed = jnp.ones((B, 1, T, S), bool)
    if causal:
        allowed &= (jnp.arange(T)[:, None] + (S - T) >= jnp.arange(S)[None, :])[None, None]
    if attention_mask is not None:
        allowed &= attention_mask.astype(bool)[:, None, None, :]
    s = jnp.where(allowed, s, -jnp.inf)
    m = jnp.max(s, -1, keepdims=True)
    p = jnp.where(allowed, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    denom = p.sum(-1, keepdims=True)
    p = p / jnp.where(denom == 0, 1.0, denom)
    return jnp.einsum("bhts,bshd->bthd", p, v, precision=HIGHEST).astype(q.dtype)


def cross_entropy(logits, targets, ignore_index=-100, reduction="mean"):
    """logsumexp(logits_i) - logits_i[targets_i] per row in fp32; rows whose target is
    ignore_index count 0 and are left out of the mean (a mean over no row is 0).
    logits [..., V], targets [...]; reduction "mean", "sum" or "none" (per row)."""
    logits = logits.astype(jnp.float32)
    valid = targets != ignore_index
    picked = jnp.take_along_axis(logits, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    rows = jnp.where(valid, jax.nn.logsumexp(logits, axis=-1) - picked, 0.0)
    if reduction == "none":
        return rows
    return rows.sum() / (jnp.maximum(valid.sum(), 1) if reduction == "mean" else 1)
