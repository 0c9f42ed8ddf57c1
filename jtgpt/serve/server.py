"""An OpenAI-compatible HTTP server on jtgpt's serving engine (FastAPI on uvicorn).

    POST /v1/completions        prompt: a string or a list of token ids
    POST /v1/chat/completions   messages, rendered with the checkpoint's chat template
    GET  /v1/models, GET /health

Request and response JSON follow the OpenAI API (`stream: true` gives server-sent events: `data:
{json}` chunks, then `data: [DONE]`), plus vLLM's extra sampling parameters top_k, min_p and
repetition_penalty. Temperature 0 is greedy. What is not implemented (n > 1, logprobs, tools, ...)
is refused with a 400, never silently ignored.

Threads. The engine is not thread-safe, so one thread, EngineThread, owns it. The asyncio side
(uvicorn's event loop, one coroutine per HTTP request) talks to it through a command queue (add a
request, abort one); the engine thread drains that queue before each `engine.step()`, steps while
it has work and blocks on the queue when it has none. It hands each request's new tokens and
finish reason back through that request's Stream, an asyncio.Queue filled from the engine thread
with `loop.call_soon_threadsafe`. A failing step fails the requests in flight with a 500 (the
engine does not say which one broke it) and the thread goes on serving new ones; a request the
engine accepted always ends with its finish reason or an error.

Text. The completion's text comes from jtgpt.text.TextStream, as `jtgpt generate` prints it:
stop strings end it, and text that could still begin one is held back.

Disconnects. When a client goes away (mid-stream, or while waiting for a non-streamed answer),
the coroutine serving it is cancelled and its cleanup aborts the request in the engine, which
frees its pages.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import pathlib
import queue
import threading
import time
import uuid
from typing import Annotated, AsyncIterator, Callable, Literal, NamedTuple

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException

from jtgpt.text import TextStream

logger = logging.getLogger("jtgpt.serve")


# ------------------------------------------------------------------------------ engine thread

class Accepted(NamedTuple):
    """The engine took the request."""


class Tokens(NamedTuple):
    """New tokens of one step; finish_reason "stop" or "length" on the request's last."""
    ids: list[int]
    finish_reason: str | None


class Failed(NamedTuple):
    """The request cannot go on: refused by the engine (400) or the engine failed (500)."""
    status: int
    message: str


class Stream:
    """One request's events (Accepted, Tokens, Failed), from the engine thread to the coroutine
    serving it on `loop`."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.events: asyncio.Queue = asyncio.Queue()
        self.request_id: int | None = None  # the engine's; set and read by the engine thread only
        self._loop = loop

    def put(self, event) -> None:
        """From the engine thread."""
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop has closed (shutdown): nobody is listening
            pass


class EngineThread:
    """The thread that owns the engine (module docstring)."""

    def __init__(self, engine):
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[int, Stream] = {}  # the engine's request id -> its stream
        self._thread = threading.Thread(target=self._run, name="jtgpt-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Fail what is in flight and end the thread (blocks until the current step is done)."""
        self._commands.put(None)
        self._thread.join()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    # From the event loop's thread. The queue holds functions for the engine thread to call, in
    # order, so an abort always comes after its request was added (or refused).

    def submit(self, prompt_ids: list[int], options: dict) -> Stream:
        """Add a request; its stream's first event is Accepted or Failed."""
        stream = Stream(asyncio.get_running_loop())
        self._commands.put(functools.partial(self._add, stream, prompt_ids, options))
        return stream

    def abort(self, stream: Stream) -> None:
        """Stop the request (a no-op once it has finished)."""
        self._commands.put(functools.partial(self._abort, stream))

    # ----------------------------------------------------------------- on the engine thread

    def _run(self) -> None:
        while True:
            try:
                # Block only when idle (no busy spin); else run what came in during the last step.
                command = self._commands.get(block=not self._streams)
                while command is not None:
                    command()
                    command = self._commands.get_nowait()
                break  # None: stop
            except queue.Empty:
                pass
            if self._streams:
                self._step()
        self._fail_all(503, "the server is shutting down", abort=True)

    def _add(self, stream: Stream, prompt_ids: list[int], options: dict) -> None:
        try:
            request_id = self.engine.add_request(prompt_ids, **options)
        except ValueError as e:  # the engine's word on bad arguments
            stream.put(Failed(400, str(e)))
            return
        except Exception as e:
            logger.exception("engine.add_request failed")
            stream.put(Failed(500, f"the engine failed: {type(e).__name__}: {e}"))
            return
        stream.request_id = request_id
        self._streams[request_id] = stream
        stream.put(Accepted())

    def _abort(self, stream: Stream) -> None:
        if self._streams.get(stream.request_id) is not stream:
            return  # finished, failed or refused already
        del self._streams[stream.request_id]
        try:
            self.engine.abort(stream.request_id)
        except Exception:
            logger.exception("engine.abort(%d) failed", stream.request_id)

    def _step(self) -> None:
        if not self.engine.has_unfinished:
            # Each stream is a request the engine accepted and never finished: never leave its
            # client waiting.
            self._fail_all(500, "the engine lost the request")
            return
        try:
            new = self.engine.step()
            finished = self.engine.pop_finished()
        except Exception as e:
            logger.exception("engine.step failed: failing the %d requests in flight",
                             len(self._streams))
            self._fail_all(500, f"the engine failed: {type(e).__name__}: {e}", abort=True)
            return
        for request_id in new.keys() | finished.keys():
            stream = self._streams.get(request_id)
            if stream is None:
                continue  # aborted meanwhile
            reason = finished.get(request_id)
            if reason is not None:
                del self._streams[request_id]
            if reason == "abort":  # not asked for by us: the engine gave up on it
                stream.put(Failed(500, "the engine aborted the request"))
            else:
                stream.put(Tokens([int(t) for t in new.get(request_id, ())], reason))

    def _fail_all(self, status: int, message: str, *, abort: bool = False) -> None:
        for request_id, stream in self._streams.items():
            if abort:  # free its pages, so the engine can serve the next requests
                try:
                    self.engine.abort(request_id)
                except Exception:
                    logger.exception("engine.abort(%d) failed", request_id)
            stream.put(Failed(status, message))
        self._streams.clear()


