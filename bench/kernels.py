"""Each jtgpt kernel alone at GPT-2 124M's shapes (B*T = 512*300 tokens; the LM head at the
training batch, 16*1024), against XLA.

    python bench/kernels.py            # the kernels with their chosen configs, vs XLA
    python bench/kernels.py --sweep    # also try other GEMM tile configs
    python bench/kernels.py --only train   # fwd+bwd of each op of the GPT-2 training step
    python bench/kernels.py --only gemm --dtype tf32 --sweep   # fp32 GEMMs on tf32 tensor cores

For tuning: prints TFLOP/s (GEMM) or GB/s (layernorm, embedding) per kernel, each output checked
against its reference first. GPU only. Attention has its own script, bench/attention.py.
"""
import argparse
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from common import compile_and_time, relative_error  # noqa: E402
from jtgpt import reference  # noqa: E402
from jtgpt.kernels import matmul  # noqa: E402
from jtgpt.kernels.cross_entropy import linear_cross_entropy  # noqa: E402
from jtgpt.kernels.layernorm import layer_norm  # noqa: E402
from jtgpt.kernels.matmul import linear  # noqa: E402

M = 512 * 300


def bench(fn, *args, calls=20, repeats=5):
    """Median ms per call of `calls` back-to-back calls."""
    return compile_and_time(fn, *args, calls=calls, repeats=repeats)[0] * 1e3


def bench_gemms(dtype, sweep, precision="ieee"):
    shapes = {"c_attn": (768, 2304, dict(bias=True)), "attn.c_proj": (768, 768, dict(bias=True, residual=True)),
              "c_fc+gelu": (768, 3072, dict(bias=True, activation="gelu_tanh")),
              "mlp.c_proj": (3072, 768, dict(bias=True, residual=True))}
    key = iter(jax.random.split(jax.random.key(0), 16))
    for name, (K, N, epi) in shapes.items():
        x = jax.random.normal(next(key), (M, K), dtype)
        w = (jax.random.normal(next(key), (K, N), jnp.float32) / K ** 0.5).astype(dtype)
        b = jax.random.normal(next(key), (N,), dtype)
        r = jax.random.normal(next(key), (M, N), dtype)
        kw = dict(bias=b if epi.get("bias") else None, residual=r if epi.get("residual") else None,
                  activation=epi.get("activation"))
        ref = jax.jit(lambda x, w: reference.linear(x, w, **kw))  # XLA's default precision
        flops = 2 * M * K * N
        # IEEE fp32 against XLA's IEEE fp32 ("highest"); tf32 and bf16 against its default
        xla_precision = "highest" if dtype == jnp.float32 and precision == "ieee" else None
        with jax.default_matmul_precision(xla_precision):
            xla_ms = bench(lambda x, w: _xla_linear(x, w, **kw), x, w)
        _row(f"XLA {name}", xla_ms, flops / xla_ms / 1e9, "TFLOP/s")
        configs = [None] + (SWEEP_GEMM[jnp.dtype(dtype).name] if sweep else [])
        for cfg in configs:
            if cfg is not None:
                matmul._block_config = lambda *shape_dtype, cfg=cfg, **epilogue: dict(cfg)
            fn = jax.jit(lambda x, w: linear(x, w, precision=precision, **kw))
            try:
                err = relative_error(fn(x, w), ref(x, w))
                ms = bench(fn, x, w)
            except Exception as e:  # a config that does not fit (shared memory) is skipped
                _row(f"jtgpt {name} {cfg}", float("nan"), float("nan"), "", type(e).__name__)
                continue
            finally:
                matmul._block_config = DEFAULT_GEMM_CONFIG
            label = "chosen" if cfg is None else _short(cfg)
            _row(f"jtgpt {name} [{label}]", ms, flops / ms / 1e9, "TFLOP/s", f"err {err:.1e}")


def _xla_linear(x, w, bias=None, residual=None, activation=None):
    """The competitor: the same epilogue as XLA fuses it, in the input dtype."""
    y = x @ w + bias
    if activation == "gelu_tanh":
        y = jax.nn.gelu(y, approximate=True)
    return y if residual is None else y + residual


