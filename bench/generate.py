"""Generation benchmark: greedy decoding, jtgpt vs Hugging Face, GPT-2 124M and a Llama-3.2-1B
shape (random weights), bf16.

    python bench/generate.py                      # GPU: every case below; CPU: tiny configs,
    python bench/generate.py --only gpt2          #   checks only
    python bench/generate.py --markdown bench/out.md

Cases: prompt 128 + 256 new tokens at B=1 and B=64 for both models, and prompt 4096 + 256 at B=1
for the 1B (long context: the KV cache, not the weights, grows to a third of the bytes read).
Competitors: jtgpt `generate` (one compiled program); HF Flax `generate` under jax.jit (GPT-2; it
has no Llama-3 rope scaling); HF PyTorch `generate` with the static cache and torch.compile
(reported as failed where it fails); HF PyTorch `generate` (eager, SDPA, dynamic cache). No row
stops at eos (eos is off everywhere), so every competitor produces every token.

Checks before timing: on each model's weights, jtgpt's and HF PyTorch's greedy tokens in fp32
(2 rows, one of them left-padded, 32 new tokens) must be equal, token for token; the bf16 runs'
agreement with HF (the share of equal tokens, which bf16 rounding lets drift) is reported.

Measured: the whole generate call (prefill included), median of --repeats; new tokens/s =
B * new / time. ms/step is the decode step alone: (time(new) - time(1 new)) / (new - 1), which
also removes the prefill. Roofline: each decode step reads every weight once (the LM head too;
the token embedding rows are negligible) and each row's K and V so far; at the measured copy
bandwidth (an XLA copy of a 2 GiB array: bytes read + written over time) that is
    roofline step = (weight bytes + B * mean cache length * L * 2 Hkv D * 2 bytes) / bandwidth
and "% roofline" = roofline step / measured ms/step. Compile time is jax's lower + compile
(torch has none).
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # run from a checkout too
import jtgpt  # noqa: E402
from common import copy_bandwidth, gpu_kernel_table, model_configs, stage  # noqa: E402
from jtgpt.models.gpt2 import GPTConfig  # noqa: E402
from jtgpt.models.llama import PRESETS  # noqa: E402

CHECK_ROWS, CHECK_NEW = 2, 32

def cases(on_gpu: bool):
    """(model name, config, [(B, prompt, new), ...])."""
    if not on_gpu:
        return [(name, config, [(2, 8, 4)]) for name, config in model_configs(False).items()]
    return [("gpt2", GPTConfig(), [(1, 128, 256), (64, 128, 256)]),
            ("llama", PRESETS["llama-3.2-1b"], [(1, 128, 256), (64, 128, 256), (1, 4096, 256)])]


def timed(fn, repeats: int) -> float:
    """Median seconds of fn() (each call blocks on its result)."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def step_bytes(config, B: int, mean_len: float) -> float:
    if isinstance(config, GPTConfig):
        L, kv_width = config.n_layer, 2 * config.n_embd
    else:
        L, kv_width = config.num_hidden_layers, 2 * config.num_key_value_heads * config.head_dim
    return 2 * config.num_params + B * mean_len * L * kv_width * 2


def _model_class(config):
    return jtgpt.GPT if isinstance(config, GPTConfig) else jtgpt.Llama


