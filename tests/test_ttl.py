"""State TTL timelines in the style of Flink's TtlStateTestBase: a ManualClock is stepped and
every state type is read at the edges (API.md section 4, docs/semantics.md "TTL").

Timelines that depend on ReturnExpiredIfNotCleanedUp disable background cleanup: with it on,
incremental cleanup may legitimately remove an expired entry before the read that would
return it.
"""

from datetime import timedelta

import pytest

import statecore
from statecore import (
    AggregatingStateDescriptor,
    ListStateDescriptor,
    MapStateDescriptor,
    ReducingStateDescriptor,
    StateTtlConfig,
    StateVisibility,
    Time,
    UpdateType,
    ValueStateDescriptor,
)
from model import Average

TTL = 100
T0 = 1000

ON_CREATE = UpdateType.OnCreateAndWrite
ON_READ = UpdateType.OnReadAndWrite
NEVER = StateVisibility.NeverReturnExpired
RETURN = StateVisibility.ReturnExpiredIfNotCleanedUp


class Latest:
    """AggregateFunction whose result is the last value added."""

    def create_accumulator(self):
        return ()

    def add(self, value, acc):
        return (value,)

    def get_result(self, acc):
        return acc[0]

    def merge(self, a, b):
        return b


class Kind:
    """How to write one value into a state type and read it back."""

    def __init__(self, make, write, read, expect, empty):
        self.make, self.write, self.read, self.expect, self.empty = make, write, read, expect, empty


KINDS = {
    "value": Kind(lambda n: ValueStateDescriptor(n),
                  lambda s, i: s.update(f"v{i}"), lambda s: s.value(), lambda i: f"v{i}", None),
    "list": Kind(lambda n: ListStateDescriptor(n),
                 lambda s, i: s.update([f"e{i}"]), lambda s: s.get(), lambda i: [f"e{i}"], []),
    "map": Kind(lambda n: MapStateDescriptor(n),
                lambda s, i: s.put("uk", i), lambda s: s.get("uk"), lambda i: i, None),
    "map_items": Kind(lambda n: MapStateDescriptor(n),
                      lambda s, i: s.put("uk", i), lambda s: s.items(), lambda i: [("uk", i)], []),
    "reducing": Kind(lambda n: ReducingStateDescriptor(n, lambda acc, v: v),
                     lambda s, i: s.add(i), lambda s: s.get(), lambda i: i, None),
    "aggregating": Kind(lambda n: AggregatingStateDescriptor(n, Latest()),
                        lambda s, i: s.add(i), lambda s: s.get(), lambda i: i, None),
}


def ttl_config(update_type=ON_CREATE, visibility=NEVER, ttl=TTL):
    return (StateTtlConfig.new_builder(Time.milliseconds(ttl))
            .set_update_type(update_type)
            .set_state_visibility(visibility)
            .disable_cleanup_in_background()
            .build())


def ttl_state(kb, descriptor, config):
    descriptor.enable_time_to_live(config)
    return kb.get_state(descriptor)


@pytest.fixture(params=sorted(KINDS))
def kind(request):
    return KINDS[request.param]


@pytest.fixture(params=[ON_CREATE, ON_READ], ids=["OnCreateAndWrite", "OnReadAndWrite"])
def update_type(request):
    return request.param


@pytest.fixture(params=[NEVER, RETURN], ids=["NeverReturnExpired", "ReturnExpiredIfNotCleanedUp"])
def visibility(request):
    return request.param


def test_timeline(kb, clock, kind, update_type, visibility):
    s = ttl_state(kb, kind.make("s"), ttl_config(update_type, visibility))
    kb.set_current_key("k")
    clock.set(T0)
    kind.write(s, 1)
    clock.set(T0 + TTL - 1)
    assert kind.read(s) == kind.expect(1)  # visible at t + ttl - 1
    last_access = T0
    if update_type is ON_READ:
        last_access = T0 + TTL - 1  # that read refreshed the timestamp
        clock.set(last_access + TTL - 1)
        assert kind.read(s) == kind.expect(1)  # alive only because reads extend it
        last_access = clock()
    clock.set(last_access + TTL)
    assert kb.num_state_entries() == 1  # expired but not cleaned up
    if visibility is RETURN:
        assert kind.read(s) == kind.expect(1)  # returned once ...
    assert kind.read(s) == kind.empty  # ... then never again
    assert kb.num_state_entries() == 0  # the read removed it
    assert kind.read(s) == kind.empty


