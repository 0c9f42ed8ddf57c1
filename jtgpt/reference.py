"""Pure-jnp references: the math of every jtgpt kernel in a few lines each.

The tests check each Triton kernel against these on random inputs. They compute in float32 and
cast the result to the input dtype, which is what the kernels do (fp32 accumulation and fp32
statistics whatever the storage dtype). Dropout is left out here: its random stream is the
kernel's own, and the tests check it by its statistics instead.
"""
import jax
import jax.numpy as jnp
import numpy as np

HIGHEST = jax.lax.Precision.HIGHEST  # true fp32 dots on every backend (no tf32 or bf16 passes)


def embedding(ids, wte, positions=None, wpe=None):
    """wte[ids] (+ wpe[positions]); ids and positions [B, T] int, wte [V, D], wpe [P, D] -> [B, T, D].

    A token whose id is outside [0, V), or whose position is outside [0, P), gets a row of NaN:
    never another row's values (no wrapping of negative ids, no clamping).
    """
    def lookup(table, idx):
        ok = (idx >= 0) & (idx < table.shape[0])
        rows = table[jnp.where(ok, idx, 0)].astype(jnp.float32)
        return jnp.where(ok[..., None], rows, jnp.nan)
    out = lookup(wte, ids)
    if wpe is not None:
        out = out + lookup(wpe, positions)
    return out.astype(wte.dtype)


def layer_norm(x, weight, bias, eps=1e-5):
    """(x - mean) / sqrt(var + eps) * weight + bias over the last axis, statistics in fp32."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps) * weight.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(x.dtype)


def rms_norm(x, weight, eps=1e-6):
    """Llama's RMSNorm over the last axis: weight * (x / sqrt(mean(x^2) + eps)).

    The statistics are fp32; x / rms is rounded to x's dtype before the weight multiplies it, the
    order of Hugging Face's LlamaRMSNorm, and the product is rounded to x's dtype again.
    """
    x32 = x.astype(jnp.float32)
    normed = (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + eps)).astype(x.dtype)
    return (weight.astype(jnp.float32) * normed.astype(jnp.float32)).astype(x.dtype)


def gelu_tanh(x):
    """GPT-2's `gelu_new`: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return 0.5 * x * (1.0 + jnp.tanh(0.7978845608028654 * (x + 0.044715 * x ** 3)))


def silu(x):
    """x * sigmoid(x), the gate of Llama's SwiGLU MLP."""
    return x * jax.nn.sigmoid(x)


def linear(x, w, bias=None, residual=None, activation=None, transpose_w=False):
    """act(x @ w + bias) + residual; x [..., K], w [K, N] (or [N, K] with transpose_w) -> [..., N].

    activation "swiglu" splits the product into halves [gate | up] and gives silu(gate) * up, so
    w [K, 2F] (gate columns, then up columns) makes [..., F].
    """
    w32 = w.astype(jnp.float32)
    y = jnp.matmul(x.astype(jnp.float32), w32.T if transpose_w else w32, precision=HIGHEST)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    if activation == "gelu_tanh":
        y = gelu_tanh(y)
    elif activation == "swiglu":
        gate, up = jnp.split(y, 2, axis=-1)
        y = silu(gate) * up
    if residual is not None:
        y = y + residual.astype(jnp.float32)
    return y.astype(x.dtype)


def rope(x, positions, inv_freq):
    """Rotary position embedding in Hugging Face's rotate-half layout.

    For a head vector x of length D at position p, with x1 = x[:D/2], x2 = x[D/2:] and the angles
    a_j = p * inv_freq_j (an fp32 product, as Hugging Face forms it):

        out[:D/2] = x1 cos(a) - x2 sin(a),    out[D/2:] = x2 cos(a) + x1 sin(a)

    x [B, T, H, D]; positions [B, T] int; inv_freq [D/2] fp32 -> x's dtype (computed in fp32).
    """
    angle = positions.astype(jnp.float32)[..., None] * inv_freq.astype(jnp.float32)  # [B, T, D/2]
    cos, sin = jnp.cos(angle)[:, :, None, :], jnp.sin(angle)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


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


