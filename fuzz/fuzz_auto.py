"""Fuzz target: Auto().deserialize on arbitrary bytes (T3 in RELIABILITY.md).

For every input:

* decoding returns a value or raises ``SerializationError``, nothing else
  (no RecursionError, MemoryError, OverflowError, crash or hang);
* no audit event in ``_common.FORBIDDEN`` fires (no pickle lookup, import,
  exec, ...) while decoding, re-encoding or comparing;
* the compiled decoder agrees with the pure-Python reference decoder
  (``auto_reference.py``): same value, or both refuse;
* when decoding succeeds: ``deserialize(serialize(v))`` is ``v`` (strict,
  NaN-aware, type-exact), ``serialize`` is deterministic, and the key
  encoding (when ``v`` may be a key) decodes back to an equal value.

Run: ``python fuzz/fuzz_auto.py -atheris_runs=300000`` (see CONTRIBUTING.md).
"""
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)                  # the fuzz/ helpers
sys.path.append(os.path.dirname(_HERE))    # the in-place built statecore, unless PYTHONPATH names another

import atheris_shim  # noqa: E402  (atheris if installed, else a no-op instrumentation context)
atheris_shim.ACTIVE = __name__ == "__main__"

with atheris_shim.instrument_imports():
    import auto_reference

from _common import Guard, corpus_inputs, loose_equal, run, same  # noqa: E402

from statecore.errors import SerializationError  # noqa: E402
from statecore.serializers import Auto  # noqa: E402

AUTO = Auto()


def check(data):
    try:
        value = AUTO.deserialize(data)
    except SerializationError:
        value = err = SerializationError
    else:
        err = None
    try:
        ref = auto_reference.decode(data)
    except auto_reference.Invalid as exc:
        ref, ref_err = None, exc
    else:
        ref_err = None
    if (err is None) != (ref_err is None):
        raise AssertionError(f"compiled and reference decoders disagree on {data[:80]!r}: "
                             f"compiled={'error' if err else repr(value)[:200]}, "
                             f"reference={repr(ref_err) if ref_err else repr(ref)[:200]}")
    if err is not None:
        return
    if not same(value, ref):
        raise AssertionError(f"compiled and reference decoders differ on {data[:80]!r}: "
                             f"{repr(value)[:200]} vs {repr(ref)[:200]}")
    enc = AUTO.serialize(value)
    if AUTO.serialize(value) != enc:
        raise AssertionError(f"serialize is not deterministic for {repr(value)[:200]}")
    back = AUTO.deserialize(enc)
    if not same(back, value):
        raise AssertionError(f"deserialize(serialize(v)) != v for {repr(value)[:200]}: {repr(back)[:200]}")
    try:
        key = AUTO.serialize_key(value)
    except SerializationError:
        return  # dicts and NaN cannot be keys
    if not loose_equal(AUTO.deserialize(key), value) or AUTO.serialize_key(value) != key:
        raise AssertionError(f"key encoding of {repr(value)[:200]} does not round-trip deterministically")


atheris_shim.instrument(check, same, loose_equal)


def TestOneInput(data):
    with Guard():
        check(data)


#: Inputs that walk every decoder path once before the audit hook is armed (lazy imports happen here).
#: Not the corpus: with the debug pickle switch on, a corpus input may be a pickle payload.
WARM_UP = [b"", b"\x00", b"\x01", b"\x02", b"\x03" + bytes(8), b"\x05" + bytes(8), b"\x04\x09\x01" + bytes(8),
           b"\x04\x01\x00", b"\x06\x02\xc3\xa9", b"\x06\x01\xff", b"\x07\x01x", b"\x08\x01\x00",
           b"\x09\x02\x00\x01", b"\x0a\x01\x06\x00\x00", b"\x0a\x01\x09\x00\x00", b"\x09\x05\x00",
           b"\x00\x00", b"\x0b", b"\x06\xff\xff", b"\x08\x01" * 101 + b"\x00"]


def warm_up():
    for data in WARM_UP:
        check(data)


if __name__ == "__main__":
    run(TestOneInput, warm_up, "auto")
