"""The headline benchmark: GPT-2 124M forward (no LM head) at B x T, jtgpt vs Hugging Face.

    python bench/fwd.py                       # GPU: B=512, T=300; CPU: a tiny config, interpreted
    python bench/fwd.py --batch 64 --seq 1024 --markdown bench/out.md
    python bench/fwd.py --modes bf16 --no-torch --profile   # and its kernels, one by one

Every competitor runs in this process on the same weights and token ids, after a warm-up; each
output is checked against Hugging Face Flax GPT-2 in fp32 ("highest" precision dots) before it is
timed, and the jtgpt logits against FlaxGPT2LMHeadModel's. The modes are the precisions of the
PyTorch "Triton GPT" table this project answers (fp32, tf32, mixed fp16, fp16) plus bf16 and
mixed bf16, each beside Hugging Face's row in the same precision. Timing: `--calls` back-to-back
calls with one block at the end, repeated `--repeats` times, median.

FLOPs per forward, L layers, width D, M = B*T tokens, causal attention counted once per pair:
    L * (24 M D^2  +  4 B T (T+1)/2 D)
Peak memory for JAX programs is XLA's buffer assignment for the compiled call (arguments +
outputs + temporaries - aliased); for torch, torch.cuda.max_memory_allocated.
"""
import argparse
import contextlib
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # run from a checkout too
import jtgpt  # noqa: E402
from common import (H100_BF16_DENSE_TFLOPS, compile_and_time, gpu_kernel_table, relative_error,  # noqa: E402
                    stage, time_torch)
from jtgpt.models.gpt2 import GPTConfig  # noqa: E402

# Each jtgpt mode: (label, compute dtype, param dtype, fp32 dot precision, HF baseline it is
# compared with, tolerance of its relative error against HF Flax fp32).
MODES = {
    "fp32": ("jtgpt fp32 (ieee)", jnp.float32, jnp.float32, "ieee", "HF Flax fp32", 1e-4),
    "tf32x3": ("jtgpt fp32 (3xtf32)", jnp.float32, jnp.float32, "tf32x3", "HF Flax fp32", 1e-4),
    "tf32": ("jtgpt tf32", jnp.float32, jnp.float32, "tf32", "HF Flax fp32", 1e-2),
    "mixed": ("jtgpt mixed (fp32 params, bf16)", jnp.bfloat16, jnp.float32, "ieee", "HF Flax bf16", 5e-2),
    "bf16": ("jtgpt bf16", jnp.bfloat16, jnp.bfloat16, "ieee", "HF Flax bf16", 5e-2),
    "mixed-fp16": ("jtgpt mixed fp16 (fp32 params, fp16)", jnp.float16, jnp.float32, "ieee",
                   "HF Flax mixed fp16 (fp32 params)", 1e-2),
    "fp16": ("jtgpt fp16", jnp.float16, jnp.float16, "ieee", "HF Flax fp16", 1e-2),
}
# The Hugging Face Flax baselines: (compute dtype, param dtype), and the jtgpt modes after each.
# Flax's `dtype` is the compute dtype: fp32 params with dtype fp16 is its mixed precision.
HF_FLAX = {
    "HF Flax bf16": (jnp.bfloat16, jnp.bfloat16, ("bf16", "mixed")),
    "HF Flax fp16": (jnp.float16, jnp.float16, ("fp16",)),
    "HF Flax mixed fp16 (fp32 params)": (jnp.float16, jnp.float32, ("mixed-fp16",)),
    "HF Flax fp32": (jnp.float32, jnp.float32, ("tf32", "tf32x3", "fp32")),
}


def flops(config: GPTConfig, B: int, T: int) -> float:
    D, L = config.n_embd, config.n_layer
    return L * (24 * B * T * D * D + 4 * B * T * (T + 1) / 2 * D)


def gemm_ceiling(calls: int, repeats: int) -> float:
    """bf16 TFLOP/s of XLA's own 8192^3 matmul here: the ceiling the table is read against."""
    n = 8192
    a = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(2), (n, n), jnp.bfloat16)
    return 2 * n ** 3 / compile_and_time(jnp.dot, a, b, calls=calls, repeats=repeats)[0] / 1e12


