"""Flash attention, forward and forward + backward: jtgpt against cuDNN and JAX's Pallas kernel.

    python bench/attention.py                        # causal bf16 (B, H, T, D) = (4,32,4096,128)
    python bench/attention.py --shape 512,12,300,64  # GPT-2 124M's attention at B=512, T=300
    python bench/attention.py --markdown out.md      # also write the table to a file
    python bench/attention.py --shape 1,2,40,32      # CPU: an interpreted smoke test
    python bench/attention.py --sweep --dropout 0.1  # jtgpt alone: time other block configs

Competitors, all on the same random inputs: jtgpt.kernels.attention.flash_attention (packed qkv in,
packed dqkv out), cuDNN through jax.nn.dot_product_attention(implementation="cudnn") and
jax.experimental.pallas.ops.gpu.attention.mha, each where it runs (on CPU only jtgpt does, in
Triton's interpreter, and Pallas in its interpreter). Before timing, each one's output and
gradient (for one random cotangent) are checked against jax.vjp of jtgpt.reference.attention on
two (batch, head) slices, so the check costs the same at any size; a competitor that fails the
check is not timed.

FLOPs (FlashAttention-2's convention): fwd = 4 B H T^2 D, halved when causal; bwd = 2.5 fwd;
fwd + bwd = 3.5 fwd. Times: the median over repeats of N back-to-back calls (bench/common.py).
"""
import argparse
import functools
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from common import compile_and_time, relative_error  # noqa: E402
from jtgpt import reference  # noqa: E402
from jtgpt.kernels.attention import flash  # noqa: E402
from jtgpt.kernels.attention import flash_attention  # noqa: E402

TOLERANCE = {"bfloat16": 2e-2, "float16": 4e-3, "float32": 1e-3}  # fp32: competitors may use tf32


# ------------------------------------------------------------------------------ competitors

def competitors(H, D, causal):
    """name -> (fn timed on its inputs, which inputs: "qkv" packed or "q,k,v" [B, T, H, D]),
    or the ImportError that keeps it out."""
    found = {"jtgpt": (functools.partial(flash_attention, num_heads=H, causal=causal), "qkv"),
             "cuDNN": (functools.partial(jax.nn.dot_product_attention, is_causal=causal,
                                         implementation="cudnn"), "q,k,v")}
    try:
        from jax.experimental.pallas.ops.gpu.attention import mha
        found["Pallas mha"] = (functools.partial(mha, segment_ids=None, sm_scale=D ** -0.5,
                                                 causal=causal,
                                                 interpret=jax.default_backend() != "gpu"), "q,k,v")
    except ImportError as e:
        found["Pallas mha"] = e
    return found


def pack(q, k, v):
    """q, k, v [B, T, H, D] as the packed qkv [B, T, 3 H D] of a c_attn GEMM."""
    B, T, H, D = q.shape
    return jnp.concatenate([x.reshape(B, T, H * D) for x in (q, k, v)], axis=-1)


def check(fn, layout, q, k, v, dout, causal, slices):
    """Largest relative error of out, dq, dk, dv of `fn` on the (b, h) `slices`, against jax.vjp
    of the reference on those slices alone (attention is independent per batch row and head)."""
    if layout == "qkv":
        attend = lambda q, k, v: fn(pack(q, k, v)).reshape(q.shape)  # noqa: E731
    else:
        attend = fn

    @jax.jit
    def out_and_grads(q, k, v, dout):
        out, vjp = jax.vjp(attend, q, k, v)
        return out, vjp(dout)

    out, grads = out_and_grads(q, k, v, dout)
    ref = functools.partial(reference.attention, causal=causal)
    errors = []
    for b, h in slices:
        sl = lambda x: x[b:b + 1, :, h:h + 1].astype(jnp.float32)  # noqa: E731
        ref_out, ref_vjp = jax.vjp(ref, sl(q), sl(k), sl(v))
        errors.append(relative_error(sl(out), ref_out))
        errors += [relative_error(sl(g), r) for g, r in zip(grads, ref_vjp(sl(dout)))]
    return max(errors)


