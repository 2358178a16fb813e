"""Serializers (API.md section 5): round trips, equality, hostile input, key determinism and
the promise that decoding Auto bytes never runs code."""

import json
import math
import os
import pickle
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import statecore
from statecore import SerializationError, ValueStateDescriptor
from statecore.serializers import (
    Auto,
    Bool,
    Bytes,
    Float64,
    Int64,
    Json,
    Pickle,
    Serializer,
    Str,
    resolve_serializer,
)
from model import canon

ALL_SERIALIZERS = [Int64(), Float64(), Str(), Bytes(), Bool(), Auto(), Pickle(), Json()]
SER_IDS = [type(s).__name__ for s in ALL_SERIALIZERS]


def varint(n):
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def assert_refused(serializer, data):
    """deserialize(data) must raise SerializationError, and nothing else."""
    try:
        value = serializer.deserialize(data)
    except SerializationError:
        return
    except BaseException as exc:  # noqa: BLE001 - the point is the exception type
        raise AssertionError(f"{type(serializer).__name__}.deserialize({data[:40]!r}...) raised "
                             f"{type(exc).__name__} instead of SerializationError: {exc}") from exc
    raise AssertionError(f"{type(serializer).__name__}.deserialize({data[:40]!r}...) "
                         f"(len {len(data)}) returned {value!r:.80} instead of raising SerializationError")


# -- audit: decoding Auto bytes must not import, exec, unpickle or open anything ----------------
_AUDIT = {"on": False, "events": []}
_WATCHED = ("pickle.find_class", "exec", "compile", "import", "os.system", "subprocess.Popen",
            "ctypes.dlopen", "open", "code.__new__", "function.__new__", "marshal.loads")


def _audit_hook(event, args):
    if _AUDIT["on"] and event in _WATCHED:
        _AUDIT["events"].append((event, repr(args)[:100]))


sys.addaudithook(_audit_hook)


def audited_auto_decode(data):
    _AUDIT["events"].clear()
    _AUDIT["on"] = True
    try:
        return Auto().deserialize(data)
    finally:
        _AUDIT["on"] = False
        assert not _AUDIT["events"], f"Auto.deserialize triggered {_AUDIT['events']}"


# -- round trips ------------------------------------------------------------------------------
@pytest.mark.parametrize("v", [0, 1, -1, 2 ** 63 - 1, -(2 ** 63), 123456789, -987654321])
def test_int64_round_trip(v):
    data = Int64().serialize(v)
    assert isinstance(data, bytes)
    out = Int64().deserialize(data)
    assert out == v and type(out) is int


@pytest.mark.parametrize("v", [2 ** 63, -(2 ** 63) - 1, "1", 1.5, None])
def test_int64_refuses(v):
    with pytest.raises(SerializationError):
        Int64().serialize(v)


def test_int64_accepts_numpy_integers():
    assert Int64().deserialize(Int64().serialize(np.int32(-7))) == -7
    assert Int64().serialize(np.int64(5)) == Int64().serialize(5)


@pytest.mark.parametrize("v", [0.0, -0.0, 1.5, -2.25, math.inf, -math.inf, 5e-324, 1.7976931348623157e308, math.pi])
def test_float64_round_trip(v):
    out = Float64().deserialize(Float64().serialize(v))
    assert type(out) is float
    assert struct.pack(">d", out) == struct.pack(">d", v)


def test_float64_nan_round_trip():
    out = Float64().deserialize(Float64().serialize(math.nan))
    assert type(out) is float and math.isnan(out)


@pytest.mark.parametrize("v", ["", "a", "ü日本語🙂", "x" * 10000, "\x00nul\x00", "\u2028"])
def test_str_round_trip(v):
    assert Str().deserialize(Str().serialize(v)) == v


def test_str_refuses_surrogates_and_non_str():
    with pytest.raises(SerializationError):
        Str().serialize("\ud800")
    with pytest.raises(SerializationError):
        Str().serialize(5)


@pytest.mark.parametrize("v", [b"", b"\x00", bytes(range(256)), b"x" * 100000])
def test_bytes_round_trip(v):
    out = Bytes().deserialize(Bytes().serialize(v))
    assert out == v and type(out) is bytes


def test_bytes_refuses_str():
    with pytest.raises(SerializationError):
        Bytes().serialize("text")


@pytest.mark.parametrize("v", [True, False])
def test_bool_round_trip(v):
    out = Bool().deserialize(Bool().serialize(v))
    assert out is v


