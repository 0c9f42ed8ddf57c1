"""Train GPT-2 on a text file with jtgpt's Triton kernels; prints loss and tokens/s.

    python examples/train_gpt2.py --text input.txt                       # GPT-2 124M from scratch
    python examples/train_gpt2.py --text input.txt --init gpt2 --tokenizer gpt2   # fine-tune
    python examples/train_gpt2.py --text input.txt --config tiny --steps 20       # CPU smoke run
    python examples/train_gpt2.py --text input.txt --devices 8 --checkpoint run/  # 8 GPUs, ZeRO-2
    python examples/train_gpt2.py --text input.txt --devices 8 --checkpoint run/ --resume

The text is tokenized once (GPT-2's BPE through transformers, or raw bytes: 256 ids, nothing to
download), 90% of it trains and 10% is held out. Step i draws `--batch` random windows of `--seq`
tokens, seeded by (--seed, i), so a resumed run draws what the uninterrupted one would have.
Loss is printed every `--log-every` steps with the tokens/s since the last print (the first print
includes compilation); the held-out loss (no dropout) is printed at the end. `--devices N` trains
data-parallel over N devices with ZeRO-2 (jtgpt.train); `--checkpoint DIR` saves the whole train
state there every `--checkpoint-every` steps and at the end, and `--resume` starts from it (on
any number of devices).
"""
import argparse
import dataclasses
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # run from a checkout too
import jtgpt  # noqa: E402
from jtgpt import train  # noqa: E402
from jtgpt.models.gpt2 import PRESETS  # noqa: E402

# The model shapes --config takes: GPT-2's sizes, and a tiny one for a CPU (interpreter) run.
CONFIGS = {**PRESETS, "tiny": dataclasses.replace(PRESETS["gpt2"], n_positions=256,
                                                 n_embd=64, n_layer=2, n_head=2)}


def tokenize(text: str, tokenizer: str) -> tuple[np.ndarray, int]:
    """(token ids, vocabulary size)."""
    if tokenizer == "bytes":
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32), 256
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tokenizer)
    return np.asarray(tok(text)["input_ids"], np.int32), len(tok)


def make_model(args, vocab_size: int, dtype, param_dtype) -> jtgpt.GPT:
    if args.init:
        model = jtgpt.GPT.from_pretrained(args.init, dtype=dtype, param_dtype=param_dtype)
        if model.config.vocab_size < vocab_size:
            raise SystemExit(f"--init {args.init} has {model.config.vocab_size} tokens, fewer than "
                             f"the tokenizer's {vocab_size}: use its tokenizer (--tokenizer gpt2)")
        return model
    config = dataclasses.replace(CONFIGS[args.config], vocab_size=vocab_size)
    return jtgpt.GPT(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(args.seed))


def windows(tokens: np.ndarray, batch: int, seq: int, rng: np.random.Generator) -> np.ndarray:
    starts = rng.integers(0, len(tokens) - seq, size=batch)
    return np.stack([tokens[s:s + seq] for s in starts])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text", required=True, help="a UTF-8 text file")
    p.add_argument("--tokenizer", default="bytes", help="'bytes', or a HF tokenizer name ('gpt2')")
    p.add_argument("--init", help="start from this HF checkpoint (name or directory)")
    p.add_argument("--config", default="gpt2", choices=list(CONFIGS),
                   help="model shape when training from scratch")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--accum", type=int, default=1, help="micro-batches a step (divides --batch)")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--dtype", default="bfloat16", help="compute dtype; parameters stay float32")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", help="write the trained model here (HF layout)")
    p.add_argument("--devices", type=int, default=1,
                   help="data-parallel over this many devices (ZeRO-2); --batch divides by it")
    p.add_argument("--checkpoint", help="save the train state here (orbax) while training")
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--resume", action="store_true", help="start from --checkpoint's train state")
    args = p.parse_args(argv)
    if args.resume and not args.checkpoint:
        raise SystemExit("--resume needs --checkpoint DIR, the train state to start from")
    if not 1 <= args.devices <= len(jax.devices()):
        raise SystemExit(f"--devices {args.devices}: this machine has {len(jax.devices())}")

    with open(args.text, encoding="utf-8") as f:
        tokens, vocab_size = tokenize(f.read(), args.tokenizer)
    split = int(0.9 * len(tokens))
    train_tokens, val_tokens = tokens[:split], tokens[split:]
    if min(len(train_tokens), len(val_tokens)) <= args.seq:
        raise SystemExit(f"{args.text}: {len(tokens)} tokens is too short for --seq {args.seq}")

    model = make_model(args, vocab_size, jnp.dtype(args.dtype), jnp.float32)
    if args.seq > model.config.n_positions:
        raise SystemExit(f"--seq {args.seq} exceeds the model's n_positions={model.config.n_positions}")
    schedule = optax_schedule(args.lr, args.warmup, args.steps)
    mesh = (jax.sharding.Mesh(np.asarray(jax.devices()[:args.devices]), (train.DATA,))
            if args.devices > 1 else None)
    state, step = train.init(model, train.adamw(schedule), accum_steps=args.accum, mesh=mesh)
    if args.resume:
        state = train.restore(args.checkpoint, state)
        print(f"resumed from {args.checkpoint} at step {int(state.step)}")
    print(f"{model.config}\n{len(train_tokens)} training tokens, {args.batch} x {args.seq} a step"
          f" on {args.devices} device(s)")

    key = jax.random.key(args.seed)
    t0, tokens_since = time.perf_counter(), 0
    for i in range(int(state.step) + 1, args.steps + 1):
        rng = np.random.default_rng([args.seed, i])
        batch = {"input_ids": jnp.asarray(windows(train_tokens, args.batch, args.seq, rng))}
        state, metrics = step(state, batch, jax.random.fold_in(key, i))
        if args.checkpoint and (i % args.checkpoint_every == 0 or i == args.steps):
            train.save(args.checkpoint, state)
        tokens_since += args.batch * args.seq
        if i % args.log_every == 0 or i == args.steps:
            loss = float(metrics["loss"])  # blocks: the timing below covers the steps run
            elapsed = time.perf_counter() - t0
            print(f"step {i:5d}  loss {loss:.4f}  grad norm {float(metrics['grad_norm']):.3f}  "
                  f"{tokens_since / elapsed:,.0f} tokens/s")
            t0, tokens_since = time.perf_counter(), 0

    trained = train.model_of(model, state)
    val = jnp.asarray(windows(val_tokens, args.batch, args.seq, np.random.default_rng(args.seed)))
    print(f"held-out loss {float(jax.jit(lambda m, ids: m.loss(ids))(trained, val)):.4f}")
    if args.save:
        trained.save_pretrained(args.save)
        print(f"saved to {args.save}")


def optax_schedule(lr: float, warmup: int, steps: int):
    """Linear warm-up to lr, then cosine decay to lr / 10."""
    warmup = max(1, min(warmup, steps - 1))
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), lr / 10)


if __name__ == "__main__":
    main()