# ------------------------------------------------------------------------------------ sweep

# (BLOCK_M, BLOCK_N, num_warps, num_stages) to try for 16-bit inputs, beside the chosen ones.
# Forward and dQ need BLOCK_M % BLOCK_N == 0, dK/dV BLOCK_N % BLOCK_M == 0 (the causal diagonal).
SWEEP = {
    "fwd": [(128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3), (128, 64, 8, 4),
            (128, 32, 8, 4), (64, 64, 4, 3), (64, 64, 4, 2), (64, 64, 4, 4), (64, 32, 4, 4),
            (64, 32, 4, 3), (256, 64, 8, 2)],
    "dkdv": [(32, 128, 8, 3), (32, 128, 8, 4), (64, 128, 8, 2), (64, 128, 8, 3), (64, 128, 8, 4),
             (32, 64, 4, 3), (64, 64, 4, 3), (64, 64, 4, 4), (64, 64, 8, 3), (16, 64, 4, 4)],
    "dq": [(128, 64, 8, 3), (128, 64, 8, 4), (128, 32, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3),
           (64, 32, 4, 3), (64, 32, 4, 4), (128, 128, 8, 2), (64, 64, 4, 4), (128, 32, 8, 4)],
}


def sweep(qkv, dout, H, D, causal, dropout_rate, calls, repeats, row, parts_to_sweep):
    """Time jtgpt's forward under each SWEEP["fwd"] config, and its whole backward (dQ, then
    dK/dV) under each dK/dV config with the chosen dQ one and vice versa; each output is
    checked against the chosen configs' output first."""
    seed = jnp.int32(7)
    _, _, seed, cfg = flash._checked(qkv, H, None, None, causal, None, "ieee", dropout_rate,
                                         seed)
    # The forward as training runs it: storing the dropout mask's bits for the backward.
    forward = lambda qkv: flash._forward(qkv, None, seed, cfg, store_keep=True)  # noqa: E731
    out, lse, keep = jax.jit(forward)(qkv)
    parts = {  # part -> (a fresh jit each call: it traces under the config patched in now, args)
        "fwd": (lambda: jax.jit(lambda qkv: forward(qkv)[0]), (qkv,)),
        "dkdv": (lambda: jax.jit(lambda *a: flash._backward(*a, cfg)),
                 (qkv, None, keep, out, lse, dout))}
    parts["dq"] = parts["dkdv"]
    chosen = {"fwd": flash._block_config(D, qkv.dtype, "ieee")}
    chosen["dkdv"], chosen["dq"] = flash._bwd_block_config(D, qkv.dtype, "ieee")
    saved = flash._block_config, flash._bwd_block_config
    for part in parts_to_sweep:
        configs, (make, args) = SWEEP[part], parts[part]
        want = make()(*args)
        for config in [chosen[part]] + [c for c in configs if c != chosen[part]]:
            if part == "fwd":
                flash._block_config = lambda *_, c=config: c
            else:
                pair = (config, chosen["dq"]) if part == "dkdv" else (chosen["dkdv"], config)
                flash._bwd_block_config = lambda *_, pair=pair: pair
            try:
                fn = make()
                err = relative_error(fn(*args), want)
                seconds, _, _ = compile_and_time(fn, *args, calls=calls, repeats=repeats)
                row(f"{part} {config}{' (chosen)' if config == chosen[part] else ''}",
                    f"{seconds * 1e3:.3f}", f"{err:.1e}")
            except Exception as e:  # noqa: BLE001 - a config that does not fit shared memory
                row(f"{part} {config}", "-", f"{type(e).__name__}: {str(e).splitlines()[0][:80]}")
            finally:
                flash._block_config, flash._bwd_block_config = saved


# ------------------------------------------------------------------------------------- main

