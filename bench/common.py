"""What every benchmark here shares: compile once, time back-to-back calls, compare outputs."""
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

H100_BF16_DENSE_TFLOPS = 989.0  # datasheet, SXM; MFU is against this


def stage(message):
    """Print a timestamped progress line at once (a run cut short still shows how far it got)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def peak_bytes(compiled) -> int:
    """XLA's buffer assignment for one call of a compiled program: arguments + outputs +
    temporaries - aliased (donated) buffers; the same measure for every JAX competitor."""
    m = compiled.memory_analysis()
    return 0 if m is None else (m.argument_size_in_bytes + m.output_size_in_bytes
                                + m.temp_size_in_bytes - m.alias_size_in_bytes)


def compile_and_time(fn, *args, calls: int, repeats: int) -> tuple[float, int, object]:
    """(median seconds per call, peak bytes (see peak_bytes), output) of fn(*args), compiled
    once for both."""
    compiled = jax.jit(fn).lower(*args).compile()
    peak = peak_bytes(compiled)
    out = jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            result = compiled(*args)
        jax.block_until_ready(result)
        times.append((time.perf_counter() - t0) / calls)
    return statistics.median(times), peak, out


def relative_error(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def time_steps(step, state, batch, *, steps: int, repeats: int) -> tuple[float, int, float, float]:
    """(median seconds per step, peak bytes, first loss, last loss) of a jitted train step
    `step(state, batch, key) -> (state, metrics)` run chained (each step's state feeds the next),
    `steps` steps per timing after a warm-up step, `repeats` timings."""
    key = jax.random.key(1)
    compiled = step.lower(state, batch, key).compile()
    peak = peak_bytes(compiled)
    state, metrics = compiled(state, batch, key)  # warm-up
    first = float(metrics["loss"])
    times = []
    for r in range(repeats):
        t0 = time.perf_counter()
        for i in range(steps):
            state, metrics = compiled(state, batch, jax.random.fold_in(key, r * steps + i))
        jax.block_until_ready(metrics)
        times.append((time.perf_counter() - t0) / steps)
    return statistics.median(times), peak, first, float(metrics["loss"])


def time_torch(fn, *, calls: int, repeats: int) -> tuple[float, int, object]:
    """(median seconds per call, peak bytes, last output) of fn() on a CUDA torch model:
    `calls` back-to-back calls with one synchronize at the end, `repeats` times. Warm fn up first
    (torch.compile compiles on its first call)."""
    import torch
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            out = fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / calls)
    return statistics.median(times), torch.cuda.max_memory_allocated(), out


def torch_train_step(model, ids, *, learning_rate: float, compile_it: bool):
    """step() -> loss: one optimizer step of a Hugging Face PyTorch causal LM on CUDA, as every
    training benchmark here runs it: bf16 autocast over the model's fp32 weights, the loss from
    labels=ids, global-norm clipping to 1.0, fused AdamW (betas 0.9/0.95, eps 1e-8, weight decay
    0.1 on the matrices only, as jtgpt.train.adamw); the forward under torch.compile if asked."""
    import torch
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=learning_rate, betas=(0.9, 0.95), eps=1e-8, fused=True)
    forward = torch.compile(model) if compile_it else model

    def step():
        with torch.autocast("cuda", torch.bfloat16):
            loss = forward(ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def gpu_kernel_table(run, steps: int, top: int = 30) -> str:
    """A markdown table of where the GPU's time goes in `run()` (called `steps` times under the
    profiler): each kernel name with its launch grid, its ms per step and share of kernel time,
    largest first. Kernel durations come from the trace's GPU stream lines."""
    import collections
    import glob
    import re
    import tempfile
    trace_dir = tempfile.mkdtemp(prefix="jtgpt-trace-")
    with jax.profiler.trace(trace_dir):
        for _ in range(steps):
            out = run()
        jax.block_until_ready(out)
    path = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)[0]
    totals, counts = collections.Counter(), collections.Counter()
    for plane in jax.profiler.ProfileData.from_file(path).planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if not line.name.startswith("Stream"):
                continue
            for event in line.events:
                grid = re.search(r"grid:(\S+)", str(dict(event.stats).get("kernel_details", "")))
                key = f"{event.name[:60]} {grid.group(1) if grid else ''}".strip()
                totals[key] += event.duration_ns
                counts[key] += 1
    all_ns = sum(totals.values())
    lines = [f"GPU kernel time {all_ns / steps / 1e6:.2f} ms/step over {steps} steps",
             "| kernel (grid) | calls/step | ms/step | share |", "|---|---:|---:|---:|"]
    for key, ns in totals.most_common(top):
        lines.append(f"| {key} | {counts[key] / steps:g} | {ns / steps / 1e6:.3f} | {100 * ns / all_ns:.1f}% |")
    return "\n".join(lines)


def copy_bandwidth() -> float:
    """Bytes/s of an XLA elementwise pass over a 1 GiB array (read + written), the roofline's
    bandwidth: the best of 20 passes, each writing into the buffer the previous one freed."""
    x = jnp.ones((2**28,), jnp.float32)
    scale = jax.jit(lambda x: x * 1.0001, donate_argnums=0)  # not an identity XLA could elide
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        x = jax.block_until_ready(scale(x))
        times.append(time.perf_counter() - t0)
    return 2 * x.nbytes / min(times)


def model_configs(on_gpu: bool) -> dict:
    """The benchmarks' two models by name: GPT-2 124M and the Llama-3.2-1B shape on the GPU; on
    the CPU (Triton's interpreter) tiny ones of the same families, for a check run."""
    from jtgpt.models.gpt2 import GPTConfig
    from jtgpt.models.llama import PRESETS, LlamaConfig
    if on_gpu:
        return {"gpt2": GPTConfig(), "llama": PRESETS["llama-3.2-1b"]}
    return {"gpt2": GPTConfig(vocab_size=97, n_positions=128, n_embd=64, n_layer=2, n_head=4),
            "llama": LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=88,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=128)}


def print_tables(names: str, table_of, header: str, markdown: str | None) -> None:
    """header, then table_of(name) for each comma-separated name, printed as each is done; all
    of it also written to the file `markdown` when given."""
    out = [header]
    for name in names.split(","):
        out.append(table_of(name))
        print(out[-1], flush=True)
    if markdown:
        with open(markdown, "w") as f:
            f.write("\n".join(out))
