"""Model-based test with checkpointing (RELIABILITY.md T4): tests/test_model_stateful.py's machine
plus checkpoint, restore, savepoint and rescale rules, against the same dict model (tests/model.py).

The machine of test_model_stateful.py (every Value/List/Map/Reducing/Aggregating operation,
the ``*_batch`` calls, namespaces, a 200-ish key pool with keys and map user keys of 650-700
characters, i.e. > 511 bytes serialized, TTL with every UpdateType x Visibility and clock
moves) is extended with:

* ``checkpoint``: a synchronous checkpoint; the model is copied as that checkpoint's oracle;
* ``checkpoint_async`` / ``await_async``: the cut is taken now, the future is awaited in a
  later step (after more mutations), and its oracle is the model at the call;
* ``restore_now``: checkpoint (sync or async) and replace the backend under test with one
  restored from it; the model is unchanged;
* ``rollback_to_latest``: replace the backend with one restored from the newest completed
  checkpoint (possibly several steps old, possibly async) and the model with its oracle;
* ``savepoint_into_other``: a canonical savepoint restored into the OTHER backend type, which
  becomes the backend under test (the run then alternates between heap and LMDB);
* ``rescale_split_union``: checkpoint, restore two instances with half the key groups each,
  read every plain state through the owning half (and ``get_keys`` through both), then
  checkpoint both halves and restore one instance from the two checkpoints (the union), which
  becomes the backend under test.

After every step the base invariant reads every plain state of the current key and compares
``num_state_entries()`` with the model; ``get_keys`` and TTL reads happen in rules.

LMDB runs with ``write_buffer_size=4096``, no read cache and incremental checkpoints, so it
spills constantly and restores from delta chains.  Checkpoints go to a file storage
(``num_retained=2``), savepoints to plain directories.

CI: ``max_examples=60, stateful_step_count=50`` per backend; ``STATECORE_SOAK=1``: 1,000 x 100.

Negative control: with ``STATECORE_DEBUG_DROP_FLUSH_TOMBSTONES=1`` (statecore/_lmdb.pyx: a flush skips the
LMDB delete of a tombstone) the LMDB machine, run in a child on deterministic examples without shrinking,
must report a divergence; the same examples without the switch must not (slow).
"""
import copy
import itertools
import os

import pytest

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import initialize, rule

import statecore
from statecore.keygroups import compute_key_group_range_for_operator_index as kg_range
from statecore.serializers import Float64

from backends import BACKENDS
from model import Average, TtlSpec, canon, int_sum
from test_model_stateful import (KEYS, NAMESPACED_STATES, PLAIN_STATES, UPDATE_TYPES, V_DEFAULT,
                                 VISIBILITIES, make_machine)

SOAK = os.environ.get("STATECORE_SOAK") == "1"
MAXP = 128


def make_backend(name, path):
    if name == "lmdb":
        return statecore.LMDBStateBackend(db_path=str(path), write_buffer_size=4096, cache_entries=0,
                                          incremental=True)
    return BACKENDS[name](path)


def other(name):
    names = sorted(BACKENDS)
    return names[(names.index(name) + 1) % len(names)]


