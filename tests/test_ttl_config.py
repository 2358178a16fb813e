"""Tests of statecore.ttl: Time, StateTtlConfig and its builder, clocks (pure Python)."""

import datetime
import json
import pickle
import time

import numpy as np
import pytest

from statecore.ttl import (
    ManualClock,
    StateTtlConfig,
    StateTtlConfigBuilder,
    StateVisibility,
    Time,
    TtlTimeCharacteristic,
    UpdateType,
    to_millis,
    wall_clock_ms,
)


# --- Time and to_millis ---

@pytest.mark.parametrize(
    "t, ms",
    [
        (Time.days(7), 7 * 86_400_000),
        (Time.hours(2), 7_200_000),
        (Time.minutes(3), 180_000),
        (Time.seconds(5), 5_000),
        (Time.milliseconds(250), 250),
    ],
)
def test_time_units(t, ms):
    assert t.to_milliseconds() == ms
    assert t.to_timedelta() == datetime.timedelta(milliseconds=ms)
    assert t == Time.milliseconds(ms) and hash(t) == hash(Time.milliseconds(ms))
    assert eval(repr(t)) == t
    assert pickle.loads(pickle.dumps(t)) == t


def test_time_repr_and_refusals():
    assert repr(Time.seconds(60)) == "Time.minutes(1)"
    assert repr(Time.milliseconds(1500)) == "Time.milliseconds(1500)"
    assert Time.seconds(np.int64(2)).to_milliseconds() == 2000
    with pytest.raises(TypeError):
        Time.seconds(1.5)
    with pytest.raises(TypeError):
        Time.seconds(True)
    with pytest.raises(AttributeError):
        Time.seconds(1)._ms = 3
    assert Time.seconds(1) != 1000


def test_to_millis_accepts_time_timedelta_int():
    assert to_millis(Time.seconds(2)) == 2000
    assert to_millis(datetime.timedelta(minutes=1)) == 60_000
    assert to_millis(datetime.timedelta(microseconds=1500)) == 1  # floor to ms
    assert to_millis(10) == 10
    assert to_millis(np.int32(10)) == 10


@pytest.mark.parametrize("bad", [0, -1, Time.seconds(0), Time.milliseconds(-5),
                                 datetime.timedelta(0), datetime.timedelta(seconds=-1),
                                 datetime.timedelta(microseconds=999)])
def test_to_millis_rejects_non_positive(bad):
    with pytest.raises(ValueError, match="positive"):
        to_millis(bad)


@pytest.mark.parametrize("bad, name", [(True, "bool"), (1.5, "float"), ("7d", "str"), (None, "NoneType")])
def test_to_millis_rejects_other_types(bad, name):
    with pytest.raises(TypeError, match=name):
        to_millis(bad)


def test_to_millis_rejects_overflow():
    with pytest.raises(ValueError, match="64-bit"):
        to_millis(1 << 63)
    assert to_millis((1 << 63) - 1) == (1 << 63) - 1


# --- enums ---

def test_enum_aliases():
    assert UpdateType.ON_CREATE_AND_WRITE is UpdateType.OnCreateAndWrite
    assert UpdateType.ON_READ_AND_WRITE is UpdateType.OnReadAndWrite
    assert UpdateType.DISABLED is UpdateType.Disabled
    assert StateVisibility.NEVER_RETURN_EXPIRED is StateVisibility.NeverReturnExpired
    assert StateVisibility.RETURN_EXPIRED_IF_NOT_CLEANED_UP is StateVisibility.ReturnExpiredIfNotCleanedUp
    assert TtlTimeCharacteristic.PROCESSING_TIME is TtlTimeCharacteristic.ProcessingTime
    assert [m.value for m in UpdateType] == [0, 1, 2]
    assert [m.value for m in StateVisibility] == [0, 1]
    assert UpdateType.ON_READ_AND_WRITE.name == "OnReadAndWrite"


# --- StateTtlConfig ---

def test_config_defaults_are_flinks():
    c = StateTtlConfig(1000)
    assert c.ttl_ms == 1000 and c.ttl == Time.seconds(1)
    assert c.update_type is UpdateType.OnCreateAndWrite
    assert c.state_visibility is StateVisibility.NeverReturnExpired
    assert c.ttl_time_characteristic is TtlTimeCharacteristic.ProcessingTime
    assert not c.is_cleanup_full_snapshot
    assert c.is_cleanup_in_background and not c.incremental_cleanup
    assert c.incremental_cleanup_size == 5 and not c.incremental_cleanup_every_record
    # Background cleanup on by default -> Flink's default incremental strategy (5, false).
    assert c.effective_incremental_cleanup() == (5, False)
    assert c.incremental_cleanup_active == 5
    assert not c.update_on_read and not c.return_expired


