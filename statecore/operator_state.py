"""Operator (non-keyed) state: Flink's OperatorStateBackend.

Three kinds, differing only in how they are redistributed on restore:

* ``get_list_state(desc)``: a list per parallel instance; on rescale the
  elements of all old instances are concatenated (in the order of the
  checkpoints passed) and split evenly into contiguous parts (Flink's
  SPLIT_DISTRIBUTE); at unchanged parallelism instance i keeps exactly the
  elements of checkpoint i, as in Flink.
* ``get_union_list_state(desc)``: every instance gets the union (UNION).
* ``get_broadcast_state(map_desc)``: every instance gets the same map; it is
  taken from the first checkpoint (all instances hold the same broadcast
  state, as in Flink).

Elements are serialized when they are added (so later mutation of an added
object does not leak into state, and a value the serializer refuses fails at
once); reads decode them.  Operator state is small by design: it lives in
Python lists and dicts and is checkpointed with the same storage, metadata
format and verification as keyed state.
"""
import uuid

from statecore.checkpoint import format as fmt
from statecore.checkpoint import storage as stg
from statecore.descriptors import ListStateDescriptor, MapStateDescriptor
from statecore.errors import BackendClosedError, CorruptCheckpointError, StateMigrationError

OPERATOR_DATA_MAGIC = b"SCOPDAT1"
SPLIT, UNION, BROADCAST = "split", "union", "broadcast"


class OperatorListState:
    """List state of one operator instance (ListState's methods)."""

    def __init__(self, backend, descriptor, mode, items=None):
        self._backend, self.descriptor, self.mode = backend, descriptor, mode
        self._ser = descriptor.serializer
        self._items = list(items or [])  # serialized elements

    def _encode_all(self, values):
        values = list(values)
        if any(v is None for v in values):
            raise ValueError(f"operator list state {self.descriptor.name!r}: None is not a valid element; "
                             "nothing was changed")
        return [self._ser.serialize(v) for v in values]

    def get(self):
        self._backend._check_open()
        return [self._ser.deserialize(b) for b in self._items]

    def add(self, value):
        self._backend._check_open()
        self._items.extend(self._encode_all([value]))

    def add_all(self, values):
        self._backend._check_open()
        self._items.extend(self._encode_all(values))

    def update(self, values):
        self._backend._check_open()
        self._items = self._encode_all(values)

    def clear(self):
        self._backend._check_open()
        self._items = []


class BroadcastState:
    """Broadcast state: a map identical on every instance (MapState's methods)."""

    def __init__(self, backend, descriptor, items=None):
        self._backend, self.descriptor = backend, descriptor
        self._kser, self._vser = descriptor.key_serializer, descriptor.value_serializer
        self._map = dict(items or {})  # serialized key -> serialized value

    def _k(self, key):
        self._backend._check_open()
        return self._kser.serialize_key(key)

    def get(self, key):
        b = self._map.get(self._k(key))
        return None if b is None else self._vser.deserialize(b)

    def put(self, key, value):
        kb = self._k(key)
        self._map[kb] = self._vser.serialize(value)

    def put_all(self, mapping):
        items = mapping.items() if hasattr(mapping, "items") else mapping
        encoded = [(self._k(k), self._vser.serialize(v)) for k, v in items]
        self._map.update(encoded)

    def remove(self, key):
        self._map.pop(self._k(key), None)

    def contains(self, key):
        return self._k(key) in self._map

    __contains__ = contains

    def items(self):
        self._backend._check_open()
        return [(self._kser.deserialize(k), self._vser.deserialize(v)) for k, v in self._map.items()]

    def keys(self):
        return [k for k, _ in self.items()]

    def values(self):
        return [v for _, v in self.items()]

    def __iter__(self):
        return iter(self.keys())

    def is_empty(self):
        self._backend._check_open()
        return not self._map

    def clear(self):
        self._backend._check_open()
        self._map = {}


