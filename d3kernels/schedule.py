"""The D3 schedule: how many and which decoder layers each generated token runs.

Pure Python, no torch. See docs/design.md section 1 for the semantics:

* step i is the index of the token being generated (0 = the prompt pass, which
  always runs at full depth);
* N_i = L for i < decay_start (and for i == 0), otherwise
  N_i = clamp(floor(L * alpha**(i - decay_start) + 1e-9), n_core, L);
* the kept set is every layer except the first L - N_i entries of the skip
  order, so kept sets are nested: a layer kept at step i was kept at every
  earlier step.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Sequence, Union

SkipOrder = Union[str, Sequence[int]]

PRESET_ORDERS = ("bottom", "top")


# The D3 defaults, in one place: D3Schedule's signature, the CLI, generate() and hf.generate read them.
DEFAULTS = {"alpha": 0.998, "start": 0.5, "tail": 1, "skip_order": "bottom", "decay_start": 0}


class D3Schedule:
    """Position-aware depth decay over ``num_layers`` decoder layers.

    Args:
        num_layers: L, the model's decoder layer count (>= 1).
        alpha: decay per generated token, in (0, 1]. 1 keeps every layer.
        start: fraction of L kept as the head core, in [0, 1]:
            s = floor(start * L + 0.5) layers [0, s) always run.
        tail: number of last layers that always run, in [0, L - s].
        skip_order: "bottom" (drop from s upward), "top" (drop the highest flex
            layer first) or an explicit permutation of the flex layers
            [s, L - tail), in drop order.
        decay_start: number of steps that run at full depth before decay
            begins (>= 0).
    """

    def __init__(self, num_layers: int, alpha: float = DEFAULTS["alpha"], start: float = DEFAULTS["start"],
                 tail: int = DEFAULTS["tail"], skip_order: SkipOrder = DEFAULTS["skip_order"],
                 decay_start: int = DEFAULTS["decay_start"]):
        if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers < 1:
            raise ValueError(f"num_layers must be an integer >= 1, got {num_layers!r}")
        L = num_layers
        try:
            alpha = float(alpha)
        except (TypeError, ValueError):
            raise ValueError(f"alpha must be a number in (0, 1], got {alpha!r}") from None
        if not (0.0 < alpha <= 1.0) or math.isnan(alpha):
            raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
        try:
            start = float(start)
        except (TypeError, ValueError):
            raise ValueError(f"start must be a number in [0, 1], got {start!r}") from None
        if not (0.0 <= start <= 1.0):
            raise ValueError(f"start must be in [0, 1], got {start!r}")
        s = int(math.floor(start * L + 0.5))
        if not isinstance(tail, int) or isinstance(tail, bool) or not (0 <= tail <= L - s):
            raise ValueError(
                f"tail must be an integer in [0, {L - s}] (L={L} layers minus the {s}-layer "
                f"head core from start={start}), got {tail!r}")
        if not isinstance(decay_start, int) or isinstance(decay_start, bool) or decay_start < 0:
            raise ValueError(f"decay_start must be an integer >= 0, got {decay_start!r}")
        flex = list(range(s, L - tail))
        if isinstance(skip_order, str):
            if skip_order == "bottom":
                order = flex
            elif skip_order == "top":
                order = flex[::-1]
            else:
                raise ValueError(
                    f"skip_order must be one of {PRESET_ORDERS} or a list of the flex layers "
                    f"{flex[:1] + ['...'] + flex[-1:] if len(flex) > 2 else flex}, got {skip_order!r}")
        else:
            try:
                order = [int(x) for x in skip_order]
            except (TypeError, ValueError):
                raise ValueError(f"skip_order must be a preset name or a list of ints, got {skip_order!r}") from None
            if sorted(order) != flex:
                raise ValueError(
                    f"an explicit skip_order must be a permutation of the flex layers "
                    f"range({s}, {L - tail}) (start={start}, tail={tail}, L={L}), got {order}")
        self.num_layers = L
        self.alpha = alpha
        self.start = start
        self.tail = tail
        self.decay_start = decay_start
        self.n_head_core = s
        self.n_core = s + tail
        self.flex_layers = tuple(flex)
        self.skip_order = tuple(order)
        self.order_name = skip_order if isinstance(skip_order, str) else "explicit"
        self._kept = lru_cache(maxsize=None)(self.kept_for_count)

    def core_layers(self) -> tuple:
        """The ascending tuple of layers no step ever skips: the head core [0, s) and the last `tail`
        layers, or all L layers when alpha = 1. Every kept_layers(i) contains it, and late steps reach it."""
        return self._kept(self.num_layers if self.alpha == 1.0 else self.n_core)

    @property
    def n_flex(self) -> int:
        """Number of layers that can be skipped."""
        return len(self.flex_layers)

    def num_kept(self, i: int) -> int:
        """N_i: the number of layers run when generating token T_i (i >= 0)."""
        if i < 0:
            raise ValueError(f"step index must be >= 0, got {i}")
        L = self.num_layers
        if i < self.decay_start or i == 0 or self.alpha == 1.0:
            return L
        n = math.floor(L * self.alpha ** (i - self.decay_start) + 1e-9)
        return max(self.n_core, min(L, n))

    def kept_for_count(self, n: int) -> tuple:
        dropped = set(self.skip_order[: self.num_layers - n])
        return tuple(l for l in range(self.num_layers) if l not in dropped)

    def kept_layers(self, i: int) -> tuple:
        """The ascending tuple of layer indices run when generating token T_i.

        The tuple is the key a driver uses to cache one CUDA graph per depth;
        there are at most n_flex + 1 distinct values.
        """
        return self._kept(self.num_kept(i))

    def mean_kept(self, num_tokens: int) -> float:
        """Average layers per token over tokens T_0 .. T_{num_tokens-1}."""
        if num_tokens <= 0:
            return float(self.num_layers)
        return sum(self.num_kept(i) for i in range(num_tokens)) / num_tokens

    def with_alpha(self, alpha: float) -> "D3Schedule":
        """The same schedule at another alpha: same layers, head and tail cores, skip order and decay_start,
        so both schedules' kept sets are prefixes of one order (nested), whatever the two alphas."""
        if alpha == self.alpha:
            return self
        return D3Schedule(self.num_layers, alpha, self.start, self.tail, list(self.skip_order), self.decay_start)

    def shares_order(self, other: "D3Schedule") -> bool:
        """Whether `other` drops layers in the same order from the same cores (it may differ in alpha and
        decay_start): then any kept set of either is a kept set of both, and kept sets stay nested."""
        return (self.num_layers, self.n_head_core, self.tail, self.skip_order) == (
            other.num_layers, other.n_head_core, other.tail, other.skip_order)

    def __repr__(self) -> str:
        order = self.order_name if self.order_name != "explicit" else list(self.skip_order)
        return (f"D3Schedule(num_layers={self.num_layers}, alpha={self.alpha}, start={self.start}, "
                f"tail={self.tail}, skip_order={order!r}, decay_start={self.decay_start})")
