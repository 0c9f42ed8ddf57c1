"""What every benchmark here shares: compile once, time back-to-back calls, compare outputs."""
import statistics
import time

import jax
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
