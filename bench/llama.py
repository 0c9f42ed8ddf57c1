"""Llama benchmark: Llama-3.2-1B and Llama-3.1-8B shapes (random weights), jtgpt vs Hugging Face.

    python bench/llama.py                        # GPU: the three sections below; CPU: a tiny
    python bench/llama.py --only forward,train   #   config in the interpreter, checks only
    python bench/llama.py --markdown bench/out.md

Sections, each on one set of random weights that every competitor reads (jtgpt writes them with
save_pretrained, transformers loads them):
- forward: Llama-3.2-1B shape, no LM head (hidden states), B=8 x T=2048, bf16 weights and compute;
- train: one optimizer step of Llama-3.2-1B, B=4 x T=2048: fp32 parameters, bf16 compute, AdamW
  (lr 1e-4, betas 0.9/0.95, weight decay 0.1 on matrices, global-norm clipping 1.0), the loss
  through the LM head (jtgpt: fused with the cross-entropy; HF: `labels=`, full logits);
- forward-8b: Llama-3.1-8B shape, no LM head, B=1 x T=8192, bf16.
Competitors: jtgpt; HF PyTorch LlamaForCausalLM (SDPA attention, eager); the same under
torch.compile (the PyTorch rows need CUDA torch). Before timing, every forward's hidden states
are checked against HF PyTorch's on a slice of the batch (fp32 HF for the 1B shape, bf16 for 8B),
and every train step's first loss against HF's fp32 loss on the same batch.

Timing: `--calls` back-to-back calls (chained steps for training) with one block at the end,
`--repeats` times, median. FLOPs, L layers, width d, q/kv heads Hq/Hkv of size D, MLP width F,
vocabulary V, B*T tokens (causal attention counted once per visible pair):
    forward  = 2 B T L (d (Hq + 2 Hkv) D + Hq D d + 3 d F)  +  4 B Hq D L T (T + 1) / 2
    train    = 3 x (forward + 2 B T d V)      (backward = 2 x forward; no recomputation counted)
MFU is against the H100/H200 SXM datasheet's 989 dense bf16 TFLOP/s; peak memory is XLA's buffer
assignment for jtgpt (arguments + outputs + temporaries - donated) and max_memory_allocated for
torch.
"""
import argparse
import dataclasses
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # run from a checkout too
import jtgpt  # noqa: E402
from common import (H100_BF16_DENSE_TFLOPS, compile_and_time, relative_error, stage,  # noqa: E402
                    time_steps, time_torch, torch_train_step)
from jtgpt import train  # noqa: E402
from jtgpt.models.llama import PRESETS, LlamaConfig  # noqa: E402

LEARNING_RATE = 1e-4
# jtgpt's error against HF PyTorch that fails the run before anything is timed: bf16 hidden states
# against fp32 ones (bf16 against bf16 for 8B), and a bf16-compute loss against the fp32 loss.
FORWARD_TOLERANCE, LOSS_TOLERANCE = 5e-2, 1e-2
SECTIONS = ("forward", "train", "forward-8b")
TINY = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=88, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0,
                   max_position_embeddings=131072,
                   rope_scaling=PRESETS["llama-3.2-1b"].rope_scaling, tie_word_embeddings=True)


@dataclasses.dataclass
class Section:
    name: str
    config: LlamaConfig
    batch: tuple[int, int]
    train: bool


def sections(on_gpu: bool) -> dict[str, Section]:
    if not on_gpu:  # the interpreter: one tiny config for every section, so the command runs
        return {"forward": Section("forward", TINY, (2, 16), False),
                "train": Section("train", TINY, (2, 16), True),
                "forward-8b": Section("forward-8b", dataclasses.replace(TINY, tie_word_embeddings=False),
                                      (1, 32), False)}
    return {"forward": Section("forward", PRESETS["llama-3.2-1b"], (8, 2048), False),
            "train": Section("train", PRESETS["llama-3.2-1b"], (4, 2048), True),
            "forward-8b": Section("forward-8b", PRESETS["llama-3.1-8b"], (1, 8192), False)}