# ------------------------------------------------------------------------------------- text

# ---------------------------------------------------------------------------------- requests

class APIError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, message: str, *, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.status = message, param, status

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param,
                          "code": None}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


class _Strict(BaseModel):
    # Unknown parameters are refused, not ignored (a client asking for logprobs or tools learns
    # it gets none), and no lax coercion ("5" for 5, "yes" for true): wrong types are a 400.
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """What both endpoints take. top_k, min_p, repetition_penalty: vLLM's extra parameters."""
    model: str
    temperature: float | None = Field(None, ge=0)  # None: 1
    top_p: float | None = Field(None, gt=0, le=1)  # None: 1 (off)
    top_k: int | None = Field(None, ge=-1)  # -1, 0, None: off (vLLM's -1, HF's 0)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    n: int = 1
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and unused, as OpenAI's own end-user tag

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n):
        if n != 1:
            raise ValueError("only n=1 is supported")
        return n

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop):
        if stop is not None and "" in ([stop] if isinstance(stop, str) else stop):
            raise ValueError("a stop string must not be empty")
        return stop


class CompletionRequest(_Sampling):
    prompt: str | list[Annotated[int, Field(ge=0)]]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default; None: up to the context


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None

    def for_template(self) -> dict:
        """The message as chat templates take it: content a string (text parts joined with
        newlines, as vLLM joins them)."""
        content = self.content
        if isinstance(content, list):
            content = "\n".join(part.text for part in content)
        return {"role": self.role, "content": content,
                **({"name": self.name} if self.name is not None else {})}


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # None: up to the context
    max_tokens: int | None = Field(None, ge=1)  # its older name


def _engine_options(req: _Sampling, max_tokens: int | None, prompt_len: int, max_len: int,
                    prompt_param: str) -> dict:
    """engine.add_request's keyword arguments for req; APIError where the prompt does not fit."""
    if prompt_len == 0:
        raise APIError("the prompt is empty", param=prompt_param)
    if prompt_len >= max_len:
        raise APIError(f"the prompt is {prompt_len} tokens, but this model's maximum context "
                       f"length is {max_len} tokens", param=prompt_param)
    if max_tokens is None:
        max_tokens = max_len - prompt_len
    elif prompt_len + max_tokens > max_len:
        raise APIError(f"This model's maximum context length is {max_len} tokens. However, you "
                       f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the prompt, "
                       f"{max_tokens} in the completion).", param="max_tokens")
    options = dict(max_new_tokens=max_tokens, seed=req.seed,
                   repetition_penalty=None if req.repetition_penalty in (None, 1.0)
                   else req.repetition_penalty)
    temperature = 1.0 if req.temperature is None else req.temperature
    if temperature == 0:  # greedy, as OpenAI and vLLM: the truncations change nothing then
        return {**options, "do_sample": False}
    return {**options, "do_sample": True, "temperature": temperature,
            "top_k": req.top_k if req.top_k and req.top_k > 0 else None,
            "top_p": None if req.top_p in (None, 1.0) else req.top_p,
            "min_p": req.min_p or None}


