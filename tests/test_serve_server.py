"""The OpenAI-compatible server (jtgpt.serve.server), driven by the official `openai` client against
a server started here (uvicorn in a thread) on a tiny random GPT-2 checkpoint directory with a
word-level tokenizer and a chat template: greedy completions equal `model.generate` on the prompt
alone, streamed text equals the non-streamed text, concurrent requests equal their solo results,
bad requests are 400s with OpenAI's error body, a client that disconnects has its request aborted
(its pages freed) while others complete, and the engine thread survives engine errors. Plus the
`jtgpt serve` command's argument errors and wiring.
"""
import concurrent.futures
import itertools
import json
import threading
import time

import httpx
import jax
import numpy as np
import openai
import pytest
import uvicorn
from flax import nnx

import jtgpt
from jtgpt import cli
from jtgpt.serve import Engine
from jtgpt.serve import server as srv

VOCAB, CONTEXT, NEW = 64, 64, 4
EOS_WORD = "</s>"
MODEL = "tiny"
# One length: each step shape and each reference generate() compiles once.
PROMPTS = ["w3 w5 w7", "w9 w4 w1", "w11 w12 w13", "w20 w30 w40"]
STOP_PROMPT = "w8 w2 w6"  # the checkpoint's eos is its greedy 4th new token (and no other's)
STOP_AT = 3
# Roles as words of the vocabulary; the assistant's turn opened at the end.
CHAT_TEMPLATE = ("{% for m in messages %}{{ {'system': 'w60', 'user': 'w61', 'assistant': 'w62'}"
                 "[m['role']] }} {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}w62{% endif %}")


def _randomize(model):
    """Every parameter random at a scale where greedy outputs vary with the prompt and are far
    from ties (the default init gives near-uniform logits)."""
    flat, tree = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))
    keys = jax.random.split(jax.random.key(0), len(flat))
    new = []
    for (path, x), key in zip(flat, keys):
        name, z = jax.tree_util.keystr(path), jax.random.normal(key, x.shape, x.dtype)
        if "bias" in name:
            new.append(0.1 * z)
        elif x.ndim == 1:  # norm weights
            new.append(1 + 0.2 * z)
        elif "wte" in name or "wpe" in name:
            new.append(0.3 * z)
        else:  # [in, out]
            new.append(2 * z / x.shape[0] ** 0.5)
    nnx.update(model, jax.tree.unflatten(tree, new))


def _tokenizer(eos: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    words = [f"w{i}" for i in range(VOCAB)]
    words[eos] = EOS_WORD
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer.add_special_tokens([EOS_WORD])  # so decoding skips it, as a real eos
    return tokenizer


def _greedy(model, ids, new):
    return np.asarray(model.generate(np.array([ids]), max_new_tokens=new))[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(directory, model, tokenizer): the model reloaded from the directory, its eos chosen so
    that STOP_PROMPT ends with it."""
    path = tmp_path_factory.mktemp("tiny")
    config = jtgpt.GPTConfig(vocab_size=VOCAB, n_positions=CONTEXT, n_embd=32, n_layer=2,
                             n_head=2, bos_token_id=0, eos_token_id=0)
    model = jtgpt.GPT(config)
    _randomize(model)
    stop_ids = [int(w[1:]) for w in STOP_PROMPT.split()]
    free = np.asarray(model.generate(np.array([stop_ids]), max_new_tokens=STOP_AT + 1,
                                     eos_token_id=[]))[0, len(stop_ids):].tolist()
    eos = free[STOP_AT]
    assert eos not in free[:STOP_AT], "pick another STOP_PROMPT"
    model.save_pretrained(path)
    hf_config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**hf_config, "eos_token_id": eos}))
    _tokenizer(eos).save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHAT_TEMPLATE,
         "eos_token": EOS_WORD}))
    return path, jtgpt.from_pretrained(path), cli.load_tokenizer(str(path), path)


def _start(app):
    """A uvicorn server running app on 127.0.0.1 (a free port) in a thread: (server, port)."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    server.thread = thread
    return server, server.servers[0].sockets[0].getsockname()[1]


def _stop(server):
    server.should_exit = True
    server.thread.join(timeout=60)


@pytest.fixture(scope="module")
def served(checkpoint):
    """(base url, engine) of the server on the checkpoint."""
    path, model, tokenizer = checkpoint
    engine = Engine(model, page_size=4, num_pages=48, max_seqs=8, max_batch_tokens=64)
    app = srv.create_app(engine, tokenizer, MODEL,
                         chat_template=srv.load_chat_template(str(path), path))
    server, port = _start(app)
    yield f"http://127.0.0.1:{port}", engine
    _stop(server)


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served[0]}/v1", api_key="x", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def reference(checkpoint):
    """text -> (completion text, finish reason, tokens) of greedy model.generate on the text
    alone, NEW new tokens (computed once per text)."""
    _, model, tokenizer = checkpoint
    eos = model.config.eos_token_id
    cache = {}

    def expect(text, special_tokens=True):
        if text not in cache:
            ids = tokenizer.encode(text, add_special_tokens=special_tokens).ids
            new = _greedy(model, ids, NEW)
            if eos in new:  # then pad: the request's tokens end at its eos
                new = new[:new.index(eos) + 1]
            completion = tokenizer.decode(ids + new)[len(tokenizer.decode(ids)):]
            cache[text] = completion, "stop" if new[-1] == eos else "length", new
        return cache[text]
    return expect


def _wait_idle(engine, timeout=60):
    """Until every page is free again (the engine has nothing left)."""
    deadline = time.monotonic() + timeout
    while engine.num_free_pages != engine.num_pages:
        assert time.monotonic() < deadline, (f"{engine.num_pages - engine.num_free_pages} pages "
                                             f"still held")
        time.sleep(0.05)


# -------------------------------------------------------------------------------- completions

def test_completion_equals_generate(client, reference):
    text, reason, tokens = reference(PROMPTS[0])
    out = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=NEW, temperature=0)
    assert out.object == "text_completion" and out.model == MODEL and out.id.startswith("cmpl-")
    assert [(c.index, c.text, c.finish_reason) for c in out.choices] == [(0, text, reason)]
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (
        3, len(tokens), 3 + len(tokens))


