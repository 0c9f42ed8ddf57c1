"""Serving benchmark: jtgpt's engine (continuous batching, paged KV cache) against static batches,
GPT-2 124M and a Llama-3.2-1B shape (random weights), bf16, greedy.

    python bench/serve.py                         # GPU: both models; CPU: a tiny check run
    python bench/serve.py --only gpt2 --requests 1000 --markdown bench/out.md

Workloads (fixed seed; every request arrives at t = 0, an offline batch):
- mixed: --requests requests, prompt lengths ~ lognormal(median 128, sigma 1) clipped to [8, 512]
  tokens, output lengths ~ lognormal(median 64, sigma 1) clipped to [4, 256]: a long tail of long
  prompts and long answers, as chat traffic has. No request stops at eos: each produces its drawn
  number of tokens.
- shared prefix: --prefix-requests requests of one 512-token system prompt + 32 own tokens, 32 new
  tokens each; the engine with prefix caching on and off.
- decode step: 64 requests of prompt 128 + 256 new, the engine's time per decode step once every
  request is decoding (a call's time / the steps it ran: --decode-steps), against `generate`'s
  step at B = 64. --profile adds both one's GPU kernel tables (jax.profiler).

Competitors on the mixed workload: the engine; jtgpt `generate` in static batches of --max-seqs
requests in arrival order (left-padded to the batch's longest prompt, rounded up to a multiple of
64, and run for the batch's longest output, rounded up to a multiple of 32, so that a few
programs serve all batches; each compiled before timing); HF PyTorch `generate` (eager, SDPA) in
the same static batches, on the first --hf-requests requests (it is ~10x slower). The engine and
jtgpt's static batches report the run of median time among --repeats (a new engine each run: a
cold prefix cache). Only the tokens a request asked for count as output. Time to first token:
from t = 0 to the step that produced it (for static batches, the end of the request's batch:
generate returns all at once); inter-token latency: between a request's consecutive tokens
(static batches: their batch's decode time / steps; the engine: the tokens of one multi-step
call arrive together, 0 apart). KV memory: the most pages the engine's requests held at once x
page bytes, against the static cache of the largest batch.
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
from common import gpu_kernel_table, model_configs, print_tables, stage  # noqa: E402
from jtgpt.models.gpt2 import GPTConfig  # noqa: E402
from jtgpt.serve import Engine  # noqa: E402

def mixed_workload(n, vocab, seed=0, max_prompt=512, max_new=256):
    """(prompts, output lengths) of the mixed workload (module docstring)."""
    rng = np.random.default_rng(seed)
    prompt_lens = np.clip(rng.lognormal(np.log(128), 1.0, n), 8, max_prompt).astype(int)
    new_lens = np.clip(rng.lognormal(np.log(64), 1.0, n), 4, max_new).astype(int)
    return [rng.integers(0, vocab, p).tolist() for p in prompt_lens], new_lens.tolist()


def other_tokens(prompts, vocab, seed=99):
    """Prompts of the same lengths with other random tokens: a warm-up run on them compiles
    every step shape the timed run meets (with eos off, the schedule depends on lengths only)
    and leaves nothing in the prefix cache that the timed run could hit."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, len(p)).tolist() for p in prompts]


def percentiles(values):
    return (float(np.percentile(values, 50)), float(np.percentile(values, 99))) if values else (0, 0)


def run_engine(engine, prompts, new_lens):
    """Every request at t = 0, steps until all finish: throughput, latencies, peak pages."""
    t0 = time.perf_counter()
    ids = [engine.add_request(p, max_new_tokens=n, eos_token_id=[]) for p, n in zip(prompts, new_lens)]
    stamps = {rid: [] for rid in ids}
    peak, steps = 0, []
    while engine.has_unfinished:
        s0 = time.perf_counter()
        out = engine.step()
        now = time.perf_counter()
        steps.append((now - s0, len(out), max(map(len, out.values()), default=0)))
        peak = max(peak, engine.num_pages - engine.num_free_pages)
        for rid, tokens in out.items():
            stamps[rid] += [now - t0] * len(tokens)
        engine.pop_finished()
    total = time.perf_counter() - t0
    ttft = [s[0] for s in stamps.values()]
    itl = [b - a for s in stamps.values() for a, b in zip(s, s[1:])]
    return dict(total=total, tokens=sum(len(s) for s in stamps.values()), ttft=percentiles(ttft),
                itl=percentiles(itl), peak_pages=peak, steps=steps)