def forward_flops(c: LlamaConfig, B: int, T: int) -> float:
    d, D, Hq, Hkv, F, L = (c.hidden_size, c.head_dim, c.num_attention_heads, c.num_key_value_heads,
                           c.intermediate_size, c.num_hidden_layers)
    gemms = 2 * B * T * L * (d * (Hq + 2 * Hkv) * D + Hq * D * d + 3 * d * F)
    return gemms + 4 * B * Hq * D * L * T * (T + 1) / 2


def train_flops(c: LlamaConfig, B: int, T: int) -> float:
    return 3 * (forward_flops(c, B, T) + 2 * B * T * c.hidden_size * c.vocab_size)


def main():
    on_gpu = jax.default_backend() == "gpu"
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(SECTIONS), help="sections: " + ",".join(SECTIONS))
    p.add_argument("--calls", type=int, default=10 if on_gpu else 1)
    p.add_argument("--repeats", type=int, default=3 if on_gpu else 1)
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch competitors")
    p.add_argument("--markdown", help="also write the tables to this file")
    args = p.parse_args()
    tables = []
    for name in args.only.split(","):
        section = sections(on_gpu)[name]
        rows = run_section(section, args)
        tables.append(_table(section, rows))
        print("\n" + tables[-1], flush=True)
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write("\n\n".join(tables) + "\n")


def run_section(section: Section, args) -> list[dict]:
    """Write the weights, check each competitor against HF, time it; the section's rows."""
    config, (B, T) = section.config, section.batch
    weights = tempfile.mkdtemp(prefix=f"jtgpt-bench-llama-{section.name}-")
    dtype = jnp.float32 if section.train else jnp.bfloat16
    jtgpt.Llama(config, dtype=dtype).save_pretrained(weights)
    stage(f"{section.name}: {config.num_params / 1e6:,.0f}M parameters written to {weights}")
    ids = np.asarray(jax.random.randint(jax.random.key(0), (B, T), 0, config.vocab_size, jnp.int32))
    flops = (train_flops if section.train else forward_flops)(config, B, T)
    reference = _hf_reference(weights, ids, section)
    rows = []

    def record(name, seconds, peak, err):
        rows.append(dict(name=name, ms=seconds * 1e3, tflops=flops / seconds / 1e12,
                         tokens=B * T / seconds, peak_gb=peak / 1e9, err=err))
        stage(f"{section.name} {name}: {seconds * 1e3:.2f} ms, peak {peak / 1e9:.2f} GB, "
              f"error vs HF {err:.1e}")

    if section.train:
        model = jtgpt.Llama.from_pretrained(weights, dtype=jnp.bfloat16, param_dtype=jnp.float32)
        first = float(jax.jit(lambda m, ids: m.loss(ids))(model, ids))
        err = abs(first - reference) / abs(reference)
        assert err < LOSS_TOLERANCE, f"jtgpt's loss {first} is off HF's {reference} by {err:.1e}"
        state, step = train.init(model, train.adamw(LEARNING_RATE))
        del model
        seconds, peak, _, _ = time_steps(step, state, {"input_ids": ids}, steps=args.calls,
                                         repeats=args.repeats)
        record("jtgpt", seconds, peak, err)
    else:
        model = jtgpt.Llama.from_pretrained(weights, dtype=jnp.bfloat16)
        seconds, peak, out = compile_and_time(lambda m, ids: m.hidden_states(ids), model, ids,
                                              calls=args.calls, repeats=args.repeats)
        err = relative_error(out[:1], reference)
        assert err < FORWARD_TOLERANCE, f"jtgpt's hidden states are off HF's by {err:.1e}"
        record("jtgpt", seconds, peak, err)
        del model, out
    if not args.no_torch:
        for name, seconds, peak, err in _torch_rows(weights, ids, reference, section, args):
            record(name, seconds, peak, err)
    return rows


