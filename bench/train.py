"""Training benchmark: one optimizer step of GPT-2 124M (forward, backward, AdamW), jtgpt vs HF.

    python bench/train.py                       # GPU: B=16, T=1024; CPU: a tiny config, interpreted
    python bench/train.py --batch 8 --seq 2048 --markdown bench/out.md

Every competitor trains the same weights (fp32 master weights, bf16 compute: the usual mixed
precision) on the same token ids with the same optimizer settings (global-norm clipping then
AdamW): jtgpt with jtgpt.train.adamw (one Triton launch over flat parameters) and, in a second
row, with train.optax_adamw (optax's transformations); HF Flax with optax's; HF PyTorch with
torch's fused AdamW. Dropout as GPT-2 configures it (0.1) in training mode. `--devices N` adds
jtgpt data-parallel over N devices (ZeRO-2), B rows on each: for GPUs. (On the CPU, where the
kernels run as Python callbacks, a 2-device run hung on the 2-core development machine, with
JAX's copy of a callback's input to CPU device 0 never done; with 8 devices it ran.) Before timing, each model's
eval-mode loss on the batch is checked against HF Flax fp32's. Timing: `--steps` chained steps
(each step's state feeds the next) with one block at the end, `--repeats` times, median.

Throughput: tokens/s = B*T / step time. MFU counts 6 N FLOPs per token (N = all parameters,
embeddings included; attention's own FLOPs left out, as in the usual 6N rule) against the H100
SXM's 989 dense bf16 TFLOP/s. Peak memory: XLA's buffer assignment of the compiled step
(arguments + outputs + temporaries - donated aliases); for torch, max_memory_allocated.

The attention kernel alone (fwd and fwd+bwd against cuDNN and Pallas) is bench/attention.py;
where the step's time goes: `--profile` (kernel by kernel, from a trace) and `python bench/kernels.py
--only train` (each op alone).
"""
import argparse
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # run from a checkout too
import jtgpt  # noqa: E402
from common import (H100_BF16_DENSE_TFLOPS, gpu_kernel_table, stage, time_steps,  # noqa: E402
                    time_torch, torch_train_step)
from jtgpt import train  # noqa: E402
from jtgpt.models.gpt2 import GPTConfig  # noqa: E402

LEARNING_RATE = 1e-4


def main():
    on_gpu = jax.default_backend() == "gpu"
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16 if on_gpu else 2)
    p.add_argument("--seq", type=int, default=1024 if on_gpu else 16)
    p.add_argument("--steps", type=int, default=10 if on_gpu else 1)
    p.add_argument("--repeats", type=int, default=3 if on_gpu else 1)
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch competitors")
    p.add_argument("--markdown", help="also write the table to this file")
    p.add_argument("--profile", action="store_true", help="also print jtgpt's step kernel by kernel")
    p.add_argument("--devices", type=int, default=1,
                   help="also jtgpt data-parallel (ZeRO-2) over this many devices, B rows each")
    args = p.parse_args()
    from transformers import FlaxGPT2LMHeadModel

    config = GPTConfig() if on_gpu else GPTConfig(vocab_size=97, n_positions=64, n_embd=64, n_layer=2, n_head=4)
    B, T = args.batch, args.seq
    n_params = config.num_params
    ids = jax.random.randint(jax.random.key(0), (B, T), 0, config.vocab_size, jnp.int32)
    weights = tempfile.mkdtemp(prefix="jtgpt-bench-train-")
    jtgpt.GPT(config).save_pretrained(weights)

    with jax.default_matmul_precision("highest"):
        hf32 = FlaxGPT2LMHeadModel.from_pretrained(weights, dtype=jnp.float32)
        reference = float(jax.jit(lambda p, ids: _hf_loss(hf32, p, ids, None))(hf32.params, ids))
    del hf32
    stage(f"HF Flax fp32 eval loss {reference:.5f}")

    header = (f"GPT-2 {n_params / 1e6:.1f}M train step (fwd + bwd + AdamW), B={B} T={T}, fp32 "
              f"params, bf16 compute, dropout 0.1; device: {jax.devices()[0].device_kind}")
    rows = []

    def record(name, seconds, peak, first, last, loss_err, rows_per_step=B):
        tokens = rows_per_step * T / seconds
        rows.append(dict(name=name, ms=seconds * 1e3, tokens=tokens, peak_gb=peak / 1e9,
                         err=loss_err, first=first, last=last))
        stage(f"{name}: {seconds * 1e3:.2f} ms/step, {tokens / 1e3:.1f}k tokens/s, peak "
               f"{peak / 1e9:.2f} GB, eval-loss rel err {loss_err:.1e}, loss {first:.4f} -> {last:.4f}")
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(_table(header, rows, n_params) + "\n")

    # HF Flax: its own model in training mode, the same optimizer in optax's own transformations
    # (train.optax_adamw), the same shifted-label loss.
    hf = FlaxGPT2LMHeadModel.from_pretrained(weights, dtype=jnp.bfloat16)
    optimizer = train.optax_adamw(LEARNING_RATE)

    def hf_step(state, ids, key):
        params, opt_state = state
        loss, grads = jax.value_and_grad(lambda p: _hf_loss(hf, p, ids, key))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), {"loss": loss}

    hf_state = (hf.params, optimizer.init(hf.params))
    hf_eval = float(jax.jit(lambda p, ids: _hf_loss(hf, p, ids, None))(hf.params, ids))
    timed = time_steps(jax.jit(hf_step, donate_argnums=0), hf_state, ids, steps=args.steps,
                       repeats=args.repeats)
    record("HF Flax (bf16 compute)", *timed, abs(hf_eval - reference) / abs(reference))
    del hf, hf_state

    model = jtgpt.GPT.from_pretrained(weights, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    jt_eval = float(jax.jit(lambda m, ids: m.loss(ids))(model, ids))
    err = abs(jt_eval - reference) / abs(reference)
    state, step = train.init(model, train.optax_adamw(LEARNING_RATE))
    timed = time_steps(step, state, {"input_ids": ids}, steps=args.steps, repeats=args.repeats)
    record("jtgpt (bf16 compute), optax's AdamW", *timed, err)
    optimizer = train.adamw(LEARNING_RATE)
    state, step = train.init(model, optimizer)
    timed = time_steps(step, state, {"input_ids": ids}, steps=args.steps, repeats=args.repeats)
    record("jtgpt (bf16 compute)", *timed, err)
    if args.devices > 1:
        mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:args.devices]), (train.DATA,))
        state, sharded = train.init(model, optimizer, mesh=mesh)
        batch = {"input_ids": jnp.tile(ids, (args.devices, 1))}  # B rows a device
        seconds, peak, first, last = time_steps(sharded, state, batch, steps=args.steps,
                                                repeats=args.repeats)
        record(f"jtgpt ZeRO-2 on {args.devices} devices (B={B} a device; peak GB a device)",
               seconds, peak, first, last, err, rows_per_step=B * args.devices)
    if args.profile:
        state, _ = train.init(model, optimizer)  # time_steps donated the first state
        box = [state]

        def one_step():
            box[0], metrics = step(box[0], {"input_ids": ids}, jax.random.key(2))
            return metrics
        one_step()
        print(gpu_kernel_table(one_step, steps=3), flush=True)
    del model, state

    if not args.no_torch:
        for row in _torch_rows(weights, np.asarray(ids), reference, args):
            record(*row)
    print("\n" + _table(header, rows, n_params))