def _put_bytes(out, b):
    n = len(b)
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    out += b


def _get_bytes(data, pos, end, where):
    n, shift = 0, 0
    while True:
        if pos >= end or shift > 63:
            raise CorruptCheckpointError(f"{where}: malformed length")
        c = data[pos]
        pos += 1
        n |= (c & 0x7F) << shift
        shift += 7
        if not c & 0x80:
            break
    if n > end - pos:
        raise CorruptCheckpointError(f"{where}: element length {n} runs past its section")
    return bytes(data[pos:pos + n]), pos + n


class OperatorStateBackend:
    """Operator state of one parallel instance (Flink's DefaultOperatorStateBackend)."""

    def __init__(self, state_backend, restored=None):
        self._state_backend = state_backend
        self._states = {}
        self._restored = dict(restored or {})  # name -> (meta, items)
        self._instance = uuid.uuid4().hex[:12]
        self.closed = False

    def _check_open(self):
        if self.closed:
            raise BackendClosedError("this operator state backend is closed")

    def _get(self, descriptor, mode, expected_type):
        self._check_open()
        if not isinstance(descriptor, expected_type):
            raise TypeError(f"{mode} state needs a {expected_type.__name__}, got {type(descriptor).__name__}")
        name = descriptor.name
        st = self._states.get(name)
        if st is not None:
            if st.mode != mode or st.descriptor.compatibility_key() != descriptor.compatibility_key():
                raise StateMigrationError(f"operator state {name!r} is registered as {st.mode} state with other "
                                          "serializers; use another name")
            return st
        items = None
        if name in self._restored:
            meta, items = self._restored.pop(name)
            if meta["mode"] != mode:
                raise StateMigrationError(f"operator state {name!r} was checkpointed as {meta['mode']} state and is "
                                          f"now requested as {mode} state")
            if meta["serializers"] != _serializer_ids(descriptor):
                raise StateMigrationError(f"operator state {name!r}: serializers changed from {meta['serializers']} "
                                          f"to {_serializer_ids(descriptor)}")
        st = BroadcastState(self, descriptor, items) if mode == BROADCAST else \
            OperatorListState(self, descriptor, mode, items)
        st.mode = mode
        self._states[name] = st
        return st

    def get_list_state(self, descriptor):
        """List state redistributed by even split on rescale."""
        return self._get(descriptor, SPLIT, ListStateDescriptor)

    def get_union_list_state(self, descriptor):
        """List state of which every instance gets the union on restore."""
        return self._get(descriptor, UNION, ListStateDescriptor)

    def get_broadcast_state(self, descriptor):
        """A map that is the same on every instance."""
        return self._get(descriptor, BROADCAST, MapStateDescriptor)

    def checkpoint(self, checkpoint_id):
        """Write all operator state to the backend's checkpoint storage; durable when it returns."""
        from statecore.checkpoint.snapshot import CompletedCheckpoint
        self._check_open()
        data = bytearray(OPERATOR_DATA_MAGIC)
        states = []
        entries = [(n, st.mode, _serializer_ids(st.descriptor), st) for n, st in self._states.items()]
        entries += [(n, meta["mode"], meta["serializers"], items) for n, (meta, items) in self._restored.items()]
        for name, mode, sers, st in entries:
            start = len(data)
            if isinstance(st, BroadcastState):
                pairs = list(st._map.items())
            elif isinstance(st, OperatorListState):
                pairs = [(b,) for b in st._items]
            elif mode == BROADCAST:
                pairs = list(st.items())
            else:
                pairs = [(b,) for b in st]
            for pair in pairs:
                for b in pair:
                    _put_bytes(data, b)
            states.append({"name": name, "mode": mode, "serializers": sers, "offset": start,
                           "length": len(data) - start, "count": len(pairs)})
        storage = self._state_backend.checkpoint_storage
        writer = storage.create_writer("operator-state", "op", checkpoint_id, self._instance)
        with writer:
            name, length, sha = writer.write_file("operator.sckd", data, unique=True)
            body = {"format": "native", "kind": "operator", "checkpoint_id": checkpoint_id,
                    "key_group_range": [0, 0], "max_parallelism": 1, "incremental": False, "states": states,
                    "files": [{"path": name, "length": length, "sha256": sha, "key_groups": []}]}
            location = writer.commit(fmt.encode_metadata(body))
        return CompletedCheckpoint.from_metadata(location, body)

    def close(self):
        self.closed = True
        self._states = {}
        self._restored = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def _serializer_ids(descriptor):
    if isinstance(descriptor, MapStateDescriptor):
        return [list(descriptor.key_serializer.identity()), list(descriptor.value_serializer.identity())]
    return [list(descriptor.serializer.identity())]