def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="4,32,4096,128", help="B,H,T,D (default %(default)s)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--full", action="store_true", help="non-causal attention (default causal)")
    p.add_argument("--calls", type=int, help="back-to-back calls per timing (GPU 10, CPU 1)")
    p.add_argument("--repeats", type=int, help="timings to take the median of (GPU 5, CPU 1)")
    p.add_argument("--markdown", metavar="FILE", help="also write the table to FILE")
    p.add_argument("--sweep", action="store_true", help="jtgpt only: time the SWEEP block configs")
    p.add_argument("--dropout", type=float, default=0.0, help="attention dropout (--sweep only)")
    p.add_argument("--parts", default="fwd,dkdv,dq", help="kernels to sweep (default %(default)s)")
    args = p.parse_args()
    B, H, T, D = (int(x) for x in args.shape.split(","))
    dtype, causal = jnp.dtype(args.dtype), not args.full
    on_gpu = jax.default_backend() == "gpu"
    calls = args.calls or (10 if on_gpu else 1)
    repeats = args.repeats or (5 if on_gpu else 1)

    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, dout = (jax.random.normal(key, (B, T, H, D), jnp.float32).astype(dtype)
                     for key in keys)
    inputs = {"qkv": ((pack(q, k, v),), dout.reshape(B, T, H * D)), "q,k,v": ((q, k, v), dout)}
    slices = [(0, 0), (B - 1, H - 1)]
    fwd_flops = 4 * B * H * T * T * D / (2 if causal else 1)

    lines = [f"{jax.devices()[0].device_kind}, {dtype.name}, {'causal' if causal else 'full'}, "
             f"(B, H, T, D) = ({B}, {H}, {T}, {D}), {calls} calls x {repeats} repeats", ""]
    if args.sweep:
        lines += [f"jtgpt's block configs, dropout {args.dropout}", "",
                  "| kernel (BLOCK_M, BLOCK_N, warps, stages) | ms | rel. error vs the chosen |",
                  "|---|---:|---|"]
    else:
        lines += ["| kernel | pass | ms | TFLOP/s | check: max rel. error of out, dq, dk, dv |",
                  "|---|---|---:|---:|---|"]
    print("\n".join(lines), flush=True)

    def row(*cells):  # printed as soon as measured: a run cut short still shows what it got
        lines.append("| " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)

    if args.sweep:
        sweep(inputs["qkv"][0][0], inputs["qkv"][1], H, D, causal, args.dropout, calls, repeats, row,
              args.parts.split(","))
        competitors_to_run = {}
    else:
        competitors_to_run = competitors(H, D, causal)
    for name, entry in competitors_to_run.items():
        if isinstance(entry, Exception):
            row(name, "-", "-", "-", f"unavailable: {type(entry).__name__}: {entry}"[:120])
            continue
        fn, layout = entry
        try:
            err = check(fn, layout, q, k, v, dout, causal, slices)
        except Exception as e:  # noqa: BLE001 - cuDNN on CPU, a shape a competitor refuses
            message = str(e).splitlines()[0] if str(e) else ""
            row(name, "-", "-", "-", f"unavailable: {type(e).__name__}: {message}"[:120])
            continue
        if not err <= TOLERANCE[dtype.name]:
            row(name, "-", "-", "-", f"FAILED: {err:.1e} > {TOLERANCE[dtype.name]:g}, not timed")
            continue
        fn_args, cotangent = inputs[layout]

        def fwd_bwd(*a, fn=fn, cotangent=cotangent):
            return jax.vjp(fn, *a)[1](cotangent)

        for label, f, flops in (("fwd", fn, fwd_flops), ("fwd+bwd", fwd_bwd, 3.5 * fwd_flops)):
            seconds, _, _ = compile_and_time(f, *fn_args, calls=calls, repeats=repeats)
            row(name, label, f"{seconds * 1e3:.3f}", f"{flops / seconds / 1e12:.1f}", f"{err:.1e}")

    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