def static_batches(prompts, new_lens, batch):
    """[(ids [B, T], mask, new, the requests' own new lengths)], T and new rounded up."""
    out = []
    for i in range(0, len(prompts), batch):
        ps, ns = prompts[i:i + batch], new_lens[i:i + batch]
        T = -(-max(map(len, ps)) // 64) * 64
        ids = np.zeros((len(ps), T), np.int32)
        mask = np.zeros((len(ps), T), np.int32)
        for r, p in enumerate(ps):
            ids[r, T - len(p):], mask[r, T - len(p):] = p, 1
        out.append((ids, mask, -(-max(ns) // 32) * 32, ns))
    return out


def run_static(generate, batches):
    """Each batch after the other: totals and latencies as run_engine's."""
    t0 = time.perf_counter()
    ttft, itl, tokens = [], [], 0
    for ids, mask, new, ns in batches:
        b0 = time.perf_counter()
        generate(ids, mask, new)
        now = time.perf_counter()
        ttft += [now - t0] * len(ns)
        itl += [(now - b0) / new] * sum(n - 1 for n in ns)
        tokens += sum(ns)
    total = time.perf_counter() - t0
    return dict(total=total, tokens=tokens, ttft=percentiles(ttft), itl=percentiles(itl))


def median_run(run, repeats):
    """The run (a dict with its total time) of median total among `repeats` calls of run()."""
    runs = sorted((run() for _ in range(repeats)), key=lambda r: r["total"])
    return runs[len(runs) // 2]


def compiled_static(generate, batches):
    """generate, after one call on every batch's shapes (compile for jtgpt, warm-up for torch)."""
    for ids, mask, new, _ in batches:
        generate(ids, mask, new)
    return generate


def jtgpt_static(model):
    def generate(ids, mask, new):
        out = model.generate(ids, mask, max_new_tokens=new, eos_token_id=[], pad_token_id=0)
        return np.asarray(out)
    return generate


def hf_static(weights):
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(weights, dtype=torch.bfloat16,
                                                 attn_implementation="sdpa").cuda().eval()

    def generate(ids, mask, new):
        with torch.no_grad():
            out = model.generate(torch.from_numpy(ids).long().cuda(),
                                 attention_mask=torch.from_numpy(mask).long().cuda(),
                                 max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
        torch.cuda.synchronize()
        return out
    return generate


def page_bytes(model, page_size):
    spec = model.kv_spec
    return spec.num_layers * page_size * spec.token_width * jnp.dtype(spec.dtype).itemsize


def row(name, r, kv_gb=None):
    rps = r["requests"] / r["total"]
    return (f"| {name} | {r['requests']} | {rps:,.2f} | {r['tokens'] / r['total']:,.0f} | "
            f"{r['ttft'][0] * 1e3:,.0f} / {r['ttft'][1] * 1e3:,.0f} | "
            f"{r['itl'][0] * 1e3:.2f} / {r['itl'][1] * 1e3:.2f} | "
            f"{'' if kv_gb is None else f'{kv_gb:.2f}'} |")


HEADER = ("| implementation | requests | requests/s | output tokens/s | TTFT p50 / p99 ms | "
          "ITL p50 / p99 ms | KV GB |\n|---|---:|---:|---:|---:|---:|---:|")


def bench_model(name, config, args, on_gpu):
    dtype = jnp.bfloat16 if on_gpu else jnp.float32
    model = (jtgpt.GPT if isinstance(config, GPTConfig) else jtgpt.Llama)(config, dtype=dtype)
    P = 16
    engine_options = dict(page_size=P, max_seqs=args.max_seqs, max_batch_tokens=args.max_batch_tokens,
                          max_len=min(model.max_context, 1024), decode_steps=args.decode_steps)
    lines = [f"### {name}\n"]
    n = args.requests if on_gpu else 6
    prompts, new_lens = mixed_workload(n, config.vocab_size, max_prompt=512 if on_gpu else 40,
                                       max_new=256 if on_gpu else 8)
    stage(f"{name}: mixed workload, {n} requests, {sum(new_lens)} output tokens")
    run_engine(Engine(model, **engine_options), other_tokens(prompts, config.vocab_size), new_lens)
    # A new engine for each timed run: its prefix cache starts cold (the compiled steps are
    # shared by every engine of the model).
    r = median_run(lambda: run_engine(Engine(model, **engine_options), prompts, new_lens),
                   args.repeats) | dict(requests=n)
    kv_engine = r["peak_pages"] * page_bytes(model, P) / 1e9
    batches = static_batches(prompts, new_lens, args.max_seqs)
    static = compiled_static(jtgpt_static(model), batches)
    s = median_run(lambda: run_static(static, batches), args.repeats) | dict(requests=n)
    spec = model.kv_spec
    kv_static = max(ids.shape[0] * (ids.shape[1] + new) for ids, _, new, _ in batches) \
        * spec.num_layers * spec.token_width * jnp.dtype(dtype).itemsize / 1e9
    lines += [f"Mixed workload ({n} requests, {sum(new_lens):,} output tokens):\n", HEADER,
              row("jtgpt Engine (continuous batching)", r, kv_engine),
              row(f"jtgpt generate, static batches of {args.max_seqs}", s, kv_static)]
    if on_gpu and args.hf_requests:
        m = args.hf_requests
        with tempfile.TemporaryDirectory() as weights:
            model.save_pretrained(weights)
            hf_batches = static_batches(prompts[:m], new_lens[:m], args.max_seqs)
            h = run_static(compiled_static(hf_static(weights), hf_batches), hf_batches) \
                | dict(requests=m)
        lines.append(row(f"HF PyTorch generate (eager), static batches, first {m} requests", h))
    lines.append(f"\nEngine vs jtgpt static batching: {r['tokens'] / r['total'] / (s['tokens'] / s['total']):.2f}x "
                 f"output tokens/s.\n")

    m = args.prefix_requests if on_gpu else 4
    rng = np.random.default_rng(1)
    system = rng.integers(0, config.vocab_size, 512 if on_gpu else 32).tolist()
    shared = [system + rng.integers(0, config.vocab_size, 32 if on_gpu else 4).tolist()
              for _ in range(m)]
    stage(f"{name}: shared prefix, {m} requests")
    rows = []
    for caching in (True, False):
        engine = Engine(model, prefix_caching=caching, **engine_options)
        # The warm-up's own system prompt: the timed run starts from a cold prefix cache.
        warm_system = other_tokens([system], config.vocab_size)[0]
        run_engine(engine, [warm_system + p[len(system):] for p in shared],
                   [32 if on_gpu else 4] * m)
        res = run_engine(engine, shared, [32 if on_gpu else 4] * m) | dict(requests=m)
        rows.append(res)
    lines += [f"Shared prefix ({m} requests of a {len(system)}-token system prompt + "
              f"{len(shared[0]) - len(system)} own tokens, 32 new):\n", HEADER,
              row("Engine, prefix caching on", rows[0], rows[0]["peak_pages"] * page_bytes(model, P) / 1e9),
              row("Engine, prefix caching off", rows[1], rows[1]["peak_pages"] * page_bytes(model, P) / 1e9),
              f"\nTTFT p50 off / on: {rows[1]['ttft'][0] / rows[0]['ttft'][0]:.2f}x.\n"]

    B, T, new = (64, 128, 256) if on_gpu else (4, 8, 8)
    stage(f"{name}: decode step at B={B}")
    ids = np.asarray(jax.random.randint(jax.random.key(0), (B, T), 0, config.vocab_size))
    engine = Engine(model, **engine_options)
    run_engine(engine, other_tokens(ids.tolist(), config.vocab_size), [new] * B)
    steps = run_engine(engine, ids.tolist(), [new] * B)["steps"]
    decode = [t / k for t, count, k in steps if count == B]  # every request decoding, k steps
    decode = decode[len(decode) // 4:]  # past the first steps' warm-up
    engine_step = statistics.median(decode)
    timed = {}
    for n_new in (new, 1):
        model.generate(ids, max_new_tokens=n_new, eos_token_id=[], pad_token_id=0).block_until_ready()
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=n_new, eos_token_id=[], pad_token_id=0).block_until_ready()
        timed[n_new] = time.perf_counter() - t0
    generate_step = (timed[new] - timed[1]) / (new - 1)
    lines.append(f"Decode step at B={B} (prompt {T} + {new}): engine {engine_step * 1e3:.3f} ms, "
                 f"generate {generate_step * 1e3:.3f} ms: {engine_step / generate_step:.2f}x.\n")
    if args.profile and on_gpu:
        k = args.decode_steps
        prompts = other_tokens(ids.tolist(), config.vocab_size, seed=7)
        for p in prompts:
            engine.add_request(p, max_new_tokens=1 + 2 * k, eos_token_id=[])
        started = set()
        while len(started) < B:  # the prefill steps: every request's first token
            started |= set(engine.step())
        lines += [f"GPU kernels of the engine's decode, per call of {k} steps at B={B}:\n",
                  gpu_kernel_table(engine.step, steps=2, top=25),
                  f"\nGPU kernels of generate at B={B}, prompt {T} + {k} new (its prefill "
                  f"included):\n",
                  gpu_kernel_table(lambda: model.generate(ids, max_new_tokens=k, eos_token_id=[],
                                                          pad_token_id=0), steps=1, top=25), ""]
        while engine.has_unfinished:
            engine.step()
    return "\n".join(lines)


def main():
    on_gpu = jax.default_backend() == "gpu"
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="gpt2,llama")
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--prefix-requests", type=int, default=200)
    p.add_argument("--hf-requests", type=int, default=128)
    p.add_argument("--max-seqs", type=int, default=64)
    p.add_argument("--max-batch-tokens", type=int, default=2048)
    p.add_argument("--decode-steps", type=int, default=8, help="the engine's decode_steps")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed runs of the mixed workload, engine and jtgpt static: the median")
    p.add_argument("--profile", action="store_true",
                   help="also the GPU kernel tables of the B=64 decode, engine and generate")
    p.add_argument("--markdown", help="also write the tables to this file")
    args = p.parse_args()
    configs = model_configs(on_gpu)
    print_tables(args.only, lambda name: bench_model(name, configs[name], args, on_gpu),
                 f"device: {jax.devices()[0].device_kind}, bf16, greedy, random weights\n",
                 args.markdown)

if __name__ == "__main__":
    main()
