"""Example-based acceptance tests of the keyed-state API (API.md sections 2, 3, 5, 6, 8),
run against every registered backend through the ``make_backend`` / ``kb`` fixtures."""

import math
import pickle

import numpy as np
import pytest

import statecore
from statecore import (
    AggregatingStateDescriptor,
    BackendClosedError,
    KeyGroupOutOfRangeError,
    ListStateDescriptor,
    MapStateDescriptor,
    ReducingStateDescriptor,
    SerializationError,
    StateError,
    StateMigrationError,
    ValueStateDescriptor,
)
from statecore.serializers import Auto, Float64, Int64, Pickle, Str
from model import Average, canon

MAXP = 128


class Opaque:
    """A type Auto does not know; picklable (module level) for the Pickle() tests."""

    def __init__(self, payload):
        self.payload = payload

    def __eq__(self, other):
        return isinstance(other, Opaque) and other.payload == self.payload

    def __hash__(self):
        return hash(self.payload)


# -- Flink's key-group assignment in plain Python (docs/semantics.md) ------------------------
_M32 = 0xFFFFFFFF


def _rotl(x, r):
    return ((x << r) | (x >> (32 - r))) & _M32


def _fmix(h):
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def ref_murmur3_32(data, seed=0):
    c1, c2 = 0xCC9E2D51, 0x1B873593
    h = seed & _M32
    nblocks = len(data) // 4
    for i in range(nblocks):
        k = int.from_bytes(data[4 * i:4 * i + 4], "little")
        k = (_rotl((k * c1) & _M32, 15) * c2) & _M32
        h = (_rotl(h ^ k, 13) * 5 + 0xE6546B64) & _M32
    tail = data[4 * nblocks:]
    k = 0
    for i in reversed(range(len(tail))):
        k = (k << 8) | tail[i]
    if tail:
        h ^= (_rotl((k * c1) & _M32, 15) * c2) & _M32
    return _fmix(h ^ len(data))


def ref_key_group(key_bytes, max_parallelism):
    """KeyGroupRangeAssignment.computeKeyGroupForKeyHash(murmur3_32(bytes), maxParallelism)."""
    code = ref_murmur3_32(key_bytes)
    code = (_rotl((code * 0xCC9E2D51) & _M32, 15) * 0x1B873593) & _M32  # MathUtils.murmurHash
    code = (_rotl(code, 13) * 5 + 0xE6546B64) & _M32
    code = _fmix(code ^ 4)
    signed = code - (1 << 32) if code & 0x80000000 else code
    positive = signed if signed >= 0 else (-signed if signed != -(1 << 31) else 0)
    return positive % max_parallelism


# -- helpers ----------------------------------------------------------------------------------
def restricted_kb(make_backend, clock=None, index=1):
    kgr = statecore.compute_key_group_range_for_operator_index(MAXP, 4, index)
    return kgr, make_backend().create_keyed_state_backend(
        max_parallelism=MAXP, key_group_range=kgr, clock=clock or statecore.ManualClock(0))


def keys_by_group(kgr, count=3):
    """``count`` int keys whose key group is inside ``kgr`` and ``count`` outside."""
    inside, outside = [], []
    i = 0
    while len(inside) < count or len(outside) < count:
        (inside if statecore.assign_to_key_group(i, MAXP) in kgr else outside).append(i)
        i += 1
    return inside[:count], outside[:count]


def all_states(kb):
    return {
        "value": kb.get_state(ValueStateDescriptor("value")),
        "list": kb.get_state(ListStateDescriptor("list")),
        "map": kb.get_state(MapStateDescriptor("map")),
        "reducing": kb.get_state(ReducingStateDescriptor("reducing", lambda a, b: a + b)),
        "aggregating": kb.get_state(AggregatingStateDescriptor("aggregating", Average())),
    }


# -- ValueState -------------------------------------------------------------------------------
def test_value_state_methods(kb):
    s = kb.get_state(ValueStateDescriptor("v"))
    kb.set_current_key("alice")
    assert s.value() is None
    s.update({"x": [1, 2.5, "three", None, (b"4",)]})
    assert s.value() == {"x": [1, 2.5, "three", None, (b"4",)]}
    s.update(7)
    assert s.value() == 7
    kb.set_current_key("bob")
    assert s.value() is None
    s.update("b")
    kb.set_current_key("alice")
    assert s.value() == 7
    s.clear()
    assert s.value() is None
    kb.set_current_key("bob")
    assert s.value() == "b"


