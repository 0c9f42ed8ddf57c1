"""What every benchmark here shares: compile once, time back-to-back calls, compare outputs."""
import statistics
import time

import jax
import numpy as np


def compile_and_time(fn, *args, calls: int, repeats: int) -> tuple[float, int, object]:
    """(median seconds per call, peak bytes, output) of fn(*args), compiled once for both.

    Peak bytes: XLA's buffer assignment for the call (arguments + outputs + temporaries -
    aliased), the same measure for every JAX competitor.
    """
    compiled = jax.jit(fn).lower(*args).compile()
    m = compiled.memory_analysis()
    peak = 0 if m is None else (m.argument_size_in_bytes + m.output_size_in_bytes
                                + m.temp_size_in_bytes - m.alias_size_in_bytes)
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
