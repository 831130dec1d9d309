"""`d3kernels serve`: an OpenAI-compatible HTTP server on the package's own Server (Starlette + uvicorn).

    d3kernels serve --port 8000            # the embedded model; --model PATH for another
    curl -s 127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"model": "SmolLM2-135M-Instruct", "prompt": "The capital of France is", "max_tokens": 16}'

Endpoints: POST /v1/completions, POST /v1/chat/completions (the model's chat template), GET /v1/models,
GET /health (the engine's counts: queue, live requests, pages free and promised). Streaming is server-sent
events as the openai client reads them ("data: {...}" chunks, then "data: [DONE]").

Request fields (docs/serving.md, "The HTTP server", lists them): model, prompt / messages, max_tokens
(chat: also max_completion_tokens), temperature, top_p, seed, stop, stream, stream_options.include_usage,
user; extensions top_k, ignore_eos, return_token_ids and d3 ({"alpha": a}: this request's D3 depth decay).
n, logprobs, echo, best_of, suffix, presence_penalty, frequency_penalty, logit_bias and top_logprobs are
accepted only at the value that turns them off; any other value, and any other field, is a 400 that names
the field. Responses carry usage counts and an extra "d3" object: the request's alpha and its mean layers
per token (the prompt pass counted as one token at full depth, as Generation.mean_layers).

All of a request's work happens on the engine's thread (d3kernels.service.Engine): this module parses,
tokenizes, turns tokens into text (stop strings included) and writes responses. A client that disconnects
has its request cancelled (the Server finishes it at its next step and its pages return); a full queue is a
429 at once; SIGINT / SIGTERM stop new requests, let live ones run for --shutdown-grace seconds, abort the
rest, and exit with status 0.
"""
from __future__ import annotations

import asyncio
import json
import math
import signal
import socket
import time
import uuid
from typing import Optional

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from .generate import template_ids
from .service import Draining, Engine, Handle, QueueFull

# fields that change nothing at this value, and are refused at any other (never silently ignored)
NEUTRAL = {"n": "1", "presence_penalty": "0", "frequency_penalty": "0", "logit_bias": "null or {}",
           "logprobs": "null or false", "echo": "false", "best_of": "1", "suffix": "null or \"\"",
           "top_logprobs": "null or 0"}
# OpenAI fields this server does not implement: named in the 400 as such, not as unknown
UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "response_format", "parallel_tool_calls",
               "audio", "modalities", "prediction", "reasoning_effort", "service_tier", "store", "metadata",
               "web_search_options", "verbosity", "min_p", "repetition_penalty")
COMMON = ("model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream", "stream_options", "user",
          "ignore_eos", "return_token_ids", "d3", "n", "presence_penalty", "frequency_penalty", "logit_bias",
          "logprobs")
FIELDS = {"completions": COMMON + ("prompt", "echo", "best_of", "suffix"),
          "chat": COMMON + ("messages", "max_completion_tokens", "top_logprobs")}
GREEDY = {"temperature": 0.0, "top_p": 1.0, "top_k": 0}     # the Server's own sampling (serve() sets no other)
COMPLETIONS_DEFAULT_MAX_TOKENS = 16     # OpenAI's default for /v1/completions; chat: the room left
MAX_STOPS = 16