def test_value_update_none_clears(kb):
    s = kb.get_state(ValueStateDescriptor("v", default="dflt"))
    kb.set_current_key(1)
    s.update(10)
    assert kb.num_state_entries() == 1
    s.update(None)
    assert s.value() == "dflt"
    assert kb.num_state_entries() == 0
    assert list(kb.get_keys("v")) == []


def test_value_descriptor_default(kb):
    s = kb.get_state(ValueStateDescriptor("v", int, default=-1))
    kb.set_current_key("k")
    assert s.value() == -1
    s.update(0)
    assert s.value() == 0
    s.clear()
    assert s.value() == -1
    assert kb.num_state_entries() == 0


def test_value_state_typed_serializer_refuses_other_types(kb):
    s = kb.get_state(ValueStateDescriptor("v", Int64()))
    kb.set_current_key("k")
    s.update(5)
    with pytest.raises(SerializationError):
        s.update("not an int")
    assert s.value() == 5


# -- ListState --------------------------------------------------------------------------------
def test_list_state_methods(kb):
    s = kb.get_state(ListStateDescriptor("l"))
    kb.set_current_key("k")
    assert s.get() == []
    s.add(1)
    s.add("two")
    s.add_all([3, (4, 5)])
    s.add_all(x for x in [6])
    s.add_all([])
    assert s.get() == [1, "two", 3, (4, 5), 6]
    got = s.get()
    got.append("mutating the returned list")
    assert s.get() == [1, "two", 3, (4, 5), 6]
    s.update(["a", "b"])
    assert s.get() == ["a", "b"]
    kb.set_current_key("other")
    assert s.get() == []
    kb.set_current_key("k")
    s.update([])
    assert s.get() == []
    assert kb.num_state_entries() == 0
    s.add("x")
    s.clear()
    assert s.get() == []


@pytest.mark.parametrize("call", [
    lambda s: s.add(None),
    lambda s: s.add_all([7, None]),
    lambda s: s.add_all(iter([None])),
    lambda s: s.update([8, None, 9]),
    lambda s: s.update([None]),
], ids=["add", "add_all", "add_all_iter", "update", "update_only_none"])
def test_list_none_element_refused(kb, call):
    s = kb.get_state(ListStateDescriptor("l"))
    kb.set_current_key("k")
    s.add_all([1, 2])
    with pytest.raises(ValueError):
        call(s)
    assert s.get() == [1, 2]
    assert kb.num_state_entries() == 1


# -- MapState ---------------------------------------------------------------------------------
def test_map_state_methods(kb):
    s = kb.get_state(MapStateDescriptor("m"))
    kb.set_current_key("k")
    assert s.is_empty()
    assert s.get("a") is None
    assert not s.contains("a")
    assert s.items() == [] and s.keys() == [] and s.values() == [] and list(iter(s)) == []
    s.put("a", 1)
    s.put(2, "two")
    s.put_all({"c": [3], ("t", 4): None})
    assert not s.is_empty()
    assert s.get("a") == 1 and s.get(2) == "two" and s.get("c") == [3]
    assert s.contains(("t", 4)) and s.get(("t", 4)) is None  # None is a stored value
    assert not s.contains("zzz")
    assert sorted(map(repr, s.keys())) == sorted(map(repr, ["a", 2, "c", ("t", 4)]))
    assert sorted(map(repr, iter(s))) == sorted(map(repr, ["a", 2, "c", ("t", 4)]))
    assert sorted(map(repr, s.values())) == sorted(map(repr, [1, "two", [3], None]))
    assert dict(s.items()) == {"a": 1, 2: "two", "c": [3], ("t", 4): None}
    s.put("a", 10)
    assert s.get("a") == 10
    s.remove("a")
    s.remove("never there")
    assert not s.contains("a") and s.get("a") is None
    assert kb.num_state_entries() == 3
    kb.set_current_key("other")
    assert s.is_empty()
    kb.set_current_key("k")
    s.clear()
    assert s.is_empty() and kb.num_state_entries() == 0


def test_map_snapshot_results_safe_to_mutate_state(kb):
    s = kb.get_state(MapStateDescriptor("m"))
    kb.set_current_key("k")
    s.put_all({i: i * i for i in range(20)})
    for k in s.keys():
        s.remove(k)
    assert s.is_empty()
    s.put_all({i: i for i in range(5)})
    for k, v in s.items():
        s.put(k + 100, v)
    assert len(s.keys()) == 10


