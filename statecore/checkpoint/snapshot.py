"""Checkpoints, savepoints and restore of keyed state (Flink's snapshot strategies).

A checkpoint of one keyed backend is a folder with one data file and a
``_metadata`` file written last (see docs/checkpoint-format.md):

* the data file holds one section per key group, each a run of records
  ``varint len(key) | composite key | varint len(value) | value | BE64 ts``;
  sections are what rescaling reads: a restoring backend reads exactly the key
  groups it owns, from the checkpoints of every old parallel instance;
* the metadata names every state (type, serializers, TTL), the key-group range,
  and every file with its length, SHA-256 and per-key-group offsets.

Restore verifies every file it will read (length and SHA-256) before it
touches any state; a mismatch raises ``CorruptCheckpointError``.  The
serializers come from the descriptors (code), never from checkpoint bytes.

The same data format serves every backend, so a checkpoint of the heap backend
restores into the LMDB tier and back; ``savepoint`` writes it as a
self-contained "canonical" snapshot, with ``cleanup_full_snapshot`` applied.
"""
import concurrent.futures
import dataclasses
import threading

from statecore._states import DATA_MAGIC, SnapshotSink, consistent_copy, load_section, snapshot_table
from statecore.checkpoint import format as fmt
from statecore.checkpoint import storage as stg
from statecore.errors import CheckpointError, CorruptCheckpointError, StateMigrationError
from statecore.keygroups import KeyGroupRange

DATA_FILE = "data.sckd"

_executor = None
_executor_lock = threading.Lock()


def _background():
    """One shared writer thread pool for asynchronous checkpoints (I/O bound, GIL released in C loops)."""
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="statecore-ckpt")
        return _executor


@dataclasses.dataclass(frozen=True)
class CompletedCheckpoint:
    """A completed checkpoint or savepoint (what ``checkpoint`` returns and ``load_checkpoint`` reads).

    ``size_bytes`` is what this checkpoint wrote; ``full_size_bytes`` what it
    references in total (equal for full checkpoints).
    """

    checkpoint_id: int
    location: str
    key_group_range: KeyGroupRange
    size_bytes: int
    full_size_bytes: int
    incremental: bool
    format: str
    metadata: dict = dataclasses.field(repr=False, compare=False)

    @classmethod
    def from_metadata(cls, location, body):
        try:
            kgr = KeyGroupRange(*body["key_group_range"])
            files = body["files"]
            size = sum(int(f["length"]) for f in files)
            return cls(checkpoint_id=int(body["checkpoint_id"]), location=location, key_group_range=kgr,
                       size_bytes=size, full_size_bytes=size, incremental=bool(body.get("incremental", False)),
                       format=str(body["format"]), metadata=body)
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptCheckpointError(f"{location}/_metadata: missing or invalid field ({exc})") from None


def load_checkpoint(location):
    """Read and verify the metadata of the checkpoint or savepoint at ``location``."""
    if isinstance(location, CompletedCheckpoint):
        location = location.location
    body = fmt.decode_metadata(stg.read_metadata(location), f"{location}/_metadata")
    return CompletedCheckpoint.from_metadata(location, body)


# ---------------------------------------------------------------- taking snapshots

class _Cut:
    """A consistent cut of a keyed backend: state metadata + tables (or copies) to serialize."""

    def __init__(self, kb, copy):
        self.max_parallelism = kb.max_parallelism
        self.kgr = kb.key_group_range
        self.job_id, self.operator_id = kb.job_id, kb.operator_id
        self.key_serializer = list(kb.key_serializer.identity())
        self.now = kb._now_ms()
        self.backend = type(kb.state_backend).__name__ if kb.state_backend is not None else type(kb).__name__
        self.tables = []
        self.sink = None
        for meta, layout, table in kb._snapshot_tables():
            if copy:
                table = consistent_copy(table)
            self.tables.append((meta, layout, table))

    def serialize(self, cleanup_expired):
        """Fill the sink from the tables (the expensive part; heap tables release the GIL)."""
        sink = SnapshotSink(self.kgr.start, self.kgr.end)
        states = []
        for meta, layout, table in self.tables:
            ttl = meta["ttl"]
            drop = ttl["ttl_ms"] if ttl and cleanup_expired and ttl.get("cleanup_full_snapshot") else 0
            sink.set_state(drop, self.now, layout)
            before = sink.records
            snapshot_table(table, sink)
            states.append(dict(meta, entries=sink.records - before))
        self.sink, self.states, self.tables = sink, states, None
        return self


def _ttl_full_snapshot_flag(meta):
    return bool(meta and meta.get("cleanup_full_snapshot"))


def _write(cut, writer, checkpoint_id, fmt_name):
    data, sections = cut.sink.collect()
    name, length, sha = writer.write_file(DATA_FILE, data)
    body = {
        "format": fmt_name,
        "checkpoint_id": checkpoint_id,
        "job_id": cut.job_id,
        "operator_id": cut.operator_id,
        "backend": cut.backend,
        "max_parallelism": cut.max_parallelism,
        "key_group_range": [cut.kgr.start, cut.kgr.end],
        "key_serializer": cut.key_serializer,
        "incremental": False,
        "created_ms": cut.now,
        "states": cut.states,
        "files": [{"path": name, "length": length, "sha256": sha, "key_groups": sections}],
    }
    location = writer.commit(fmt.encode_metadata(body))
    return CompletedCheckpoint.from_metadata(location, body)


