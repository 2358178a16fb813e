"""Model-based test: every keyed-state operation on a real backend and on tests/model.py.

One hypothesis ``RuleBasedStateMachine`` per registered backend (pyroaring's
test_state_machine pattern): each rule applies the same operation to the backend and to the
model and compares what they return; after every step the invariant reads all states without
TTL for the current key and compares ``num_state_entries()``. States with TTL are only read
inside rules, because a TTL read has side effects (it removes expired entries and refreshes
timestamps under OnReadAndWrite) that the model replays in the same order.

TTL parameters (ttl_ms, update type, visibility) are drawn once per run. TTL configs disable
background cleanup so that the model, which has no incremental cleanup, agrees exactly.
"""

import collections
import math
import pathlib
import shutil
import tempfile

import numpy as np
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import statecore
from statecore.serializers import Float64
from backends import BACKENDS
from model import Average, Model, MISSING, TtlSpec, canon, int_sum

INT_KEYS = [0, 1, -1, 7, 42, -(2 ** 40), 2 ** 62, 2 ** 63 - 1, -(2 ** 63)]
KEY_POOL = INT_KEYS + [
    2 ** 63, 2 ** 64 + 5, 2 ** 100, -(2 ** 70),
    "", "a", "key", "ü日本語🙂", "x" * 700, "é" * 400,
    b"", b"a", b"\x00\xff" * 3,
    (), (1, "a"), ((2, b"z"), ("nested", (3,))), ("t" * 650,),
    True, False,
    1.0, 0.0, -2.5, float("inf"),
]
NAMESPACES = [None, 0, 1, -3, 2 ** 65, "", "ns", "窓"]
USER_KEYS = [0, 1, -3, 2 ** 65, -(2 ** 64), "k", "", "ключ", "u" * 700, "ü" * 400]

SMALL_INTS = st.integers(-1000, 1000)
BIG_INTS = st.integers(-(2 ** 80), 2 ** 80)
SHORT_TEXT = st.text(max_size=8)
LONG_TEXT = st.sampled_from(["L" * 700, "ŵ" * 350])
AUTO_VALUES = st.one_of(
    SMALL_INTS, BIG_INTS, SHORT_TEXT, LONG_TEXT,
    st.tuples(SMALL_INTS, SHORT_TEXT), st.lists(SMALL_INTS, max_size=3),
)
FLOATS = st.floats(allow_nan=False, width=64)
LIST_ELEMENTS = st.one_of(SMALL_INTS, SHORT_TEXT, LONG_TEXT)
MAP_VALUES = st.one_of(st.none(), SMALL_INTS, SHORT_TEXT)

UPDATE_TYPES = [statecore.UpdateType.OnCreateAndWrite, statecore.UpdateType.OnReadAndWrite]
VISIBILITIES = [statecore.StateVisibility.NeverReturnExpired,
                statecore.StateVisibility.ReturnExpiredIfNotCleanedUp]

VALUE_STATES = ["v", "v_ttl", "f", "f_ttl"]
FLOAT_STATES = ["f", "f_ttl"]
LIST_STATES = ["l", "l_ttl"]
MAP_STATES = ["m", "m_ttl"]
REDUCING_STATES = ["r", "r_ttl"]
AGG_STATES = ["a", "a_ttl"]
ALL_STATES = VALUE_STATES + LIST_STATES + MAP_STATES + REDUCING_STATES + AGG_STATES
# Batch access is keyed by int keys in the state's current namespace; the float states stay
# in the default namespace so that a batch call's namespace is never in question.
NAMESPACED_STATES = [s for s in ALL_STATES if s not in FLOAT_STATES]
PLAIN_STATES = [s for s in ALL_STATES if not s.endswith("_ttl")]

V_DEFAULT = "<default>"


def names(group):
    """Draw a state name from ``group``, TTL states three times out of four: the invariant
    already reads every plain state after each step, TTL states are only read by rules."""
    return st.one_of(st.sampled_from([n for n in group if n.endswith("_ttl")]), st.sampled_from(group))