def make_checkpoint_machine(backend_name):
    Base = make_machine(backend_name)

    class CheckpointStateMachine(Base):
        def __init__(self):
            super().__init__()
            self.kb.close()  # replaced by one with checkpoint storage (and an LMDB tuned for spilling)
            self.counter = itertools.count()
            self.current = backend_name
            self.cid = 0
            self.completed = []   # (CompletedCheckpoint, oracle), oldest first
            self.pending = []     # (future, oracle)
            self.descriptors = {}
            self.namespaces = {}
            self.kb = self._new_keyed(backend_name)

        def _backend(self, name):
            path = self.tmp / f"b{next(self.counter)}"
            path.mkdir()
            backend = make_backend(name, path)
            backend.checkpoint_storage = statecore.FileSystemCheckpointStorage(str(self.tmp / "ckpt"))
            backend.num_retained = 2
            return backend

        def _new_keyed(self, name, **kw):
            return self._backend(name).create_keyed_state_backend(max_parallelism=MAXP, clock=self.clock, **kw)

        def teardown(self):
            for fut, _ in self.pending:
                try:
                    fut.result(timeout=60)
                except Exception:  # noqa: BLE001 - the run already failed or is over
                    pass
            super().teardown()

        # -- setup: the base setup, keeping the descriptors to re-register after a restore ----------
        @initialize(ttl_ms=st.one_of(st.integers(1, 10), st.integers(1, 1000)),
                    update_type=st.sampled_from(UPDATE_TYPES),
                    visibility=st.sampled_from(VISIBILITIES), key=KEYS,
                    start=st.integers(0, 10 ** 6))
        def setup(self, ttl_ms, update_type, visibility, key, start):
            self.clock.set(start)
            self.ttl_ms = ttl_ms
            spec = TtlSpec(ttl_ms, update_type == statecore.UpdateType.OnReadAndWrite,
                           visibility == statecore.StateVisibility.ReturnExpiredIfNotCleanedUp)
            config = (statecore.StateTtlConfig.new_builder(statecore.Time.milliseconds(ttl_ms))
                      .set_update_type(update_type).set_state_visibility(visibility)
                      .disable_cleanup_in_background().build())
            m = self.model
            for suffix, ttl in (("", None), ("_ttl", spec)):
                pairs = [
                    (statecore.ValueStateDescriptor("v" + suffix, default=V_DEFAULT if not ttl else None),
                     m.value_state("v" + suffix, ttl, V_DEFAULT if not ttl else None)),
                    (statecore.ValueStateDescriptor("f" + suffix, Float64()), m.value_state("f" + suffix, ttl)),
                    (statecore.ListStateDescriptor("l" + suffix), m.list_state("l" + suffix, ttl)),
                    (statecore.MapStateDescriptor("m" + suffix), m.map_state("m" + suffix, ttl)),
                    (statecore.ReducingStateDescriptor("r" + suffix, int_sum),
                     m.reducing_state("r" + suffix, int_sum, ttl)),
                    (statecore.AggregatingStateDescriptor("a" + suffix, Average()),
                     m.aggregating_state("a" + suffix, Average(), ttl)),
                ]
                for descriptor, _ in pairs:
                    if ttl is not None:
                        descriptor.enable_time_to_live(config)
                    self.descriptors[descriptor.name] = descriptor
                    self.namespaces[descriptor.name] = None
            self._attach(self.kb)
            self._set_key(key)
            self.ready = True

        def _attach(self, kb):
            """Make ``kb`` the backend under test: state handles, namespaces and current key."""
            self.real = {}
            for name, descriptor in self.descriptors.items():
                state = kb.get_state(descriptor)
                state.set_current_namespace(self.namespaces[name])
                self.real[name] = state
            self.kb = kb
            if self.ready:
                self._set_key(self.model.get_current_key())

        def _replace(self, kb):
            old = self.kb
            self._attach(kb)
            old.close()

        @rule(name=st.sampled_from(NAMESPACED_STATES), namespace=st.sampled_from([None, "ns", 0, "窓", 2 ** 65]))
        def set_namespace(self, name, namespace):
            self.real[name].set_current_namespace(namespace)
            self.model.states[name].set_current_namespace(namespace)
            self.namespaces[name] = namespace

        # -- oracle copies ---------------------------------------------------------------------
        def _oracle(self):
            m = self.model
            return copy.deepcopy((m.cells, m.map_cells, m.key_objects))

        def _load_oracle(self, oracle):
            m = self.model
            m.cells, m.map_cells, key_objects = copy.deepcopy(oracle)
            m.key_objects.update(key_objects)

        def _next_id(self):
            self.cid += 1
            return self.cid

        def _drain(self):
            for fut, oracle in self.pending:
                self.completed.append((fut.result(timeout=60), oracle))
            self.pending = []
            del self.completed[:-2]

        # -- checkpoint rules --------------------------------------------------------------------
        @rule()
        def checkpoint(self):
            self._drain()  # checkpoints of one backend complete in order anyway
            cp = self.kb.checkpoint(self._next_id())
            assert cp.checkpoint_id == self.cid
            self.completed.append((cp, self._oracle()))
            del self.completed[:-2]

        @rule()
        def checkpoint_async(self):
            if len(self.pending) < 3:
                self.pending.append((self.kb.checkpoint_async(self._next_id()), self._oracle()))

        @rule()
        def await_async(self):
            self._drain()

        @rule(use_async=st.booleans())
        def restore_now(self, use_async):
            self._drain()
            if use_async:
                cp = self.kb.checkpoint_async(self._next_id()).result(timeout=60)
            else:
                cp = self.kb.checkpoint(self._next_id())
            self.completed.append((cp, self._oracle()))
            self._replace(self._restore(self.current, [cp.location]))

        @rule()
        def rollback_to_latest(self):
            self._drain()
            if not self.completed:
                return
            cp, oracle = self.completed[-1]
            self._replace(self._restore(self.current, [cp.location]))
            self._load_oracle(oracle)

        @rule()
        def savepoint_into_other(self):
            self._drain()
            target = self.tmp / f"sp{next(self.counter)}"
            sp = self.kb.savepoint(str(target))
            assert sp.format == "canonical"
            self.current = other(self.current)
            self.completed = []  # checkpoints of the previous backend type are not this job's chain
            self._replace(self._restore(self.current, [sp.location]))

        @rule()
        def rescale_split_union(self):
            self._drain()
            cp = self.kb.checkpoint(self._next_id())
            halves = [self._restore(self.current, [cp.location], key_group_range=kg_range(MAXP, 2, i))
                      for i in range(2)]
            try:
                self._check_halves(halves)
                cps = [h.checkpoint(self._next_id()) for h in halves]
            finally:
                for h in halves:
                    h.close()
            union = self._restore(self.current, [c.location for c in cps])
            self.completed = []  # the old single-instance chain ends here
            self._replace(union)

        def _restore(self, name, locations, **kw):
            return self._backend(name).restore_keyed_state_backend(locations, max_parallelism=MAXP, clock=self.clock,
                                                                   **kw)

        def _check_halves(self, halves):
            """Every plain state's keys and values, read through the half that owns each key."""
            for name in PLAIN_STATES:
                ns = self.namespaces[name]
                stored = self.model.stored_keys(name, ns)
                seen = set()
                for h in halves:
                    got = [canon(k) for k in h.get_keys(name, ns)]
                    assert len(got) == len(set(got)), f"{name}: a key repeats in one half"
                    for k in got:
                        assert k not in seen, f"{name}: key {k} restored into both halves"
                        seen.add(k)
                    assert all(statecore.assign_to_key_group(self.model.key_objects[k], MAXP) in h.key_group_range
                               for k in got if k in self.model.key_objects), f"{name}: key outside its half"
                assert seen == stored, f"{name}/{ns!r}: halves {seen} != model {stored}"
            model_key = self.model.current_key
            for key_canon in {k for (_, k, _) in self.model.cells} | {k for (_, k, _, _) in self.model.map_cells}:
                key = self.model.key_objects[key_canon]
                owner = halves[0] if statecore.assign_to_key_group(key, MAXP) in halves[0].key_group_range \
                    else halves[1]
                owner.set_current_key(key)
                self.model.set_current_key(key)
                for name in PLAIN_STATES:
                    state = owner.get_state(self.descriptors[name])
                    state.set_current_namespace(self.namespaces[name])
                    model_state = self.model.states[name]
                    if name in ("l",):
                        got, want = state.get(), model_state.get()
                    elif name in ("m",):
                        got, want = sorted(map(canon, (kv for kv in state.items()))), \
                            sorted(map(canon, model_state.items()))
                    elif name in ("r", "a"):
                        got, want = state.get(), model_state.get()
                    else:
                        got, want = state.value(), model_state.value()
                    assert canon(got) == canon(want), f"{name} of {key!r} via its half: {got!r} != {want!r}"
            self.model.set_current_key(model_key)

    CheckpointStateMachine.__name__ = CheckpointStateMachine.__qualname__ = f"CheckpointStateMachine_{backend_name}"
    return CheckpointStateMachine