def test_expired_exactly_at_ttl(kb, clock, kind, update_type, visibility):
    s = ttl_state(kb, kind.make("s"), ttl_config(update_type, visibility))
    kb.set_current_key("k")
    clock.set(T0)
    kind.write(s, 1)
    clock.set(T0 + TTL)  # no read in between, so no refresh even under OnReadAndWrite
    if visibility is RETURN:
        assert kind.read(s) == kind.expect(1)
    assert kind.read(s) == kind.empty
    kind.write(s, 2)  # a new write after expiry starts a fresh lifetime
    clock.set(T0 + 2 * TTL - 1)
    assert kind.read(s) == kind.expect(2)


def test_write_refreshes_timestamp(kb, clock, kind, visibility):
    s = ttl_state(kb, kind.make("s"), ttl_config(ON_CREATE, visibility))
    kb.set_current_key("k")
    clock.set(T0)
    kind.write(s, 1)
    clock.set(T0 + 50)
    kind.write(s, 2)
    clock.set(T0 + 50 + TTL - 1)
    assert kind.read(s) == kind.expect(2)
    clock.set(T0 + 50 + TTL)
    if visibility is RETURN:
        assert kind.read(s) == kind.expect(2)
    assert kind.read(s) == kind.empty


def test_keys_and_namespaces_expire_independently(kb, clock, kind):
    s = ttl_state(kb, kind.make("s"), ttl_config())
    clock.set(T0)
    kb.set_current_key("old")
    kind.write(s, 1)
    clock.set(T0 + 60)
    kb.set_current_key("new")
    kind.write(s, 2)
    s.set_current_namespace("ns")
    kind.write(s, 3)
    clock.set(T0 + TTL)
    assert kind.read(s) == kind.expect(3)
    s.set_current_namespace(None)
    assert kind.read(s) == kind.expect(2)
    kb.set_current_key("old")
    assert kind.read(s) == kind.empty
    assert kb.num_state_entries() == 2


def test_list_elements_expire_individually(kb, clock, update_type, visibility):
    s = ttl_state(kb, ListStateDescriptor("l"), ttl_config(update_type, visibility))
    kb.set_current_key("k")
    clock.set(T0)
    s.add("a")
    clock.set(T0 + 50)
    s.add("b")
    s.add_all(["c"])
    clock.set(T0 + TTL)  # "a" expired, "b" and "c" alive
    if visibility is RETURN:
        assert s.get() == ["a", "b", "c"]
    assert s.get() == ["b", "c"]  # under OnReadAndWrite this refreshed b and c to T0 + TTL
    assert kb.num_state_entries() == 1
    clock.set(T0 + 50 + TTL)  # written at T0 + 50: expired unless refreshed by the reads above
    if update_type is ON_READ:
        assert s.get() == ["b", "c"]  # refreshed again, to T0 + 50 + TTL
        clock.set(T0 + 50 + 2 * TTL)
    if visibility is RETURN:
        assert s.get() == ["b", "c"]
    assert s.get() == []
    assert kb.num_state_entries() == 0
    s.add("d")
    assert s.get() == ["d"]


def test_list_add_to_partly_expired_list(kb, clock):
    s = ttl_state(kb, ListStateDescriptor("l"), ttl_config())
    kb.set_current_key("k")
    clock.set(T0)
    s.add_all(["a", "b"])
    clock.set(T0 + TTL + 5)
    s.add("c")
    assert s.get() == ["c"]
    clock.set(T0 + 2 * TTL + 4)
    assert s.get() == ["c"]
    clock.set(T0 + 2 * TTL + 5)
    assert s.get() == []


def test_map_entries_expire_individually(kb, clock, update_type, visibility):
    s = ttl_state(kb, MapStateDescriptor("m"), ttl_config(update_type, visibility))
    kb.set_current_key("k")
    clock.set(T0)
    s.put("a", 1)
    clock.set(T0 + 50)
    s.put("b", 2)
    s.put_all({"c": None})
    assert kb.num_state_entries() == 3
    clock.set(T0 + TTL)  # "a" expired
    assert kb.num_state_entries() == 3
    if visibility is RETURN:
        assert sorted(s.items()) == [("a", 1), ("b", 2), ("c", None)]
    assert sorted(s.items()) == [("b", 2), ("c", None)]
    assert kb.num_state_entries() == 2
    assert s.get("a") is None and not s.contains("a")
    assert s.contains("b") and s.contains("c")
    assert sorted(s.keys()) == ["b", "c"]
    assert sorted(s.values(), key=repr) == [2, None]
    assert sorted(iter(s)) == ["b", "c"]
    assert not s.is_empty()
    clock.set(T0 + 50 + TTL)  # b and c written at T0 + 50: expired unless refreshed at T0 + TTL
    if update_type is ON_READ:
        assert s.get("b") == 2  # refreshed again, to T0 + 50 + TTL; c last read at T0 + TTL
        clock.set(T0 + 50 + 2 * TTL)
    if visibility is RETURN:
        assert s.get("b") == 2
    assert s.get("b") is None
    if visibility is NEVER:
        assert s.is_empty()
        assert s.items() == []
        assert kb.num_state_entries() == 0
    else:
        assert kb.num_state_entries() == 1  # expired "c" was not read yet
        assert s.items() == [("c", None)]
        assert s.is_empty()
        assert kb.num_state_entries() == 0