def test_map_long_user_keys(kb):
    s = kb.get_state(MapStateDescriptor("m", Str(), Int64()))
    kb.set_current_key("x" * 1000)
    long_keys = ["k" * 1024, "k" * 1025, "ü" * 600]
    for i, k in enumerate(long_keys):
        s.put(k, i)
    for i, k in enumerate(long_keys):
        assert s.get(k) == i
    assert sorted(s.keys()) == sorted(long_keys)
    assert [canon(k) for k in kb.get_keys("m")] == [canon("x" * 1000)]


# -- Reducing / Aggregating -------------------------------------------------------------------
def test_reducing_state(kb):
    s = kb.get_state(ReducingStateDescriptor("r", lambda acc, v: acc + v, int))
    kb.set_current_key("k")
    assert s.get() is None
    s.add(3)
    assert s.get() == 3
    s.add(4)
    s.add(-10)
    assert s.get() == -3
    kb.set_current_key("j")
    assert s.get() is None
    s.add(1)
    kb.set_current_key("k")
    s.clear()
    assert s.get() is None
    kb.set_current_key("j")
    assert s.get() == 1


def test_reducing_function_argument_order(kb):
    s = kb.get_state(ReducingStateDescriptor("r", lambda acc, v: acc + [v]))
    kb.set_current_key("k")
    s.add([1])
    s.add(2)
    s.add(3)
    assert s.get() == [1, 2, 3]


def test_aggregating_state(kb):
    s = kb.get_state(AggregatingStateDescriptor("a", Average()))
    kb.set_current_key("k")
    assert s.get() is None
    s.add(1)
    assert s.get() == 1.0
    s.add(2)
    s.add(6)
    assert s.get() == 3.0
    s.clear()
    assert s.get() is None
    s.add(5)
    assert s.get() == 5.0


# -- namespaces -------------------------------------------------------------------------------
def test_namespaces_isolate(kb):
    states = all_states(kb)
    kb.set_current_key("k")
    for ns in ["w1", "w2", None, 7]:
        for s in states.values():
            s.set_current_namespace(ns)
        states["value"].update(f"v-{ns}")
        states["list"].add(f"l-{ns}")
        states["map"].put("uk", f"m-{ns}")
        states["reducing"].add(len(str(ns)))
        states["aggregating"].add(len(str(ns)))
    assert kb.num_state_entries() == 4 * 5
    for s in states.values():
        s.set_current_namespace("w1")
    states["value"].clear()
    states["list"].clear()
    states["map"].clear()
    for ns in ["w2", None, 7]:
        for s in states.values():
            s.set_current_namespace(ns)
        assert states["value"].value() == f"v-{ns}"
        assert states["list"].get() == [f"l-{ns}"]
        assert states["map"].items() == [("uk", f"m-{ns}")]
        assert states["reducing"].get() == len(str(ns))
        assert states["aggregating"].get() == float(len(str(ns)))
    assert sorted(map(repr, kb.get_keys("value", "w2"))) == ["'k'"]
    assert list(kb.get_keys("value", "w1")) == []
    assert list(kb.get_keys("value", "nope")) == []


def test_namespace_is_per_state(kb):
    a = kb.get_state(ValueStateDescriptor("a"))
    b = kb.get_state(ValueStateDescriptor("b"))
    kb.set_current_key("k")
    a.set_current_namespace("x")
    a.update(1)
    b.update(2)  # b stays in the default namespace
    assert list(kb.get_keys("b")) == ["k"]
    assert list(kb.get_keys("a")) == []
    assert list(kb.get_keys("a", "x")) == ["k"]


# -- get_state identity and migration -----------------------------------------------------------
def test_get_state_same_object_for_same_name(kb):
    d1 = ValueStateDescriptor("v", int)
    s1 = kb.get_state(d1)
    assert kb.get_state(d1) is s1
    assert kb.get_state(ValueStateDescriptor("v", int)) is s1
    assert kb.get_state(ValueStateDescriptor("v", Int64())) is s1  # int is Int64()
    m = kb.get_state(MapStateDescriptor("m"))
    assert kb.get_state(MapStateDescriptor("m")) is m
    assert kb.get_state(MapStateDescriptor("m", None, None)) is m  # None is Auto()
    assert kb.get_state(MapStateDescriptor("m", Auto(), Auto())) is m
    assert kb.get_state(ListStateDescriptor("l")) is kb.get_state(ListStateDescriptor("l"))