AUTO_VALUES = [
    None, True, False, 0, 1, -1, 2 ** 63 - 1, -(2 ** 63), 2 ** 63, -(2 ** 63) - 1, 2 ** 64,
    2 ** 5000, -(2 ** 70), -(2 ** 5000) + 1, 0.0, -0.0, 1.5, math.inf, -math.inf, "", "ü日本語🙂",
    "s" * 5000, b"", b"\x00\xff", (), [], {}, (1, "a", (2, (3, (b"4",)))), [1, [2, [3, []]]],
    {"a": 1, 2: [3, {"b": (4,)}], (5, 6): None, b"k": 1.5, None: True},
    [(), [], {}], ("t", ["l", {"d": ("t2",)}]),
]


@pytest.mark.parametrize("v", AUTO_VALUES, ids=lambda v: repr(v)[:40])
def test_auto_round_trip(v):
    data = Auto().serialize(v)
    assert isinstance(data, bytes)
    out = audited_auto_decode(data)
    assert canon(out) == canon(v)


def test_auto_nan_round_trip():
    out = Auto().deserialize(Auto().serialize(math.nan))
    assert type(out) is float and math.isnan(out)


def test_auto_keeps_types_apart():
    encodings = {Auto().serialize(v) for v in [1, 1.0, True, "1", b"1", (1,), [1]]}
    assert len(encodings) == 7
    assert Auto().serialize(()) != Auto().serialize([])
    assert type(Auto().deserialize(Auto().serialize((1, 2)))) is tuple
    assert type(Auto().deserialize(Auto().serialize([1, 2]))) is list


@pytest.mark.parametrize("scalar, expected", [
    (np.int8(-5), -5), (np.int16(300), 300), (np.int32(-70000), -70000), (np.int64(5), 5),
    (np.uint8(255), 255), (np.uint32(2 ** 32 - 1), 2 ** 32 - 1), (np.uint64(2 ** 64 - 1), 2 ** 64 - 1),
    (np.float16(0.5), 0.5), (np.float32(1.5), 1.5), (np.float64(-2.25), -2.25),
    (np.bool_(True), True), (np.bool_(False), False),
], ids=lambda v: f"{type(v).__name__}({v})" if isinstance(v, np.generic) else repr(v))
def test_auto_numpy_scalars_decode_as_python(scalar, expected):
    data = Auto().serialize(scalar)
    assert data == Auto().serialize(expected)
    out = Auto().deserialize(data)
    assert type(out) is type(expected) and out == expected
    assert Auto().serialize_key(scalar) == Auto().serialize_key(expected)


def test_auto_numpy_scalars_inside_containers():
    v = (np.int64(1), [np.float64(2.5)], {"k": np.bool_(True)})
    assert canon(Auto().deserialize(Auto().serialize(v))) == canon((1, [2.5], {"k": True}))


class Opaque:
    def __init__(self, x):
        self.x = x

    def __eq__(self, other):
        return isinstance(other, Opaque) and other.x == self.x


@pytest.mark.parametrize("v", [Opaque(1), {1, 2}, frozenset([1]), object(), 1 + 2j, bytearray(b"x"), range(3)],
                         ids=lambda v: type(v).__name__)
def test_auto_refuses_unknown_types(v):
    with pytest.raises(SerializationError) as info:
        Auto().serialize(v)
    assert type(v).__name__ in str(info.value)
    assert "Pickle" in str(info.value)
    with pytest.raises(SerializationError):
        Auto().serialize([1, (2, v)])


def test_auto_refuses_unknown_type_as_key():
    with pytest.raises(SerializationError) as info:
        Auto().serialize_key(Opaque(1))
    assert "Opaque" in str(info.value) and "Pickle" in str(info.value)


def test_auto_deep_structures_refused_on_encode_not_crash():
    deep = []
    for _ in range(100000):
        deep = [deep]
    with pytest.raises(SerializationError):
        Auto().serialize(deep)
    shallow = []
    for _ in range(20):
        shallow = (shallow,)
    assert canon(Auto().deserialize(Auto().serialize(shallow))) == canon(shallow)


@pytest.mark.parametrize("v", [None, True, 0, -17, 2.5, "ü", [1, "a", None, {"k": [True, 1.5]}], {}])
def test_json_round_trip(v):
    assert canon(Json().deserialize(Json().serialize(v))) == canon(v)