def test_map_get_of_expired_entry_removes_it(kb, clock, visibility):
    s = ttl_state(kb, MapStateDescriptor("m"), ttl_config(ON_CREATE, visibility))
    kb.set_current_key("k")
    clock.set(T0)
    s.put("a", "x")
    s.put("b", "y")
    clock.set(T0 + TTL)
    assert s.get("a") == ("x" if visibility is RETURN else None)
    assert kb.num_state_entries() == 1
    assert s.get("a") is None
    s.put("a", "z")
    assert s.get("a") == "z"


def test_map_contains_never_returns_expired(kb, clock, update_type):
    s = ttl_state(kb, MapStateDescriptor("m"), ttl_config(update_type, NEVER))
    kb.set_current_key("k")
    clock.set(T0)
    s.put("a", 1)
    clock.set(T0 + TTL - 1)
    assert s.contains("a")
    # OnReadAndWrite: the contains() above refreshed the entry to T0 + TTL - 1
    clock.set(T0 + TTL if update_type is ON_CREATE else T0 + 2 * TTL - 2)
    assert s.contains("a") is (update_type is ON_READ)


def test_map_remove_and_put_on_expired(kb, clock):
    s = ttl_state(kb, MapStateDescriptor("m"), ttl_config())
    kb.set_current_key("k")
    clock.set(T0)
    s.put_all({"a": 1, "b": 2})
    clock.set(T0 + TTL)
    s.remove("a")
    s.put("b", 3)
    assert s.items() == [("b", 3)]
    assert kb.num_state_entries() == 1


@pytest.mark.parametrize("which", ["reducing", "aggregating"])
def test_fold_into_expired_accumulator(kb, clock, visibility, which):
    if which == "reducing":
        desc, expect_never, expect_return = ReducingStateDescriptor("r", lambda a, b: a + b), 3, 8
    else:
        desc, expect_never, expect_return = AggregatingStateDescriptor("a", Average()), 3.0, 4.0
    s = ttl_state(kb, desc, ttl_config(ON_CREATE, visibility))
    kb.set_current_key("k")
    clock.set(T0)
    s.add(5)
    clock.set(T0 + TTL)
    s.add(3)  # NeverReturnExpired: the expired accumulator counts as absent
    expected = expect_return if visibility is RETURN else expect_never
    clock.set(T0 + 2 * TTL - 1)  # the add stamped T0 + TTL
    assert s.get() == expected
    clock.set(T0 + 2 * TTL)
    if visibility is RETURN:
        assert s.get() == expected
    assert s.get() is None


def test_update_none_and_clear_under_ttl(kb, clock):
    s = ttl_state(kb, ValueStateDescriptor("v", default="d"), ttl_config(ON_READ, RETURN))
    kb.set_current_key("k")
    clock.set(T0)
    s.update("x")
    s.update(None)
    assert s.value() == "d"
    s.update("y")
    clock.set(T0 + TTL)
    s.clear()
    assert s.value() == "d"
    assert kb.num_state_entries() == 0


def test_ttl_and_plain_states_side_by_side(kb, clock):
    plain = kb.get_state(ValueStateDescriptor("plain"))
    timed = ttl_state(kb, ValueStateDescriptor("timed"), ttl_config())
    kb.set_current_key("k")
    clock.set(T0)
    plain.update(1)
    timed.update(2)
    clock.set(T0 + 10 * TTL)
    assert plain.value() == 1
    assert timed.value() is None
    assert kb.num_state_entries() == 1


def test_expired_entries_counted_and_may_appear_in_get_keys(kb, clock):
    s = ttl_state(kb, ValueStateDescriptor("v"), ttl_config())
    clock.set(T0)
    for k in ["a", "b"]:
        kb.set_current_key(k)
        s.update(k)
    clock.set(T0 + 50)
    kb.set_current_key("c")
    s.update("c")
    clock.set(T0 + TTL)
    assert kb.num_state_entries() == 3  # expired-but-not-cleaned entries still count
    keys = set(kb.get_keys("v"))
    assert {"c"} <= keys <= {"a", "b", "c"}
    kb.set_current_key("a")
    assert s.value() is None
    assert kb.num_state_entries() == 2
    assert {"c"} <= set(kb.get_keys("v")) <= {"b", "c"}