def _prompt(B, T, vocab, padded: bool = False):
    ids = np.asarray(jax.random.randint(jax.random.key(B * 7 + T), (B, T), 0, vocab, jnp.int32))
    mask = np.ones((B, T), np.int32)
    if padded:
        mask[-1, : T // 4] = 0
    return ids, mask


def check_fp32(name, weights, config, device) -> None:
    """jtgpt's fp32 greedy tokens equal HF PyTorch's, on a left-padded batch."""
    import torch
    from transformers import AutoModelForCausalLM
    ids, mask = _prompt(CHECK_ROWS, 24, config.vocab_size, padded=True)
    model = _model_class(config).from_pretrained(weights, dtype=jnp.float32)
    ours = np.asarray(model.generate(ids, mask, max_new_tokens=CHECK_NEW, eos_token_id=[],
                                     pad_token_id=0))
    hf = AutoModelForCausalLM.from_pretrained(weights, dtype=torch.float32).to(device).eval()
    with torch.no_grad():
        theirs = hf.generate(torch.from_numpy(ids).long().to(device),
                             attention_mask=torch.from_numpy(mask).long().to(device),
                             max_new_tokens=CHECK_NEW, do_sample=False, eos_token_id=None,
                             pad_token_id=0).cpu().numpy()
    if not (ours == theirs).all():
        row, col = np.argwhere(ours != theirs)[0]
        raise SystemExit(f"{name}: jtgpt's fp32 greedy tokens differ from HF PyTorch's at row {row},"
                         f" new token {col - ids.shape[1]}: {ours[row, col]} vs {theirs[row, col]}")
    stage(f"{name}: fp32 greedy tokens equal HF PyTorch's ({CHECK_ROWS} rows x {CHECK_NEW})")
    del model, hf


def run_jtgpt(weights, config, B, T, new, repeats, profile=False):
    model = _model_class(config).from_pretrained(weights, dtype=jnp.bfloat16)
    ids, _ = _prompt(B, T, config.vocab_size)
    gen = lambda m, ids, n: m.generate(ids, max_new_tokens=n, eos_token_id=[], pad_token_id=0)  # noqa: E731
    t0 = time.perf_counter()
    run = jax.jit(gen, static_argnums=2).lower(model, ids, new).compile()
    compile_s = time.perf_counter() - t0
    run_one = jax.jit(gen, static_argnums=2).lower(model, ids, 1).compile()
    out = np.asarray(run(model, ids))
    total = timed(lambda: run(model, ids), repeats)
    prefill = timed(lambda: run_one(model, ids), repeats)
    if profile:
        print(gpu_kernel_table(lambda: run(model, ids), steps=1, top=25), flush=True)
    return dict(name="jtgpt", total=total, step=(total - prefill) / (new - 1), compile=compile_s,
                out=out)


def run_hf_flax(weights, config, B, T, new, repeats):
    from transformers import FlaxGPT2LMHeadModel
    model = FlaxGPT2LMHeadModel.from_pretrained(weights, dtype=jnp.bfloat16)
    model.params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), model.params)
    ids, _ = _prompt(B, T, config.vocab_size)

    def compiled(n):
        # Flax generate needs an eos; min_length bans it until the last token (no early stop).
        gen = lambda params, ids: model.generate(  # noqa: E731
            ids, params=params, max_new_tokens=n, min_length=T + n, do_sample=False,
            eos_token_id=config.vocab_size - 1, pad_token_id=0).sequences
        return jax.jit(gen).lower(model.params, ids).compile()

    t0 = time.perf_counter()
    run = compiled(new)
    compile_s = time.perf_counter() - t0
    run_one = compiled(1)
    out = np.asarray(run(model.params, ids))
    total = timed(lambda: run(model.params, ids), repeats)
    prefill = timed(lambda: run_one(model.params, ids), repeats)
    return dict(name="HF Flax generate (jit)", total=total, step=(total - prefill) / (new - 1),
                compile=compile_s, out=out)


def run_hf_torch(weights, config, B, T, new, repeats, compiled=False):
    """HF PyTorch generate, eager with its dynamic cache, or (compiled) with the static cache, on
    which transformers' generate compiles the decode steps' forward itself (torch.compile,
    fullgraph, mode "reduce-overhead": CUDA graphs; `_valid_auto_compile_criteria` in 4.57). The
    older recipe, model.forward = torch.compile(model.forward, ...), also sends the prefill
    through the CUDA graphs, and then fails ("accessing tensor output of CUDAGraphs that has been
    overwritten by a subsequent run", 2026-12-02)."""
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(weights, dtype=torch.bfloat16,
                                                 attn_implementation="sdpa").cuda().eval()
    if compiled:
        model.generation_config.cache_implementation = "static"
    ids, _ = _prompt(B, T, config.vocab_size)
    ids_t = torch.from_numpy(ids).long().cuda()

    def gen(n):
        with torch.no_grad():
            out = model.generate(ids_t, attention_mask=torch.ones_like(ids_t), max_new_tokens=n,
                                 do_sample=False, eos_token_id=None, pad_token_id=0)
        torch.cuda.synchronize()
        return out

    def seconds(n):
        gen(n)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = gen(n)
            times.append(time.perf_counter() - t0)
        return statistics.median(times), out

    t0 = time.perf_counter()
    gen(new)  # the compilation, for the compiled model
    compile_s = time.perf_counter() - t0 if compiled else None
    total, out = seconds(new)
    prefill, _ = seconds(1)
    del model
    torch.cuda.empty_cache()
    name = "HF PyTorch generate (static cache, torch.compile)" if compiled else "HF PyTorch generate (eager)"
    return dict(name=name, total=total, step=(total - prefill) / (new - 1), compile=compile_s,
                out=out.cpu().numpy())