def _row(name, ms, rate, unit, note=""):
    """Print a table row as soon as it is measured: a run cut short still shows what it got."""
    print(f"| {name} | {ms:.3f} | {rate:.1f} | {unit} | {note} |", flush=True)


def _short(cfg):
    persistent = " persistent" if cfg.get("persistent") else ""
    return (f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']} w{cfg['num_warps']} "
            f"s{cfg['num_stages']}{persistent}")


DEFAULT_GEMM_CONFIG = matmul._block_config
SWEEP_GEMM = {  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, persistent) per input dtype
    dtype: [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=w, num_stages=s,
                 persistent=p)
            for bm, bn, bk, w, s, p in configs]
    for dtype, configs in {
        "bfloat16": [(128, 256, 64, 8, 3, False), (128, 128, 64, 4, 4, False),
                     (128, 128, 64, 8, 4, False), (256, 128, 64, 8, 3, False),
                     (128, 256, 64, 8, 4, False), (64, 256, 64, 4, 4, False),
                     (128, 128, 128, 8, 3, False), (128, 256, 64, 8, 3, True),
                     (128, 256, 64, 8, 4, True), (256, 128, 64, 8, 3, True),
                     (128, 128, 64, 4, 4, True)],
        # fp32 tiles take twice the shared memory a stage of bf16's
        "float32": [(128, 128, 32, 8, 3, False), (128, 128, 32, 4, 4, False),
                    (128, 256, 32, 8, 3, False), (256, 128, 32, 8, 3, False),
                    (128, 128, 64, 8, 3, False), (128, 128, 64, 4, 3, False),
                    (64, 256, 32, 4, 4, False), (128, 64, 64, 4, 4, False),
                    (128, 128, 32, 8, 3, True)],
    }.items()}


def bench_layernorm(dtype):
    x = jax.random.normal(jax.random.key(3), (M, 768), dtype)
    w = jax.random.normal(jax.random.key(4), (768,), dtype)
    b = jax.random.normal(jax.random.key(5), (768,), dtype)
    nbytes = 2 * x.size * x.dtype.itemsize
    ref = jax.jit(reference.layer_norm)
    ours = jax.jit(layer_norm)
    err = relative_error(ours(x, w, b), ref(x, w, b))
    for name, f in (("XLA layernorm", ref), ("jtgpt layernorm", ours)):
        ms = bench(f, x, w, b)
        _row(name, ms, nbytes / ms / 1e6, "GB/s", f"err {err:.1e}" if "jtgpt" in name else "")


def bench_lm_head(dtype, tokens=16 * 1024, vocab=50257, width=768):
    """The LM head fused with the loss, forward + backward, at GPT-2's training shape (B*T = 16 x
    1024 tokens): jtgpt's linear_cross_entropy against XLA's logits GEMM + optax's CE."""
    import optax
    h = jax.random.normal(jax.random.key(6), (tokens, width), dtype)
    w = (0.02 * jax.random.normal(jax.random.key(7), (vocab, width))).astype(dtype)
    t = jax.random.randint(jax.random.key(8), (tokens,), 0, vocab)

    def xla_loss(h, w):
        logits = (h @ w.T).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, t).mean()

    ours = jax.value_and_grad(lambda h, w: linear_cross_entropy(h, w, t), argnums=(0, 1))
    xla = jax.value_and_grad(xla_loss, argnums=(0, 1))
    err = max(relative_error(a, b) for a, b in zip(jax.tree.leaves(jax.jit(ours)(h, w)),
                                                    jax.tree.leaves(jax.jit(xla)(h, w))))
    flops = 6 * tokens * vocab * width  # logits, dh, dw
    for name, f in (("XLA LM head + CE, fwd+bwd", xla), ("jtgpt linear_cross_entropy, fwd+bwd", ours)):
        ms = bench(f, h, w, calls=5)
        _row(name, ms, flops / ms / 1e9, "TFLOP/s", f"err {err:.1e}" if "jtgpt" in name else "")