class ApiError(Exception):
    """An error answered as OpenAI's {"error": {...}} with this HTTP status."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


# --------------------------------------------------------------------------- request fields

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _bad(name: str, want: str, v) -> ApiError:
    return ApiError(400, f"'{name}' must be {want}, got {json.dumps(v)}", name)


def _neutral(name: str, v) -> bool:
    """Whether v is the value of field `name` that turns it off."""
    if v is None:
        return True
    if name in ("n", "best_of"):
        return _is_int(v) and v == 1
    if name in ("presence_penalty", "frequency_penalty"):
        return _is_num(v) and v == 0
    if name == "logit_bias":
        return v == {}
    if name in ("logprobs", "echo"):
        return v is False
    if name == "suffix":
        return v == ""
    if name == "top_logprobs":
        return _is_int(v) and v == 0
    raise KeyError(name)


def parse_common(body: dict, kind: str, ctx: "Context") -> dict:
    """The checked fields every endpoint shares (ApiError 400 naming the field on anything else)."""
    allowed = FIELDS[kind]
    for name in body:
        if name in UNSUPPORTED:
            raise ApiError(400, f"'{name}' is not supported by this server", name)
        if name not in allowed:
            raise ApiError(400, f"unknown field '{name}'", name)
    for name in NEUTRAL:
        if name in body and name in allowed and not _neutral(name, body[name]):
            raise ApiError(400, f"'{name}'={json.dumps(body[name])} is not supported: this server takes only "
                                f"{NEUTRAL[name]}", name)
    if "model" not in body:
        raise ApiError(400, "'model' is required", "model")
    if not isinstance(body["model"], str):
        raise _bad("model", "a string", body["model"])
    if body["model"] != ctx.model_id:
        raise ApiError(404, f"the model '{body['model']}' does not exist; this server serves '{ctx.model_id}'",
                       "model", "model_not_found")
    g = {k: v for k, v in body.items() if v is not None}
    out = {}
    for name in ("max_tokens", "max_completion_tokens"):
        if name in g and not (_is_int(g[name]) and g[name] >= 1):
            raise _bad(name, "an integer >= 1", g[name])
    if "max_tokens" in g and "max_completion_tokens" in g and g["max_tokens"] != g["max_completion_tokens"]:
        raise ApiError(400, "'max_tokens' and 'max_completion_tokens' differ; give one", "max_completion_tokens")
    out["max_tokens"] = g.get("max_tokens", g.get("max_completion_tokens"))
    t = g.get("temperature", ctx.temperature)
    if not (_is_num(t) and 0 <= t <= 2):
        raise _bad("temperature", "a number in [0, 2]", t)
    p = g.get("top_p", ctx.top_p)
    if not (_is_num(p) and 0 < p <= 1):
        raise _bad("top_p", "a number in (0, 1]", p)
    k = g.get("top_k", ctx.top_k)
    if not (_is_int(k) and k >= -1):
        raise _bad("top_k", "an integer >= 0 (0 or -1: off)", k)
    out["sampling"] = {"temperature": float(t), "top_p": float(p), "top_k": max(0, k)}
    if "seed" in g:
        if not (_is_int(g["seed"]) and 0 <= g["seed"] < 2 ** 63):
            raise _bad("seed", "an integer in [0, 2^63)", g["seed"])
        out["sampling"]["seed"] = g["seed"]
    stop = g.get("stop", [])
    stop = [stop] if isinstance(stop, str) else stop
    if not (isinstance(stop, list) and len(stop) <= MAX_STOPS and all(isinstance(s, str) and s for s in stop)):
        raise _bad("stop", f"a non-empty string or a list of at most {MAX_STOPS} of them", g["stop"])
    out["stop"] = stop
    for name in ("stream", "ignore_eos", "return_token_ids"):
        if name in g and not isinstance(g[name], bool):
            raise _bad(name, "true or false", g[name])
        out[name] = g.get(name, False)
    out["include_usage"] = False
    if "stream_options" in g:
        so = g["stream_options"]
        if not isinstance(so, dict):
            raise _bad("stream_options", "an object", so)
        if not out["stream"]:
            raise ApiError(400, "'stream_options' needs \"stream\": true", "stream_options")
        for key, v in so.items():
            if key != "include_usage":
                raise ApiError(400, f"unknown field 'stream_options.{key}'", f"stream_options.{key}")
            if not isinstance(v, bool):
                raise _bad("stream_options.include_usage", "true or false", v)
        out["include_usage"] = so.get("include_usage", False)
    if "user" in g and not isinstance(g["user"], str):
        raise _bad("user", "a string", g["user"])
    out["alpha"] = None
    if "d3" in g:
        d3 = g["d3"]
        if not isinstance(d3, dict):
            raise _bad("d3", "an object such as {\"alpha\": 0.998}", d3)
        for key, v in d3.items():
            if key in ("lossless", "speculative"):
                raise ApiError(400, f"'d3.{key}' is not supported: the Server does not run lossless D3 (its "
                                    "verify pass is a separate code path; docs/serving.md)", f"d3.{key}")
            if key != "alpha":
                raise ApiError(400, f"unknown field 'd3.{key}' (the server takes d3.alpha)", f"d3.{key}")
            if not (_is_num(v) and 0 < v <= 1):
                raise _bad("d3.alpha", "a number in (0, 1]", v)
            out["alpha"] = float(v)
    return out


def parse_prompt(v, ctx: "Context") -> list:
    """A completion's prompt (a string, token ids, or a list holding one of them) as token ids."""
    if isinstance(v, list) and len(v) == 1 and isinstance(v[0], (str, list)):
        v = v[0]
    if isinstance(v, str):
        if not v:
            raise ApiError(400, "'prompt' is empty", "prompt")
        if ctx.tokenizer is None:
            raise ApiError(400, "this model has no tokenizer: give 'prompt' as a list of token ids", "prompt")
        return list(ctx.tokenizer(v)["input_ids"])
    if isinstance(v, list) and v and all(_is_int(t) for t in v):
        bad = [t for t in v if not 0 <= t < ctx.vocab]
        if bad:
            raise ApiError(400, f"'prompt' has token ids outside [0, {ctx.vocab}): {bad[:5]}", "prompt")
        return list(v)
    if isinstance(v, list) and len(v) > 1 and all(isinstance(x, (str, list)) for x in v):
        raise ApiError(400, f"'prompt' holds {len(v)} prompts: this server takes one prompt per request", "prompt")
    raise _bad("prompt", "a non-empty string or a non-empty list of token ids", v)


