"""A plain-Python model of statecore's keyed state (docs/semantics.md): the test oracle.

Storage is two dicts, as the semantics page describes it:

* ``cells[(state, key, namespace)]`` holds one :class:`Cell` (value, timestamp) for
  Value/Reducing/Aggregating state and a non-empty list of cells (one per element) for
  List state;
* ``map_cells[(state, key, namespace, user_key)]`` holds one :class:`Cell` per map entry.

Keys, namespaces and user keys are stored under :func:`canon`, their typed identity
(``1``, ``1.0`` and ``True`` differ; NumPy scalars equal their Python value).

TTL follows Flink's ``AbstractTtlDecorator``: an entry written at ``t`` is expired at ``now``
iff ``t + ttl <= now``; writes stamp ``now``; a read of an unexpired entry refreshes it under
OnReadAndWrite; a read of an expired entry removes it and returns it only under
ReturnExpiredIfNotCleanedUp. There is deliberately no incremental cleanup here: model tests
build their TTL configs with ``disable_cleanup_in_background()``.
"""

import math
import struct

import numpy as np

_MISSING = object()


def canon(obj):
    """Hashable, type-exact identity of an Auto-encodable value.

    ``1``, ``1.0`` and ``True`` map to different identities, tuples differ from lists,
    ``-0.0`` differs from ``0.0``, all NaNs are one identity and NumPy scalars map to
    the identity of their Python equivalent.
    """
    if isinstance(obj, np.generic):
        obj = obj.item()
    if obj is None:
        return ("none",)
    if isinstance(obj, bool):
        return ("bool", obj)
    if isinstance(obj, int):
        return ("int", obj)
    if isinstance(obj, float):
        if math.isnan(obj):
            return ("float", "nan")
        return ("float", struct.pack(">d", obj))
    if isinstance(obj, str):
        return ("str", str(obj))
    if isinstance(obj, bytes):
        return ("bytes", bytes(obj))
    if isinstance(obj, tuple):
        return ("tuple", tuple(canon(x) for x in obj))
    if isinstance(obj, list):
        return ("list", tuple(canon(x) for x in obj))
    if isinstance(obj, dict):
        return ("dict", frozenset((canon(k), canon(v)) for k, v in obj.items()))
    raise TypeError(f"canon: unsupported type {type(obj).__name__}")


class Average:
    """AggregateFunction: the mean of the added numbers; accumulator ``(sum, count)``."""

    def create_accumulator(self):
        return (0, 0)

    def add(self, value, acc):
        return (acc[0] + value, acc[1] + 1)

    def get_result(self, acc):
        return acc[0] / acc[1]

    def merge(self, a, b):
        return (a[0] + b[0], a[1] + b[1])


def int_sum(a, b):
    """ReduceFunction used by the model tests."""
    return a + b


class TtlSpec:
    """The parts of a StateTtlConfig the model needs."""

    __slots__ = ("ttl_ms", "update_on_read", "return_expired")

    def __init__(self, ttl_ms, update_on_read, return_expired):
        self.ttl_ms = ttl_ms
        self.update_on_read = update_on_read
        self.return_expired = return_expired

    def __repr__(self):
        return (f"TtlSpec(ttl_ms={self.ttl_ms}, update_on_read={self.update_on_read}, "
                f"return_expired={self.return_expired})")


class Cell:
    __slots__ = ("value", "ts", "user_key")

    def __init__(self, value, ts, user_key=None):
        self.value = value
        self.ts = ts
        self.user_key = user_key

    def __repr__(self):
        return f"Cell({self.value!r}, ts={self.ts})"


