"""`d3kernels serve` as a user runs it: real server processes on 127.0.0.1, driven by the official openai
package, on the embedded model and on a tiny random model (with the embedded tokenizer).

Every output is compared with the offline Decoder on the same prompt, token for token (the server's extra
field return_token_ids), and its text with the tokenizer's decoding of those tokens. Under load (32
concurrent streams, 200 requests) nothing may be lost or differ, and no page may stay taken. Faults
(disconnects, malformed JSON, wrong types, unknown fields, over-long prompts, a full queue, shutdown
signals) must each get their answer while the server keeps answering correctly and leaks no page.

Every wait is bounded (WAIT_S); server processes are killed in teardown.
"""
from __future__ import annotations

import asyncio
import http.client
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import openai
import pytest
import torch

from d3kernels import D3Schedule, Decoder, cpu, load_model
from d3kernels.generate import template_ids
from d3kernels.model import Model, random_model, save_hf
from d3kernels.openai_api import TextStream

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WAIT_S = 180          # the longest any one wait may take (a server's start on a busy 2-core machine)
SMOL = dict(alpha=0.98, start=0.5, tail=1, S=512)       # D3 visibly at work within 24 tokens
TINY = dict(alpha=0.8, start=0.25, tail=1, S=256, L=6)
LONG_S = 4096         # the tiny model's servers whose requests must still run while the test acts