def _hf_loss(hf, params, ids, key):
    """Mean next-token cross-entropy of FlaxGPT2LMHeadModel; dropout when `key` is given."""
    logits = hf(ids, params=params, dropout_rng=key, train=key is not None).logits
    return optax.softmax_cross_entropy_with_integer_labels(
        logits[:, :-1].astype(jnp.float32), ids[:, 1:]).mean()


def _torch_rows(weights, ids, reference, args):
    """HF PyTorch GPT2LMHeadModel (SDPA), bf16 autocast over fp32 weights, fused torch AdamW with
    the same clipping and decay, eager and torch.compile, where CUDA torch is installed."""
    try:
        import torch
        from transformers import GPT2LMHeadModel
    except ImportError:
        return
    if not torch.cuda.is_available():
        return
    ids_t = torch.from_numpy(np.array(ids)).long().cuda()  # torch's loss takes int64 labels
    for name, compile_it in (("HF PyTorch (bf16 autocast, SDPA)", False),
                             ("HF PyTorch + torch.compile", True)):
        model = GPT2LMHeadModel.from_pretrained(weights, attn_implementation="sdpa").cuda()
        with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
            model.eval()
            err = abs(float(model(ids_t, labels=ids_t).loss) - reference) / abs(reference)
            model.train()
        step = torch_train_step(model, ids_t, learning_rate=LEARNING_RATE, compile_it=compile_it)
        first = float(step())  # warm-up (and compilation)
        seconds, peak, loss = time_torch(step, calls=args.steps, repeats=args.repeats)
        yield name, seconds, peak, first, float(loss), err
        del model, step


def _table(header, rows, n_params) -> str:
    hf = next((r for r in rows if r["name"].startswith("HF Flax")), None)
    lines = [header, "",
             "| implementation | ms/step | tokens/s | MFU (6N) | peak GB | vs HF Flax tokens/s | "
             "eval-loss rel err vs HF fp32 | loss first -> last step |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        mfu = 6 * n_params * r["tokens"] / 1e12 / H100_BF16_DENSE_TFLOPS
        speedup = f"{r['tokens'] / hf['tokens']:.2f}x" if hf and r is not hf else ""
        lines.append(f"| {r['name']} | {r['ms']:.2f} | {r['tokens'] / 1e3:.1f}k | {100 * mfu:.1f}% | "
                     f"{r['peak_gb']:.2f} | {speedup} | {r['err']:.1e} | {r['first']:.4f} -> {r['last']:.4f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