def test_json_tuples_become_lists_and_output_is_deterministic():
    assert Json().deserialize(Json().serialize((1, (2,)))) == [1, [2]]
    assert Json().serialize({"b": 1, "a": 2}) == Json().serialize({"a": 2, "b": 1})


def test_json_refuses_unencodable():
    with pytest.raises(SerializationError):
        Json().serialize(Opaque(1))
    with pytest.raises(SerializationError):
        Json().serialize(b"bytes")


@pytest.mark.parametrize("v", [Opaque([1, 2]), {1, 2}, 1 + 2j, None, (1, [2], {"a": b"x"}), 2 ** 5000])
def test_pickle_round_trip(v):
    assert Pickle().deserialize(Pickle().serialize(v)) == v


def test_pickle_refuses_unpicklable():
    with pytest.raises(SerializationError):
        Pickle().serialize(lambda: None)


# -- equality and resolution --------------------------------------------------------------------
def test_serializers_equal_by_type():
    for a, b in zip(ALL_SERIALIZERS, [Int64(), Float64(), Str(), Bytes(), Bool(), Auto(), Pickle(), Json()]):
        assert a == b and hash(a) == hash(b)
        assert not (a != b)
    for i, a in enumerate(ALL_SERIALIZERS):
        for j, b in enumerate(ALL_SERIALIZERS):
            if i != j:
                assert a != b, (a, b)


def test_resolve_serializer():
    assert resolve_serializer(int) == Int64()
    assert resolve_serializer(float) == Float64()
    assert resolve_serializer(str) == Str()
    assert resolve_serializer(bytes) == Bytes()
    assert resolve_serializer(bool) == Bool()
    assert resolve_serializer(None) == Auto()
    p = Pickle()
    assert resolve_serializer(p) == p
    assert isinstance(resolve_serializer(int), Serializer)


class Upper(Serializer):
    """A user-written serializer: upper-cases strings."""

    def serialize(self, obj):
        if not isinstance(obj, str):
            raise SerializationError(f"Upper needs str, got {type(obj).__name__}")
        return obj.upper().encode()

    def deserialize(self, data):
        try:
            return bytes(data).decode()
        except UnicodeDecodeError as exc:
            raise SerializationError(str(exc)) from None


def test_user_serializer_is_used_by_state(kb):
    s = kb.get_state(ValueStateDescriptor("u", Upper()))
    kb.set_current_key("k")
    s.update("abc")
    assert s.value() == "ABC"
    assert Upper() == Upper() and Upper() != Str()


# -- keys ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [{"a": 1}, {}, math.nan, (1, math.nan), [math.nan], ("x", {"d": 1})],
                         ids=["dict", "empty_dict", "nan", "nan_in_tuple", "nan_in_list", "dict_in_tuple"])
def test_auto_serialize_key_refuses_dict_and_nan(bad):
    with pytest.raises(SerializationError):
        Auto().serialize_key(bad)


@pytest.mark.parametrize("serializer", [Json(), Pickle()], ids=["Json", "Pickle"])
@pytest.mark.parametrize("bad", [{"a": 1}, math.nan], ids=["dict", "nan"])
def test_other_serializers_serialize_key_refuse_dict_and_nan(serializer, bad):
    with pytest.raises(SerializationError):
        serializer.serialize_key(bad)


def test_float64_serialize_key_refuses_nan():
    with pytest.raises(SerializationError):
        Float64().serialize_key(math.nan)


def test_zero_and_negative_zero_are_one_key():
    assert Auto().serialize_key(-0.0) == Auto().serialize_key(0.0)
    assert Float64().serialize_key(-0.0) == Float64().serialize_key(0.0)


def test_serialize_key_equals_serialize_for_valid_keys():
    for k in [1, "a", (1, "b", b"c"), 2 ** 70, 1.5, True, None, ()]:
        assert Auto().serialize_key(k) == Auto().serialize(k)


DETERMINISM_SCRIPT = textwrap.dedent("""
    import json, sys
    import statecore
    from statecore.serializers import Auto
    keys = [
        "", "a", "key-1", "ü日本語🙂", "x" * 700, ("tuple", "of", "strs"), (("n", 1), ("m", (2.5, b"b"))),
        1, -1, 2 ** 63, -(2 ** 70), 2 ** 5000, 1.5, -0.0, 1.0, True, False, b"\\x00bytes", (), None,
        tuple(str(i) for i in range(50)),
    ]
    out = {
        "keys": [[Auto().serialize_key(k).hex(), statecore.assign_to_key_group(k, 128),
                  statecore.assign_to_key_group(k, 4096)] for k in keys],
        "value": Auto().serialize({"b": 1, "a": ("x", "y"), 3: ["z"]}).hex(),
    }
    json.dump(out, sys.stdout)
""")