def bench_train_parts(dtype, B=16, T=1024, D=768, H=12, V=50257, layers=12, p=0.1):
    """Forward + backward of every op of GPT-2 124M's training step at B x T (dropout p), each
    alone, times how many the step runs: where bench/train.py's step time goes. XLA's fwd+bwd of
    the same GEMM (its own epilogue fusion, no dropout) beside each GEMM."""
    from jtgpt.kernels.attention import flash_attention
    from jtgpt.kernels.embedding import embedding
    M, keys = B * T, iter(jax.random.split(jax.random.key(9), 32))
    seed = jnp.int32(1)

    def normal(shape, scale=1.0):
        return (scale * jax.random.normal(next(keys), shape)).astype(dtype)

    def fwd_bwd(f):
        def step(*args):
            out, vjp = jax.vjp(f, *args)
            return vjp(jnp.ones_like(out))
        return step

    x, x4 = normal((M, D)), normal((M, 4 * D))
    ids = jax.random.randint(next(keys), (B, T), 0, V)
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    gemms = {  # name: (K, N, epilogue)
        "c_attn": (D, 3 * D, {}), "attn.c_proj": (D, D, dict(residual=True, dropout_rate=p)),
        "c_fc": (D, 4 * D, dict(activation="gelu_tanh")),
        "mlp.c_proj": (4 * D, D, dict(residual=True, dropout_rate=p))}
    parts = []  # (name, fn, args, times a step runs it)
    for name, (K, N, epi) in gemms.items():
        epi = dict(epi)
        a, w, b = (x if K == D else x4), normal((K, N), K ** -0.5), normal((N,))
        r = normal((M, N)) if epi.pop("residual", False) else None
        parts.append((f"jtgpt {name}", lambda a, w, b, r=r, epi=epi: linear(a, w, b, residual=r, seed=seed, **epi),
                      (a, w, b), layers))
        xla_kw = dict(residual=r, activation=epi.get("activation"))
        parts.append((f"XLA {name} (no dropout)", lambda a, w, b, kw=xla_kw: _xla_linear(a, w, b, **kw),
                      (a, w, b), layers))
    parts += [
        ("jtgpt attention", lambda qkv: flash_attention(qkv, num_heads=H, dropout_rate=p, seed=seed),
         (normal((B, T, 3 * D)),), layers),
        ("jtgpt layer_norm", layer_norm, (x, normal((D,)), normal((D,))), 2 * layers + 1),
        ("jtgpt embedding", lambda wte, wpe: embedding(ids, wte, pos, wpe, dropout_rate=p, seed=seed),
         (normal((V, D), 0.02), normal((1024, D), 0.02)), 1),
        ("jtgpt LM head + CE", lambda h, w: linear_cross_entropy(h, w, ids.reshape(-1)),
         (x, normal((V, D), 0.02)), 1)]
    total = 0.0
    for name, f, args, count in parts:
        ms = bench(fwd_bwd(f), *args, calls=5)
        if name.startswith("jtgpt"):
            total += ms * count
        _row(f"{name} fwd+bwd, x{count} a step", ms, ms * count, "ms a step")
    _row("sum of the jtgpt rows (no optimizer, no glue)", total, total, "ms a step")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--only", default="gemm,layernorm,lm_head,train")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "tf32", "fp32"],
                   help="tf32: fp32 data on the tensor cores (GEMMs; the rest runs fp32)")
    args = p.parse_args()
    dtype = jnp.bfloat16 if args.dtype == "bf16" else jnp.float32
    precision = "tf32" if args.dtype == "tf32" else "ieee"
    print(f"{jax.devices()[0].device_kind}, {args.dtype}, M = {M} tokens")
    print("| kernel | ms | rate | unit | check |\n|---|---:|---:|---|---|")
    if "gemm" in args.only:
        bench_gemms(dtype, args.sweep, precision)
    if "layernorm" in args.only:
        bench_layernorm(dtype)
    if "lm_head" in args.only:
        bench_lm_head(dtype)
    if "train" in args.only:
        bench_train_parts(dtype)


if __name__ == "__main__":
    main()