# Half of the draws come from a few "hot" keys and namespaces, so that a run returns to the
# entries it wrote (and lets them expire) instead of scattering over the whole pool.
KEYS = st.one_of(st.sampled_from([1, "ü日本語🙂", ("t" * 650,)]), st.sampled_from(KEY_POOL))
NAMESPACE_DRAWS = st.one_of(st.sampled_from([None, "ns"]), st.sampled_from(NAMESPACES))


def same(actual, expected, what):
    assert canon(actual) == canon(expected), f"{what}: backend {actual!r} != model {expected!r}"


def same_multiset(actual, expected, what):
    actual, expected = list(actual), list(expected)
    assert collections.Counter(map(canon, actual)) == collections.Counter(map(canon, expected)), (
        f"{what}: backend {actual!r} != model {expected!r}")


def same_items(actual, expected, what):
    actual = list(actual)
    assert all(isinstance(kv, tuple) and len(kv) == 2 for kv in actual), f"{what}: {actual!r}"
    same_multiset(actual, expected, what)


def make_machine(backend_name):
    factory = BACKENDS[backend_name]

    class KeyedStateMachine(RuleBasedStateMachine):
        def __init__(self):
            super().__init__()
            self.tmp = pathlib.Path(tempfile.mkdtemp(prefix=f"statecore-sm-{backend_name}-"))
            self.clock = statecore.ManualClock(0)
            self.kb = factory(self.tmp).create_keyed_state_backend(max_parallelism=128, clock=self.clock)
            self.model = Model(self.clock)
            self.real = {}
            self.ttl_ms = 1
            self.ready = False

        def teardown(self):
            try:
                self.kb.close()
            finally:
                shutil.rmtree(self.tmp, ignore_errors=True)

        # -- setup --------------------------------------------------------------------
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
                      .set_update_type(update_type)
                      .set_state_visibility(visibility)
                      .disable_cleanup_in_background()
                      .build())
            m = self.model
            for suffix, ttl in (("", None), ("_ttl", spec)):
                descriptors = [
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
                for descriptor, model_state in descriptors:
                    if ttl is not None:
                        descriptor.enable_time_to_live(config)
                    self.real[descriptor.name] = self.kb.get_state(descriptor)
            self._set_key(key)
            self.ready = True

        def pair(self, name):
            return self.real[name], self.model.states[name]

        # -- keys, namespaces, clock ----------------------------------------------------
        @rule(key=KEYS)
        def set_key(self, key):
            self._set_key(key)

        def _set_key(self, key):
            self.kb.set_current_key(key)
            self.model.set_current_key(key)
            assert self.kb.current_key_group == statecore.assign_to_key_group(key, 128)

        @rule(name=st.sampled_from(NAMESPACED_STATES), namespace=NAMESPACE_DRAWS)
        def set_namespace(self, name, namespace):
            real, model = self.pair(name)
            real.set_current_namespace(namespace)
            model.set_current_namespace(namespace)

        # Three clock rules make time pass often enough for reads to land between a write, a
        # refresh (OnReadAndWrite) and the expiry of either; each may read every TTL state of
        # the current key right after moving the clock.
        @rule(data=st.data(), then_read=st.booleans())
        def advance_clock(self, data, then_read):
            self.clock.advance(data.draw(st.integers(0, 2 * self.ttl_ms), label="advance_ms"))
            if then_read:
                self.read_all_ttl_states()

        @rule(data=st.data(), then_read=st.booleans())
        def advance_clock_within_ttl(self, data, then_read):
            self.clock.advance(data.draw(st.integers(0, max(1, self.ttl_ms // 2)), label="advance_ms"))
            if then_read:
                self.read_all_ttl_states()

        @rule(data=st.data(), then_read=st.booleans())
        def advance_clock_to_edge(self, data, then_read):
            # an entry written now is visible after ttl - 1 and expired after ttl
            ttl = self.ttl_ms
            self.clock.advance(data.draw(st.sampled_from([ttl - 1, ttl, ttl + 1]), label="advance_ms"))
            if then_read:
                self.read_all_ttl_states()

        @rule(name=st.sampled_from(ALL_STATES), namespace=NAMESPACE_DRAWS)
        def get_keys(self, name, namespace):
            keys = list(self.kb.get_keys(name, namespace))
            got = [canon(k) for k in keys]
            assert len(got) == len(set(got)), f"get_keys({name!r}, {namespace!r}) repeats a key: {keys!r}"
            stored = self.model.stored_keys(name, namespace)
            if name.endswith("_ttl"):
                visible = self.model.visible_keys(name, namespace)
                assert visible <= set(got) <= stored, (
                    f"get_keys({name!r}, {namespace!r}) = {keys!r}; visible {visible}, stored {stored}")
            else:
                assert set(got) == stored, f"get_keys({name!r}, {namespace!r}) = {keys!r}; model {stored}"

        # -- clear (every state type) -----------------------------------------------------------
        @rule(name=names(ALL_STATES))
        def clear(self, name):
            real, model = self.pair(name)
            real.clear()
            model.clear()

        # -- ValueState -------------------------------------------------------------------
        @rule(name=names(VALUE_STATES), data=st.data())
        def value_update(self, name, data):
            value = data.draw(st.one_of(st.none(), FLOATS if name in FLOAT_STATES else AUTO_VALUES), label="value")
            real, model = self.pair(name)
            real.update(value)
            model.update(value)

        @rule(name=names(VALUE_STATES))
        def value_read(self, name):
            real, model = self.pair(name)
            same(real.value(), model.value(), f"{name}.value()")

        @rule(name=names(FLOAT_STATES),
              pairs=st.lists(st.tuples(st.sampled_from(INT_KEYS), FLOATS), min_size=1, max_size=6,
                             unique_by=lambda kv: kv[0]),
              as_numpy=st.booleans())
        def value_update_batch(self, name, pairs, as_numpy):
            keys = [k for k, _ in pairs]
            values = [v for _, v in pairs]
            real, model = self.pair(name)
            if as_numpy:
                real.update_batch(np.array(keys, dtype=np.int64), np.array(values, dtype=np.float64))
            else:
                real.update_batch(keys, values)
            model.update_batch(keys, values)

        @rule(name=names(FLOAT_STATES),
              keys=st.lists(st.sampled_from(INT_KEYS), min_size=0, max_size=6, unique=True),
              as_numpy=st.booleans(), fill=st.one_of(st.none(), FLOATS))
        def value_read_batch(self, name, keys, as_numpy, fill):
            real, model = self.pair(name)
            arg = np.array(keys, dtype=np.int64) if as_numpy else list(keys)
            result = real.value_batch(arg) if fill is None else real.value_batch(arg, fill=fill)
            expected = model.value_batch(keys)
            if as_numpy:
                assert isinstance(result, np.ndarray) and result.dtype == np.float64, repr(result)
                missing = math.nan if fill is None else fill
                expected = [missing if v is MISSING else v for v in expected]
                same([float(x) for x in result], expected, f"{name}.value_batch({keys}, fill={fill})")
            else:
                assert isinstance(result, list), repr(result)
                expected = [fill if v is MISSING else v for v in expected]
                same(result, expected, f"{name}.value_batch({keys}, fill={fill})")

        # -- ListState ----------------------------------------------------------------------
        @rule(name=names(LIST_STATES), method=st.sampled_from(["add", "add_all", "add_all_iter", "update"]),
              values=st.lists(LIST_ELEMENTS, min_size=1, max_size=4))
        def list_write(self, name, method, values):
            real, model = self.pair(name)
            if method == "add":
                values = values[:1]
                real.add(values[0])
            elif method == "add_all":
                real.add_all(tuple(values))
            elif method == "add_all_iter":
                real.add_all(iter(values))
            else:
                real.update(values)
            getattr(model, "update" if method == "update" else "add_all")(values)

        @rule(name=names(LIST_STATES), method=st.sampled_from(["add_all", "update"]))
        def list_write_empty(self, name, method):
            real, model = self.pair(name)
            getattr(real, method)([])
            getattr(model, method)([])

        @rule(name=names(LIST_STATES), values=st.lists(LIST_ELEMENTS, max_size=3),
              method=st.sampled_from(["add", "add_all", "update"]), data=st.data())
        def list_none_refused(self, name, values, method, data):
            real, _ = self.pair(name)
            bad = list(values)
            bad.insert(data.draw(st.integers(0, len(bad)), label="none_at"), None)
            try:
                if method == "add":
                    real.add(None)
                else:
                    getattr(real, method)(bad)
            except ValueError:
                pass
            else:
                raise AssertionError(f"{name}.{method} with a None element did not raise ValueError")
            # nothing changed: the model was not touched, and later reads compare against it

        @rule(name=names(LIST_STATES))
        def list_get(self, name):
            real, model = self.pair(name)
            got = real.get()
            assert isinstance(got, list), repr(got)
            same(got, model.get(), f"{name}.get()")

        # -- MapState -------------------------------------------------------------------------
        @rule(name=names(MAP_STATES), method=st.sampled_from(["put", "put_all", "remove"]),
              user_key=st.sampled_from(USER_KEYS), value=MAP_VALUES,
              mapping=st.dictionaries(st.sampled_from(USER_KEYS), MAP_VALUES, max_size=4))
        def map_write(self, name, method, user_key, value, mapping):
            real, model = self.pair(name)
            if method == "put":
                real.put(user_key, value)
                model.put(user_key, value)
            elif method == "put_all":
                real.put_all(mapping)
                model.put_all(mapping)
            else:
                real.remove(user_key)
                model.remove(user_key)

        @rule(name=names(MAP_STATES), user_key=st.sampled_from(USER_KEYS),
              method=st.sampled_from(["get", "contains", "items", "keys", "values", "iter", "is_empty"]))
        def map_read(self, name, user_key, method):
            real, model = self.pair(name)
            what = f"{name}.{method}({user_key!r})"
            if method == "get":
                same(real.get(user_key), model.get(user_key), what)
            elif method == "contains":
                same(real.contains(user_key), model.contains(user_key), what)
            elif method == "items":
                same_items(real.items(), model.items(), what)
            elif method == "keys":
                same_multiset(real.keys(), model.keys(), what)
            elif method == "iter":
                same_multiset(iter(real), model.keys(), what)
            elif method == "values":
                same_multiset(real.values(), model.values(), what)
            else:
                same(real.is_empty(), model.is_empty(), what)

        # -- Reducing / Aggregating -----------------------------------------------------------
        @rule(name=names(REDUCING_STATES + AGG_STATES), value=SMALL_INTS)
        def fold_add(self, name, value):
            real, model = self.pair(name)
            real.add(value)
            model.add(value)

        @rule(name=names(REDUCING_STATES + AGG_STATES))
        def fold_get(self, name):
            real, model = self.pair(name)
            same(real.get(), model.get(), f"{name}.get()")

        @rule()
        def read_all_ttl(self):
            self.read_all_ttl_states()

        def read_all_ttl_states(self):
            """One read of every TTL state (each read has TTL side effects, replayed by the model)."""
            for name in ALL_STATES:
                if name.endswith("_ttl"):
                    self._read(name)

        def _read(self, name):
            real, model = self.pair(name)
            if name in VALUE_STATES:
                same(real.value(), model.value(), f"{name}.value()")
            elif name in LIST_STATES:
                same(real.get(), model.get(), f"{name}.get()")
            elif name in MAP_STATES:
                same_items(real.items(), model.items(), f"{name}.items()")
            else:
                same(real.get(), model.get(), f"{name}.get()")

        # -- invariants ---------------------------------------------------------------------------
        @invariant()
        def backend_equals_model(self):
            if not self.ready:
                return
            same(self.kb.get_current_key(), self.model.get_current_key(), "get_current_key()")
            for name in PLAIN_STATES:
                self._read(name)
            assert self.kb.num_state_entries() == self.model.num_state_entries(), (
                f"num_state_entries: backend {self.kb.num_state_entries()} != model "
                f"{self.model.num_state_entries()}")

    KeyedStateMachine.__name__ = KeyedStateMachine.__qualname__ = f"KeyedStateMachine_{backend_name}"
    return KeyedStateMachine


for _name in sorted(BACKENDS):
    _machine = make_machine(_name)
    globals()[_machine.__name__] = _machine
    globals()[f"Test{_name.capitalize()}KeyedStateModel"] = _machine.TestCase
del _name, _machine