def parse_messages(v, ctx: "Context") -> list:
    """A chat's messages as the token ids of the chat template with the generation prompt."""
    if not isinstance(v, list) or not v:
        raise _bad("messages", "a non-empty list of {\"role\", \"content\"} objects", v)
    if ctx.tokenizer is None or not getattr(ctx.tokenizer, "chat_template", None):
        raise ApiError(400, "this model has no chat template: use /v1/completions", "messages")
    msgs = []
    for i, m in enumerate(v):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(where, "an object with \"role\" and \"content\"", m)
        for key in m:
            if key not in ("role", "content"):
                raise ApiError(400, f"'{where}.{key}' is not supported by this server", f"{where}.{key}")
        if m.get("role") not in ("system", "user", "assistant"):
            raise _bad(f"{where}.role", "\"system\", \"user\" or \"assistant\"", m.get("role"))
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
                        and set(part) == {"type", "text"}):
                    raise _bad(f"{where}.content[{j}]", "a {\"type\": \"text\", \"text\": ...} part", part)
                parts.append(part["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise _bad(f"{where}.content", "a string or a list of text parts", content)
        msgs.append({"role": m["role"], "content": content})
    try:
        return template_ids(ctx.tokenizer, msgs)
    except Exception as e:   # the template's own rules (say, roles that must alternate)
        raise ApiError(400, f"the chat template refused the messages: {e}", "messages") from None


# --------------------------------------------------------------------------- tokens to text

class TextStream:
    """Token ids in, text out, as it becomes final: a character whose bytes are not all there yet is held,
    and so is a tail of the text that may begin a stop string. A stop string ends the text before it
    (stopped = True; used: the tokens consumed up to the one that completed it).

    Decoding keeps a window (vLLM's prefix / read offsets): the text of ids[prefix:] minus that of
    ids[prefix:read] is what the newest tokens add, so a step costs two short decodes, not the whole text."""

    def __init__(self, tokenizer, stops: list):
        self.tok, self.stops = tokenizer, stops
        self.ids, self.text, self.sent, self.used = [], "", 0, 0
        self.prefix = self.read = 0
        self.stopped = False

    def _decode(self, ids: list) -> str:
        return self.tok.decode(ids, skip_special_tokens=True) if self.tok is not None else ""

    def _advance(self, final: bool) -> None:
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self.text += after[len(before):]
            self.prefix, self.read = self.read, len(self.ids)

    def _grow(self, final: bool) -> None:
        """Decode what the newest tokens add, and end the text at a stop string it completes."""
        start = len(self.text)
        self._advance(final)
        if self.stops and len(self.text) > start:
            lo = max(0, start - max(len(s) for s in self.stops) + 1)
            hits = [i for i in (self.text.find(s, lo) for s in self.stops) if i >= 0]
            if hits:
                self.text, self.stopped = self.text[:min(hits)], True

    def push(self, toks: list, final: bool = False) -> str:
        """Add tokens (final: the request has ended); returns the new text that is safe to send."""
        for t in toks:
            if self.stopped:
                break
            self.ids.append(t)
            self.used += 1
            self._grow(False)
        if final and not self.stopped and self.read < len(self.ids):
            self._grow(True)      # the last bytes, complete or not
        end = len(self.text) if (final or self.stopped) else len(self.text) - self._held()
        out = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out

    def _held(self) -> int:
        """Characters at the end of the text that may begin a stop string."""
        n = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text)), n, -1):
                if self.text.endswith(s[:k]):
                    n = k
                    break
        return n