@pytest.mark.parametrize("second", [
    lambda: ListStateDescriptor("counter_state"),
    lambda: MapStateDescriptor("counter_state"),
    lambda: ReducingStateDescriptor("counter_state", lambda a, b: a),
    lambda: AggregatingStateDescriptor("counter_state", Average()),
    lambda: ValueStateDescriptor("counter_state", str),
    lambda: ValueStateDescriptor("counter_state", Float64()),
    lambda: ValueStateDescriptor("counter_state", Pickle()),
], ids=["list", "map", "reducing", "aggregating", "str", "float64", "pickle"])
def test_same_name_other_type_or_serializer_is_migration_error(kb, second):
    first = kb.get_state(ValueStateDescriptor("counter_state", int))
    kb.set_current_key(1)
    first.update(5)
    with pytest.raises(StateMigrationError) as info:
        kb.get_state(second())
    assert "counter_state" in str(info.value)
    assert first.value() == 5
    assert kb.get_state(ValueStateDescriptor("counter_state", int)) is first


def test_map_same_name_other_key_serializer_is_migration_error(kb):
    kb.get_state(MapStateDescriptor("m", int, str))
    with pytest.raises(StateMigrationError):
        kb.get_state(MapStateDescriptor("m", str, str))
    with pytest.raises(StateMigrationError):
        kb.get_state(MapStateDescriptor("m", int, int))


def test_serializer_as_python_type_equals_serializer(kb):
    s = kb.get_state(ValueStateDescriptor("v", int))
    kb.set_current_key("k")
    s.update(2 ** 62)
    assert s.value() == 2 ** 62
    assert kb.get_state(ValueStateDescriptor("v", Int64())) is s
    f = kb.get_state(ValueStateDescriptor("f", float))
    assert kb.get_state(ValueStateDescriptor("f", Float64())) is f


# -- errors: no key, closed, key-group range -------------------------------------------------
@pytest.mark.parametrize("use", [
    lambda s: s["value"].value(),
    lambda s: s["value"].update(1),
    lambda s: s["list"].get(),
    lambda s: s["list"].add(1),
    lambda s: s["map"].put("a", 1),
    lambda s: s["map"].get("a"),
    lambda s: s["map"].items(),
    lambda s: s["reducing"].add(1),
    lambda s: s["aggregating"].get(),
    lambda s: s["value"].clear(),
], ids=["value", "update", "list_get", "list_add", "map_put", "map_get", "map_items",
        "reducing_add", "aggregating_get", "clear"])
def test_state_error_without_current_key(kb, use):
    states = all_states(kb)
    with pytest.raises(StateError):
        use(states)
    assert kb.num_state_entries() == 0


def test_backend_closed_error(make_backend, clock):
    kb = make_backend().create_keyed_state_backend(max_parallelism=MAXP, clock=clock)
    s = kb.get_state(ValueStateDescriptor("v"))
    m = kb.get_state(MapStateDescriptor("m"))
    kb.set_current_key("k")
    s.update(1)
    kb.close()
    kb.close()  # idempotent
    for use in [
        lambda: kb.set_current_key("k"),
        lambda: kb.get_state(ValueStateDescriptor("v")),
        lambda: kb.get_state(ValueStateDescriptor("new")),
        lambda: list(kb.get_keys("v")),
        lambda: kb.num_state_entries(),
        lambda: s.value(),
        lambda: s.update(2),
        lambda: s.clear(),
        lambda: m.put("a", 1),
        lambda: m.items(),
    ]:
        with pytest.raises(BackendClosedError):
            use()


def test_context_manager_closes(make_backend, clock):
    with make_backend().create_keyed_state_backend(max_parallelism=MAXP, clock=clock) as kb:
        s = kb.get_state(ValueStateDescriptor("v"))
        kb.set_current_key("k")
        s.update(1)
        assert s.value() == 1
    with pytest.raises(BackendClosedError):
        s.value()
    with pytest.raises(BackendClosedError):
        kb.set_current_key("k")
    kb.close()


def test_context_manager_closes_on_exception(make_backend, clock):
    with pytest.raises(RuntimeError, match="boom"):
        with make_backend().create_keyed_state_backend(max_parallelism=MAXP, clock=clock) as kb:
            raise RuntimeError("boom")
    with pytest.raises(BackendClosedError):
        kb.set_current_key(1)


def test_key_group_out_of_range(make_backend):
    kgr, kb = restricted_kb(make_backend)
    assert list(kgr) == list(range(32, 64))
    try:
        inside, outside = keys_by_group(kgr)
        s = kb.get_state(ValueStateDescriptor("v"))
        kb.set_current_key(inside[0])
        s.update("in")
        group = kb.current_key_group
        bad_str = next(f"s{i}" for i in range(1000) if statecore.assign_to_key_group(f"s{i}", MAXP) not in kgr)
        for bad in outside + [bad_str]:
            with pytest.raises(KeyGroupOutOfRangeError) as info:
                kb.set_current_key(bad)
            assert isinstance(info.value, ValueError)
            assert isinstance(info.value, StateError)
            assert kb.get_current_key() == inside[0]
            assert kb.current_key_group == group
            assert s.value() == "in"
        for k in inside:
            kb.set_current_key(k)
            assert kb.current_key_group in kgr
    finally:
        kb.close()