def _validation_error(exc: RequestValidationError) -> APIError:
    """FastAPI's 422 as OpenAI's 400: the first problem, param the top-level field."""
    error = exc.errors()[0]
    if error["type"] == "json_invalid":
        return APIError(f"the body is not valid JSON: {error.get('ctx', {}).get('error', '')}")
    loc = [str(part) for part in error["loc"][1:]]  # [0] is "body"
    param = loc[0] if loc else None
    if error["type"] == "extra_forbidden":
        return APIError(f"unsupported parameter: {'.'.join(loc)}", param=param)
    where = f"{'.'.join(loc)}: " if param else ""
    return APIError(f"{where}{error['msg']}", param=param)


async def _until_disconnected(request: Request) -> None:
    # The body has been read: the next message the server has for this request is its end.
    while (await request.receive())["type"] != "http.disconnect":
        pass


# --------------------------------------------------------------------------------------- app

def create_app(engine, tokenizer, model_name: str, *,
               chat_template: Callable[[list[dict]], str] | None = None) -> FastAPI:
    """The server's FastAPI app: `engine` a jtgpt.serve.Engine (driven by an EngineThread that
    the app starts and stops with itself), `tokenizer` a `tokenizers.Tokenizer`, model_name the
    name clients must ask for, chat_template renders chat messages to the prompt text (None: the
    model has none, and chat completions are refused)."""
    runner = EngineThread(engine)
    created = int(time.time())
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        runner.start()
        try:
            yield
        finally:
            await asyncio.to_thread(runner.stop)

    app = FastAPI(title="jtgpt", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, exc: RequestValidationError):
        return _validation_error(exc).response()

    @app.exception_handler(HTTPException)  # 404, 405: the same error body
    async def http_error(request, exc: HTTPException):
        return APIError(str(exc.detail), status=exc.status_code).response()

    @app.get("/health")
    async def health():
        if not runner.is_alive():
            return APIError("the engine thread has stopped", status=503).response()
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model",
                                            "created": created, "owned_by": "jtgpt",
                                            "max_model_len": engine.max_len}]}

    def check(body: _Sampling) -> None:
        if body.model != model_name:
            raise APIError(f"The model `{body.model}` does not exist (this server has "
                           f"`{model_name}`).", param="model")
        if body.stream_options is not None and not body.stream:
            raise APIError("stream_options is only allowed with stream: true",
                           param="stream_options")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check(body)
        if isinstance(body.prompt, str):
            prompt = tokenizer.encode(body.prompt).ids
        else:
            prompt = body.prompt
            if any(t >= vocab_size for t in prompt):
                raise APIError(f"prompt: token ids must be below the vocabulary size "
                               f"{vocab_size}", param="prompt")
        return await respond(request, body, prompt, body.max_tokens, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        check(body)
        if chat_template is None:
            raise APIError(f"the model {model_name!r} has no chat template (its "
                           f"tokenizer_config.json has no chat_template): use /v1/completions",
                           param="messages")
        import jinja2  # transformers renders chat templates with it
        try:
            text = chat_template([m.for_template() for m in body.messages])
        except jinja2.TemplateError as e:  # the template's own checks (roles must alternate, ...)
            raise APIError(f"the chat template refused the messages: {e}", param="messages")
        # The template writes the special tokens (bos) itself: add none, as transformers does.
        prompt = tokenizer.encode(text, add_special_tokens=False).ids
        max_tokens = (body.max_tokens if body.max_completion_tokens is None
                      else body.max_completion_tokens)
        return await respond(request, body, prompt, max_tokens, chat=True)

    async def respond(request: Request, body: _Sampling, prompt: list[int],
                      max_tokens: int | None, *, chat: bool):
        options = _engine_options(body, max_tokens, len(prompt), engine.max_len,
                                  "messages" if chat else "prompt")
        stream = runner.submit(prompt, options)
        try:
            event = await stream.events.get()
        except BaseException:  # cancelled while the engine thread took it: do not leak it
            runner.abort(stream)
            raise
        if isinstance(event, Failed):
            raise APIError(event.message, status=event.status)
        text = TextStream(tokenizer, prompt, [body.stop] if isinstance(body.stop, str)
                    else body.stop or [])
        pieces = _pieces(runner, stream, text)
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": model_name}

        def usage():
            return {"prompt_tokens": len(prompt), "completion_tokens": len(text.tokens),
                    "total_tokens": len(prompt) + len(text.tokens)}

        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            if chat:
                head["object"] = "chat.completion.chunk"
            return StreamingResponse(_events(pieces, head, chat, usage if include_usage else None),
                                     media_type="text/event-stream")

        async def collect():
            async with contextlib.aclosing(pieces):
                return [piece async for piece in pieces]

        work = asyncio.ensure_future(collect())
        gone = asyncio.ensure_future(_until_disconnected(request))
        await asyncio.wait((work, gone), return_when=asyncio.FIRST_COMPLETED)
        gone.cancel()
        if not work.done():  # the client left: cancelling the work aborts the request
            work.cancel()
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        got = work.result()
        content, reason = "".join(t for t, _ in got), got[-1][1]
        choice = ({"message": {"role": "assistant", "content": content}} if chat
                  else {"text": content})
        return {**head, "choices": [{"index": 0, **choice, "logprobs": None,
                                     "finish_reason": reason}], "usage": usage()}

    return app


async def _pieces(runner: EngineThread, stream: Stream, text: TextStream
                  ) -> AsyncIterator[tuple[str, str | None]]:
    """(new text, None), ..., (last text, finish reason) of an accepted request. If this is
    closed or cancelled before the engine finished the request (or a stop string ended it
    early), the request is aborted in the engine."""
    done = False  # the engine finished the request (or failed it)
    try:
        while True:
            event = await stream.events.get()
            if isinstance(event, Failed):
                done = True
                raise APIError(event.message, status=event.status)
            done = event.finish_reason is not None
            new, stopped = text.add(event.ids, final=done)
            if stopped or done:
                yield new, "stop" if stopped else event.finish_reason
                return
            if new:
                yield new, None
    finally:
        if not done:
            runner.abort(stream)


async def _events(pieces, head: dict, chat: bool, usage: Callable[[], dict] | None
                  ) -> AsyncIterator[str]:
    """The server-sent events of a streamed completion. An error after the 200 went out is an
    event with OpenAI's error body (the client raises it), as vLLM sends it."""
    def event(payload: dict) -> str:
        return f"data: {json.dumps(payload)}\n\n"

    def chunk(choice: dict, reason: str | None) -> str:
        extra = {"usage": None} if usage else {}  # OpenAI: null on all but the usage chunk
        return event({**head, "choices": [{"index": 0, **choice, "logprobs": None,
                                           "finish_reason": reason}], **extra})

    async with contextlib.aclosing(pieces):
        try:
            if chat:
                yield chunk({"delta": {"role": "assistant", "content": ""}}, None)
            async for new, reason in pieces:
                delta = {"content": new} if new else {}
                yield chunk({"delta": delta} if chat else {"text": new}, reason)
            if usage:
                yield event({**head, "choices": [], "usage": usage()})
        except APIError as e:
            yield event(e.body())
    yield "data: [DONE]\n\n"


# ------------------------------------------------------------------------------- chat template

def load_chat_template(name_or_path: str, directory: pathlib.Path
                       ) -> Callable[[list[dict]], str] | None:
    """The chat template of the checkpoint `name_or_path` (resolved to `directory`), as a function
    of the messages to the prompt text (with the assistant's turn opened), through transformers'
    apply_chat_template; None if the checkpoint has none."""
    local = pathlib.Path(name_or_path).expanduser().is_dir()
    if local and not any((directory / name).is_file()
                         for name in ("tokenizer_config.json", "chat_template.jinja")):
        return None
    from transformers import AutoTokenizer
    try:  # a hub repo: transformers fetches the tokenizer files the checkpoint's snapshot lacks
        hf = AutoTokenizer.from_pretrained(directory if local else name_or_path)
    except OSError as e:  # transformers' "can't load tokenizer"
        raise FileNotFoundError(f"{name_or_path!r}: cannot load its tokenizer for the chat "
                                f"template: {e}") from e
    if hf.chat_template is None:
        return None
    return functools.partial(hf.apply_chat_template, tokenize=False, add_generation_prompt=True)
