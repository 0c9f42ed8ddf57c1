"""Optimizer benchmark: one AdamW step alone, at GPT-2 124M's and Llama-3.2-1B's parameter shapes,
jtgpt vs optax.adamw in the same run.

    python bench/optim.py                    # GPU: both sizes; CPU: a tiny check run (interpreted)
    python bench/optim.py --only gpt2 --markdown bench/out.md

Every variant runs under jax.jit with its parameters and state donated (updated in place), the
same random gradients each step, weight decay 0.1 on the matrices and embeddings (ndim >= 2),
learning rate 3e-4, no clipping:
- fp32 parameters: optax.adamw + optax.apply_updates on the parameter tree; jtgpt.optim.adamw, the
  same optax calls (the trees concatenated into the kernel's flat buffers and the updates split
  back); jtgpt's fused step, jtgpt.kernels.adamw on flat parameters, gradients and moments.
- bf16 parameters, fp32 master weights and moments: optax.adamw on the fp32 master tree (the bf16
  gradients upcast), then the bf16 copies cast; jtgpt's fused step writing master weights,
  moments and the bf16 copy in one launch.

Bytes: what the step must move at least, 28 a parameter in both cases (fp32: read p, g, m, v,
write p, m, v; bf16: read master 4, g 2, m, v, write master, m, v, the bf16 copy 2). GB/s = those
bytes / time, against the copy bandwidth (an XLA pass over 1 GiB, read + written). Time: the
median of --repeats timings of --steps chained steps, each step's outputs the next one's inputs.
Before timing, each variant's parameters after one step are checked against optax's.
"""
import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # run from a checkout too
import jtgpt  # noqa: E402
from common import copy_bandwidth, model_configs, print_tables, stage  # noqa: E402
from jtgpt import optim  # noqa: E402
from jtgpt.kernels.adamw import Hyper, adamw_update  # noqa: E402
from jtgpt.models.gpt2 import GPTConfig  # noqa: E402

LEARNING_RATE, WEIGHT_DECAY, B1, B2, EPS = 3e-4, 0.1, 0.9, 0.999, 1e-8
MATRICES = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
BYTES_PER_PARAM = 28

def random_tree(config, dtype, seed):
    """A tree of the model's parameter shapes, random values in dtype."""
    cls = jtgpt.GPT if isinstance(config, GPTConfig) else jtgpt.Llama
    shapes = nnx.state(nnx.eval_shape(lambda: cls(config)), nnx.Param)
    leaves, treedef = jax.tree.flatten(shapes)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten([0.02 * jax.random.normal(k, leaf.shape, dtype)
                              for k, leaf in zip(keys, leaves)])


def time_chain(step, state, grads, steps: int, repeats: int) -> float:
    """Median seconds a step over `repeats` chains of `steps` (compiled first): state =
    step(*state, grads), the state donated."""
    state = jax.block_until_ready(step(*state, grads))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            state = step(*state, grads)
        jax.block_until_ready(state)
        times.append((time.perf_counter() - t0) / steps)
    return statistics.median(times)


