"""Stop strings (d3kernels/stops.py, docs/design.md section 4.3): found when they span tokens (pieces, a
leading space, a character split over byte tokens), and each step decodes only a few tokens, so a step
costs the same however long the output grows; Decoder.generate and its speculative path stop there."""
import torch

from helpers import tiny_model

from d3kernels import D3Schedule, Decoder
from d3kernels.model import Model
from d3kernels.stops import StopStrings


class Pieces:
    """A tokenizer stand-in: token i is the UTF-8 bytes pieces[i]; decode joins them, replaces an incomplete
    character by U+FFFD and drops one leading space, as SentencePiece decoders do. Records the longest
    decode."""

    def __init__(self, pieces: list):
        self.pieces, self.longest, self.calls = [p if isinstance(p, bytes) else p.encode() for p in pieces], 0, 0

    def decode(self, ids) -> str:
        ids = list(ids)
        self.longest, self.calls = max(self.longest, len(ids)), self.calls + 1
        text = b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")
        return text[1:] if text.startswith(" ") else text


E_ACUTE = "é".encode()
WORDS = Pieces(["Hel", "lo", " wor", "ld", E_ACUTE[:1], E_ACUTE[1:], "!", " x"])


def _first_stop(tok, ids: list, stops: list) -> int:
    """The index of the token at which StopStrings reports a stop in one row (-1: none)."""
    watch = StopStrings(tok, stops, 1)
    for n, t in enumerate(ids):
        if watch.add(0, t):
            return n
    return -1


def test_a_stop_string_spanning_tokens_is_found_where_it_ends():
    ids = [0, 1, 2, 3, 4, 5, 6, 7]                      # "Hello world" + "é" (two byte tokens) + "!" + " x"
    assert WORDS.decode(ids) == "Hello world\u00e9! x"
    assert _first_stop(WORDS, ids, ["o w"]) == 2          # "lo" + " wor": the space comes from the piece
    assert _first_stop(WORDS, ids, ["lo world"]) == 3     # spans three tokens
    assert _first_stop(WORDS, ids, ["d\u00e9!"]) == 6     # "ld" + the two halves of "é" + "!"
    assert _first_stop(WORDS, ids, ["\u00e9"]) == 5       # found once its second byte arrives
    assert _first_stop(WORDS, ids, ["Hel"]) == 0 and _first_stop(WORDS, ids, ["xyz", "! x"]) == 7
    assert _first_stop(WORDS, ids, ["world!"]) == -1      # never: "é" sits between


def test_each_token_decodes_a_few_tokens_only():
    """2000 tokens: every decode call covers at most 3 tokens (2, plus one while a character is split)."""
    tok = Pieces(WORDS.pieces)
    g = torch.Generator().manual_seed(0)
    ids = [int(i) for i in torch.randint(0, 4, (2000,), generator=g)] + [4, 5, 6]
    assert _first_stop(tok, ids, ["\u00e9!"]) == len(ids) - 1
    assert tok.longest <= 3 and tok.calls == 2 * len(ids), (tok.longest, tok.calls)


def test_generate_stops_at_a_string_spanning_two_tokens():
    """Decoder.generate, plain and speculative, stops at the token where a stop string spanning two tokens
    ends, decoding a few tokens per step."""
    base = tiny_model(L=6, d=64, H=4, H_kv=2, D=16, F=96, V=101, seed=11)
    model = Model(base.config, base.weights, Pieces([f"<{i}>" for i in range(101)]))
    full = Decoder(model, D3Schedule(6, alpha=1.0), max_seq_len=96, backend="reference")
    free = full.generate([[5, 17, 42]], max_new_tokens=30, ignore_eos=True).tokens[0].tolist()
    j = next(j for j in range(3, 29) if f"{free[j]}><{free[j + 1]}" not in "".join(f"<{t}>" for t in free[:j + 1]))
    stop = f"{free[j]}><{free[j + 1]}"                   # the end of T_j and the start of T_{j+1}
    for dec, kw in ((full, {}), (Decoder(model, D3Schedule(6, alpha=0.85, start=0.2, tail=1), max_seq_len=96,
                                         backend="reference"), dict(speculative=3))):
        model.tokenizer.longest = 0
        g = dec.generate([[5, 17, 42]], max_new_tokens=30, stop=[stop], **kw)
        assert g.finished == ["stop"] and g.tokens[0].tolist()[: j + 2] == free[: j + 2], kw
        assert (g.tokens[0] >= 0).sum() == j + 2, kw
        assert model.tokenizer.longest <= 2, (kw, model.tokenizer.longest)