class ServerProcess:
    """`python -m d3kernels serve --port 0 ...` in its own process; its log goes to a file."""

    def __init__(self, args: list, log_path: str):
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "d3kernels", "serve", "--host", "127.0.0.1",
                                      "--port", "0", "--threads", "1", *args], stdout=self.log, stderr=subprocess.STDOUT,
                                     cwd=ROOT, start_new_session=True)
        self.port = None

    def wait_ready(self) -> "ServerProcess":
        t0 = time.monotonic()
        while time.monotonic() - t0 < WAIT_S:
            m = re.search(r"serving (\S+) on http://127\.0\.0\.1:(\d+)", open(self.log_path).read())
            if m:
                self.model_id, self.port = m.group(1), int(m.group(2))
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"the server did not start:\n{open(self.log_path).read()[-3000:]}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=WAIT_S, **kw)

    def aclient(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=WAIT_S)

    def raw(self, method: str, path: str, body=None, timeout: float = WAIT_S) -> tuple:
        """(status, parsed JSON body) of one plain HTTP request; body: bytes, or an object sent as JSON."""
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
            c.request(method, path, body=data, headers={"Content-Type": "application/json"})
            r = c.getresponse()
            return r.status, json.loads(r.read() or b"null")
        finally:
            c.close()

    def health(self) -> dict:
        return self.raw("GET", "/health")[1]

    def wait_idle(self) -> dict:
        """/health once no request is queued or live (bounded)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < WAIT_S:
            h = self.health()
            if h["live"] == 0 and h["queued"] == 0:
                return h
            time.sleep(0.05)
        raise AssertionError(f"requests still in flight after {WAIT_S} s: {self.health()}")

    def stop(self, sig=signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(WAIT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


def assert_no_leak(h: dict) -> None:
    assert h["live"] == 0 and h["queued"] == 0, h
    assert h["free_pages"] == h["num_pages"] and h["promised_pages"] == 0, f"pages leaked: {h}"


# --------------------------------------------------------------------------- models and their offline outputs

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The servers run with --threads 1 and so do the offline decoders here: the same arithmetic on both sides,
    and no OpenMP team spinning against the other processes on a small machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    if cpu.C is not None:
        cpu.set_num_threads(1)
    yield
    torch.set_num_threads(before)
    if cpu.C is not None:
        cpu.set_num_threads(before)


@pytest.fixture(scope="module")
def smol_server(tmp_path_factory):
    s = ServerProcess(["--alpha", str(SMOL["alpha"]), "--start", str(SMOL["start"]), "--tail", str(SMOL["tail"]),
                       "--max-seq-len", str(SMOL["S"]), "--max-batch", "4"],
                      str(tmp_path_factory.mktemp("smol") / "server.log"))
    yield s      # loads while the test process loads its own copy
    s.stop()


@pytest.fixture(scope="module")
def smol(smol_server):
    model = load_model()
    smol_server.wait_ready()
    return smol_server, model


@pytest.fixture(scope="module")
def tiny_dir(smol, tmp_path_factory):
    """A random 6-layer model with the embedded tokenizer (so chat templates and text work), as a Hugging
    Face directory."""
    _, model = smol
    r = random_model(TINY["L"], 64, 4, 2, 16, 128, model.config.vocab, seed=5)
    path = str(tmp_path_factory.mktemp("tiny") / "tiny-random")
    save_hf(Model(r.config, r.weights, model.tokenizer, source="random"), path)
    return path


TINY_ARGS = ["--alpha", str(TINY["alpha"]), "--start", str(TINY["start"]), "--tail", str(TINY["tail"]),
             "--max-seq-len", str(TINY["S"])]


@pytest.fixture(scope="module")
def tiny(tiny_dir, tmp_path_factory):
    # a pool of 64 pages of 16 holds 4 requests at full length for 8 slots: admission waits for pages
    s = ServerProcess(["--model", tiny_dir, *TINY_ARGS, "--max-batch", "8", "--max-queue", "64",
                       "--num-pages", "64"], str(tmp_path_factory.mktemp("tiny-server") / "server.log"))
    try:
        model = load_model(tiny_dir)
        yield s.wait_ready(), model
    finally:
        s.stop()


class Offline:
    """The offline Decoder's greedy (or seeded) tokens for a prompt, cached; eos ends them as the server's."""

    def __init__(self, model, alpha, start, tail, S, **_):
        self.model, self.S = model, S
        self.sched = lambda a: D3Schedule(model.config.num_layers, alpha=a, start=start, tail=tail)
        self.alpha = alpha
        self.cache = {}

    def __call__(self, ids, n, alpha=None, **sampling) -> tuple:
        """(tokens, mean layers per token) of the first n tokens."""
        key = (tuple(ids), n, alpha, tuple(sorted(sampling.items())))
        if key not in self.cache:
            dec = Decoder(self.model, self.sched(self.alpha if alpha is None else alpha), max_batch=1,
                          max_seq_len=self.S)
            g = dec.generate([ids], max_new_tokens=n, **sampling)
            self.cache[key] = ([t for t in g.tokens[0].tolist() if t >= 0], g.mean_layers)
        return self.cache[key]


def extra(obj, name):
    """An extra field of an openai response object (the server's token_ids, d3)."""
    return (obj.model_extra or {}).get(name)


# --------------------------------------------------------------------------- the embedded model

def test_models_health_and_unknown_routes(smol):
    s, model = smol
    c = s.client()
    assert [m.id for m in c.models.list().data] == [s.model_id]
    assert c.models.retrieve(s.model_id).id == s.model_id
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("no-such-model")
    h = s.health()
    assert h["status"] == "ok" and h["slots"] == 4 and h["num_pages"] == 4 * SMOL["S"] // 16
    assert_no_leak(h)
    assert s.raw("GET", "/v1/nothing")[0] == 404
    assert s.raw("GET", "/v1/completions")[0] == 405


@pytest.mark.parametrize("stream", [False, True])
def test_completion_equals_the_offline_decoder(smol, stream):
    s, model = smol
    off = Offline(model, **SMOL)
    prompt = "The capital of France is"
    ids = model.tokenizer(prompt)["input_ids"]
    want, layers = off(ids, 24)
    c = s.client()
    kw = dict(model=s.model_id, prompt=prompt, max_tokens=24, temperature=0,
              extra_body={"return_token_ids": True})
    if stream:
        text, toks, last = "", [], None
        for ch in c.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
            if ch.choices:
                text += ch.choices[0].text
                toks += extra(ch.choices[0], "token_ids") or []
                if ch.choices[0].finish_reason is not None:
                    last = ch
            else:
                usage = ch.usage
        finish, d3 = last.choices[0].finish_reason, extra(last, "d3")
    else:
        r = c.completions.create(**kw)
        text, toks, usage = r.choices[0].text, extra(r.choices[0], "token_ids"), r.usage
        finish, d3 = r.choices[0].finish_reason, extra(r, "d3")
    assert toks == want
    assert text == model.tokenizer.decode(want, skip_special_tokens=True)
    assert finish == ("stop" if want[-1] in model.config.eos_token_ids else "length")
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(ids), len(want))
    assert d3["alpha"] == SMOL["alpha"] and d3["layers_per_token"] == pytest.approx(layers)
    assert d3["layers_per_token"] < model.config.num_layers        # D3 skipped layers
    assert_no_leak(s.health())