@pytest.mark.parametrize("key", [
    0, 1, -1, 2 ** 63, -(2 ** 70), 3.25, "alice", "ü日本", "z" * 700, b"\x00bytes",
    ("tuple", 1, (2.5, b"x")), True, False,
], ids=repr)
def test_current_key_group_is_flink_assignment(kb, key):
    kb.set_current_key(key)
    expected = statecore.assign_to_key_group(key, MAXP)
    assert kb.current_key_group == expected
    assert 0 <= expected < MAXP
    assert expected == ref_key_group(Auto().serialize_key(key), MAXP)
    same_key = kb.get_current_key()
    assert canon(same_key) == canon(key)


def test_get_keys(kb):
    v = kb.get_state(ValueStateDescriptor("v"))
    m = kb.get_state(MapStateDescriptor("m"))
    keys = [1, "two", (3, "three"), b"four", 2 ** 80, "x" * 800]
    for k in keys:
        kb.set_current_key(k)
        v.update(repr(k))
    kb.set_current_key("only-map")
    m.put("a", 1)
    assert sorted(map(canon, kb.get_keys("v"))) == sorted(map(canon, keys))
    assert list(kb.get_keys("m")) == ["only-map"]
    kb.set_current_key("two")
    v.clear()
    kb.set_current_key("only-map")
    m.remove("a")
    assert sorted(map(canon, kb.get_keys("v"))) == sorted(map(canon, [k for k in keys if k != "two"]))
    assert list(kb.get_keys("m")) == []


def test_num_state_entries_counts(kb):
    states = all_states(kb)
    assert kb.num_state_entries() == 0
    kb.set_current_key("k")
    states["value"].update(1)
    states["list"].add_all([1, 2, 3])
    states["map"].put_all({"a": 1, "b": 2, "c": 3})
    states["reducing"].add(1)
    states["reducing"].add(2)
    states["aggregating"].add(1)
    assert kb.num_state_entries() == 1 + 1 + 3 + 1 + 1
    kb.set_current_key("j")
    states["list"].add(9)
    states["map"].put("z", None)
    assert kb.num_state_entries() == 9
    states["map"].remove("z")
    assert kb.num_state_entries() == 8


def test_metrics(kb):
    m = kb.metrics()
    for name in ["entries", "bytes_in_memory", "bytes_on_disk", "flushes", "ttl_expired"]:
        assert name in m, f"metrics() lacks {name!r}: {m!r}"
        assert isinstance(m[name], int) and m[name] >= 0, (name, m[name])
    s = kb.get_state(ValueStateDescriptor("v"))
    for i in range(50):
        kb.set_current_key(i)
        s.update("x" * 100)
    m = kb.metrics()
    assert m["entries"] == kb.num_state_entries() == 50
    assert m["bytes_in_memory"] + m["bytes_on_disk"] > 0


def test_many_keys_survive_spilling(kb, backend_name):
    s = kb.get_state(ValueStateDescriptor("v"))
    lst = kb.get_state(ListStateDescriptor("l"))
    for i in range(2000):
        kb.set_current_key(i)
        s.update(("value", i, "p" * 50))
        lst.add(i)
        if i % 3 == 0:
            lst.add(-i)
    for i in range(0, 2000, 7):
        kb.set_current_key(i)
        assert s.value() == ("value", i, "p" * 50)
        assert lst.get() == ([i, -i] if i % 3 == 0 else [i])
    for i in range(0, 2000, 2):
        kb.set_current_key(i)
        s.clear()
    assert kb.num_state_entries() == 1000 + 2000
    assert sorted(kb.get_keys("v")) == list(range(1, 2000, 2))
    if backend_name == "lmdb":  # a 4 KiB write buffer cannot hold this: the spill tier was used
        assert kb.metrics()["flushes"] > 0
        assert kb.metrics()["bytes_on_disk"] > 0