def optax_step(tx):
    def step(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state
    return jax.jit(step, donate_argnums=(0, 1))


def fused_step(layout, cast_dtype=None):
    """jtgpt's AdamW on flat buffers: step(master, mu, nu, count[, the last 16-bit copy], grads)
    -> (master, mu, nu, count[, the new copy]); the state donated."""
    hyper = Hyper(B1, B2, EPS, 0.0, WEIGHT_DECAY)

    def step(master, mu, nu, count, *copy_and_grads):
        scalars = optim.bias_corrected_scalars(LEARNING_RATE, count, B1, B2)
        out = adamw_update(master, copy_and_grads[-1], mu, nu, scalars, hyper,
                           decay_end=layout.decay_end, cast_dtype=cast_dtype)
        return (*out[:3], count + 1, *out[3:])
    return jax.jit(step, donate_argnums=(0, 1, 2, 4) if cast_dtype else (0, 1, 2))


def bench_size(name, config, args, bandwidth):
    params = random_tree(config, jnp.float32, 0)
    grads = random_tree(config, jnp.float32, 1)
    n = sum(p.size for p in jax.tree.leaves(params))
    layout = optim.FlatLayout.of(params, MATRICES(params))
    stage(f"{name}: {n / 1e6:,.1f}M parameters in {len(jax.tree.leaves(params))} leaves")
    reference = optax.adamw(LEARNING_RATE, B1, B2, EPS, weight_decay=WEIGHT_DECAY, mask=MATRICES)
    expected = optax.apply_updates(params, reference.update(grads, reference.init(params),
                                                            params)[0])
    rows = []

    def check(what, new_params):
        for a, b in zip(jax.tree.leaves(new_params), jax.tree.leaves(expected)):
            np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                       rtol=1e-5 if a.dtype == jnp.float32 else 1e-2,
                                       atol=1e-6 if a.dtype == jnp.float32 else 1e-3,
                                       err_msg=what)

    def add(what, seconds):
        rows.append((what, seconds, BYTES_PER_PARAM * n / seconds))

    copy = lambda t: jax.tree.map(jnp.copy, t)  # noqa: E731  (each variant donates its own)
    for label, tx in (("optax.adamw", reference),
                      ("jtgpt.optim.adamw (as an optax transform)",
                       optim.adamw(LEARNING_RATE, B1, B2, EPS, weight_decay=WEIGHT_DECAY,
                                   mask=MATRICES))):
        step = optax_step(tx)
        p = copy(params)
        check(label, step(p, tx.init(p), grads)[0])
        p = copy(params)
        add(f"fp32: {label}", time_chain(step, (p, tx.init(p)), grads, args.steps, args.repeats))

    step = fused_step(layout)
    flat_grads = layout.flatten(grads)
    zeros = lambda: jnp.zeros(layout.size, jnp.float32)  # noqa: E731
    check("jtgpt fused", layout.unflatten(step(layout.flatten(params), zeros(), zeros(),
                                               jnp.int32(0), flat_grads)[0]))
    add("fp32: jtgpt fused (flat buffers)", time_chain(
        step, (layout.flatten(params), zeros(), zeros(), jnp.int32(0)), flat_grads,
        args.steps, args.repeats))

    del flat_grads  # (the 1B's buffers fill most of an 80 GB GPU)
    bf16_grads = jax.tree.map(lambda g: g.astype(jnp.bfloat16), grads)
    del grads

    def optax_master(master, opt_state, _, grads16):
        """(master, opt_state, the bf16 copy); the previous copy donated for the new one."""
        up = jax.tree.map(lambda g: g.astype(jnp.float32), grads16)
        updates, opt_state = reference.update(up, opt_state, master)
        master = optax.apply_updates(master, updates)
        return master, opt_state, jax.tree.map(lambda p: p.astype(jnp.bfloat16), master)
    master_step = jax.jit(optax_master, donate_argnums=(0, 1, 2))
    bf16_copy = lambda t: jax.tree.map(lambda x: x.astype(jnp.bfloat16), t)  # noqa: E731
    p = copy(params)
    check("bf16: optax", master_step(p, reference.init(p), bf16_copy(p), bf16_grads)[2])
    p = copy(params)
    add("bf16 + fp32 master: optax.adamw, then the bf16 cast", time_chain(
        master_step, (p, reference.init(p), bf16_copy(p)), bf16_grads, args.steps, args.repeats))

    step = fused_step(layout, jnp.bfloat16)
    flat16 = layout.flatten(bf16_grads)
    copy16 = lambda: layout.flatten(params).astype(jnp.bfloat16)  # noqa: E731
    check("bf16: jtgpt fused", layout.unflatten(step(layout.flatten(params), zeros(), zeros(),
                                                     jnp.int32(0), copy16(), flat16)[4]))
    add("bf16 + fp32 master: jtgpt fused (flat buffers)", time_chain(
        step, (layout.flatten(params), zeros(), zeros(), jnp.int32(0), copy16()), flat16,
        args.steps, args.repeats))

    lines = [f"### {name}: {n / 1e6:,.1f}M parameters, {len(jax.tree.leaves(params))} leaves\n",
             "| variant | ms | GB/s (28 bytes a parameter) | % of copy bandwidth |",
             "|---|---:|---:|---:|"]
    for what, seconds, rate in rows:
        lines.append(f"| {what} | {seconds * 1e3:.3f} | {rate / 1e9:,.0f} | "
                     f"{100 * rate / bandwidth:.0f}% |")
    return "\n".join(lines) + "\n"


def main():
    on_gpu = jax.default_backend() == "gpu"
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="gpt2,llama")
    p.add_argument("--steps", type=int, default=10 if on_gpu else 1)
    p.add_argument("--repeats", type=int, default=5 if on_gpu else 1)
    p.add_argument("--markdown", help="also write the tables to this file")
    args = p.parse_args()
    configs = model_configs(on_gpu)
    bandwidth = copy_bandwidth() if on_gpu else float("nan")
    print_tables(args.only, lambda name: bench_size(name, configs[name], args, bandwidth),
                 f"device: {jax.devices()[0].device_kind}; copy bandwidth "
                 f"{bandwidth / 1e12:.2f} TB/s\n", args.markdown)

if __name__ == "__main__":
    main()