@pytest.mark.parametrize("stream", [False, True])
def test_chat_equals_the_offline_decoder(smol, stream):
    s, model = smol
    off = Offline(model, **SMOL)
    messages = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Name three rivers."}]
    want, _ = off(template_ids(model.tokenizer, messages), 32)
    c = s.client()
    kw = dict(model=s.model_id, messages=messages, max_tokens=32, temperature=0, extra_body={"return_token_ids": True})
    if stream:
        text, toks, roles = "", [], []
        for ch in c.chat.completions.create(stream=True, **kw):
            d = ch.choices[0].delta
            roles += [d.role] if d.role else []
            text += d.content or ""
            toks += extra(ch.choices[0], "token_ids") or []
        assert roles == ["assistant"]
    else:
        r = c.chat.completions.create(**kw)
        assert r.choices[0].message.role == "assistant"
        text, toks = r.choices[0].message.content, extra(r.choices[0], "token_ids")
    assert toks == want
    assert text == model.tokenizer.decode(want, skip_special_tokens=True)


def test_sampling_seed_alpha_and_stop_strings(smol):
    s, model = smol
    off = Offline(model, **SMOL)
    c = s.client()
    prompt = "Once upon a time"
    ids = model.tokenizer(prompt)["input_ids"]
    kw = dict(model=s.model_id, prompt=prompt, max_tokens=20, extra_body={"return_token_ids": True})
    # a seeded request draws from its own generator: the offline Decoder's tokens with that seed
    sampled = dict(temperature=0.8, top_p=0.9, seed=11)
    want, _ = off(ids, 20, **sampled)
    got = [extra(c.completions.create(**sampled, **kw).choices[0], "token_ids") for _ in range(2)]
    assert got[0] == want and got[1] == want
    assert want != off(ids, 20)[0], "the sampled text should differ from the greedy one"
    # per-request depth: full depth (alpha 1) and a steeper decay than the server's
    for alpha in (1.0, 0.9):
        r = c.completions.create(temperature=0, **{**kw, "extra_body": {"return_token_ids": True,
                                                                        "d3": {"alpha": alpha}}})
        want, layers = off(ids, 20, alpha=alpha)
        assert extra(r.choices[0], "token_ids") == want
        d3 = extra(r, "d3")
        assert d3["alpha"] == alpha and d3["layers_per_token"] == pytest.approx(layers)
    assert extra(r, "d3")["layers_per_token"] < off(ids, 20)[1] < model.config.num_layers
    # stop strings: the text ends before the first one, in one response and streamed
    full = model.tokenizer.decode(off(ids, 20)[0], skip_special_tokens=True)
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip() and full.find(stop) > 0
    r = c.completions.create(temperature=0, stop=[stop, "\u2603never"], **kw)
    assert (r.choices[0].text, r.choices[0].finish_reason) == (full[: full.find(stop)], "stop")
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(temperature=0, stop=stop, stream=True, **kw))
    assert streamed == full[: full.find(stop)]
    assert_no_leak(s.wait_idle())


def test_text_stream_holds_back_partial_characters_and_stop_strings(smol):
    _, model = smol
    tok = model.tokenizer
    ids = tok("Caf\u00e9 \u2603 na\u00efve: the end. Done!")["input_ids"]
    full = tok.decode(ids, skip_special_tokens=True)
    t = TextStream(tok, [])
    assert "".join(t.push([i]) for i in ids) + t.push([], final=True) == full
    for stop in ("end", "d. D", "!"):
        want = full[: full.find(stop)]
        t, sent = TextStream(tok, [stop, "zzz"]), ""
        for i in ids:
            sent += t.push([i])
            assert want.startswith(sent), (stop, sent)      # nothing past the stop is ever sent
        sent += t.push([], final=True)
        assert sent == want and t.stopped
        assert t.used == len(tok(want + stop)["input_ids"])  # it stopped at the token that completed the stop


# --------------------------------------------------------------------------- the tiny model: load and faults

def _prompts(model, k: int, seed: int = 0) -> list:
    g = random.Random(seed)
    return [[g.randrange(model.config.vocab) for _ in range(g.randrange(3, 40))] for _ in range(k)]