# -- key typing -------------------------------------------------------------------------------
def test_one_float_and_true_are_three_keys(kb):
    s = kb.get_state(ValueStateDescriptor("v"))
    for k, v in [(1, "int"), (1.0, "float"), (True, "bool")]:
        kb.set_current_key(k)
        s.update(v)
    for k, v in [(1, "int"), (1.0, "float"), (True, "bool")]:
        kb.set_current_key(k)
        assert s.value() == v
    assert kb.num_state_entries() == 3
    assert sorted(canon(k) for k in kb.get_keys("v")) == sorted([canon(1), canon(1.0), canon(True)])


def test_numpy_scalar_key_equals_python_key(kb):
    s = kb.get_state(ValueStateDescriptor("v"))
    kb.set_current_key(np.int64(5))
    s.update("x")
    kb.set_current_key(5)
    assert s.value() == "x"
    assert kb.current_key_group == statecore.assign_to_key_group(np.int64(5), MAXP)
    kb.set_current_key(np.float64(2.5))
    s.update("f")
    kb.set_current_key(2.5)
    assert s.value() == "f"
    kb.set_current_key(np.int32(5))
    assert s.value() == "x"
    assert kb.num_state_entries() == 2
    assert sorted(canon(k) for k in kb.get_keys("v")) == sorted([canon(5), canon(2.5)])


@pytest.mark.parametrize("bad_key", [{"a": 1}, {}, float("nan"), (1, float("nan")), ("x", {"d": 1})],
                         ids=["dict", "empty_dict", "nan", "nan_in_tuple", "dict_in_tuple"])
def test_dict_and_nan_keys_refused(kb, bad_key):
    s = kb.get_state(ValueStateDescriptor("v"))
    kb.set_current_key("good")
    s.update(1)
    with pytest.raises(SerializationError):
        kb.set_current_key(bad_key)
    assert kb.get_current_key() == "good"
    assert s.value() == 1
    assert kb.num_state_entries() == 1
    with pytest.raises(SerializationError):
        Auto().serialize_key(bad_key)


def test_auto_refuses_unknown_type(kb):
    s = kb.get_state(ValueStateDescriptor("v"))
    kb.set_current_key("k")
    s.update("before")
    with pytest.raises(SerializationError) as info:
        s.update(Opaque(1))
    assert "Opaque" in str(info.value)
    assert "Pickle" in str(info.value)
    assert isinstance(info.value, TypeError)
    assert s.value() == "before"
    with pytest.raises(SerializationError) as info:
        kb.set_current_key(Opaque(2))
    assert "Opaque" in str(info.value) and "Pickle" in str(info.value)
    assert kb.get_current_key() == "k"
    lst = kb.get_state(ListStateDescriptor("l"))
    with pytest.raises(SerializationError):
        lst.add_all([1, Opaque(3)])
    assert lst.get() == []


def test_pickle_serializer_accepts_unknown_type(kb):
    s = kb.get_state(ValueStateDescriptor("p", Pickle()))
    m = kb.get_state(MapStateDescriptor("pm", Str(), Pickle()))
    kb.set_current_key("k")
    s.update(Opaque([1, 2]))
    m.put("o", Opaque("x"))
    assert s.value() == Opaque([1, 2])
    assert m.get("o") == Opaque("x")
    assert pickle.loads(pickle.dumps(s.value())) == Opaque([1, 2])


def test_custom_key_serializer_refuses_other_key_types(make_backend, clock):
    kb = make_backend().create_keyed_state_backend(max_parallelism=MAXP, clock=clock, key_serializer=Str())
    try:
        s = kb.get_state(ValueStateDescriptor("v"))
        kb.set_current_key("k")
        s.update(1)
        assert kb.current_key_group == ref_key_group(Str().serialize_key("k"), MAXP)
        with pytest.raises(SerializationError):
            kb.set_current_key(5)
        assert kb.get_current_key() == "k"
        assert list(kb.get_keys("v")) == ["k"]
    finally:
        kb.close()


# -- batch API --------------------------------------------------------------------------------
def test_value_batch_numpy_float64(kb):
    s = kb.get_state(ValueStateDescriptor("f", Float64()))
    s.update_batch(np.array([1, 2, 3], dtype=np.int64), np.array([1.5, -0.0, math.inf]))
    out = s.value_batch(np.array([3, 2, 1, 4], dtype=np.int64))
    assert isinstance(out, np.ndarray) and out.dtype == np.float64
    assert out[0] == math.inf and out[1] == 0.0 and math.copysign(1, out[1]) == -1 and out[2] == 1.5
    assert math.isnan(out[3])
    filled = s.value_batch(np.array([4, 1], dtype=np.int64), fill=-7.0)
    assert filled.dtype == np.float64 and filled.tolist() == [-7.0, 1.5]
    # single-key reads see batch writes, and the batch did not move the current key
    kb.set_current_key("current")
    s.update_batch(np.array([9], dtype=np.int64), np.array([9.5]))
    assert kb.get_current_key() == "current"
    assert s.value() is None
    kb.set_current_key(9)
    assert s.value() == 9.5
    kb.set_current_key(2)
    s.update(2.25)
    assert s.value_batch(np.array([2], dtype=np.int64)).tolist() == [2.25]
    assert kb.num_state_entries() == 4
    assert sorted(kb.get_keys("f")) == [1, 2, 3, 9]