def test_eos_is_stop_and_not_in_the_text(client, reference):
    """(With the prompt as token ids.)"""
    text, reason, tokens = reference(STOP_PROMPT)
    assert reason == "stop" and len(tokens) == STOP_AT + 1  # the checkpoint's eos was chosen so
    ids = [int(word[1:]) for word in STOP_PROMPT.split()]
    out = client.completions.create(model=MODEL, prompt=ids, max_tokens=NEW, temperature=0)
    assert out.choices[0].text == text and EOS_WORD not in text
    assert out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens == STOP_AT + 1  # the eos counts, as in vLLM


def test_streamed_completion_equals_non_streamed(client, reference):
    text, reason, tokens = reference(PROMPTS[1])
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=NEW,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    *pieces, last = chunks
    assert {c.object for c in chunks} == {"text_completion"} and len({c.id for c in chunks}) == 1
    assert "".join(c.choices[0].text for c in pieces) == text
    assert [c.choices[0].finish_reason for c in pieces] == [None] * (len(pieces) - 1) + [reason]
    assert len(pieces) > 1  # it did stream
    assert last.choices == [] and last.usage.completion_tokens == len(tokens)


def test_stop_strings(client, reference):
    """The text ends before the first stop string; streamed, the same (text that could begin
    one, "w9" of "w999", is held back until it cannot)."""
    text, _, _ = reference(PROMPTS[0])
    words = text.split()
    assert len(words) >= 3
    options = dict(model=MODEL, prompt=PROMPTS[0], max_tokens=NEW, temperature=0,
                   stop=[words[2], "w999"])
    out = client.completions.create(**options)
    assert out.choices[0].text == text[:text.index(words[2])]
    assert out.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(stream=True, **options))
    assert "".join(c.choices[0].text for c in streamed) == out.choices[0].text
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_sampling_is_reproducible_from_seed(client):
    options = dict(model=MODEL, prompt=PROMPTS[2], max_tokens=3, temperature=1.5, top_p=0.9,
                   seed=3, extra_body={"top_k": 20, "min_p": 0.01, "repetition_penalty": 1.2})
    first, again = (client.completions.create(**options).choices[0] for _ in range(2))
    assert first.text == again.text and first.finish_reason in ("stop", "length")


# ------------------------------------------------------------------------------------- chat

def test_chat_completion(client, reference):
    messages = [{"role": "system", "content": "w50"}, {"role": "user", "content": "w3 w5"}]
    # CHAT_TEMPLATE rendered; encoded without special tokens, as the template writes its own.
    text, reason, tokens = reference("w60 w50 w61 w3 w5 w62", special_tokens=False)
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=NEW,
                                         temperature=0)
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    assert (out.choices[0].message.role, out.choices[0].message.content) == ("assistant", text)
    assert out.choices[0].finish_reason == reason
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (6, len(tokens))
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=messages, max_completion_tokens=NEW, temperature=0, stream=True))
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == reason