class Model:
    """The keyed state of one keyed backend."""

    def __init__(self, clock):
        self.clock = clock
        self.cells = {}
        self.map_cells = {}
        self.key_objects = {}  # canon(key) -> the key object, for get_keys
        self.current_key = _MISSING
        self.states = {}  # state name -> Model*State

    # -- keys -------------------------------------------------------------------------
    def set_current_key(self, key):
        self.current_key = key
        self.key_objects.setdefault(canon(key), key)

    def get_current_key(self):
        if self.current_key is _MISSING:
            raise AssertionError("model: no current key")
        return self.current_key

    def num_state_entries(self):
        return len(self.cells) + len(self.map_cells)

    def stored_keys(self, state, namespace=None):
        """canon(key) of every key with something stored (expired or not) in state/namespace."""
        ns = canon(namespace)
        keys = {k for (s, k, n) in self.cells if s == state and n == ns}
        keys |= {k for (s, k, n, _) in self.map_cells if s == state and n == ns}
        return keys

    def visible_keys(self, state, namespace=None):
        """canon(key) of every key with at least one unexpired entry (no side effects)."""
        ns = canon(namespace)
        st = self.states[state]
        now = self.clock()
        keys = set()
        for (s, k, n), cell in self.cells.items():
            if s == state and n == ns:
                cells = cell if isinstance(cell, list) else [cell]
                if any(not st.is_expired(c, now) for c in cells):
                    keys.add(k)
        for (s, k, n, _), cell in self.map_cells.items():
            if s == state and n == ns and not st.is_expired(cell, now):
                keys.add(k)
        return keys

    # -- states -----------------------------------------------------------------------
    def _register(self, state):
        self.states[state.name] = state
        return state

    def value_state(self, name, ttl=None, default=None):
        return self._register(ModelValueState(self, name, ttl, default))

    def list_state(self, name, ttl=None):
        return self._register(ModelListState(self, name, ttl))

    def map_state(self, name, ttl=None):
        return self._register(ModelMapState(self, name, ttl))

    def reducing_state(self, name, reduce_function, ttl=None):
        return self._register(ModelReducingState(self, name, ttl, reduce_function))

    def aggregating_state(self, name, aggregate_function, ttl=None):
        return self._register(ModelAggregatingState(self, name, ttl, aggregate_function))


class ModelState:
    def __init__(self, model, name, ttl):
        self.model = model
        self.name = name
        self.ttl = ttl
        self.namespace = None

    def set_current_namespace(self, namespace):
        self.namespace = namespace

    def _slot(self, key=_MISSING):
        if key is _MISSING:
            key = self.model.get_current_key()
        else:
            self.model.key_objects.setdefault(canon(key), key)
        return (self.name, canon(key), canon(self.namespace))

    def now(self):
        return self.model.clock()

    def is_expired(self, cell, now=None):
        if self.ttl is None:
            return False
        if now is None:
            now = self.now()
        return cell.ts + self.ttl.ttl_ms <= now

    def read_rule(self, cell):
        """Apply Flink's read rule to one entry: returns (visible, keep_stored)."""
        if self.ttl is None:
            return True, True
        now = self.now()
        if self.is_expired(cell, now):
            return self.ttl.return_expired, False
        if self.ttl.update_on_read:
            cell.ts = now
        return True, True

    def _read_single(self, slot):
        """Read rule on a single-cell slot; returns the value or _MISSING."""
        cell = self.model.cells.get(slot)
        if cell is None:
            return _MISSING
        visible, keep = self.read_rule(cell)
        if not keep:
            del self.model.cells[slot]
        return cell.value if visible else _MISSING

    def clear(self):
        slot = self._slot()
        self.model.cells.pop(slot, None)
        for k in [k for k in self.model.map_cells if k[:3] == slot]:
            del self.model.map_cells[k]


class ModelValueState(ModelState):
    def __init__(self, model, name, ttl, default):
        super().__init__(model, name, ttl)
        self.default = default

    def value_for(self, key=_MISSING):
        v = self._read_single(self._slot(key))
        return self.default if v is _MISSING else v

    def update_for(self, value, key=_MISSING):
        slot = self._slot(key)
        if value is None:
            self.model.cells.pop(slot, None)
        else:
            self.model.cells[slot] = Cell(value, self.now())

    def value(self):
        return self.value_for()

    def update(self, value):
        self.update_for(value)

    def value_batch(self, keys):
        """Per-key reads, in order; _MISSING for a missing key."""
        return [self._read_single(self._slot(k)) for k in keys]

    def update_batch(self, keys, values):
        for k, v in zip(keys, values):
            self.update_for(v, k)