@pytest.mark.slow
def test_key_bytes_and_groups_independent_of_hash_seed(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(statecore.__file__)))
    script = tmp_path / "keys.py"
    script.write_text(DETERMINISM_SCRIPT, encoding="utf-8")
    outputs = []
    for seed in ["0", "1", "random"]:
        env = dict(os.environ, PYTHONHASHSEED=seed,
                   PYTHONPATH=os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
        proc = subprocess.run([sys.executable, str(script)], env=env, cwd=root,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        outputs.append(json.loads(proc.stdout))
    assert outputs[0] == outputs[1] == outputs[2]
    scope = {}
    exec(DETERMINISM_SCRIPT.replace("json.dump(out, sys.stdout)", ""), scope)  # this process too
    assert scope["out"] == outputs[0]
    groups = [g for _, g, _ in outputs[0]["keys"]]
    assert len(set(groups)) > 3  # the keys spread over key groups


# -- hostile bytes ------------------------------------------------------------------------------
SAMPLE_VALUES = {
    "Int64": [0, -5, 2 ** 63 - 1],
    "Float64": [1.5, -0.0, math.nan],
    "Str": ["", "abc", "ü日本語"],
    "Bytes": [b"", b"abc"],
    "Bool": [True, False],
    "Auto": [None, 5, 2 ** 70, -(2 ** 100), 1.5, "ü日本", b"bytes", (1, "a"), [1, [2, [3]]],
             {"k": (1, b"v"), 2: None}, "s" * 300, (), {}],
    "Pickle": [1, "a", (1, [2]), Opaque(3)],
    "Json": [1, "a", [1, {"k": None}], {"a": [1.5, True]}],
}


def _valid_encodings(serializer):
    return [serializer.serialize(v) for v in SAMPLE_VALUES[type(serializer).__name__]]


@pytest.mark.parametrize("serializer", [s for s in ALL_SERIALIZERS if not isinstance(s, (Bytes, Str))],
                         ids=[i for i in SER_IDS if i not in ("Bytes", "Str")])
def test_truncated_encodings_refused(serializer):
    for data in _valid_encodings(serializer):
        for cut in range(len(data)):
            if isinstance(serializer, Json) and data[:cut].strip() and data[:cut].isdigit():
                continue  # "12" is a valid JSON prefix of "123"
            assert_refused(serializer, data[:cut])


def test_str_truncated_multibyte_refused():
    data = Str().serialize("ü日🙂")
    for cut in [1, 3, 4, 6, 7, 8]:  # cuts inside a multi-byte character
        assert_refused(Str(), data[:cut])


@pytest.mark.parametrize("serializer", [s for s in ALL_SERIALIZERS if not isinstance(s, Bytes)],
                         ids=[i for i in SER_IDS if i != "Bytes"])
def test_trailing_garbage_refused(serializer):
    for data in _valid_encodings(serializer):
        for tail in [b"\x00", b"\xff", b"garbage", b"\x00" * 100]:
            if isinstance(serializer, Str) and tail.isascii():
                continue  # valid UTF-8 + ASCII is another valid string
            assert_refused(serializer, data + tail)


def test_float64_wrong_sizes_refused():
    for n in [0, 1, 4, 7, 9, 16]:
        assert_refused(Float64(), b"\x01" * n)


@pytest.mark.parametrize("data", [b"", b"\x02", b"\xff", b"\x00\x00", b"\x01\x01", b"true"])
def test_bool_hostile(data):
    assert_refused(Bool(), data)


@pytest.mark.parametrize("data", [b"\xff", b"\xc3", b"\xed\xa0\x80", b"abc\xff", b"\xf4\x90\x80\x80", b"\xc0\x80"])
def test_str_invalid_utf8_refused(data):
    assert_refused(Str(), data)


def test_auto_wrong_tags_refused():
    valid_tags = {Auto().serialize(v)[0] for v in AUTO_VALUES}
    bad = [t for t in range(256) if t not in valid_tags]
    assert len(bad) > 200
    for tag in bad:
        for rest in [b"", b"\x00", b"\x01\x00" + b"\x00" * 8]:
            assert_refused(Auto(), bytes([tag]) + rest)
        # a wrong tag nested inside a valid container
        assert_refused(Auto(), b"\x09\x01" + bytes([tag]))
        assert_refused(Auto(), Auto().serialize((1,))[:-9] + bytes([tag]) + b"\x00" * 8)


HUGE_LENGTHS = [2 ** 62, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1, 2 ** 31, 2 ** 32 + 1, 10 ** 6]


@pytest.mark.parametrize("n", HUGE_LENGTHS)
def test_auto_huge_declared_lengths_refused(n):
    str_tag, bytes_tag, tuple_tag, list_tag, dict_tag = (Auto().serialize(v)[0] for v in ["", b"", (), [], {}])
    big_tag = Auto().serialize(2 ** 70)[0]
    for tag in [str_tag, bytes_tag, tuple_tag, list_tag, dict_tag, big_tag]:
        for payload in [b"", b"abc", b"\x00" * 64]:
            assert_refused(Auto(), bytes([tag]) + varint(n) + payload)
        assert_refused(Auto(), b"\x09\x02\x00" + bytes([tag]) + varint(n) + b"xyz")


def test_auto_malformed_varints_refused():
    str_tag = Auto().serialize("")[0]
    for bad_len in [b"\x80", b"\xff" * 9, b"\xff" * 10, b"\xff" * 11 + b"\x01", b"\xff" * 9 + b"\x7f"]:
        assert_refused(Auto(), bytes([str_tag]) + bad_len)
        assert_refused(Auto(), bytes([str_tag]) + bad_len + b"a" * 20)


@pytest.mark.parametrize("wrap", [lambda x: [x], lambda x: (x,), lambda x: {"k": x}, lambda x: [1, x]],
                         ids=["list", "tuple", "dict_value", "list_second"])
def test_auto_100000_deep_nesting_refused(wrap):
    # the per-level head comes from the encoder's own output: enc(wrap(x)) == head + enc(x)
    inner = Auto().serialize(0)
    outer = Auto().serialize(wrap(0))
    assert outer.endswith(inner)
    head = outer[:-len(inner)]
    expected = 0
    for _ in range(50):
        expected = wrap(expected)
    assert canon(Auto().deserialize(head * 50 + inner)) == canon(expected)  # moderate depth is fine
    assert_refused(Auto(), head * 100000 + inner)
    assert_refused(Auto(), head * 100000)  # deep and truncated


def test_auto_other_malformed_inputs():
    list_tag, dict_tag, str_tag, big_tag = (Auto().serialize(v)[0] for v in [[], {}, "", 2 ** 70])
    cases = [
        bytes([list_tag]) + varint(1000) + b"\x00" * 10,  # count exceeds the items present
        bytes([dict_tag]) + varint(1) + Auto().serialize(None),  # key without value
        bytes([dict_tag]) + varint(1) + Auto().serialize([]) + Auto().serialize(1),  # unhashable key
        bytes([dict_tag]) + varint(1) + Auto().serialize({}) + Auto().serialize(1),  # unhashable key
        bytes([str_tag]) + varint(2) + b"\xc3\x28",  # invalid UTF-8
        bytes([str_tag]) + varint(3) + b"\xed\xa0\x80",  # encoded surrogate
        bytes([big_tag]) + varint(1) + b"\x05",  # non-canonical: fits in int64
        bytes([big_tag]) + varint(0),  # empty big int
        b"",
    ]
    for data in cases:
        assert_refused(Auto(), data)


def test_auto_200000_byte_int_decodes():
    big_tag = Auto().serialize(2 ** 70)[0]
    payload = b"\x01" + b"\x00" * 200000  # a 1.6-million-bit integer, canonical
    data = bytes([big_tag]) + varint(len(payload)) + payload
    value = Auto().deserialize(data)
    assert value == 1 << (8 * 200000)


@pytest.mark.parametrize("data", [
    b"", b"{", b"[1,", b"\xff\xfe", b'"\xc3"', b"1 2", b"[" * 100000, b"[" * 100000 + b"]" * 100000,
    b'{"a":' * 100000, b"undefined", b"\x00",
], ids=lambda d: repr(d[:12]))
def test_json_hostile(data):
    assert_refused(Json(), data)


@pytest.mark.parametrize("data", [
    b"", b"\x80", b"\x80\x05", b"not a pickle", b"\x80\x05\x95" + (2 ** 62).to_bytes(8, "little"),
    b"\x80\x05\x8e" + (2 ** 62).to_bytes(8, "little") + b"x", b"\x80\x05\x8d" + (2 ** 62).to_bytes(8, "little"),
    b"\x80\x05X" + (2 ** 31 - 1).to_bytes(4, "little") + b"abc", b"(" * 100000, b"\x80\x05]" * 100000,
    b"\x80\x05K\x01\x00.", b"\x80\x05}q\x00(K\x01]q\x01e.",
], ids=lambda d: repr(d[:12]))
def test_pickle_hostile(data):
    assert_refused(Pickle(), data)


@pytest.mark.parametrize("serializer", ALL_SERIALIZERS, ids=SER_IDS)
def test_deserialize_refuses_non_bytes(serializer):
    for bad in [None, 5, "text", [1, 2]]:
        with pytest.raises((SerializationError, TypeError)):
            serializer.deserialize(bad)


@given(st.one_of(
    st.binary(max_size=64),
    st.lists(st.one_of(st.integers(0, 16), st.integers(0, 255), st.sampled_from([0x80, 0xFF, 0x7F])),
             max_size=64).map(bytes),
))
@example(b"\x09\x01" * 200 + b"\x00")
@example(b"\x0a\x01\x09\x00\x00")
def test_auto_fuzz_decode_returns_value_or_serialization_error(data):
    try:
        value = audited_auto_decode(data)
    except SerializationError:
        return
    again = Auto().deserialize(Auto().serialize(value))
    assert canon(again) == canon(value)


# Pickle is left out: random pickles may name globals, and Pickle is only for trusted data.
@pytest.mark.parametrize("serializer", [s for s in ALL_SERIALIZERS if not isinstance(s, (Auto, Pickle))],
                         ids=[i for i in SER_IDS if i not in ("Auto", "Pickle")])
@given(data=st.binary(max_size=40))
def test_fuzz_decode_any_serializer(serializer, data):
    try:
        serializer.deserialize(data)
    except SerializationError:
        pass


# -- hypothesis round trip over recursive values ----------------------------------------------
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-(2 ** 200), 2 ** 200), st.floats(),
    st.text(), st.binary(),
)
HASHABLE = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(), st.binary()),
    lambda children: st.lists(children, max_size=3).map(tuple), max_leaves=6,
)
AUTO_OBJECTS = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(HASHABLE, children, max_size=4),
    ),
    max_leaves=20,
)