# -- incremental cleanup -------------------------------------------------------------------
def _fill(kb, s, n, clock_at, clock):
    clock.set(clock_at)
    for i in range(n):
        kb.set_current_key(i)
        s.update(i)


@pytest.mark.parametrize("state_kind", ["value", "map", "list"])
def test_incremental_cleanup_on_state_access(kb, clock, state_kind):
    config = (StateTtlConfig.new_builder(Time.milliseconds(TTL))
              .cleanup_incrementally(10, False)
              .build())
    if state_kind == "value":
        s = ttl_state(kb, ValueStateDescriptor("s"), config)
        write, read, n_entries = (lambda i: s.update(i)), s.value, 100
    elif state_kind == "list":
        s = ttl_state(kb, ListStateDescriptor("s"), config)
        write, read, n_entries = (lambda i: s.add_all([i, i])), s.get, 100
    else:
        s = ttl_state(kb, MapStateDescriptor("s"), config)
        write, read, n_entries = (lambda i: s.put_all({"a": i, "b": i})), (lambda: s.get("a")), 200
    clock.set(T0)
    for i in range(100):
        kb.set_current_key(i)
        write(i)
    assert kb.num_state_entries() == n_entries  # nothing is expired yet: nothing cleaned
    expired_before = kb.metrics()["ttl_expired"]
    clock.set(T0 + TTL)
    kb.set_current_key("fresh")
    write(-1)
    fresh_entries = n_entries // 100
    counts = [kb.num_state_entries()]
    for _ in range(500):
        read()  # each access visits up to 10 entries of the state
        counts.append(kb.num_state_entries())
        if counts[-1] == fresh_entries:
            break
    assert counts[-1] == fresh_entries, f"entries did not drop to {fresh_entries}: {counts[:5]}...{counts[-5:]}"
    assert all(b <= a for a, b in zip(counts, counts[1:])), "entries grew while only reading"
    assert kb.metrics()["ttl_expired"] - expired_before >= n_entries
    assert read() is not None  # the fresh entry survived
    kb.set_current_key(5)
    assert read() in (None, [])


def test_incremental_cleanup_every_record(kb, clock):
    config = (StateTtlConfig.new_builder(Time.milliseconds(TTL))
              .cleanup_incrementally(10, True)
              .build())
    s = ttl_state(kb, ValueStateDescriptor("s"), config)
    _fill(kb, s, 100, T0, clock)
    assert kb.num_state_entries() == 100
    clock.set(T0 + TTL)
    for i in range(500):
        kb.set_current_key(("record", i))  # no state access at all
        if kb.num_state_entries() == 0:
            break
    assert kb.num_state_entries() == 0
    assert kb.metrics()["ttl_expired"] >= 100


def test_set_current_key_alone_does_not_clean_without_every_record(kb, clock):
    config = (StateTtlConfig.new_builder(Time.milliseconds(TTL))
              .cleanup_incrementally(10, False)
              .disable_cleanup_in_background()
              .build())
    s = ttl_state(kb, ValueStateDescriptor("s"), config)
    _fill(kb, s, 50, T0, clock)
    clock.set(T0 + TTL)
    for i in range(200):
        kb.set_current_key(("record", i))
    assert kb.num_state_entries() == 50


def test_incremental_cleanup_never_removes_live_entries(kb, clock):
    config = (StateTtlConfig.new_builder(Time.milliseconds(TTL))
              .cleanup_incrementally(10, True)
              .build())
    s = ttl_state(kb, ValueStateDescriptor("s"), config)
    _fill(kb, s, 60, T0, clock)
    clock.set(T0 + TTL - 1)
    for i in range(60):
        kb.set_current_key(i)
        assert s.value() == i
    assert kb.num_state_entries() == 60


def test_background_cleanup_is_invisible_under_never_return_expired(kb, clock):
    s = ttl_state(kb, ValueStateDescriptor("s"),
                  StateTtlConfig.new_builder(Time.milliseconds(TTL)).build())  # default cleanup
    _fill(kb, s, 30, T0, clock)
    clock.set(T0 + TTL - 1)
    for i in range(30):
        kb.set_current_key(i)
        assert s.value() == i
    clock.set(T0 + TTL)
    for i in range(30):
        kb.set_current_key(i)
        assert s.value() is None
    assert kb.num_state_entries() == 0