def test_value_batch_default_from_descriptor(kb):
    s = kb.get_state(ValueStateDescriptor("f", Float64(), default=-1.0))
    s.update_batch(np.array([1], dtype=np.int64), np.array([1.0]))
    assert s.value_batch(np.array([1, 2], dtype=np.int64)).tolist() == [1.0, -1.0]
    assert s.value_batch(np.array([1, 2], dtype=np.int64), fill=0.5).tolist() == [1.0, 0.5]
    assert s.value_batch([1, 2]) == [1.0, -1.0]


def test_value_batch_int64(kb):
    s = kb.get_state(ValueStateDescriptor("i", Int64()))
    keys = np.array([10, -20, 2 ** 40], dtype=np.int64)
    s.update_batch(keys, np.array([1, -(2 ** 63), 2 ** 63 - 1], dtype=np.int64))
    out = s.value_batch(keys)
    assert isinstance(out, np.ndarray) and out.dtype == np.int64
    assert out.tolist() == [1, -(2 ** 63), 2 ** 63 - 1]
    with pytest.raises(StateError):
        s.value_batch(np.array([10, 11], dtype=np.int64))
    filled = s.value_batch(np.array([10, 11], dtype=np.int64), fill=0)
    assert filled.dtype == np.int64 and filled.tolist() == [1, 0]
    kb.set_current_key(-20)
    assert s.value() == -(2 ** 63)


def test_value_batch_lists(kb):
    s = kb.get_state(ValueStateDescriptor("f", Float64()))
    s.update_batch([1, 2], [0.5, 1.5])
    out = s.value_batch([2, 3, 1])
    assert out == [1.5, None, 0.5]
    assert s.value_batch([3], fill=4.0) == [4.0]
    auto = kb.get_state(ValueStateDescriptor("auto"))
    auto.update_batch(["a", (1, 2), 7], ["A", [1], {"x": 1}])
    assert auto.value_batch(["a", "missing", (1, 2), 7]) == ["A", None, [1], {"x": 1}]
    kb.set_current_key((1, 2))
    assert auto.value() == [1]


def test_value_batch_numpy_int_keys_equal_python_keys(kb):
    s = kb.get_state(ValueStateDescriptor("f", Float64()))
    s.update_batch(np.array([5, -5], dtype=np.int64), np.array([1.0, 2.0]))
    kb.set_current_key(5)
    assert s.value() == 1.0
    assert s.value_batch([5, -5]) == [1.0, 2.0]
    assert sorted(kb.get_keys("f")) == [-5, 5]
    for k in kb.get_keys("f"):
        assert type(k) is int


@pytest.mark.parametrize("visibility", ["never", "return"])
def test_value_batch_obeys_ttl(kb, clock, visibility):
    builder = statecore.StateTtlConfig.new_builder(statecore.Time.milliseconds(100)).disable_cleanup_in_background()
    builder = builder.never_return_expired() if visibility == "never" else builder.return_expired_if_not_cleaned_up()
    desc = ValueStateDescriptor("f", Float64())
    desc.enable_time_to_live(builder.build())
    s = kb.get_state(desc)
    clock.set(1000)
    keys = np.array([1, 2], dtype=np.int64)
    s.update_batch(keys, np.array([1.0, 2.0]))
    clock.set(1050)
    s.update_batch(np.array([2], dtype=np.int64), np.array([2.5]))
    clock.set(1099)
    assert s.value_batch(keys).tolist() == [1.0, 2.5]
    clock.set(1100)
    first = s.value_batch(keys)
    if visibility == "return":
        assert first.tolist() == [1.0, 2.5]
    else:
        assert math.isnan(first[0]) and first[1] == 2.5
    second = s.value_batch(keys)
    assert math.isnan(second[0]) and second[1] == 2.5
    assert kb.num_state_entries() == 1
    clock.set(1150)
    assert s.value_batch([1, 2], fill=0.0) == ([0.0, 2.5] if visibility == "return" else [0.0, 0.0])