# --------------------------------------------------------------------------- the app

class Context:
    """What the handlers share: the engine, the tokenizer, the served name and the defaults."""

    def __init__(self, engine: Engine, model, model_id: str, schedule, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0):
        self.engine, self.tokenizer, self.model_id, self.schedule = engine, model.tokenizer, model_id, schedule
        self.vocab, self.num_layers = model.config.vocab, model.config.num_layers
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.created = int(time.time())


async def _json_body(request: Request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def _prepare(body: dict, kind: str, ctx: Context) -> dict:
    """A request's checked fields, its prompt ids and its max_tokens (checked against the context)."""
    req = parse_common(body, kind, ctx)
    if kind == "completions":
        if "prompt" not in body:
            raise ApiError(400, "'prompt' is required", "prompt")
        req["ids"], where = parse_prompt(body["prompt"], ctx), "prompt"
    else:
        if "messages" not in body:
            raise ApiError(400, "'messages' is required", "messages")
        req["ids"], where = parse_messages(body["messages"], ctx), "messages"
    n, S = len(req["ids"]), ctx.engine.server.cache.max_seq_len
    if n >= S:
        raise ApiError(400, f"the prompt has {n} tokens; this server holds at most {S} positions per request "
                            "(prompt + max_tokens)", where)
    if req["max_tokens"] is None:
        req["max_tokens"] = COMPLETIONS_DEFAULT_MAX_TOKENS if kind == "completions" else S - n
    try:
        ctx.engine.check_fits(n, req["max_tokens"])
    except ValueError as e:
        raise ApiError(400, str(e), "max_tokens") from None
    return req


class _Run:
    """One request in flight: its handle, the queue its tokens arrive in (from the engine's thread) and its
    text."""

    def __init__(self, ctx: Context, req: dict, kind: str):
        self.ctx, self.req, self.kind = ctx, req, kind
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.text = TextStream(ctx.tokenizer, req["stop"])
        self.id = ("cmpl-" if kind == "completions" else "chatcmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.handle: Optional[Handle] = None
        self.finish: Optional[str] = None

    def _sink(self, h: Handle, toks: list, finished: Optional[str]) -> None:     # the engine's thread
        self.loop.call_soon_threadsafe(self.events.put_nowait, (toks, finished))

    def submit(self) -> None:
        r = self.req
        opts = dict(ignore_eos=r["ignore_eos"], alpha=r["alpha"])
        if r["sampling"] != GREEDY:     # greedy rows are sampled together, in the step's one batched call
            opts.update(r["sampling"])
        try:
            self.handle = self.ctx.engine.submit(r["ids"], r["max_tokens"], self._sink, **opts)
        except QueueFull as e:
            raise ApiError(429, f"the server is busy: {e}", None, "rate_limit_error") from None
        except Draining as e:
            raise ApiError(503, str(e), None, "server_error") from None
        except ValueError as e:
            raise ApiError(400, str(e), "max_tokens") from None

    async def next(self) -> tuple:
        """The next piece of text and whether the request is over (self.finish is then set: "stop",
        "length", or "abort" / "error" for a request the server ended)."""
        toks, finished = await self.events.get()
        delta = self.text.push(toks, final=finished is not None)
        if self.text.stopped:
            self.ctx.engine.cancel(self.handle)     # the tokens after the stop string are not wanted
            self.finish = "stop"
        elif finished is not None:
            self.finish = {"eos": "stop", "length": "length", "cancelled": "abort"}.get(finished, finished)
        return delta, self.finish is not None

    def cancel(self) -> None:
        if self.handle is not None and self.finish is None:
            self.ctx.engine.cancel(self.handle)

    # the response's pieces
    def token_ids(self) -> list:
        return self.handle.tokens[: self.text.used]

    def usage(self) -> dict:
        n, m = len(self.req["ids"]), self.text.used
        return {"prompt_tokens": n, "completion_tokens": m, "total_tokens": n + m}

    def d3(self) -> dict:
        layers = self.handle.layers[: self.text.used]
        return {"alpha": self.req["alpha"] if self.req["alpha"] is not None else self.ctx.schedule.alpha,
                "num_layers": self.ctx.num_layers,
                "layers_per_token": sum(layers) / len(layers) if layers else None}

    def error(self) -> ApiError:
        if self.finish == "abort":
            return ApiError(503, "the request was aborted: the server is shutting down", None, "server_error")
        return ApiError(500, f"the request failed: {self.handle.error}", None, "server_error")

    def chunk(self, text: Optional[str], finish: Optional[str] = None, first: bool = False) -> dict:
        if self.kind == "completions":
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            obj = "text_completion"
        else:
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            obj = "chat.completion.chunk"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.ctx.model_id,
                "choices": [choice]}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body has been read, so only a disconnect can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _whole(run: _Run, request: Request):
    """A non-streamed response: collect every token; a client that leaves cancels the request."""
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        while True:
            nxt = asyncio.ensure_future(run.next())
            done, _ = await asyncio.wait({nxt, gone}, return_when=asyncio.FIRST_COMPLETED)
            if nxt not in done:
                nxt.cancel()
                run.cancel()
                return JSONResponse({}, status_code=499)        # nobody reads it
            _, over = nxt.result()
            if over:
                break
    finally:
        gone.cancel()
    if run.finish in ("abort", "error"):
        return run.error().response()
    text = run.text.text
    if run.kind == "completions":
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": run.finish}
        obj = "text_completion"
    else:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": run.finish}
        obj = "chat.completion"
    if run.req["return_token_ids"]:
        choice["token_ids"] = run.token_ids()
    return JSONResponse({"id": run.id, "object": obj, "created": run.created, "model": run.ctx.model_id,
                         "choices": [choice], "usage": run.usage(), "d3": run.d3()})


async def _stream(run: _Run):
    """A streamed response: a chunk per piece of text, the finish reason (with the d3 figures), usage if
    asked, [DONE]. If the client goes away Starlette cancels this generator, and the request is cancelled."""
    sent = 0
    try:
        if run.kind == "chat":
            yield _sse(run.chunk(None, first=True))
        while True:
            delta, over = await run.next()
            failed = run.finish in ("abort", "error")
            if delta or (over and not failed):
                c = run.chunk(delta, run.finish if over and not failed else None)
                if run.req["return_token_ids"]:
                    ids = run.token_ids()
                    c["choices"][0]["token_ids"], sent = ids[sent:], len(ids)
                if over:
                    c["d3"] = run.d3()
                yield _sse(c)
            if over:
                break
        if run.finish in ("abort", "error"):
            yield _sse(run.error().body())     # the openai client raises it as an APIError
            return
        if run.req["include_usage"]:
            yield _sse({**run.chunk(None), "choices": [], "usage": run.usage()})
        yield "data: [DONE]\n\n"
    finally:
        run.cancel()


def build_app(ctx: Context) -> Starlette:
    """The Starlette app over a started engine."""

    async def run(request: Request, kind: str):
        try:
            body = await _json_body(request)
            req = _prepare(body, kind, ctx)
            r = _Run(ctx, req, kind)
            r.submit()
        except ApiError as e:
            return e.response()
        if req["stream"]:
            return StreamingResponse(_stream(r), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await _whole(r, request)

    async def completions(request: Request):
        return await run(request, "completions")

    async def chat(request: Request):
        return await run(request, "chat")

    def card() -> dict:
        return {"id": ctx.model_id, "object": "model", "created": ctx.created, "owned_by": "d3kernels",
                "max_model_len": ctx.engine.server.cache.max_seq_len}

    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [card()]})

    async def model(request: Request):
        name = request.path_params["name"]
        if name != ctx.model_id:
            return ApiError(404, f"the model '{name}' does not exist; this server serves '{ctx.model_id}'",
                            "model", "model_not_found").response()
        return JSONResponse(card())

    async def health(request: Request):
        s = ctx.engine.stats()
        return JSONResponse({"status": "draining" if s["draining"] else "ok", "model": ctx.model_id, **s},
                            status_code=503 if s["draining"] else 200)

    async def not_found(request: Request, exc):
        return ApiError(getattr(exc, "status_code", 404), f"{request.method} {request.url.path}: "
                        f"{getattr(exc, 'detail', 'not found')}", None, "not_found").response()

    routes = [Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/chat/completions", chat, methods=["POST"]),
              Route("/v1/models", models, methods=["GET"]),
              Route("/v1/models/{name:path}", model, methods=["GET"]),
              Route("/health", health, methods=["GET"])]
    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})


