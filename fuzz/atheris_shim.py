"""atheris instrumentation helpers that are no-ops unless a harness runs as the fuzzer.

The harness modules are also imported by tests/test_fuzz.py (bodies run under
hypothesis, with or without atheris installed); instrumenting code outside an
``atheris.Fuzz()`` process is pointless, so a harness sets ``ACTIVE`` to
``__name__ == "__main__"`` before instrumenting.
"""
import contextlib

try:
    import atheris
except ImportError:  # pragma: no cover - depends on the environment
    atheris = None

#: Set by a harness run as a script (python fuzz/fuzz_<target>.py ...).
ACTIVE = False


def instrument_imports():
    """``atheris.instrument_imports()`` when active, else a no-op context."""
    if atheris is None or not ACTIVE:
        return contextlib.nullcontext()
    return atheris.instrument_imports()


def instrument(*funcs):
    """Instrument these Python functions for coverage feedback (no-op unless active)."""
    if atheris is None or not ACTIVE:
        return
    for f in funcs:
        atheris.instrument_func(getattr(f, "__func__", f))