def decode_attention(q, k, v, lengths, key_mask=None, sm_scale=None):
    """One query per batch row over its KV cache: `attention` of q [B, Hq, D] against the keys
    and values k, v [B, S, Hkv, D] of slots [0, lengths[b]) (lengths [B] int) that key_mask
    [B, S] (nonzero = attend; None: all) leaves visible -> [B, Hq, D]. A row with no visible
    slot returns zeros."""
    visible = jnp.arange(k.shape[1])[None, :] < lengths[:, None]
    if key_mask is not None:
        visible &= key_mask.astype(bool)
    return attention(q[:, None], k, v, attention_mask=visible, causal=False,
                     sm_scale=sm_scale)[:, 0]


def paged_attention(q, k_new, v_new, k_pages, v_pages, block_tables, cu_q, context_lens,
                    sm_scale=None):
    """Causal attention of a ragged batch's new tokens over their paged cache: q [T, Hq, D] and
    k_new, v_new [T, Hkv, D] the new tokens (sequence s's at rows [cu_q[s], cu_q[s + 1]));
    k_pages, v_pages [num_pages, P, Hkv, D]; block_tables [num_seqs, max_pages]; context_lens[s]
    the sequence's tokens, its new ones last (all concrete). Each sequence's keys are gathered
    (cached positions from its pages, then its new tokens), and each new token runs `attention`
    over the positions up to its own -> [T, Hq, D]; rows past cu_q[-1] are zeros."""
    cu_q, context_lens, tables = np.asarray(cu_q), np.asarray(context_lens), np.asarray(block_tables)
    counts = np.diff(cu_q)
    rows = int(cu_q[-1])
    seq = np.repeat(np.arange(counts.size), counts)  # of each new token
    cached = context_lens - counts
    position = cached[seq] + np.arange(rows) - cu_q[seq]
    j = np.arange(max(int(context_lens.max()), 1))  # key positions
    page_size = k_pages.shape[1]
    pages = tables[:, np.minimum(j // page_size, tables.shape[1] - 1)]  # [S, C]
    new_row = np.clip(cu_q[:-1, None] + j[None, :] - cached[:, None], 0, max(rows - 1, 0))
    from_page = (j[None, :] < cached[:, None])[..., None, None]
    k = jnp.where(from_page, k_pages[pages, j % page_size], k_new[new_row])  # [S, C, Hkv, D]
    v = jnp.where(from_page, v_pages[pages, j % page_size], v_new[new_row])
    visible = j[None, :] <= position[:, None]
    out = attention(q[:rows, None], k[seq], v[seq], attention_mask=visible, causal=False,
                    sm_scale=sm_scale)[:, 0]
    return jnp.zeros(q.shape, q.dtype).at[:rows].set(out)


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


def adamw(params, grads, mu, nu, *, learning_rate, count, b1, b2, eps, eps_root=0.0,
          weight_decay=0.0, decay_end=None, max_norm=None, grad_scale=1.0):
    """One AdamW step on flat arrays with the gradient grad_scale * grads, after `count` earlier
    updates (optax.adamw's math, clipped by the global norm first when max_norm is given): (new
    params, updates -lr u, mu, nu), all fp32 but the params and updates, in params' dtype.
    Elements [0, decay_end) get the decay (None: all)."""
    g = grads.astype(jnp.float32) * grad_scale
    if max_norm is not None:
        norm = jnp.sqrt(jnp.sum(g * g))
        g = jnp.where(norm < max_norm, g, g / norm * max_norm)
    p = params.astype(jnp.float32)
    t = count + 1
    mu = (1 - b1) * g + b1 * mu
    nu = (1 - b2) * g * g + b2 * nu
    u = (mu / (1 - b1 ** t)) / (jnp.sqrt(nu / (1 - b2 ** t) + eps_root) + eps)
    decayed = jnp.arange(p.shape[0]) < (p.shape[0] if decay_end is None else decay_end)
    u = jnp.where(decayed, u + weight_decay * p, u)
    step = -learning_rate * u
    return (p + step).astype(params.dtype), step.astype(params.dtype), mu, nu