def _hf_reference(weights, ids, section: Section):
    """HF PyTorch's answer to check every competitor against: the hidden states of the first row
    (fp32 weights, or bf16 for the 8B shape), or the train batch's fp32 loss."""
    import torch
    from transformers import LlamaForCausalLM
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if section.name == "forward-8b" else torch.float32
    model = LlamaForCausalLM.from_pretrained(weights, torch_dtype=dtype).to(device).eval()
    with torch.no_grad():
        if section.train:
            ids_t = torch.from_numpy(ids).long().to(device)
            out = float(model(ids_t, labels=ids_t).loss)
        else:
            out = model.model(torch.from_numpy(np.array(ids[:1])).long().to(device)).last_hidden_state
            out = out.float().cpu().numpy()
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    stage(f"{section.name}: HF PyTorch reference computed")
    return out


def _torch_rows(weights, ids, reference, section: Section, args):
    """(name, seconds, peak bytes, error vs reference) of HF PyTorch, eager and torch.compile."""
    try:
        import torch
        from transformers import LlamaForCausalLM
    except ImportError:
        return
    if not torch.cuda.is_available():
        return
    ids_t = torch.from_numpy(ids).long().cuda()
    for name, compile_it in (("HF PyTorch (SDPA, eager)", False), ("HF PyTorch + torch.compile", True)):
        torch.cuda.empty_cache()
        if section.train:
            model = LlamaForCausalLM.from_pretrained(weights, torch_dtype=torch.float32,
                                                     attn_implementation="sdpa").cuda()
            step = torch_train_step(model, ids_t, learning_rate=LEARNING_RATE,
                                    compile_it=compile_it)
            err = abs(float(step()) - reference) / abs(reference)  # warm-up (and compilation)
            seconds, peak, _ = time_torch(step, calls=args.calls, repeats=args.repeats)
            del step
        else:
            model = LlamaForCausalLM.from_pretrained(weights, torch_dtype=torch.bfloat16,
                                                     attn_implementation="sdpa").cuda().eval()
            forward = torch.compile(model.model) if compile_it else model.model
            with torch.no_grad():
                out = forward(ids_t).last_hidden_state  # also the warm-up
                err = relative_error(out[:1].float().cpu().numpy(), reference)
                del out
                seconds, peak, _ = time_torch(lambda: forward(ids_t).last_hidden_state,
                                              calls=args.calls, repeats=args.repeats)
            del forward
        yield name, seconds, peak, err
        del model


def _table(section: Section, rows) -> str:
    c, (B, T) = section.config, section.batch
    what = ("train step (fp32 params, bf16 compute, AdamW, loss through the LM head)"
            if section.train else "forward, no LM head, bf16")
    flops = (train_flops if section.train else forward_flops)(c, B, T)
    header = (f"Llama {c.num_params / 1e6:,.0f}M-parameter shape ({c.num_hidden_layers} layers, d={c.hidden_size}, "
              f"{c.num_attention_heads}/{c.num_key_value_heads} heads of {c.head_dim}, F={c.intermediate_size}, "
              f"V={c.vocab_size}) {what}, B={B} T={T}, {flops / 1e12:.2f} TFLOP; "
              f"device: {jax.devices()[0].device_kind}")
    compiled = next((r for r in rows if r["name"] == "HF PyTorch + torch.compile"), None)
    versus = "tokens/s vs torch.compile" if section.train else "time vs torch.compile"
    lines = [header, "",
             f"| implementation | ms | tokens/s | TFLOP/s | MFU | peak GB | {versus} | error vs HF |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = ""
        if compiled and r is not compiled:
            ratio = (f"{r['tokens'] / compiled['tokens']:.2f}x" if section.train
                     else f"{r['ms'] / compiled['ms']:.2f}x")
        lines.append(f"| {r['name']} | {r['ms']:.2f} | {r['tokens'] / 1e3:.1f}k | {r['tflops']:.1f} | "
                     f"{100 * r['tflops'] / H100_BF16_DENSE_TFLOPS:.1f}% | {r['peak_gb']:.2f} | "
                     f"{ratio} | {r['err']:.1e} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