def test_concurrent_requests_equal_their_solo_results(client, reference, served):
    expected = [reference(p) for p in PROMPTS]  # computed first: the requests then overlap

    def ask(i):
        options = dict(model=MODEL, prompt=PROMPTS[i], max_tokens=NEW, temperature=0)
        if i % 2:
            chunks = client.completions.create(stream=True, **options)
            return "".join(c.choices[0].text for c in chunks)
        return client.completions.create(**options).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        got = list(pool.map(ask, range(len(PROMPTS))))
    assert got == [text for text, _, _ in expected]
    _wait_idle(served[1])


# ----------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("endpoint, change, param", [
    ("completions", dict(model="gpt-4"), "model"),
    ("completions", dict(prompt=" ".join(["w3"] * CONTEXT)), "prompt"),  # no room for a token
    ("completions", dict(max_tokens=CONTEXT), "max_tokens"),  # prompt + max_tokens too long
    ("completions", dict(max_tokens=0), "max_tokens"),
    ("completions", dict(max_tokens=-3), "max_tokens"),
    ("completions", dict(temperature=-0.5), "temperature"),
    ("completions", dict(top_p=0.0), "top_p"),
    ("completions", dict(top_p=1.5), "top_p"),
    ("completions", dict(top_k=-2), "top_k"),
    ("completions", dict(min_p=1.5), "min_p"),
    ("completions", dict(repetition_penalty=0.0), "repetition_penalty"),
    ("completions", dict(n=2), "n"),
    ("completions", dict(prompt=""), "prompt"),
    ("completions", dict(prompt=[3, VOCAB]), "prompt"),  # a token id outside the vocabulary
    ("completions", dict(prompt=[3, -1]), "prompt"),
    ("completions", dict(prompt=5), "prompt"),
    ("completions", dict(max_tokens="4"), "max_tokens"),
    ("completions", dict(stream="yes"), "stream"),
    ("completions", dict(temperature="hot"), "temperature"),
    ("completions", dict(stop=[""]), "stop"),
    ("completions", dict(logprobs=1), "logprobs"),  # not implemented: refused, not ignored
    ("completions", dict(stream_options={"include_usage": True}), "stream_options"),
    ("completions", dict(prompt=None), "prompt"),
    ("chat/completions", dict(messages=[]), "messages"),
    ("chat/completions", dict(messages=[{"role": "user", "content": 3}]), "messages"),
    ("chat/completions", dict(tools=[]), "tools"),
    ("chat/completions", dict(model="gpt-4"), "model"),
    ("chat/completions", dict(max_completion_tokens=0), "max_completion_tokens"),
])
def test_bad_request_is_400(served, endpoint, change, param):
    body = ({"model": MODEL, "prompt": "w3 w5", "max_tokens": 4} if endpoint == "completions"
            else {"model": MODEL, "messages": [{"role": "user", "content": "w3"}],
                  "max_tokens": 4})
    response = httpx.post(f"{served[0]}/v1/{endpoint}", json={**body, **change}, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] is None
    assert error["param"] == param and error["message"]


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b""])
def test_malformed_body_is_400(served, content):
    response = httpx.post(f"{served[0]}/v1/completions", content=content, timeout=60,
                          headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_client_raises_openai_errors(client):
    with pytest.raises(openai.BadRequestError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="w3", max_tokens=2)


def test_models_and_health(served, client):
    assert [(m.id, m.object, m.owned_by) for m in client.models.list()] == [
        (MODEL, "model", "jtgpt")]
    assert httpx.get(f"{served[0]}/health").status_code == 200


def test_disconnected_clients_are_aborted(served, client, reference, monkeypatch):
    """A streaming client that leaves after its first chunk and a non-streaming one that times
    out: both requests are aborted in the engine and their pages freed, while another request
    completes. The engine steps only when the test lets it, so neither request can finish
    before its client has left, however fast the device."""
    url, engine = served
    aborted = []
    abort = engine.abort
    monkeypatch.setattr(engine, "abort", lambda request_id: (aborted.append(request_id),
                                                             abort(request_id)))
    permits, opened, step = threading.Semaphore(0), threading.Event(), engine.step

    def gated_step():
        if not opened.is_set():
            permits.acquire()
        return step()

    monkeypatch.setattr(engine, "step", gated_step)
    long = {"model": MODEL, "prompt": PROMPTS[3], "max_tokens": CONTEXT - 3, "temperature": 0}
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json={**long, "stream": True},
                          timeout=300) as response:
            permits.release()  # the prefill step: the first token, then the engine waits
            first = next(line for line in response.iter_lines() if line.startswith("data: "))
            assert json.loads(first[6:])["object"] == "text_completion"
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{url}/v1/completions", json=long, timeout=1.0)
        time.sleep(0.5)  # the server sees both clients gone and queues their aborts
    finally:
        # The step the engine waits in runs at most decode_steps tokens: both requests are
        # still unfinished when the engine reads the aborts after it.
        opened.set()
        permits.release()
    text, _, _ = reference(PROMPTS[0])
    out = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=NEW,
                                    temperature=0)
    assert out.choices[0].text == text
    _wait_idle(engine)
    assert len(aborted) == 2