def _storage(kb):
    if kb.state_backend is None:
        raise CheckpointError("this keyed backend was not created by a StateBackend, so it has no checkpoint "
                              "storage; create it with backend.create_keyed_state_backend(...)")
    return kb.state_backend.checkpoint_storage


def _instance(kb):
    return f"kg{kb.key_group_range.start}-{kb.key_group_range.end}"


def _check_id(checkpoint_id):
    if isinstance(checkpoint_id, bool) or not isinstance(checkpoint_id, int) or checkpoint_id < 0:
        raise ValueError(f"checkpoint_id must be a non-negative int, got {checkpoint_id!r}")


def _retain(kb, storage, completed):
    """Keep the newest ``num_retained`` checkpoints of this instance; delete older ones after the commit."""
    keep = getattr(kb.state_backend, "num_retained", 1)
    suffix = "-" + _instance(kb)
    mine = [loc for loc in storage.list_checkpoints(kb.job_id, kb.operator_id) if loc.rstrip("/").endswith(suffix)]
    for loc in mine[:-keep] if keep > 0 else []:
        if loc != completed.location:
            storage.delete_location(loc)


def _finish(kb, storage, cut, checkpoint_id):
    writer = storage.create_writer(cut.job_id, cut.operator_id, checkpoint_id, _instance(kb))
    with writer:
        completed = _write(cut, writer, checkpoint_id, "native")
    _retain(kb, storage, completed)
    return completed


def checkpoint(kb, checkpoint_id):
    """Synchronous checkpoint: durable when it returns."""
    _check_id(checkpoint_id)
    storage = _storage(kb)
    cut = _Cut(kb, copy=False).serialize(cleanup_expired=True)
    return _finish(kb, storage, cut, checkpoint_id)


def checkpoint_async(kb, checkpoint_id):
    """Take the cut now (heap: a C copy of every table), serialize and write in the background.

    Updates made after this returns are not in the checkpoint.  A backend whose
    tables cannot be copied (``consistent_copy`` not supported) serializes the
    cut synchronously and only writes in the background.
    """
    _check_id(checkpoint_id)
    storage = _storage(kb)
    try:
        cut = _Cut(kb, copy=True)
    except NotImplementedError:
        cut = _Cut(kb, copy=False).serialize(cleanup_expired=True)

    def work():
        if cut.sink is None:
            cut.serialize(cleanup_expired=True)
        return _finish(kb, storage, cut, checkpoint_id)
    return _background().submit(work)


def savepoint(kb, uri):
    """A canonical, self-contained savepoint at ``uri`` (expired entries left out per cleanup_full_snapshot)."""
    cut = _Cut(kb, copy=False).serialize(cleanup_expired=True)
    storage = stg.FileSystemCheckpointStorage(uri)
    writer = storage.create_writer(cut.job_id, cut.operator_id, 0, _instance(kb), kind="savepoint", target=uri)
    with writer:
        return _write(cut, writer, 0, "canonical")


# ---------------------------------------------------------------- restore

def restore(backend, checkpoints, **kwargs):
    """A new keyed backend holding exactly its key groups' state from ``checkpoints``.

    Pass the checkpoints of all old parallel instances and the new instance's
    ``key_group_range``.  Every file needed is verified before any state is
    loaded.  A different ``max_parallelism`` or key serializer raises
    ``StateMigrationError``.
    """
    if isinstance(checkpoints, (str, CompletedCheckpoint)):
        checkpoints = [checkpoints]
    completed = [load_checkpoint(c) for c in checkpoints]
    if not completed:
        raise ValueError("restore needs at least one checkpoint (or use create_keyed_state_backend)")
    kb = backend.create_keyed_state_backend(**kwargs)
    try:
        mine = kb.key_group_range
        key_ser = list(kb.key_serializer.identity())
        payloads = []
        for c in completed:
            body = c.metadata
            if body.get("max_parallelism") != kb.max_parallelism:
                raise StateMigrationError(
                    f"checkpoint {c.location} was taken with max_parallelism={body.get('max_parallelism')}, "
                    f"restore asks for {kb.max_parallelism}; max_parallelism (the number of key groups) cannot "
                    "change on restore")
            if body.get("key_serializer") != key_ser:
                raise StateMigrationError(f"checkpoint {c.location} was written with key serializer "
                                          f"{body.get('key_serializer')}, restore uses {key_ser}")
            for f in body["files"]:
                wanted = [sec for sec in f["key_groups"] if sec[0] in mine]
                if not wanted:
                    continue
                where = f"{c.location}/{f['path']}"
                data = stg.read_file(c.location, f["path"])
                fmt.verify_file(data, f["length"], f["sha256"], where)
                if data[:len(DATA_MAGIC)] != DATA_MAGIC:
                    raise CorruptCheckpointError(f"{where}: not a statecore data file (bad magic)")
                payloads.append((body, where, data, wanted))
        # Everything verified: now load.
        kb.restore_clock_ms = kb._now_ms()
        for c in completed:
            for st in c.metadata["states"]:
                kb._restore_state(st)
        for body, where, data, wanted in payloads:
            sidmap = {}
            for st in body["states"]:
                sidmap[st["sid"]] = kb._restore_state(st)
            for kg, off, length, _count in wanted:
                load_section(kb, data, off, length, kg, sidmap, where)
    except BaseException:
        kb.close()
        raise
    return kb