def main():
    on_gpu = jax.default_backend() == "gpu"
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="gpt2,llama")
    p.add_argument("--repeats", type=int, default=3 if on_gpu else 1)
    p.add_argument("--competitors", default="flax,compile,torch",
                   help="besides jtgpt: flax (HF Flax, GPT-2 only), compile (HF PyTorch static cache "
                        "+ torch.compile), torch (HF PyTorch eager)")
    p.add_argument("--profile", action="store_true", help="jtgpt's GPU kernel table per case")
    p.add_argument("--markdown", help="also write the tables to this file")
    args = p.parse_args()
    bandwidth = copy_bandwidth() if on_gpu else float("nan")
    stage(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    device = "cuda" if on_gpu else "cpu"
    tables = []
    for name, config, shapes in cases(on_gpu):
        if name not in args.only.split(","):
            continue
        weights = tempfile.mkdtemp(prefix=f"jtgpt-bench-generate-{name}-")
        model = _model_class(config)(config, dtype=jnp.bfloat16)
        model.save_pretrained(weights)
        if name == "gpt2":  # the same weights as flax_model.msgpack, for HF Flax
            model.save_pretrained(weights + "-flax", format="flax")
        del model
        stage(f"{name}: {config.num_params / 1e6:,.0f}M parameters written to {weights}")
        check_fp32(name, weights, config, device)
        rows = []
        for B, T, new in shapes:
            runs = [run_jtgpt(weights, config, B, T, new, args.repeats, args.profile)]
            if name == "gpt2" and "flax" in args.competitors:
                runs.append(run_hf_flax(weights + "-flax", config, B, T, new, args.repeats))
            if on_gpu and "compile" in args.competitors:
                try:
                    runs.append(run_hf_torch(weights, config, B, T, new, args.repeats, compiled=True))
                except Exception as e:  # noqa: BLE001 -- a competitor that fails is reported
                    stage(f"{name} B={B}: HF PyTorch static cache + torch.compile failed: "
                          f"{type(e).__name__}: {str(e)[:200]}")
            if on_gpu and "torch" in args.competitors:  # last: the reference of "tokens equal"
                runs.append(run_hf_torch(weights, config, B, T, new, args.repeats))
            ideal = step_bytes(config, B, T + new / 2) / bandwidth
            for r in runs:
                agree = float((r["out"][:, T:] == runs[-1]["out"][:, T:]).mean())
                rows.append(dict(r, B=B, T=T, new=new, ideal=ideal, agree=agree,
                                 reference=runs[-1]["name"]))
                stage(f"{name} B={B} T={T}: {r['name']} {r['total'] * 1e3:.1f} ms, "
                      f"{B * new / r['total']:,.0f} tokens/s, step {r['step'] * 1e3:.3f} ms")
        tables.append(_table(name, config, rows, bandwidth))
        print("\n" + tables[-1], flush=True)
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write("\n\n".join(tables) + "\n")


def _table(name, config, rows, bandwidth) -> str:
    header = (f"{name} ({config.num_params / 1e6:,.0f}M parameters, random weights), greedy, bf16, "
              f"no eos; copy bandwidth {bandwidth / 1e12:.2f} TB/s; device: {jax.devices()[0].device_kind}")
    lines = [header, "",
             "| B | prompt + new | implementation | new tokens/s | ms/step | % roofline | "
             "compile s | jtgpt speed-up | tokens equal to HF's |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ours = next(o for o in rows if o["name"] == "jtgpt" and (o["B"], o["T"]) == (r["B"], r["T"]))
        compile_s = "" if r["compile"] is None else f"{r['compile']:.1f}"
        agree = "" if r["name"] == r["reference"] else f"{100 * r['agree']:.0f}%"
        lines.append(f"| {r['B']} | {r['T']} + {r['new']} | {r['name']} | "
                     f"{r['B'] * r['new'] / r['total']:,.0f} | {r['step'] * 1e3:.3f} | "
                     f"{100 * r['ideal'] / r['step']:.0f}% | {compile_s} | "
                     f"{r['total'] / ours['total']:.2f}x | {agree} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