def _read_states(completed):
    """{name: (meta, items)} of one operator checkpoint, every file verified first."""
    body = completed.metadata
    if body.get("kind") != "operator":
        raise CorruptCheckpointError(f"{completed.location} is a keyed-state checkpoint, not operator state")
    f = body["files"][0]
    where = f"{completed.location}/{f['path']}"
    data = stg.read_file(completed.location, f["path"])
    fmt.verify_file(data, f["length"], f["sha256"], where)
    if data[:len(OPERATOR_DATA_MAGIC)] != OPERATOR_DATA_MAGIC:
        raise CorruptCheckpointError(f"{where}: not a statecore operator-state file (bad magic)")
    out = {}
    for meta in body["states"]:
        pos, end = meta["offset"], meta["offset"] + meta["length"]
        if not len(OPERATOR_DATA_MAGIC) <= pos <= end <= len(data):
            raise CorruptCheckpointError(f"{where}: state {meta['name']!r} lies outside the file")
        items = []
        per = 2 if meta["mode"] == BROADCAST else 1
        while pos < end:
            pair = []
            for _ in range(per):
                b, pos = _get_bytes(data, pos, end, where)
                pair.append(b)
            items.append(tuple(pair) if per == 2 else pair[0])
        if len(items) != meta["count"]:
            raise CorruptCheckpointError(f"{where}: state {meta['name']!r} has {len(items)} elements, "
                                         f"metadata says {meta['count']}")
        out[meta["name"]] = (meta, items)
    return out


def restore(state_backend, checkpoints, parallelism, index):
    """Operator state of instance ``index`` of ``parallelism`` from the checkpoints of all old instances."""
    from statecore.checkpoint.snapshot import load_checkpoint
    if isinstance(parallelism, bool) or not isinstance(parallelism, int) or parallelism < 1:
        raise ValueError(f"parallelism must be an int >= 1, got {parallelism!r}")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < parallelism:
        raise ValueError(f"index must be in 0..{parallelism - 1}, got {index!r}")
    olds = [_read_states(load_checkpoint(c)) for c in checkpoints]
    names = {n for o in olds for n in o}
    restored = {}
    for name in sorted(names):
        metas = [o[name][0] for o in olds if name in o]
        if len({(m["mode"], repr(m["serializers"])) for m in metas}) != 1:
            raise StateMigrationError(f"operator state {name!r} differs between the checkpoints being restored")
        meta = metas[0]
        per_instance = [o[name][1] if name in o else [] for o in olds]
        if meta["mode"] == BROADCAST:
            items = dict(per_instance[0])
        elif meta["mode"] == UNION:
            items = [b for part in per_instance for b in part]
        elif len(olds) == parallelism:
            items = per_instance[index]  # unchanged parallelism: keep this instance's own elements
        else:
            all_items = [b for part in per_instance for b in part]
            start = index * len(all_items) // parallelism
            end = (index + 1) * len(all_items) // parallelism
            items = all_items[start:end]
        restored[name] = (meta, items)
    return OperatorStateBackend(state_backend, restored)