_SETTINGS = settings(max_examples=1000 if SOAK else 60, stateful_step_count=100 if SOAK else 50)

for _name in sorted(BACKENDS):
    _machine = make_checkpoint_machine(_name)
    _machine.TestCase.settings = _SETTINGS
    globals()[_machine.__name__] = _machine
    globals()[f"Test{_name.capitalize()}CheckpointModel"] = _machine.TestCase
del _name, _machine


# -- negative control (RELIABILITY.md: every harness ships one) ---------------------------------------------------
# STATECORE_DEBUG_DROP_FLUSH_TOMBSTONES=1 plants a realistic LMDB-tier bug (statecore/_lmdb.pyx: a flush skips
# the LMDB delete of a tombstone, so removed values, list and map entries come back once their buffer is retired).
# The LMDB machine above, run in a child with the switch on, must report a divergence from the model.

NEGATIVE_EXAMPLES = 60   # the CI budget of the machine above
NEGATIVE_STEPS = 50


def negative_control_child():
    """Run the LMDB checkpoint machine once (deterministic examples, no shrinking: the first divergence is the
    report).  Prints ``DIVERGENCE <type>: <message>`` and exits 1, or prints ``NO DIVERGENCE`` and exits 0."""
    import sys
    import time

    from hypothesis import HealthCheck, Phase
    from hypothesis.stateful import run_state_machine_as_test

    planted = os.environ.get("STATECORE_DEBUG_DROP_FLUSH_TOMBSTONES") == "1"
    t0 = time.monotonic()
    try:
        run_state_machine_as_test(make_checkpoint_machine("lmdb"), settings=settings(
            max_examples=NEGATIVE_EXAMPLES, stateful_step_count=NEGATIVE_STEPS, deadline=None, database=None,
            derandomize=True, phases=(Phase.generate,), suppress_health_check=list(HealthCheck)))
    except Exception as e:  # noqa: BLE001 - any divergence the harness reports
        print(f"DIVERGENCE {type(e).__name__}: {str(e)[:600]} (planted={planted}, "
              f"{time.monotonic() - t0:.1f} s)", flush=True)
        sys.exit(1)
    print(f"NO DIVERGENCE (planted={planted}, {time.monotonic() - t0:.1f} s)", flush=True)
    sys.exit(0)