@given(AUTO_OBJECTS)
def test_auto_round_trip_property(value):
    data = Auto().serialize(value)
    assert canon(audited_auto_decode(data)) == canon(value)
    assert Auto().serialize(value) == data  # deterministic within the process


@given(HASHABLE)
def test_auto_key_round_trip_property(key):
    data = Auto().serialize_key(key)
    assert data == Auto().serialize_key(key)
    decoded = Auto().deserialize(data)
    assert Auto().serialize_key(decoded) == data
    assert decoded == key  # -0.0 may come back as 0.0, which is an equal key


# -- Auto never executes code ----------------------------------------------------------------------
class MakesFile:
    path = None

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("protocol", range(0, pickle.HIGHEST_PROTOCOL + 1))
def test_auto_never_unpickles(tmp_path, protocol):
    target = tmp_path / f"pwned-{protocol}"
    MakesFile.path = str(target)
    payload = pickle.dumps(MakesFile(), protocol=protocol)
    assert_refused(Auto(), payload)
    with pytest.raises(SerializationError):
        audited_auto_decode(payload)
    assert not target.exists()
    # inside a valid Auto container the payload is just data
    wrapped = Auto().serialize(("payload", payload))
    assert audited_auto_decode(wrapped) == ("payload", payload)
    assert not target.exists()
    # the negative control: the payload really does create the file when unpickled
    control = tmp_path / f"control-{protocol}"
    MakesFile.path = str(control)
    fh = pickle.loads(pickle.dumps(MakesFile(), protocol=protocol))
    fh.close()
    assert control.exists()


def test_auto_values_in_state_never_unpickle(kb, tmp_path):
    target = tmp_path / "pwned"
    MakesFile.path = str(target)
    s = kb.get_state(ValueStateDescriptor("v"))
    kb.set_current_key("k")
    with pytest.raises(SerializationError):
        s.update(MakesFile())
    assert s.value() is None
    assert not target.exists()