def main():
    on_gpu = jax.default_backend() == "gpu"
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=512 if on_gpu else 2)
    p.add_argument("--seq", type=int, default=300 if on_gpu else 16)
    p.add_argument("--modes", default=",".join(MODES), help="jtgpt modes: " + ",".join(MODES))
    p.add_argument("--calls", type=int, default=10 if on_gpu else 1)
    p.add_argument("--repeats", type=int, default=5 if on_gpu else 1)
    p.add_argument("--check-batch", type=int, default=8, help="rows checked against HF fp32")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch competitors")
    p.add_argument("--markdown", help="also write the table to this file")
    p.add_argument("--profile", action="store_true",
                   help="also print each jtgpt mode's forward kernel by kernel")
    args = p.parse_args()

    from transformers import FlaxGPT2LMHeadModel, FlaxGPT2Model

    # The real GPT-2 124M on a GPU; a tiny one in Triton's interpreter on CPU.
    config = GPTConfig() if on_gpu else GPTConfig(vocab_size=97, n_positions=64, n_embd=64, n_layer=2, n_head=4)
    B, T = args.batch, args.seq
    total_flops = flops(config, B, T)
    ids = jax.random.randint(jax.random.key(0), (B, T), 0, config.vocab_size, jnp.int32)
    check = slice(0, min(args.check_batch, B))

    # One set of random weights, written once and read by every competitor.
    weights = tempfile.mkdtemp(prefix="jtgpt-bench-")
    init = jtgpt.GPT(config)
    _randomize_norms(init)
    init.save_pretrained(weights)
    del init
    stage("weights written")

    hf32 = FlaxGPT2Model.from_pretrained(weights, dtype=jnp.float32)
    with jax.default_matmul_precision("highest"):
        reference = np.asarray(hf32(ids[check]).last_hidden_state)
    del hf32

    # The logits, LM head included, against FlaxGPT2LMHeadModel before timing anything of ours.
    hf_lm = FlaxGPT2LMHeadModel.from_pretrained(weights, dtype=jnp.float32)
    with jax.default_matmul_precision("highest"):
        ref_logits = np.asarray(hf_lm(ids[:2, :64]).logits)
    ours = jtgpt.GPT.from_pretrained(weights)
    logits_err = relative_error(jax.jit(lambda m, ids: m(ids))(ours, ids[:2, :64]), ref_logits)
    assert logits_err < 1e-4, f"jtgpt logits disagree with Hugging Face: relative error {logits_err:.2e}"
    del hf_lm, ours
    stage(f"jtgpt fp32 logits vs FlaxGPT2LMHeadModel: relative error {logits_err:.2e}")

    ceiling = gemm_ceiling(args.calls, args.repeats) if on_gpu else float("nan")
    header = (f"GPT-2 {config.num_params / 1e6:.1f}M forward, no LM head, B={B} T={T}, "
              f"{total_flops / 1e12:.2f} TFLOP per call; device: {jax.devices()[0].device_kind}; "
              f"XLA bf16 8192^3 GEMM ceiling here: {ceiling:.0f} TFLOP/s")
    rows = []

    def record(name, seconds, peak, err, baseline=None):
        """Add a row; print it and rewrite the table, so a run cut short keeps what it measured."""
        rows.append(dict(name=name, ms=seconds * 1e3, tflops=total_flops / seconds / 1e12,
                         peak_gb=peak / 1e9, err=err, baseline=baseline))
        stage(f"{name}: {seconds * 1e3:.2f} ms, peak {peak / 1e9:.2f} GB, rel err vs HF fp32 {err:.2e}")
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(_table(header, rows, ceiling) + "\n")

    def hf_flax(name, dtype, param_dtype):
        model = FlaxGPT2Model.from_pretrained(weights, dtype=dtype)
        params = jax.tree.map(lambda a: a.astype(param_dtype), model.params)
        seconds, peak, out = compile_and_time(
            lambda params, ids: model(ids, params=params).last_hidden_state, params, ids,
            calls=args.calls, repeats=args.repeats)
        record(name, seconds, peak, relative_error(out[check], reference))

    def ours(mode):
        label, dtype, param_dtype, precision, baseline, tol = MODES[mode]
        model = jtgpt.GPT.from_pretrained(weights, dtype=dtype, param_dtype=param_dtype, precision=precision)
        seconds, peak, out = compile_and_time(lambda m, ids: m.hidden_states(ids), model, ids,
                                              calls=args.calls, repeats=args.repeats)
        err = relative_error(out[check], reference)
        assert err < tol, f"{label}: relative error {err:.2e} against HF Flax fp32 exceeds {tol}"
        record(label, seconds, peak, err, baseline)
        if args.profile:
            forward = jax.jit(lambda m, ids: m.hidden_states(ids))
            print(f"{label}: " + gpu_kernel_table(lambda: forward(model, ids), steps=3), flush=True)

    # Half precision first (the headline), then fp32; each jtgpt mode right after its baseline
    # (a baseline none of the asked modes needs is skipped). HF Flax fp32 uses XLA's default dot
    # precision (tf32 on these GPUs).
    modes = args.modes.split(",")
    unknown = set(modes) - set(MODES)
    if unknown:
        p.error(f"--modes: unknown {sorted(unknown)}; choose from {','.join(MODES)}")
    for name, (dtype, param_dtype, its_modes) in HF_FLAX.items():
        if any(m in modes for m in its_modes):
            hf_flax(name, dtype, param_dtype)
            for mode in [m for m in its_modes if m in modes]:
                ours(mode)
    if not args.no_torch:
        for name, seconds, peak, err, baseline in _torch_rows(weights, np.asarray(ids), reference,
                                                              check, args):
            record(name, seconds, peak, err, baseline)
    print("\n" + _table(header, rows, ceiling))


