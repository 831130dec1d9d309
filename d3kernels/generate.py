"""Text in, text out: the convenience layer over Decoder (generate(), and Chat for conversations)."""
from __future__ import annotations

from typing import Optional

from .decoder import Decoder
from .model import Model, load_model
from .schedule import DEFAULTS, D3Schedule

_DEFAULT_MODEL: Optional[Model] = None


def encode_prompt(model: Model, prompt: str, raw: bool = False) -> list:
    """Token ids for a prompt. A chat model's chat template is applied unless raw=True."""
    tok = model.tokenizer
    if tok is None:
        raise ValueError("this model has no tokenizer; pass token ids to Decoder.generate instead")
    if not isinstance(prompt, str) or not prompt:
        raise ValueError("prompt must be a non-empty string")
    if not raw and getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):     # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)
    return list(tok(prompt)["input_ids"])


def generate(prompt: str, model: Optional[Model] = None, alpha: float = DEFAULTS["alpha"], max_new_tokens: int = 64,
             start: float = DEFAULTS["start"], tail: int = DEFAULTS["tail"], skip_order=DEFAULTS["skip_order"],
             temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: Optional[int] = None, raw: bool = False, backend: str = "auto",
             stop=None, speculative: Optional[int] = None) -> str:
    """Generate a continuation of `prompt` with D3 and return the new text.

    model defaults to the embedded SmolLM2-135M-Instruct (loaded once). For a
    chat model the chat template is applied unless raw=True. speculative=k: lossless D3 (D3 drafts k
    tokens per round, full depth verifies; the text is full-depth decoding's).
    """
    global _DEFAULT_MODEL
    if model is None:
        if _DEFAULT_MODEL is None:
            _DEFAULT_MODEL = load_model()
        model = _DEFAULT_MODEL
    ids = encode_prompt(model, prompt, raw)
    sched = D3Schedule(model.config.num_layers, alpha=alpha, start=start, tail=tail, skip_order=skip_order)
    dec = Decoder(model, sched, max_batch=1, max_seq_len=len(ids) + max_new_tokens, backend=backend)
    g = dec.generate([ids], max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                     stop=stop, speculative=speculative)
    toks = [t for t in g.tokens[0].tolist() if t >= 0]
    return model.tokenizer.decode(toks, skip_special_tokens=True)


def template_ids(tok, messages: list) -> list:
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):        # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


class Chat:
    """A conversation with D3 that keeps its KV cache between turns.

        chat = d3kernels.Chat()                  # embedded SmolLM2-135M-Instruct, fill="mask"
        chat.send("What is the capital of France?")
        chat.send("And of Italy?")               # prefills only the new tokens, after the first turn

    Each send() applies the model's chat template to the whole conversation, keeps the part of the cache
    whose tokens it shares with that (the earlier turns, unless the tokenizer writes a reply differently
    from how it was generated: then from there on), prefills the rest at full depth and decodes the
    reply under D3; the step index restarts every turn. fill decides what the layers a reply skipped
    leave for later turns: "mask" (nothing: later turns attend past those positions at those layers),
    "project" or "copy" (approximate K/V: later turns see every position); see README, "Chat".
    """

    def __init__(self, model: Optional[Model] = None, schedule: Optional[D3Schedule] = None, fill: str = "mask",
                 max_seq_len: int = 2048, backend: str = "auto", system: Optional[str] = None):
        global _DEFAULT_MODEL
        if model is None:
            if _DEFAULT_MODEL is None:
                _DEFAULT_MODEL = load_model()
            model = _DEFAULT_MODEL
        if model.tokenizer is None or not getattr(model.tokenizer, "chat_template", None):
            raise ValueError("Chat needs a model whose tokenizer has a chat template")
        self.model = model
        self.decoder = Decoder(model, schedule, max_batch=1, max_seq_len=max_seq_len, backend=backend, fill=fill)
        self.messages = [] if system is None else [{"role": "system", "content": system}]
        self.prefilled = []      # tokens prefilled per turn (the cost of each turn's prompt)

    def send(self, text: str, max_new_tokens: int = 64, **sampling) -> str:
        """Add a user message, generate the reply (returned as text, also appended to .messages).
        sampling: temperature, top_k, top_p, seed, stop (as Decoder.generate)."""
        if not isinstance(text, str) or not text:
            raise ValueError("the message must be a non-empty string")
        messages = self.messages + [{"role": "user", "content": text}]
        ids = template_ids(self.model.tokenizer, messages)
        g = self.decoder.generate([ids], max_new_tokens, reuse_prefix=True, **sampling)
        self.prefilled.append(self.decoder.prefilled[0])
        reply = self.model.tokenizer.decode([t for t in g.tokens[0].tolist() if t >= 0], skip_special_tokens=True)
        self.messages = messages + [{"role": "assistant", "content": reply}]
        self.last = g
        return reply
