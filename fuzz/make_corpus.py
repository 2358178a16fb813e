"""Regenerate the seed corpus in fuzz/corpus/<target>/ (kept in the repo; deterministic).

    python fuzz/make_corpus.py     # rewrite every target's seeds

(The auto seeds are deterministic; the metadata/datafile seeds embed a
checkpoint's creation time, so they change on every run.)

* auto: ~1,000 Auto encodings of hypothesis-generated values (derandomized),
  plus edge cases: nan (several payloads), -0.0, +-inf, int64 bounds, 2**5000,
  10**5-deep nesting (must raise SerializationError), bad UTF-8, lone
  surrogates, length prefixes longer than the data, varint overflow,
  non-canonical big ints, trailing bytes, unhashable dict keys, and a pickle
  ``__reduce__`` payload (an unknown tag to Auto; the debug pickle fallback
  turns it into a caught code-lookup).
* serializers: valid and broken encodings of every typed serializer
  (first byte selects the serializer, as fuzz_serializers.py reads it).
* metadata: a real ``_metadata`` file, its body (wrapped mode) and broken ones.
* datafile: the real data files and sections fuzz_datafile.py builds.

Files are named by the SHA-1 of their content, as libFuzzer names them.
"""
import hashlib
import json
import os
import pickle
import struct
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.append(os.path.dirname(_HERE))

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from statecore.serializers import Auto, Bool, Bytes, Float64, Int64, Json, Str  # noqa: E402

AUTO = Auto()
N_HYPOTHESIS = 1000


def _varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


_scalars = (st.none() | st.booleans() | st.integers(-2 ** 63, 2 ** 63 - 1)
            | st.integers(min_value=-2 ** 300, max_value=2 ** 300) | st.floats(allow_nan=True, allow_infinity=True)
            | st.text(max_size=20) | st.binary(max_size=20))
_hashable = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
                         | st.binary(max_size=8), lambda c: st.tuples(c, c), max_leaves=4)
VALUES = st.recursive(_scalars, lambda c: st.lists(c, max_size=5) | st.lists(c, max_size=4).map(tuple)
                      | st.dictionaries(_hashable, c, max_size=4), max_leaves=12)