# --------------------------------------------------------------------------- the process

def default_model_id(model) -> str:
    """The id a model is served under by default: its file or directory name (".gguf" dropped), else its
    config name."""
    import os
    src = model.source or ""
    if os.path.exists(src):
        name = os.path.basename(os.path.normpath(src))
        return name[:-5] if name.endswith(".gguf") else name
    return model.config.name

def serve(model, schedule, host: str = "127.0.0.1", port: int = 8000, model_id: Optional[str] = None,
          max_batch: int = 8, max_seq_len: int = 2048, page_size: int = 16, num_pages: Optional[int] = None,
          max_queue: int = 64, backend: str = "auto", fill: str = "mask", temperature: float = 0.0,
          top_p: float = 1.0, top_k: int = 0, shutdown_grace_s: float = 10.0, log=None,
          log_level: str = "warning", prefill_chunk: Optional[int] = None) -> int:
    """Serve `model` under `schedule` until SIGINT / SIGTERM; returns 0 after a clean shutdown.

    The Server gets max_batch slots of max_seq_len positions on a paged cache (page_size; num_pages
    default: every slot can reach max_seq_len); at most max_queue requests wait for a slot. port 0 picks a
    free port; the log line "serving ... on http://HOST:PORT" names it. temperature / top_p / top_k: the
    defaults of requests that do not set them. prefill_chunk: prompt tokens prefilled per step (Server; None:
    a prompt whole when it is admitted). On a signal: no new requests (503), the queued ones get 503,
    live ones run for up to shutdown_grace_s seconds and are then aborted."""
    import uvicorn

    from .serving import Server

    log = log or (lambda m: None)
    server = Server(model, schedule, max_batch=max_batch, max_seq_len=max_seq_len, backend=backend, fill=fill,
                    page_size=page_size, num_pages=num_pages, log=log, prefill_chunk=prefill_chunk)
    engine = Engine(server, max_queue, log=log).start()
    model_id = model_id or default_model_id(model)
    app = build_app(Context(engine, model, model_id, schedule, temperature, top_p, top_k))

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound = sock.getsockname()[1]

    class Uvicorn(uvicorn.Server):
        def handle_exit(self, sig, frame):      # before uvicorn waits for the open responses to end
            if not engine.draining:
                log(f"signal {signal.Signals(sig).name}: no new requests; the live ones get {shutdown_grace_s:g} s")
            engine.drain(shutdown_grace_s)
            super().handle_exit(sig, frame)

    # uvicorn raises the signal again after its shutdown, with the handler it found: make that one a no-op,
    # so the process exits with status 0 rather than dying of the signal
    caught = []
    previous = {s: signal.signal(s, lambda sig, frame: caught.append(sig)) for s in (signal.SIGINT, signal.SIGTERM)}
    config = uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="off",
                            timeout_graceful_shutdown=int(shutdown_grace_s) + 5)
    log(f"serving {model_id} on http://{host}:{bound} ({server.core.backend} backend, {max_batch} slots, "
        f"{server.cache.num_pages} pages of {page_size}, queue {max_queue}; {schedule})")
    try:
        Uvicorn(config).run(sockets=[sock])
    finally:
        ended = engine.stop()
        for s, h in previous.items():
            signal.signal(s, h)
        sock.close()
    s = engine.stats()
    log(f"stopped: {s['completed']} requests completed, {s['cancelled']} cancelled, {s['aborted']} aborted, "
        f"{s['rejected_full']} refused with a full queue{'' if ended else '; the engine loop did not end'}")
    return 0 if ended else 1
