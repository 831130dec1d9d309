"""Text in, text out: the convenience layer over Decoder."""
from __future__ import annotations

from typing import Optional

from .decoder import Decoder
from .model import Model, load_model
from .schedule import D3Schedule

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


def generate(prompt: str, model: Optional[Model] = None, alpha: float = 0.998, max_new_tokens: int = 64,
             start: float = 0.5, tail: int = 1, skip_order="bottom", temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: Optional[int] = None, raw: bool = False, backend: str = "auto",
             stop=None) -> str:
    """Generate a continuation of `prompt` with D3 and return the new text.

    model defaults to the embedded SmolLM2-135M-Instruct (loaded once). For a
    chat model the chat template is applied unless raw=True.
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
                     stop=stop)
    toks = [t for t in g.tokens[0].tolist() if t >= 0]
    return model.tokenizer.decode(toks, skip_special_tokens=True)