def _table(header, rows, ceiling) -> str:
    by_name = {r["name"]: r for r in rows}
    lines = [header, "",
             "| implementation | ms | TFLOP/s | MFU | % of GEMM ceiling | peak GB | vs its HF Flax | rel err vs HF fp32 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        base = by_name.get(r["baseline"] or "")
        ratio = f"{r['ms'] / base['ms']:.2f}x ({r['baseline']})" if base else ""
        lines.append(f"| {r['name']} | {r['ms']:.2f} | {r['tflops']:.1f} | "
                     f"{100 * r['tflops'] / H100_BF16_DENSE_TFLOPS:.1f}% | {100 * r['tflops'] / ceiling:.1f}% | "
                     f"{r['peak_gb']:.2f} | {ratio} | {r['err']:.1e} |")
    return "\n".join(lines)


def _randomize_norms(model):
    """LayerNorm weights and all biases random too, so a wrong one cannot hide behind 1s and 0s."""
    from flax import nnx
    keys = iter(jax.random.split(jax.random.key(7), 1000))
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if path[-1] == "bias" or "ln" in str(path[-2]):
            base = 1.0 if path[-1] == "weight" else 0.0
            var.set_value(base + 0.1 * jax.random.normal(next(keys), var.shape, var.dtype))


def _torch_rows(weights, ids, reference, check, args):
    """(name, seconds, peak bytes, rel err, baseline) of HF PyTorch GPT-2 (SDPA), where CUDA
    torch is installed: bf16 eager and torch.compile, and the origin table's fp16 rows (fp16
    weights, and autocast fp16 over fp32 weights: its mixed precision) eager."""
    try:
        import torch
        from transformers import GPT2Model
    except ImportError:
        return
    if not torch.cuda.is_available():
        return
    ids_t = torch.from_numpy(np.array(ids)).cuda()
    # (name, stored weights, autocast dtype or None, torch.compile, the HF Flax row it is read by)
    rows = [("HF PyTorch bf16 (SDPA)", torch.bfloat16, None, False, "HF Flax bf16"),
            ("HF PyTorch bf16 + torch.compile", torch.bfloat16, None, True, "HF Flax bf16"),
            ("HF PyTorch fp16 (SDPA)", torch.float16, None, False, "HF Flax fp16"),
            ("HF PyTorch mixed fp16 (autocast, SDPA)", torch.float32, torch.float16, False,
             "HF Flax mixed fp16 (fp32 params)")]
    for name, weights_dtype, autocast, compiled, baseline in rows:
        model = GPT2Model.from_pretrained(weights, torch_dtype=weights_dtype,
                                          attn_implementation="sdpa").cuda().eval()
        fn = torch.compile(model) if compiled else model
        mixed = torch.autocast("cuda", autocast) if autocast else contextlib.nullcontext()
        with torch.no_grad(), mixed:
            out = fn(ids_t).last_hidden_state  # also the warm-up
            err = relative_error(out[check].float().cpu().numpy(), reference)
            seconds, peak, _ = time_torch(lambda: fn(ids_t), calls=args.calls,
                                          repeats=args.repeats)
        yield name, seconds, peak, err, baseline


if __name__ == "__main__":
    main()