# -------------------------------------------------------------------------- engine failures

class _FlakyEngine:
    """A pure-Python engine (the Engine API) that refuses prompts starting with token 0 and
    fails one step when told to; otherwise it counts up from the prompt's last token."""
    max_len, num_pages = 32, 8

    def __init__(self):
        self.requests, self.finished, self.fail_next_step = {}, {}, False
        self._ids = itertools.count()

    @property
    def num_free_pages(self):
        return self.num_pages - len(self.requests)

    @property
    def has_unfinished(self):
        return bool(self.requests)

    def add_request(self, prompt_ids, *, max_new_tokens, **sampling):
        if prompt_ids[0] == 0:
            raise ValueError("the engine refuses token 0")
        request_id = next(self._ids)
        self.requests[request_id] = [prompt_ids[-1], max_new_tokens]
        return request_id

    def step(self):
        if self.fail_next_step:
            self.fail_next_step = False
            raise RuntimeError("the device is on fire")
        new = {}
        for request_id, state in list(self.requests.items()):
            state[0], state[1] = (state[0] + 1) % VOCAB, state[1] - 1
            new[request_id] = [state[0]]
            if state[1] == 0:
                self.finished[request_id] = "length"
                del self.requests[request_id]
        return new

    def pop_finished(self):
        finished, self.finished = self.finished, {}
        return finished

    def abort(self, request_id):
        self.requests.pop(request_id, None)


def test_engine_errors_do_not_stop_the_server(checkpoint):
    """The engine's ValueError is a 400; a failing step fails the request in flight with a 500
    (an error event mid-stream) and frees it; the next request is served."""
    engine = _FlakyEngine()
    server, port = _start(srv.create_app(engine, checkpoint[2], MODEL))
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
    try:
        with pytest.raises(openai.BadRequestError, match="refuses token 0"):
            client.completions.create(model=MODEL, prompt=[0, 1], max_tokens=3)
        engine.fail_next_step = True
        with pytest.raises(openai.InternalServerError, match="on fire"):
            client.completions.create(model=MODEL, prompt=[5], max_tokens=3)
        engine.fail_next_step = True
        with pytest.raises(openai.APIError, match="on fire"):
            list(client.completions.create(model=MODEL, prompt=[5], max_tokens=3, stream=True))
        assert not engine.requests  # aborted: nothing left holding pages
        out = client.completions.create(model=MODEL, prompt=[5], max_tokens=3)
        assert out.choices[0].text == " w6 w7 w8" and out.choices[0].finish_reason == "length"
    finally:
        _stop(server)


def test_no_chat_template_is_400(checkpoint):
    server, port = _start(srv.create_app(_FlakyEngine(), checkpoint[2], MODEL))
    try:
        response = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "w3"}]}, timeout=60)
        assert response.status_code == 400 and "no chat template" in response.text
    finally:
        _stop(server)


# -------------------------------------------------------------------------------------- CLI

def test_cli_serve_errors_name_what_is_missing(tmp_path, capsys):
    assert cli.main(["serve", "--model", str(tmp_path / "nowhere")]) == 1
    assert "no such local directory" in capsys.readouterr().err
    jtgpt.GPT(jtgpt.GPTConfig(vocab_size=VOCAB, n_positions=CONTEXT, n_embd=32, n_layer=1,
                              n_head=2)).save_pretrained(tmp_path)
    assert cli.main(["serve", "--model", str(tmp_path)]) == 1  # no tokenizer
    assert "has no tokenizer.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["serve", "--model", str(tmp_path), "--port", "http"])


def test_cli_serve_runs_uvicorn_on_the_app(checkpoint, monkeypatch):
    """The command's wiring, with uvicorn.run replaced: the app it would serve answers."""
    from fastapi.testclient import TestClient
    ran = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: ran.update(app=app, **kwargs))
    path = str(checkpoint[0])
    assert cli.main(["serve", "--model", path, "--dtype", "float32", "--port", "8123",
                     "--num-pages", "16", "--served-model-name", "mine"]) == 0
    assert (ran["host"], ran["port"]) == ("127.0.0.1", 8123)
    with TestClient(ran["app"]) as http:
        assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["mine"]