def test_config_accepts_timedelta_and_time():
    assert StateTtlConfig(datetime.timedelta(days=7)) == StateTtlConfig(Time.days(7))
    assert StateTtlConfig(Time.days(7)).ttl_ms == 604_800_000


def test_config_validation():
    with pytest.raises(ValueError, match="enable_time_to_live"):
        StateTtlConfig(1000, UpdateType.Disabled)
    with pytest.raises(ValueError):
        StateTtlConfig(0)
    with pytest.raises(TypeError, match="int"):
        StateTtlConfig(1000, 1)
    with pytest.raises(TypeError, match="str"):
        StateTtlConfig(1000, UpdateType.OnCreateAndWrite, "NeverReturnExpired")
    with pytest.raises(TypeError, match="StateVisibility"):
        StateTtlConfig(1000, UpdateType.OnCreateAndWrite, UpdateType.OnReadAndWrite)
    with pytest.raises(ValueError, match="cleanup size"):
        StateTtlConfig(1000, incremental_cleanup_size=0)
    with pytest.raises(TypeError):
        StateTtlConfig(1000, cleanup_full_snapshot=1)


def test_config_is_immutable_hashable_and_picklable():
    c = StateTtlConfig(1000, UpdateType.OnReadAndWrite, StateVisibility.ReturnExpiredIfNotCleanedUp)
    with pytest.raises(AttributeError):
        c.ttl_ms = 5
    with pytest.raises(AttributeError):
        c.new_attribute = 5
    assert c == StateTtlConfig(1000, UpdateType.ON_READ_AND_WRITE, StateVisibility.RETURN_EXPIRED_IF_NOT_CLEANED_UP)
    assert c != StateTtlConfig(1000)
    assert len({c, StateTtlConfig(1000, UpdateType.OnReadAndWrite,
                                  StateVisibility.ReturnExpiredIfNotCleanedUp)}) == 1
    assert pickle.loads(pickle.dumps(c)) == c
    assert c.update_on_read and c.return_expired
    r = repr(c)
    assert "Time.seconds(1)" in r and "OnReadAndWrite" in r and "ReturnExpiredIfNotCleanedUp" in r


def test_effective_incremental_cleanup_truth_table():
    # (explicit, background) -> effective, as Flink's getIncrementalCleanupStrategy.
    assert StateTtlConfig(1, cleanup_in_background=False).effective_incremental_cleanup() == (0, False)
    assert StateTtlConfig(1, cleanup_in_background=False).incremental_cleanup_active == 0
    assert StateTtlConfig(
        1, incremental_cleanup=True, incremental_cleanup_size=10,
        incremental_cleanup_every_record=True, cleanup_in_background=False,
    ).effective_incremental_cleanup() == (10, True)
    assert StateTtlConfig(1, incremental_cleanup_size=3).effective_incremental_cleanup() == (3, False)


# --- builder ---

def test_builder_contract_example():
    ttl = (StateTtlConfig.new_builder(Time.days(7))
           .set_update_type(UpdateType.OnCreateAndWrite)
           .set_state_visibility(StateVisibility.NeverReturnExpired)
           .cleanup_incrementally(10, False)
           .build())
    assert ttl.ttl_ms == 7 * 86_400_000
    assert ttl.effective_incremental_cleanup() == (10, False)
    assert ttl.incremental_cleanup


def test_builder_shortcuts_and_reuse():
    b = StateTtlConfig.new_builder(datetime.timedelta(seconds=1))
    assert isinstance(b, StateTtlConfigBuilder) and StateTtlConfig.Builder is StateTtlConfigBuilder
    c = b.update_ttl_on_read_and_write().return_expired_if_not_cleaned_up().cleanup_full_snapshot().build()
    assert c.update_on_read and c.return_expired and c.is_cleanup_full_snapshot
    c2 = b.update_ttl_on_create_and_write().never_return_expired().set_ttl(5).build()
    assert c2.ttl_ms == 5 and not c2.update_on_read and not c2.return_expired
    assert c.ttl_ms == 1000  # earlier build unaffected
    assert "ttl_ms=5" in repr(b)