def test_load_32_streams_200_requests(tiny):
    s, model = tiny
    off = Offline(model, **TINY)
    prompts = _prompts(model, 25)
    chats = [[{"role": "user", "content": f"Question {k}: what comes after {k}?"}] for k in range(5)]
    g = random.Random(1)
    jobs = [(k, g.choice([4, 8, 12, 24])) for k in range(200)]
    before = s.health()
    in_flight, peak = [0], [0]

    async def one(client, sem, k, n):
        async with sem:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
            try:
                toks = []
                if k % 4 == 3:
                    stream = await client.chat.completions.create(
                        model=s.model_id, messages=chats[k % 5], max_tokens=n, temperature=0, stream=True,
                        extra_body={"return_token_ids": True})
                else:
                    stream = await client.completions.create(
                        model=s.model_id, prompt=prompts[k % 25], max_tokens=n, temperature=0, stream=True,
                        extra_body={"return_token_ids": True})
                async for ch in stream:
                    if ch.choices:
                        toks += extra(ch.choices[0], "token_ids") or []
                return toks
            finally:
                in_flight[0] -= 1

    async def main():
        client, sem = s.aclient(), asyncio.Semaphore(32)
        try:
            return await asyncio.wait_for(asyncio.gather(*(one(client, sem, k, n) for k, n in jobs)), WAIT_S)
        finally:
            await client.close()

    got = asyncio.run(main())
    assert peak[0] == 32
    for (k, n), toks in zip(jobs, got):
        ids = template_ids(model.tokenizer, chats[k % 5]) if k % 4 == 3 else prompts[k % 25]
        assert toks == off(ids, 24)[0][:n], f"request {k} ({n} tokens) differs from the offline decoder"
    h = s.wait_idle()
    assert_no_leak(h)
    assert h["completed"] - before["completed"] == 200 and h["errors"] == before["errors"]
    assert h["peak_live"] == 8 and h["peak_queued"] > 0, h     # every slot busy, requests waited


def _good_request(s, off, model) -> None:
    """One ordinary request answers right, and no page stays taken."""
    ids = _prompts(model, 1, seed=9)[0]
    r = s.client().completions.create(model=s.model_id, prompt=ids, max_tokens=8, temperature=0,
                                      extra_body={"return_token_ids": True})
    assert extra(r.choices[0], "token_ids") == off(ids, 8)[0]
    assert_no_leak(s.wait_idle())


BAD = [  # (body, the field the 400 must name, or None for a body that is not a request at all)
    (b"{\"model\": ", None), (b"[1, 2]", None), (b"\xff\xfe", None),
    ({"prompt": "hi", "max_tokens": "ten"}, "max_tokens"), ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hi", "temperature": "hot"}, "temperature"), ({"prompt": "hi", "top_p": 0}, "top_p"),
    ({"prompt": "hi", "stream": "yes"}, "stream"), ({"prompt": "hi", "seed": 1.5}, "seed"),
    ({"prompt": "hi", "stop": [""]}, "stop"), ({"prompt": {"text": "hi"}}, "prompt"), ({"prompt": []}, "prompt"),
    ({"prompt": [1, -3]}, "prompt"), ({"prompt": ["a", "b"]}, "prompt"), ({}, "prompt"),
    ({"prompt": "hi", "colour": "red"}, "colour"), ({"prompt": "hi", "n": 2}, "n"),
    ({"prompt": "hi", "logprobs": 2}, "logprobs"), ({"prompt": "hi", "echo": True}, "echo"),
    ({"prompt": "hi", "tools": []}, "tools"), ({"prompt": "hi", "d3": {"alpha": 1.5}}, "d3.alpha"),
    ({"prompt": "hi", "d3": {"lossless": True}}, "d3.lossless"),
    ({"prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": list(range(1, TINY["S"] + 5))}, "prompt"),                       # longer than a request holds
    ({"prompt": list(range(1, 200)), "max_tokens": 100}, "max_tokens"),          # prompt + max_tokens too long
]


def test_bad_requests_get_400_naming_the_field(tiny):
    s, model = tiny
    off = Offline(model, **TINY)
    for body, field in BAD:
        if isinstance(body, dict):
            body = {"model": s.model_id, **body}
        status, err = s.raw("POST", "/v1/completions", body)
        assert status == 400, (body, status, err)
        assert err["error"]["param"] == field and err["error"]["message"], (body, err)
    for body, field in [({"messages": "hi"}, "messages"), ({"messages": [{"role": "robot", "content": "x"}]},
                                                           "messages[0].role"),
                        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
                        ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages[0].tool_calls"),
                        ({"messages": [{"role": "user", "content": "x"}], "logprobs": True}, "logprobs")]:
        status, err = s.raw("POST", "/v1/chat/completions", {"model": s.model_id, **body})
        assert status == 400 and err["error"]["param"] == field, (body, err)
    status, err = s.raw("POST", "/v1/completions", {"model": "gpt-4", "prompt": "hi"})
    assert status == 404 and err["error"]["param"] == "model"
    with pytest.raises(openai.BadRequestError, match="'n'=3"):       # and through the client
        s.client().completions.create(model=s.model_id, prompt="hi", n=3)
    _good_request(s, off, model)


def _open_stream(s, body: dict) -> http.client.HTTPConnection:
    c = http.client.HTTPConnection("127.0.0.1", s.port, timeout=WAIT_S)
    c.request("POST", "/v1/completions", body=json.dumps({"model": s.model_id, **body}).encode(),
              headers={"Content-Type": "application/json"})
    return c


