"""Fuzz target: every typed serializer's ``deserialize`` on arbitrary bytes (T3).

The first input byte picks the serializer (Int64, Float64, Str, Bytes, Bool,
Json); the rest is handed to ``deserialize``, once as ``bytes`` and once as a
``memoryview``.  The only allowed outcomes are a value or
``SerializationError``; no audit event in ``_common.FORBIDDEN`` may fire.  A
decoded value must re-serialize without error (Json: to bytes that decode to
an equal value), and for the fixed-format serializers the bytes round-trip
exactly.
"""
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)                  # the fuzz/ helpers
sys.path.append(os.path.dirname(_HERE))    # the in-place built statecore, unless PYTHONPATH names another

import json  # noqa: E402

import atheris_shim  # noqa: E402
atheris_shim.ACTIVE = __name__ == "__main__"
from _common import Guard, loose_equal, run  # noqa: E402

from statecore.errors import SerializationError  # noqa: E402
from statecore.serializers import Bool, Bytes, Float64, Int64, Json, Str  # noqa: E402

SERIALIZERS = [Int64(), Float64(), Str(), Bytes(), Bool(), Json()]
EXACT = (Int64, Float64, Str, Bytes, Bool)  # one value, one encoding


def _json_equal(a, b):
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    return loose_equal(a, b)


def check(data):
    if not data:
        return
    ser = SERIALIZERS[data[0] % len(SERIALIZERS)]
    payload = data[1:]
    results = []
    for arg in (payload, memoryview(payload)):
        try:
            results.append(ser.deserialize(arg))
        except SerializationError:
            results.append(SerializationError)
    a, b = results
    if (a is SerializationError) != (b is SerializationError):
        raise AssertionError(f"{type(ser).__name__}: bytes and memoryview inputs disagree on {payload[:80]!r}")
    if a is SerializationError:
        return
    if isinstance(ser, EXACT):
        if ser.serialize(a) != payload:
            raise AssertionError(f"{type(ser).__name__}: {payload[:80]!r} decodes to {a!r:.100} which "
                                 "re-encodes differently")
        return
    try:
        enc = ser.serialize(a)
    except SerializationError:
        return  # e.g. Infinity/NaN literals decode but are refused by a strict encoder... accepted either way
    if not _json_equal(ser.deserialize(enc), a):
        raise AssertionError(f"Json: {payload[:80]!r} does not survive deserialize/serialize/deserialize")


atheris_shim.instrument(check, _json_equal, json.loads, json.decoder.JSONDecoder.decode,
                        json.decoder.JSONDecoder.raw_decode)


def TestOneInput(data):
    with Guard():
        check(data)


WARM_UP = [bytes([i]) + p for i in range(len(SERIALIZERS))
           for p in (b"", b"\x00" * 8, b"\x01", b"\xff\xfe", b"[1,{\"a\":null}]", b"{", b"1" * 5000,
                     b"[" * 3000, b"\"\\ud800\"", b"NaN", b"1e999")]


def warm_up():
    for data in WARM_UP:
        check(data)


if __name__ == "__main__":
    run(TestOneInput, warm_up, "serializers")