def test_map_put_batch_get_batch(kb):
    m = kb.get_state(MapStateDescriptor("m", Int64(), Float64()))
    kb.set_current_key("k")
    m.put_batch(np.array([1, 2, 3], dtype=np.int64), np.array([0.5, 1.5, 2.5]))
    out = m.get_batch(np.array([3, 4, 1], dtype=np.int64))
    assert isinstance(out, np.ndarray) and out.dtype == np.float64
    assert out[0] == 2.5 and math.isnan(out[1]) and out[2] == 0.5
    assert m.get_batch(np.array([4], dtype=np.int64), fill=9.0).tolist() == [9.0]
    assert m.get(2) == 1.5
    assert m.get_batch([2, 4]) == [1.5, None]
    assert sorted(m.keys()) == [1, 2, 3]
    kb.set_current_key("other")
    assert m.get_batch([1, 2]) == [None, None]
    assert m.is_empty()
    auto = kb.get_state(MapStateDescriptor("auto"))
    auto.put_batch(["a", ("t", 1)], [{"v": 1}, None])
    assert auto.get_batch(["a", ("t", 1), "zz"]) == [{"v": 1}, None, None]
    assert auto.contains(("t", 1)) and not auto.contains("zz")
    assert kb.num_state_entries() == 5


def test_map_get_batch_int64_missing_needs_fill(kb):
    m = kb.get_state(MapStateDescriptor("m", Int64(), Int64()))
    kb.set_current_key("k")
    m.put_batch(np.array([1, 2], dtype=np.int64), np.array([10, 20], dtype=np.int64))
    out = m.get_batch(np.array([2, 1], dtype=np.int64))
    assert out.dtype == np.int64 and out.tolist() == [20, 10]
    with pytest.raises(StateError):
        m.get_batch(np.array([1, 3], dtype=np.int64))
    assert m.get_batch(np.array([1, 3], dtype=np.int64), fill=-1).tolist() == [10, -1]


def test_batch_key_out_of_range_changes_nothing(make_backend):
    kgr, kb = restricted_kb(make_backend)
    try:
        inside, outside = keys_by_group(kgr)
        s = kb.get_state(ValueStateDescriptor("f", Float64()))
        keys = np.array([inside[0], inside[1], outside[0], inside[2]], dtype=np.int64)
        with pytest.raises(KeyGroupOutOfRangeError):
            s.update_batch(keys, np.array([1.0, 2.0, 3.0, 4.0]))
        assert kb.num_state_entries() == 0
        assert list(kb.get_keys("f")) == []
        assert s.value_batch(list(inside)) == [None, None, None]
        with pytest.raises(KeyGroupOutOfRangeError):
            s.update_batch([outside[1]], [5.0])
        with pytest.raises(KeyGroupOutOfRangeError):
            s.value_batch(np.array([inside[0], outside[0]], dtype=np.int64))
        s.update_batch(np.array(inside, dtype=np.int64), np.array([1.0, 2.0, 3.0]))
        assert s.value_batch(np.array(inside, dtype=np.int64)).tolist() == [1.0, 2.0, 3.0]
        assert kb.num_state_entries() == 3
    finally:
        kb.close()


def test_batch_length_mismatch_refused(kb):
    s = kb.get_state(ValueStateDescriptor("f", Float64()))
    with pytest.raises((ValueError, StateError)):
        s.update_batch(np.array([1, 2], dtype=np.int64), np.array([1.0]))
    assert kb.num_state_entries() == 0


@pytest.mark.parametrize("keys, values", [
    ([5, {"a": 1}], [1.0, 2.0]),
    ([6, float("nan")], [1.0, 2.0]),
    ([7, 8], [1.0, "not a float"]),
], ids=["dict_key", "nan_key", "bad_value"])
def test_batch_with_unserializable_item_changes_nothing(kb, keys, values):
    s = kb.get_state(ValueStateDescriptor("f", Float64()))
    with pytest.raises(SerializationError):
        s.update_batch(keys, values)
    assert kb.num_state_entries() == 0
    assert s.value_batch([5, 6, 7, 8]) == [None] * 4


def test_map_bulk_writes_with_unserializable_item_change_nothing(kb):
    m = kb.get_state(MapStateDescriptor("m"))
    kb.set_current_key("k")
    m.put("keep", 0)
    with pytest.raises(SerializationError):
        m.put_all({"a": 1, "b": Opaque(2)})
    with pytest.raises(SerializationError):
        m.put_batch(["c", "d"], [3, Opaque(4)])
    assert m.items() == [("keep", 0)]
    assert kb.num_state_entries() == 1