def test_builder_background_cleanup_semantics():
    off = StateTtlConfig.new_builder(1000).disable_cleanup_in_background().build()
    assert off.effective_incremental_cleanup() == (0, False)
    # An explicit cleanup_incrementally survives disabling background cleanup (Flink).
    explicit = (StateTtlConfig.new_builder(1000).cleanup_incrementally(3, True)
                .disable_cleanup_in_background().build())
    assert explicit.effective_incremental_cleanup() == (3, True)
    back_on = StateTtlConfig.new_builder(1000).disable_cleanup_in_background().cleanup_in_background().build()
    assert back_on.effective_incremental_cleanup() == (5, False)


def test_builder_validation():
    with pytest.raises(ValueError):
        StateTtlConfig.new_builder(0)
    with pytest.raises(ValueError):
        StateTtlConfig.new_builder(1000).cleanup_incrementally(0, False)
    with pytest.raises(TypeError):
        StateTtlConfig.new_builder(1000).cleanup_incrementally(5, "yes")
    with pytest.raises(TypeError, match="UpdateType"):
        StateTtlConfig.new_builder(1000).set_update_type("OnReadAndWrite")
    b = StateTtlConfig.new_builder(1000).set_update_type(UpdateType.DISABLED)
    repr(b)  # must not raise even though build() will
    with pytest.raises(ValueError, match="Disabled"):
        b.build()


# --- dict round trip ---

def test_to_dict_from_dict_round_trip():
    c = (StateTtlConfig.new_builder(Time.hours(1)).update_ttl_on_read_and_write()
         .cleanup_full_snapshot().cleanup_incrementally(7, True).disable_cleanup_in_background().build())
    d = c.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["update_type"] == "OnReadAndWrite" and d["ttl_ms"] == 3_600_000
    assert StateTtlConfig.from_dict(json.loads(json.dumps(d))) == c
    assert StateTtlConfig.from_dict({"ttl_ms": 10}) == StateTtlConfig(10)
    assert StateTtlConfig.from_dict({"ttl_ms": 10, "update_type": "ON_READ_AND_WRITE"}).update_on_read


@pytest.mark.parametrize(
    "junk",
    [
        None,
        [],
        {},
        {"ttl_ms": "10"},
        {"ttl_ms": 10.0},
        {"ttl_ms": True},
        {"ttl_ms": 0},
        {"ttl_ms": 10, "update_type": "Sometimes"},
        {"ttl_ms": 10, "update_type": "Disabled"},
        {"ttl_ms": 10, "update_type": 1},
        {"ttl_ms": 10, "state_visibility": None},
        {"ttl_ms": 10, "ttl_time_characteristic": "EventTime"},
        {"ttl_ms": 10, "cleanup_full_snapshot": "false"},
        {"ttl_ms": 10, "incremental_cleanup_size": 0},
        {"ttl_ms": 10, "incremental_cleanup_size": 2.0},
        {"ttl_ms": 10, "surprise": 1},
    ],
)
def test_from_dict_rejects_junk(junk):
    with pytest.raises(ValueError):
        StateTtlConfig.from_dict(junk)


# --- clocks ---

def test_manual_clock():
    clock = ManualClock()
    assert clock() == 0 and clock.now_ms == 0
    assert clock.advance(10) == 10 and clock() == 10
    clock.advance(Time.seconds(1))
    clock.advance(datetime.timedelta(milliseconds=5))
    assert clock() == 1015
    clock.advance(0)
    assert clock() == 1015
    with pytest.raises(ValueError, match="set"):
        clock.advance(-1)
    assert clock() == 1015
    assert clock.set(3) == 3 and clock() == 3  # set may go back
    with pytest.raises(ValueError):
        clock.set(-1)
    with pytest.raises(TypeError):
        clock.advance(1.5)
    assert ManualClock(start_ms=500)() == 500
    assert repr(ManualClock(7)) == "ManualClock(now_ms=7)"
    with pytest.raises(AttributeError):
        clock.other = 1  # __slots__


def test_wall_clock_ms():
    before = time.time_ns() // 1_000_000
    now = wall_clock_ms()
    after = time.time_ns() // 1_000_000
    assert isinstance(now, int) and before <= now <= after
