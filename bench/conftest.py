"""Benchmark setup. On a GPU the suite measures; without one (or with
D3K_BENCH_SMOKE=1) every case runs once on tiny shapes to check it executes.
TRITON_INTERPRET is set by the top-level conftest.py."""
import pytest


@pytest.fixture(scope="session")
def read_bw():
    """Streaming-read bandwidth (GB/s) measured once per run by the suite's own kernel."""
    from bench_common import measure_read_bandwidth
    return measure_read_bandwidth()
