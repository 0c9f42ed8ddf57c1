"""The `jtgpt` command.

    jtgpt generate --model NAME_OR_PATH --prompt "..." [--max-new-tokens N] [--temperature T]
                   [--top-k K] [--top-p P] [--seed S] [--dtype bfloat16]

tokenizes the prompt with the checkpoint's Hugging Face tokenizer (its tokenizer.json), streams
the generated text to stdout as it is produced, and reports tokens/s on stderr at the end.
--temperature 0 is greedy decoding; any other temperature samples (with --top-k, --top-p).

    jtgpt serve --model NAME_OR_PATH [--host 127.0.0.1] [--port 8000] [--dtype bfloat16]
                [--max-seqs 64] [--max-batch-tokens 2048] [--page-size 16] [--num-pages N]
                [--served-model-name NAME]

serves the checkpoint over an OpenAI-compatible HTTP API (jtgpt.serve.server: /v1/completions,
/v1/chat/completions, /v1/models, /health) on the continuous-batching engine (jtgpt.serve.Engine),
with the same tokenizer, and the chat template of its tokenizer_config.json. Needs the `serve`
extra (pip install 'jtgpt[serve]').
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

import jax
import jax.numpy as jnp

from jtgpt import checkpoint
from jtgpt.text import TextStream

DTYPES = ("float32", "bfloat16", "float16")


def load_tokenizer(name_or_path: str, directory: pathlib.Path):
    """The `tokenizers.Tokenizer` of the checkpoint `name_or_path` resolved to `directory`: its
    tokenizer.json, else (a hub repo) the repo's, through the Hugging Face cache.
    FileNotFoundError if there is none."""
    from tokenizers import Tokenizer
    file = directory / "tokenizer.json"
    if file.is_file():
        return Tokenizer.from_file(str(file))
    if pathlib.Path(name_or_path).expanduser().is_dir():
        raise FileNotFoundError(f"{directory} has no tokenizer.json (the Hugging Face tokenizer "
                                f"the prompt is tokenized with)")
    import huggingface_hub as hub
    try:
        return Tokenizer.from_file(hub.hf_hub_download(name_or_path, "tokenizer.json"))
    except Exception as e:  # huggingface_hub's errors (offline, no such file) say what
        raise FileNotFoundError(f"no tokenizer.json for {name_or_path!r}: the hub said: "
                                f"{type(e).__name__}: {e}") from e


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jtgpt", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="generate text from a prompt, streamed to stdout")
    gen.add_argument("--model", required=True, help="checkpoint directory or Hugging Face repo id")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=1.0, help="0: greedy decoding")
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    srv = commands.add_parser("serve", help="an OpenAI-compatible HTTP server")
    srv.add_argument("--model", required=True, help="checkpoint directory or Hugging Face repo id")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    srv.add_argument("--max-seqs", type=int, default=64, help="sequences in one engine step")
    srv.add_argument("--max-batch-tokens", type=int, default=2048, help="tokens in one step")
    srv.add_argument("--page-size", type=int, default=16, help="tokens per KV-cache page")
    srv.add_argument("--num-pages", type=int, default=None,
                     help="KV-cache pages (default: the engine's choice)")
    srv.add_argument("--served-model-name", default=None,
                     help="the model name clients ask for (default: --model as given)")
    return parser


def generate_command(args, out=sys.stdout, err=sys.stderr) -> None:
    import jtgpt
    directory = checkpoint.resolve(args.model)  # the model's own errors first: it is what is asked
    tokenizer = load_tokenizer(args.model, directory)
    model = jtgpt.from_pretrained(directory, dtype=jnp.dtype(args.dtype))
    prompt = tokenizer.encode(args.prompt).ids
    if not prompt:
        raise ValueError("--prompt tokenizes to no tokens")
    greedy = args.temperature == 0
    options = dict(do_sample=not greedy, temperature=1.0 if greedy else args.temperature,
                   top_k=args.top_k, top_p=args.top_p, key=jax.random.key(args.seed))
    out.write(tokenizer.decode(prompt))
    out.flush()
    text, start, first = TextStream(tokenizer, prompt), time.perf_counter(), None
    for chunk in model.stream([prompt], max_new_tokens=args.max_new_tokens, **options):
        if first is None:  # the first chunk waits for the compilation and the prefill
            first = (time.perf_counter(), len(chunk[0]))
        out.write(text.add([int(t) for t in chunk[0]], final=False)[0])
        out.flush()
    end = time.perf_counter()
    out.write(text.add([], final=True)[0] + "\n")
    new = text.tokens
    rate = ""
    if len(new) > first[1]:
        rate = f", then {(len(new) - first[1]) / (end - first[0]):.1f} tokens/s"
    err.write(f"{len(new)} tokens in {end - start:.2f} s: the first {first[1]} after "
              f"{first[0] - start:.2f} s (compilation and prompt){rate}\n")


def serve_command(args) -> None:
    try:
        import uvicorn
        from jtgpt.serve import Engine, server
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(f"{e.name} is not installed: jtgpt serve needs the serve extra "
                                  f"(pip install 'jtgpt[serve]')") from e
    import jtgpt
    directory = checkpoint.resolve(args.model)  # in generate_command's order, with its errors
    tokenizer = load_tokenizer(args.model, directory)
    chat_template = server.load_chat_template(args.model, directory)
    model = jtgpt.from_pretrained(directory, dtype=jnp.dtype(args.dtype))
    engine = Engine(model, page_size=args.page_size, num_pages=args.num_pages,
                    max_seqs=args.max_seqs, max_batch_tokens=args.max_batch_tokens)
    app = server.create_app(engine, tokenizer, args.served_model_name or args.model,
                            chat_template=chat_template)
    uvicorn.run(app, host=args.host, port=args.port)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    command = {"generate": generate_command, "serve": serve_command}[args.command]
    try:
        command(args)
    except (FileNotFoundError, PermissionError, ConnectionError, ValueError,
            ModuleNotFoundError) as e:
        print(f"jtgpt {args.command}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