def _run_negative_control_child(tmp_path, planted):
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "STATECORE_DEBUG_DROP_FLUSH_TOMBSTONES"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    if planted:
        env["STATECORE_DEBUG_DROP_FLUSH_TOMBSTONES"] = "1"
    return subprocess.run([sys.executable, os.path.abspath(__file__), "negative-control"], capture_output=True,
                          text=True, timeout=100, env=env, cwd=str(tmp_path))


def test_negative_control_dropped_flush_tombstones_are_caught(tmp_path):
    proc = _run_negative_control_child(tmp_path, planted=True)
    print(f"\nnegative control (flush drops tombstones): {proc.stdout.strip()[-700:]}")
    assert proc.returncode == 1 and "DIVERGENCE AssertionError" in proc.stdout, \
        f"the planted bug went unnoticed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert "planted=True" in proc.stdout


@pytest.mark.slow
def test_negative_control_examples_pass_without_the_switch(tmp_path):
    """The same deterministic examples without the planted bug: no divergence (so the one above is the bug's)."""
    proc = _run_negative_control_child(tmp_path, planted=False)
    print(f"\nsame run without the switch: {proc.stdout.strip()[-700:]}")
    assert proc.returncode == 0 and "NO DIVERGENCE (planted=False" in proc.stdout, \
        f"exit {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"


if __name__ == "__main__":
    import sys
    if sys.argv[1:] == ["negative-control"]:
        negative_control_child()
