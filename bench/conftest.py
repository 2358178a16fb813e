"""pytest-benchmark configuration: sizes come from STATECORE_BENCH_N (default 1,000,000).

Benchmarks are not part of the default test run (testpaths is tests/); run
them with ``pytest bench/ --benchmark-only``.  CI runs them with a small N as a
smoke test (STATECORE_BENCH_N=20000).
"""
import os

import pytest


@pytest.fixture(scope="session")
def n():
    return int(os.environ.get("STATECORE_BENCH_N", "1000000"))
