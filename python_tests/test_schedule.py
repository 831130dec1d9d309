"""D3Schedule against a direct computation of docs/design.md section 1."""
import math

import pytest

from d3kernels import D3Schedule

CASES = [  # (L, alpha, start, tail, order)
    (30, 0.998, 0.5, 1, "bottom"),
    (30, 0.99, 0.5, 1, "top"),
    (32, 0.97, 0.25, 3, "bottom"),
    (50, 0.95, 0.5, 2, "top"),
    (16, 0.9, 0.0, 0, "bottom"),
    (7, 0.8, 0.3, 2, "bottom"),
    (22, 0.93, 0.5, 4, [15, 11, 13, 12, 14, 16, 17]),
]


def direct(L, alpha, start, tail, order, i, decay_start=0):
    s = math.floor(start * L + 0.5)
    flex = list(range(s, L - tail))
    order = {"bottom": flex, "top": flex[::-1]}.get(order, order) if isinstance(order, str) else list(order)
    if i == 0 or i < decay_start:
        n = L
    else:
        n = max(s + tail, min(L, math.floor(L * alpha ** (i - decay_start) + 1e-9)))
    dropped = set(order[: L - n])
    return n, tuple(l for l in range(L) if l not in dropped)


@pytest.mark.parametrize("L,alpha,start,tail,order", CASES)
def test_matches_formula(L, alpha, start, tail, order):
    s = D3Schedule(L, alpha=alpha, start=start, tail=tail, skip_order=order)
    for i in list(range(0, 300)) + [1000, 10_000]:
        n, kept = direct(L, alpha, start, tail, order, i)
        assert s.num_kept(i) == n == len(s.kept_layers(i)), i
        assert s.kept_layers(i) == kept, i


def test_float_guard():
    # 50 * 0.58 = 28.999999999999996 in floating point; the +1e-9 guard makes it 29
    s = D3Schedule(50, alpha=0.58, start=0.0, tail=0)
    assert s.num_kept(1) == 29


def test_decay_start_and_step_zero():
    s = D3Schedule(20, alpha=0.5, start=0.25, tail=1, decay_start=3)
    assert [s.num_kept(i) for i in range(6)] == [20, 20, 20, 20, 10, 6]  # clamped at n_core = 5 + 1 later
    assert s.num_kept(50) == s.n_core == 6


@pytest.mark.parametrize("L,alpha,start,tail,order", CASES)
def test_nesting_invariant(L, alpha, start, tail, order):
    s = D3Schedule(L, alpha=alpha, start=start, tail=tail, skip_order=order)
    prev = set(range(L))
    distinct = set()
    for i in range(2000):
        kept = set(s.kept_layers(i))
        assert kept <= prev, f"step {i} runs a layer an earlier step skipped"
        assert set(range(s.n_head_core)) <= kept and set(range(L - tail, L)) <= kept, "core layer dropped"
        distinct.add(s.kept_layers(i))
        prev = kept
    assert len(distinct) <= s.n_flex + 1


def test_alpha_one_keeps_everything():
    s = D3Schedule(30, alpha=1.0)
    assert all(s.kept_layers(i) == tuple(range(30)) for i in range(500))


def test_presets():
    s = D3Schedule(10, alpha=0.5, start=0.2, tail=2, skip_order="bottom")
    assert s.flex_layers == (2, 3, 4, 5, 6, 7) and s.n_core == 4
    assert s.kept_layers(1) == (0, 1, 7, 8, 9)     # N_1 = floor(10 * 0.5) = 5: drop flex 2..6 from the bottom
    t = D3Schedule(10, alpha=0.5, start=0.2, tail=2, skip_order="top")
    assert t.kept_layers(1) == (0, 1, 2, 8, 9)     # drop flex 7..3 from the top
    u = D3Schedule(10, alpha=0.9, start=0.2, tail=2, skip_order="top")
    assert u.kept_layers(1) == (0, 1, 2, 3, 4, 5, 6, 8, 9)   # N_1 = 9: only the highest flex layer goes


def test_half_up_rounding():
    assert D3Schedule(30, start=0.5).n_head_core == 15
    assert D3Schedule(5, start=0.5).n_head_core == 3        # 2.5 rounds up
    assert D3Schedule(3, start=0.5, tail=1).n_head_core == 2  # 1.5 rounds up


def test_no_flex_allowed():
    s = D3Schedule(4, alpha=0.5, start=0.5, tail=2)
    assert s.n_flex == 0 and s.kept_layers(9) == (0, 1, 2, 3)


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_layers=0), "num_layers"),
    (dict(num_layers=2.5), "num_layers"),
    (dict(num_layers=10, alpha=0.0), r"alpha must be in \(0, 1\]"),
    (dict(num_layers=10, alpha=1.5), r"alpha must be in \(0, 1\]"),
    (dict(num_layers=10, alpha=-0.3), r"alpha"),
    (dict(num_layers=10, alpha=float("nan")), r"alpha"),
    (dict(num_layers=10, alpha="x"), r"alpha"),
    (dict(num_layers=10, start=1.2), r"start must be in \[0, 1\]"),
    (dict(num_layers=10, start=-0.1), r"start"),
    (dict(num_layers=10, start=0.5, tail=6), r"tail must be an integer in \[0, 5\]"),
    (dict(num_layers=10, tail=-1), r"tail"),
    (dict(num_layers=10, decay_start=-1), r"decay_start"),
    (dict(num_layers=10, skip_order="middle"), r"skip_order must be one of"),
    (dict(num_layers=10, start=0.5, tail=1, skip_order=[5, 6, 7]), r"permutation of the flex layers"),
    (dict(num_layers=10, start=0.5, tail=1, skip_order=[5, 6, 7, 8, 8]), r"permutation"),
    (dict(num_layers=10, start=0.5, tail=1, skip_order=[0, 6, 7, 8, 5]), r"permutation"),
])
def test_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        D3Schedule(**kwargs)


def test_bad_step():
    with pytest.raises(ValueError):
        D3Schedule(10).num_kept(-1)


def test_core_layers():
    s = D3Schedule(30, alpha=0.9, start=0.5, tail=2)
    assert s.core_layers() == tuple(range(15)) + (28, 29)
    assert s.core_layers() == s.kept_layers(10 ** 6)
    assert all(set(s.core_layers()) <= set(s.kept_layers(i)) for i in range(200))
    assert D3Schedule(30, alpha=1.0).core_layers() == tuple(range(30))     # alpha 1 skips nothing
