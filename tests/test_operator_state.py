"""Operator state: list (even split), union list and broadcast state, checkpoint and restore."""
import pytest

import statecore as sc
from statecore import ListStateDescriptor, MapStateDescriptor, StateMigrationError


@pytest.fixture
def backend(tmp_path):
    return sc.FsStateBackend(str(tmp_path / "c"))


def _instances(backend, parallelism, per):
    cps = []
    for i in range(parallelism):
        ob = backend.create_operator_state_backend()
        ob.get_list_state(ListStateDescriptor("offsets", int)).add_all([i * 100 + j for j in range(per)])
        ob.get_union_list_state(ListStateDescriptor("all", str)).add(f"inst{i}")
        ob.get_broadcast_state(MapStateDescriptor("rules", str, int)).put_all({"a": 1, "b": 2})
        cps.append(ob.checkpoint(1))
        ob.close()
    return cps


@pytest.mark.parametrize("old,new", [(3, 3), (3, 2), (2, 5), (1, 4), (4, 1)])
def test_redistribution(backend, old, new):
    cps = _instances(backend, old, per=6)
    all_elements = sorted(i * 100 + j for i in range(old) for j in range(6))
    got = []
    for idx in range(new):
        ob = backend.restore_operator_state_backend(cps, new, idx)
        part = ob.get_list_state(ListStateDescriptor("offsets", int)).get()
        if old == new:
            assert part == [idx * 100 + j for j in range(6)]  # unchanged parallelism keeps its own
        assert abs(len(part) - len(all_elements) / new) < 1  # even split
        got += part
        assert sorted(ob.get_union_list_state(ListStateDescriptor("all", str)).get()) == \
            sorted(f"inst{i}" for i in range(old))
        assert dict(ob.get_broadcast_state(MapStateDescriptor("rules", str, int)).items()) == {"a": 1, "b": 2}
    assert sorted(got) == all_elements  # every element exactly once


def test_mode_and_serializer_changes_refused(backend):
    cps = _instances(backend, 1, per=2)
    ob = backend.restore_operator_state_backend(cps, 1, 0)
    with pytest.raises(StateMigrationError):
        ob.get_union_list_state(ListStateDescriptor("offsets", int))
    ob = backend.restore_operator_state_backend(cps, 1, 0)
    with pytest.raises(StateMigrationError):
        ob.get_list_state(ListStateDescriptor("offsets", str))


def test_unclaimed_state_survives_the_next_checkpoint(backend):
    cps = _instances(backend, 2, per=3)
    ob = backend.restore_operator_state_backend(cps, 2, 1)
    cp2 = ob.checkpoint(2)  # "offsets" etc. never requested: still carried over
    ob2 = backend.restore_operator_state_backend([cp2], 1, 0)
    assert ob2.get_list_state(ListStateDescriptor("offsets", int)).get() == [100, 101, 102]


def test_list_state_semantics_and_errors(backend):
    ob = backend.create_operator_state_backend()
    s = ob.get_list_state(ListStateDescriptor("l"))
    item = [1, 2]
    s.add(item)
    item.append(3)  # later mutation does not leak into state
    assert s.get() == [[1, 2]]
    with pytest.raises(ValueError):
        s.add_all([1, None])
    assert s.get() == [[1, 2]]
    s.update([])
    assert s.get() == []
    with pytest.raises(sc.SerializationError):
        s.add(object())
    ob.close()
    with pytest.raises(sc.BackendClosedError):
        s.get()


def test_bad_arguments(backend):
    cps = _instances(backend, 1, per=1)
    with pytest.raises(ValueError):
        backend.restore_operator_state_backend(cps, 2, 2)
    with pytest.raises(ValueError):
        backend.restore_operator_state_backend(cps, 0, 0)