class ModelListState(ModelState):
    def get(self):
        slot = self._slot()
        cells = self.model.cells.get(slot, [])
        out, kept = [], []
        for cell in cells:
            visible, keep = self.read_rule(cell)
            if visible:
                out.append(cell.value)
            if keep:
                kept.append(cell)
        if kept:
            self.model.cells[slot] = kept
        else:
            self.model.cells.pop(slot, None)
        return out

    @staticmethod
    def _check(values):
        values = list(values)
        if any(v is None for v in values):
            raise ValueError("ListState elements must not be None")
        return values

    def add(self, value):
        self.add_all([value])

    def add_all(self, values):
        values = self._check(values)
        if values:
            now = self.now()
            self.model.cells.setdefault(self._slot(), []).extend(Cell(v, now) for v in values)

    def update(self, values):
        values = self._check(values)
        slot = self._slot()
        if values:
            now = self.now()
            self.model.cells[slot] = [Cell(v, now) for v in values]
        else:
            self.model.cells.pop(slot, None)


class ModelMapState(ModelState):
    def _entry_slot(self, user_key):
        return self._slot() + (canon(user_key),)

    def _read_entry(self, eslot):
        cell = self.model.map_cells.get(eslot)
        if cell is None:
            return _MISSING
        visible, keep = self.read_rule(cell)
        if not keep:
            del self.model.map_cells[eslot]
        return cell.value if visible else _MISSING

    def get(self, user_key):
        v = self._read_entry(self._entry_slot(user_key))
        return None if v is _MISSING else v

    def contains(self, user_key):
        return self._read_entry(self._entry_slot(user_key)) is not _MISSING

    def put(self, user_key, value):
        self.model.map_cells[self._entry_slot(user_key)] = Cell(value, self.now(), user_key)

    def put_all(self, mapping):
        for k, v in mapping.items():
            self.put(k, v)

    def remove(self, user_key):
        self.model.map_cells.pop(self._entry_slot(user_key), None)

    def items(self):
        slot = self._slot()
        out = []
        for eslot in [k for k in self.model.map_cells if k[:3] == slot]:
            cell = self.model.map_cells[eslot]
            v = self._read_entry(eslot)
            if v is not _MISSING:
                out.append((cell.user_key, v))
        return out

    def keys(self):
        return [k for k, _ in self.items()]

    def values(self):
        return [v for _, v in self.items()]

    def is_empty(self):
        return not self.items()

    def get_batch(self, user_keys):
        return [self._read_entry(self._entry_slot(k)) for k in user_keys]

    def put_batch(self, user_keys, values):
        for k, v in zip(user_keys, values):
            self.put(k, v)


class ModelReducingState(ModelState):
    def __init__(self, model, name, ttl, reduce_function):
        super().__init__(model, name, ttl)
        self.reduce_function = reduce_function

    def _usable_acc(self, slot):
        """The accumulator ``add`` folds into (Flink's TtlReduceFunction / TtlAggregateFunction)."""
        cell = self.model.cells.get(slot)
        if cell is None:
            return _MISSING
        if self.is_expired(cell) and not self.ttl.return_expired:
            return _MISSING
        return cell.value

    def get(self):
        v = self._read_single(self._slot())
        return None if v is _MISSING else v

    def add(self, value):
        slot = self._slot()
        acc = self._usable_acc(slot)
        new = value if acc is _MISSING else self.reduce_function(acc, value)
        self.model.cells[slot] = Cell(new, self.now())


class ModelAggregatingState(ModelReducingState):
    def __init__(self, model, name, ttl, aggregate_function):
        super().__init__(model, name, ttl, None)
        self.aggregate_function = aggregate_function

    def get(self):
        acc = self._read_single(self._slot())
        return None if acc is _MISSING else self.aggregate_function.get_result(acc)

    def add(self, value):
        slot = self._slot()
        acc = self._usable_acc(slot)
        if acc is _MISSING:
            acc = self.aggregate_function.create_accumulator()
        self.model.cells[slot] = Cell(self.aggregate_function.add(value, acc), self.now())


MISSING = _MISSING