# -- configuration forms ---------------------------------------------------------------------
def _on_read_never_timeline(kb, clock, config, name, start=T0):
    """OnReadAndWrite + NeverReturnExpired with ttl=100 ms, robust to background cleanup."""
    s = ttl_state(kb, ValueStateDescriptor(name), config)
    kb.set_current_key(name)
    clock.set(start)
    s.update("x")
    clock.set(start + 99)
    assert s.value() == "x"
    clock.set(start + 198)
    assert s.value() == "x"  # alive only because the read at start + 99 refreshed it
    clock.set(start + 298)
    assert s.value() is None


def test_enum_spellings_are_equivalent(kb, clock):
    assert UpdateType.ON_CREATE_AND_WRITE is UpdateType.OnCreateAndWrite
    assert UpdateType.ON_READ_AND_WRITE is UpdateType.OnReadAndWrite
    assert StateVisibility.NEVER_RETURN_EXPIRED is StateVisibility.NeverReturnExpired
    assert StateVisibility.RETURN_EXPIRED_IF_NOT_CLEANED_UP is StateVisibility.ReturnExpiredIfNotCleanedUp
    config = (StateTtlConfig.new_builder(Time.milliseconds(100))
              .set_update_type(UpdateType.ON_READ_AND_WRITE)
              .set_state_visibility(StateVisibility.RETURN_EXPIRED_IF_NOT_CLEANED_UP)
              .disable_cleanup_in_background()
              .build())
    s = ttl_state(kb, ValueStateDescriptor("upper"), config)
    kb.set_current_key("k")
    clock.set(T0)
    s.update("x")
    clock.set(T0 + 99)
    assert s.value() == "x"  # refreshes
    clock.set(T0 + 198)
    assert s.value() == "x"
    clock.set(T0 + 298)
    assert s.value() == "x"  # expired, returned once
    assert s.value() is None
    _on_read_never_timeline(kb, clock, StateTtlConfig.new_builder(Time.milliseconds(100))
                            .set_update_type(UpdateType.ON_READ_AND_WRITE)
                            .set_state_visibility(StateVisibility.NEVER_RETURN_EXPIRED).build(), "upper2",
                            start=T0 + 1000)


@pytest.mark.parametrize("ttl", [timedelta(milliseconds=100), Time.milliseconds(100), timedelta(seconds=0.1)],
                         ids=["timedelta", "Time", "timedelta_seconds"])
def test_builder_duration_forms(kb, clock, ttl):
    _on_read_never_timeline(kb, clock, StateTtlConfig.new_builder(ttl).update_ttl_on_read_and_write()
                            .never_return_expired().build(), "s")


@pytest.mark.parametrize("ttl", [timedelta(milliseconds=100), 100, Time.milliseconds(100)],
                         ids=["timedelta", "millis", "Time"])
def test_constructor_form(kb, clock, ttl):
    config = StateTtlConfig(ttl=ttl, update_type=UpdateType.OnReadAndWrite,
                            state_visibility=StateVisibility.NeverReturnExpired)
    _on_read_never_timeline(kb, clock, config, "s")


def test_long_ttl_units(kb, clock):
    s = ttl_state(kb, ValueStateDescriptor("week"), StateTtlConfig.new_builder(Time.days(7)).build())
    h = ttl_state(kb, ValueStateDescriptor("hour"),
                  StateTtlConfig.new_builder(timedelta(hours=1)).build())
    kb.set_current_key("k")
    clock.set(T0)
    s.update("w")
    h.update("h")
    clock.set(T0 + 3_600_000 - 1)
    assert h.value() == "h"
    clock.set(T0 + 3_600_000)
    assert h.value() is None
    clock.set(T0 + 7 * 86_400_000 - 1)
    assert s.value() == "w"
    clock.set(T0 + 7 * 86_400_000)
    assert s.value() is None


def test_manual_clock(clock):
    assert clock() == 0
    clock.advance(5)
    assert clock() == 5
    clock.set(100)
    assert clock() == 100
    assert statecore.ManualClock(42)() == 42


def test_clock_is_the_backends_clock(make_backend):
    clock = statecore.ManualClock(10_000)
    kb = make_backend().create_keyed_state_backend(max_parallelism=128, clock=clock)
    try:
        s = ttl_state(kb, ValueStateDescriptor("v"), ttl_config())
        kb.set_current_key("k")
        s.update(1)
        clock.advance(TTL - 1)
        assert s.value() == 1
        clock.advance(1)
        assert s.value() is None
    finally:
        kb.close()