def test_clients_that_disconnect_are_cancelled_and_free_their_pages(smol):
    # on the embedded model, whose 500-token requests outlast the test's hang-ups by far
    s, model = smol
    off = Offline(model, **SMOL)
    before = s.health()
    long = dict(prompt=[5, 6, 7], max_tokens=SMOL["S"] - 8, ignore_eos=True, temperature=0)
    conns = [_open_stream(s, {**long, "stream": True}) for _ in range(3)]
    for c in conns:                              # read the first chunks, then hang up mid-stream
        r = c.getresponse()
        assert r.status == 200
        assert r.readline().startswith(b"data: ")
    quiet = _open_stream(s, long)                # a non-streamed request whose client leaves
    t0 = time.monotonic()
    while s.health()["live"] < 4 and time.monotonic() - t0 < WAIT_S:
        time.sleep(0.05)
    for c in conns + [quiet]:
        c.sock.shutdown(2)
        c.close()
    h = s.wait_idle()
    assert_no_leak(h)
    assert h["cancelled"] - before["cancelled"] == 4
    assert h["tokens"] - before["tokens"] < 4 * long["max_tokens"], "the requests ran to their end"
    _good_request(s, off, model)


def _wait_for(s, pred, what: str) -> dict:
    t0 = time.monotonic()
    while time.monotonic() - t0 < WAIT_S:
        h = s.health()
        if pred(h):
            return h
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}: {s.health()}")


def test_full_queue_answers_429_at_once_and_sigint_exits_cleanly(tiny_dir, tmp_path):
    s = ServerProcess(["--model", tiny_dir, *TINY_ARGS, "--max-seq-len", str(LONG_S), "--max-batch", "1",
                       "--max-queue", "1", "--shutdown-grace", "60"], str(tmp_path / "server.log"))
    try:
        s.wait_ready()
        off = Offline(load_model(tiny_dir), **{**TINY, "S": LONG_S})
        long = dict(prompt=[5, 6, 7], max_tokens=LONG_S - 8, ignore_eos=True, stream=True)
        first = _open_stream(s, long)
        assert first.getresponse().status == 200
        _wait_for(s, lambda h: h["live"] == 1, "the first request to run")
        second = _open_stream(s, long)
        _wait_for(s, lambda h: h["queued"] == 1, "the second request to queue")
        t0 = time.monotonic()
        with pytest.raises(openai.RateLimitError, match="busy"):
            s.client().completions.create(model=s.model_id, prompt="hi", max_tokens=4)
        assert time.monotonic() - t0 < 10, "a full queue must be answered at once, not after a wait"
        assert s.health()["rejected_full"] == 1
        for c in (first, second):
            c.sock.shutdown(2)
            c.close()
        assert_no_leak(s.wait_idle())
        # SIGINT with a request in flight and a long grace: it finishes, then the process exits with 0
        ids = [9, 8, 7, 6]
        c = _open_stream(s, dict(prompt=ids, max_tokens=40, temperature=0, stream=True, return_token_ids=True))
        r = c.getresponse()
        first = r.readline()
        assert first.startswith(b"data: ")
        s.proc.send_signal(signal.SIGINT)
        body = first.decode() + r.read().decode()
        chunks = [json.loads(m) for m in re.findall(r"^data: (\{.*\})$", body, re.M)]
        toks = [t for ch in chunks for t in ch["choices"][0].get("token_ids", [])]
        assert body.rstrip().endswith("data: [DONE]")
        assert toks == off(ids, 40)[0]                 # it finished, whole
        assert s.proc.wait(WAIT_S) == 0
        assert "stopped: " in open(s.log_path).read()
    finally:
        s.stop()


def test_sigterm_aborts_what_outlives_the_grace_and_exits_cleanly(tiny_dir, tmp_path):
    s = ServerProcess(["--model", tiny_dir, *TINY_ARGS, "--max-seq-len", str(LONG_S), "--max-batch", "2",
                       "--shutdown-grace", "0.5"],
                      str(tmp_path / "server.log"))
    try:
        s.wait_ready()
        client = s.client()
        stream = client.completions.create(model=s.model_id, prompt=[1, 2, 3], max_tokens=LONG_S - 8, stream=True,
                                           extra_body={"ignore_eos": True})
        it = iter(stream)
        next(it)
        t0 = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        with pytest.raises(openai.APIError, match="shutting down"):
            for _ in it:
                pass
        assert s.proc.wait(WAIT_S) == 0
        assert time.monotonic() - t0 < 30
        log = open(s.log_path).read()
        assert "signal SIGTERM" in log and "1 aborted" in log, log[-2000:]
    finally:
        s.stop()