def hypothesis_encodings(n=N_HYPOTHESIS):
    out = {}

    @settings(max_examples=n * 3, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(VALUES)
    def collect(v):
        if len(out) < n:
            enc = AUTO.serialize(v)
            out.setdefault(enc, None)

    collect()
    return list(out)


class _Reduce:
    """Unpickling this looks up ``builtins.str`` (harmless even if it ran): the audit hook must see it."""

    def __reduce__(self):
        return (str, ("statecore fuzz: pickle payload was executed",))


def auto_edge_cases():
    deep = b"\x09\x01" * 10 ** 5 + b"\x00"  # 10**5 nested lists: SerializationError, not RecursionError
    return [
        AUTO.serialize(float("nan")), b"\x05" + struct.pack(">Q", 0x7FF0000000000001),  # signalling NaN
        b"\x05" + struct.pack(">Q", 0xFFF8000000000ABC), AUTO.serialize(-0.0), AUTO.serialize(float("inf")),
        AUTO.serialize(float("-inf")), AUTO.serialize(2 ** 63 - 1), AUTO.serialize(-2 ** 63),
        AUTO.serialize(2 ** 63), AUTO.serialize(-2 ** 63 - 1), AUTO.serialize(2 ** 5000), AUTO.serialize(-2 ** 5000),
        AUTO.serialize(10 ** 4400),  # more digits than int's 4300-digit str limit (decoding never goes via str)
        deep, b"\x08\x01" * 100 + b"\x00", b"\x08\x01" * 101 + b"\x00",  # depth limit exactly / one over
        b"\x0a\x01" * 60 + b"\x00\x00",
        b"\x06\x02\xc3\x28", b"\x06\x01\xff", b"\x06\x03\xed\xa0\x80", b"\x06\x04\xf4\x90\x80\x80",  # bad UTF-8
        b"\x06\x02\xc0\xaf",  # overlong encoding
        b"\x06\x0aabc", b"\x07\xff\xff\xff\xff\x0f", b"\x07" + _varint(2 ** 62) + b"x",  # length > data
        b"\x09" + _varint(2 ** 40), b"\x0a\x05\x00", b"\x07\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",
        b"\x07\xff\xff\xff\xff\xff\xff\xff\xff\xff\x02",  # varint overflow
        b"\x07\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x00",  # 11-byte varint
        b"\x07\x80\x00", b"\x06\x81\x00" + b"a",  # non-minimal varints (accepted: lengths are not canonical)
        b"\x04\x09\x00" + b"\x80" + bytes(7), b"\x04\x01\x05", b"\x04\x00", b"\x04\x0a\x00\x00" + bytes(8),
        b"\x03" + bytes(7), b"\x05\x00", b"", b"\x00\x00", b"\x0b", b"\xff", b"\x80",
        b"\x0a\x01\x09\x00\x00", b"\x0a\x01\x0a\x00\x00", b"\x0a\x01\x08\x01\x09\x00\x00",  # unhashable keys
        b"\x0a\x02\x03" + struct.pack(">Q", (1 << 63) + 1) + b"\x00\x02\x00\x01",  # {1: None, True: False}
        pickle.dumps(_Reduce(), protocol=2), pickle.dumps(_Reduce(), protocol=5),
        pickle.dumps({"a": 1}, protocol=4),
    ]


SERIALIZER_ORDER = [Int64, Float64, Str, Bytes, Bool, Json]  # must match fuzz_serializers.SERIALIZERS


def serializer_seeds():
    samples = {
        Int64: [0, 1, -1, 2 ** 63 - 1, -2 ** 63],
        Float64: [0.0, -0.0, 1.5, float("nan"), float("inf"), 5e-324],
        Str: ["", "a", "β€𝄞", "\x00"],
        Bytes: [b"", b"\x00\xff"],
        Bool: [True, False],
        Json: [None, 1, 1.5, "s", [1, [2, {"a": None}]], {"k": [True, False]}, 2 ** 80],
    }
    out = []
    for i, cls in enumerate(SERIALIZER_ORDER):
        ser = cls()
        for v in samples[cls]:
            out.append(bytes([i]) + ser.serialize(v))
        out += [bytes([i]), bytes([i]) + b"\xff" * 9, bytes([i]) + b"\x02"]
    j = SERIALIZER_ORDER.index(Json)
    out += [bytes([j]) + b"[" * 10 ** 4, bytes([j]) + b"9" * 5000, bytes([j]) + b"NaN", bytes([j]) + b"1e999",
            bytes([j]) + b'"\\ud800"', bytes([j]) + b"\xef\xbb\xbf{}", bytes([j]) + b'{"a":1,"a":2}']
    s = SERIALIZER_ORDER.index(Str)
    out += [bytes([s]) + b"\xed\xa0\x80", bytes([s]) + b"\xc3"]
    return out


def metadata_seeds():
    import fuzz_datafile
    fx = fuzz_datafile.fixture()
    meta = fx.meta_bytes
    body = meta[14:-32]
    out = [b"\x00" + meta, b"\x01" + body, b"\x00" + fx.op_meta_bytes, b"\x01" + fx.op_meta_bytes[14:-32],
           b"\x00" + meta[:13], b"\x00" + meta[:-1], b"\x00" + meta + b"\x00",
           b"\x00" + meta[:8] + b"\x00\x02" + meta[10:], b"\x00" + meta[:10] + b"\xff\xff\xff\xff" + meta[14:],
           b"\x01" + b"[" * 10 ** 4, b"\x01" + b"9" * 5000, b"\x01[]", b"\x01\xff\xfe"]
    d = json.loads(body)
    for k, v in [("key_group_range", [5, 1]), ("key_group_range", [1e300, 2]), ("checkpoint_id", "x"),
                 ("files", [{"path": 1}]), ("files", {}), ("states", [{"name": "v", "sid": 70000}]),
                 ("kind", "operator"), ("size_bytes", [])]:
        out.append(b"\x01" + json.dumps(dict(d, **{k: v}), sort_keys=True).encode())
    return out


def datafile_seeds():
    import fuzz_datafile
    return fuzz_datafile.seeds()


TARGETS = {
    "auto": lambda: hypothesis_encodings() + auto_edge_cases(),
    "serializers": serializer_seeds,
    "metadata": metadata_seeds,
    "datafile": datafile_seeds,
}


def build():
    return {target: {hashlib.sha1(s).hexdigest(): s for s in make()} for target, make in TARGETS.items()}


def main(argv):
    corpus = build()
    root = os.path.join(_HERE, "corpus")
    for target, files in corpus.items():
        d = os.path.join(root, target)
        os.makedirs(d, exist_ok=True)
        on_disk = set(os.listdir(d))
        for name in on_disk - set(files):
            os.remove(os.path.join(d, name))
        for name, data in files.items():
            with open(os.path.join(d, name), "wb") as f:
                f.write(data)
        print(f"{target}: {len(files)} seeds, {sum(map(len, files.values()))} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
