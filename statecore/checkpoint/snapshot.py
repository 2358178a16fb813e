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
import logging
import re
import threading
import uuid

from statecore._sink import DATA_MAGIC, SnapshotSink, file_chunks
from statecore._states import load_section, snapshot_delta
from statecore._tables import consistent_copy, prefault_tables, reserve_entries, snapshot_table, table_entries
from statecore.checkpoint import format as fmt
from statecore.checkpoint import storage as stg
from statecore.errors import CheckpointError, CorruptCheckpointError, StateMigrationError
from statecore.keygroups import KeyGroupRange

#: Data files are stored as ``<writer token>-data.sckd`` (see CheckpointWriter.write_file(unique=True)).
DATA_FILE = "data.sckd"
#: Snapshot bytes an LMDB-tier checkpoint keeps in memory before spilling a run (without memory_budget).
DEFAULT_SPILL_BYTES = 64 << 20
_log = logging.getLogger("statecore.checkpoint")

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
            _check_files(files, location)
            full = sum(int(f["length"]) for f in files)
            return cls(checkpoint_id=int(body["checkpoint_id"]), location=location, key_group_range=kgr,
                       size_bytes=int(body.get("size_bytes", full)), full_size_bytes=full, incremental=bool(body.get("incremental", False)),
                       format=str(body["format"]), metadata=body)
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise CorruptCheckpointError(f"{location}/_metadata: missing or invalid field ({exc})") from None


_MAX_OFFSET = 1 << 62
_CHK_FOLDER = re.compile(r"chk-(\d+)-")


def _int_field(value, lo=0, hi=_MAX_OFFSET):
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value < hi


def _check_files(files, location):
    """The per-file entries every reader relies on: well-typed, in range; else CorruptCheckpointError."""
    where = f"{location}/_metadata"
    if not isinstance(files, list):
        raise CorruptCheckpointError(f"{where}: 'files' is not a list")
    for f in files:
        ok = (isinstance(f, dict) and isinstance(f.get("path"), str) and _int_field(f.get("length"))
              and isinstance(f.get("sha256"), str) and isinstance(f.get("key_groups"), list)
              and all(isinstance(sec, list) and len(sec) == 4 and all(_int_field(x) for x in sec)
                      for sec in f["key_groups"]))
        if not ok:
            raise CorruptCheckpointError(f"{where}: malformed file entry {str(f)[:200]}")


def _check_keyed_states(body, location):
    where = f"{location}/_metadata"
    if body.get("kind", "keyed") != "keyed":
        raise CorruptCheckpointError(f"{where}: a {body.get('kind')!r} checkpoint, not keyed state")
    states = body.get("states")
    if not isinstance(states, list) or not all(
            isinstance(st, dict) and isinstance(st.get("name"), str) and _int_field(st.get("sid"), hi=1 << 16)
            for st in states):
        raise CorruptCheckpointError(f"{where}: malformed 'states'")


def load_checkpoint(location):
    """Read and verify the metadata of the checkpoint or savepoint at ``location``."""
    if isinstance(location, CompletedCheckpoint):
        location = location.location
    body = fmt.decode_metadata(stg.read_metadata(location), f"{location}/_metadata")
    completed = CompletedCheckpoint.from_metadata(location, body)
    # A chk-<id>-<instance> folder is named by the storage after its checkpoint id: metadata
    # naming another id was copied or swapped in from another checkpoint.
    m = _CHK_FOLDER.match(location.rstrip("/").rsplit("/", 1)[-1])
    if m and completed.format == "native" and int(m.group(1)) != completed.checkpoint_id:
        raise CorruptCheckpointError(f"{location}/_metadata: metadata of checkpoint {completed.checkpoint_id} "
                                     f"in the folder of checkpoint {m.group(1)} (misplaced file)")
    return completed


# ---------------------------------------------------------------- taking snapshots

#: Incremental checkpoints: a new full base after this many deltas (bounds restore work and chain length).
MAX_DELTAS = 20


class _Chain:
    """Per keyed backend checkpoint bookkeeping.

    Every checkpoint of one keyed backend runs on its own single-thread
    executor, so checkpoints complete in the order they were taken (an
    incremental delta is relative to the previous checkpoint's cut).
    ``files`` is the current incremental chain (base + deltas) and ``created``
    the shared files this backend wrote (deleted once no retained checkpoint
    references them).  ``broken`` forces the next checkpoint to be full after a
    failure.
    """

    def __init__(self):
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="statecore-ckpt")
        self.files = None      # chain as of the last completed checkpoint (None: no usable base)
        self.created = set()
        self.broken = False    # a checkpoint failed: the next cut is a full one
        self.has_base = False  # a full cut was taken (at cut time: deltas may follow)
        self.deltas = 0        # delta cuts since the last full cut


def _chain(kb):
    if kb.chain is None:
        kb.chain = _Chain()
    return kb.chain


class _Cut:
    """A consistent cut of a keyed backend: state metadata + tables (or copies) to serialize.

    With incremental checkpoints on, the cut also takes the set of prefixes
    touched since the previous cut (``delta``); ``delta`` is None for a full one.
    """

    def __init__(self, kb, copy, incremental=False):
        self.max_parallelism = kb.max_parallelism
        self.kgr = kb.key_group_range
        self.job_id, self.operator_id = kb.job_id, kb.operator_id
        self.key_serializer = list(kb.key_serializer.identity())
        self.now = kb._now_ms()
        self.backend = type(kb.state_backend).__name__ if kb.state_backend is not None else type(kb).__name__
        self.tables = []
        self.sinks = None
        self.delta = None
        self.spill_dir, self.spill_bytes = _spill_config(kb)
        for meta, layout, table in kb._snapshot_tables():
            if copy:
                table = consistent_copy(table)
            self.tables.append((meta, layout, table))
        if kb.incremental:
            chain = _chain(kb)
            dirty = kb._take_dirty()  # every checkpoint, full or not, starts a new delta
            if incremental and chain.has_base and not chain.broken and chain.deltas < MAX_DELTAS:
                self.delta = dirty
                chain.deltas += 1
            else:
                chain.has_base, chain.deltas, chain.broken = True, 0, False

    def serialize(self, cleanup_expired):
        """Fill the sinks from the tables (the expensive part; heap tables release the GIL).

        A full snapshot of a large table is serialized by two threads into two
        sinks (heap: halves of the slot array; LMDB tier: halves of the key
        groups).  The LMDB tier's sinks spill runs to a temp file in its working
        directory, each past half the spill limit, so a checkpoint's memory stays
        bounded.
        """
        parallel = self.delta is None
        spill = self.spill_bytes // 2 if parallel and self.spill_bytes else self.spill_bytes
        sink = SnapshotSink(self.kgr.start, self.kgr.end, self.spill_dir, spill)
        second = SnapshotSink(self.kgr.start, self.kgr.end, self.spill_dir, spill) if parallel else None
        sinks = [sink] if second is None else [sink, second]
        states = []
        if self.delta is not None:
            sink.set_state(0, self.now, 0)
            snapshot_delta(self.delta, {m["sid"]: (t, layout) for m, layout, t in self.tables}, sink)
            states = [dict(m, entries=table_entries(t)) for m, _, t in self.tables]
        else:
            for meta, layout, table in self.tables:
                ttl = meta["ttl"]
                drop = ttl["ttl_ms"] if ttl and cleanup_expired and ttl.get("cleanup_full_snapshot") else 0
                for s in sinks:
                    s.set_state(drop, self.now, layout)
                before = sum(s.records for s in sinks)
                snapshot_table(table, sink, second)
                states.append(dict(meta, entries=sum(s.records for s in sinks) - before))
        self.sinks, self.states, self.tables = sinks, states, None
        return self


def _body(cut, checkpoint_id, fmt_name, files, incremental, size):
    return {
        "format": fmt_name,
        "checkpoint_id": checkpoint_id,
        "job_id": cut.job_id,
        "operator_id": cut.operator_id,
        "backend": cut.backend,
        "max_parallelism": cut.max_parallelism,
        "key_group_range": [cut.kgr.start, cut.kgr.end],
        "key_serializer": cut.key_serializer,
        "incremental": incremental,
        "created_ms": cut.now,
        "states": cut.states,
        "files": files,
        "size_bytes": size,
        "full_size_bytes": sum(f["length"] for f in files),
    }


def _spill_config(kb):
    """(spill directory, bytes) for this backend's snapshot sink: the LMDB tier spills, the heap does not."""
    db_dir = getattr(kb, "db_dir", None)
    if db_dir is None:
        return None, 0
    budget = getattr(kb.state_backend, "memory_budget", None)
    return db_dir, max(1 << 20, int(budget) // 4) if budget else DEFAULT_SPILL_BYTES


def _write(cut, writer, checkpoint_id, fmt_name):
    """A self-contained checkpoint: one data file in the checkpoint folder."""
    chunks, sections, _ = file_chunks(cut.sinks)
    name, length, sha = writer.write_file(DATA_FILE, chunks, unique=True)
    files = [{"path": name, "length": length, "sha256": sha, "key_groups": sections}]
    body = _body(cut, checkpoint_id, fmt_name, files, False, length)
    location = writer.commit(fmt.encode_metadata(body))
    return CompletedCheckpoint.from_metadata(location, body)


def _write_chained(kb, storage, cut, writer, checkpoint_id):
    """Incremental mode: data goes to the shared folder; the metadata lists the chain (base + deltas)."""
    chain = _chain(kb)
    chunks, sections, _ = file_chunks(cut.sinks)
    name = f"{_instance(kb)}-{uuid.uuid4().hex}.sckd"
    relpath, length, sha = storage.write_shared_file(cut.job_id, cut.operator_id, name, chunks)
    chain.created.add(relpath)
    entry = {"path": relpath, "length": length, "sha256": sha, "key_groups": sections}
    files = (list(chain.files) if cut.delta is not None else []) + [entry]
    body = _body(cut, checkpoint_id, "native", files, cut.delta is not None, length)
    location = writer.commit(fmt.encode_metadata(body))
    chain.files = files
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
    """Keep the newest ``num_retained`` checkpoints of this instance; delete older ones after the commit.

    Shared (incremental) files this backend wrote are deleted only when no
    retained checkpoint references them.
    """
    keep = getattr(kb.state_backend, "num_retained", 1)
    suffix = "-" + _instance(kb)
    mine = [loc for loc in storage.list_checkpoints(kb.job_id, kb.operator_id) if loc.rstrip("/").endswith(suffix)]
    for loc in mine[:-keep]:
        if loc != completed.location:
            storage.delete_location(loc, background=True)  # uncommitted now, files removed by a thread
    storage.remove_leftover_trash(kb.job_id, kb.operator_id)
    chain = kb.chain
    if chain is not None and chain.created:
        referenced = set()
        for loc in mine[-keep:] + [completed.location]:
            try:
                referenced.update(f["path"] for f in load_checkpoint(loc).metadata["files"])
            except CheckpointError:
                continue  # a concurrently deleted or foreign checkpoint references nothing of ours
        for relpath in sorted(chain.created - referenced):
            storage.delete_shared(kb.job_id, kb.operator_id, relpath)
            chain.created.discard(relpath)


def _submit(kb, storage, cut, checkpoint_id):
    chain = _chain(kb)

    def work():
        try:
            if kb.incremental and cut.delta is not None and chain.files is None:
                raise CheckpointError(f"checkpoint {checkpoint_id} is incremental on top of a checkpoint that "
                                      "failed; the next checkpoint will be a full one")
            if cut.sinks is None:
                cut.serialize(cleanup_expired=True)
            # Older checkpoints' files still being removed in the background are gone before this one is
            # written: the disk never holds more checkpoints than it did with synchronous deletes.
            stg.wait_for_reclaim()
            writer = storage.create_writer(cut.job_id, cut.operator_id, checkpoint_id, _instance(kb))
            with writer:
                if kb.incremental:
                    completed = _write_chained(kb, storage, cut, writer, checkpoint_id)
                else:
                    completed = _write(cut, writer, checkpoint_id, "native")
        except BaseException:
            chain.files, chain.broken = None, True
            raise
        finally:
            # Drop the cut's tables (LMDB tier: buffer copies + a read transaction) as soon as this
            # checkpoint is done with them, even when it failed before reading them: the failed
            # future must not keep a transaction open (it would hold up map resizes).
            cut.tables = cut.sinks = None
        try:
            _retain(kb, storage, completed)
        except CheckpointError as exc:
            # The checkpoint is committed and durable: failing it now would make the caller
            # treat it as lost. The next checkpoint's retention deletes what is left over.
            # Flink does the same: discarding subsumed checkpoints (CheckpointsCleaner) only
            # logs failures, it never fails the completed checkpoint.
            _log.warning("checkpoint %s committed, but deleting older checkpoints failed: %s", completed.location, exc)
        return completed
    return chain.executor.submit(work)


def checkpoint(kb, checkpoint_id):
    """Synchronous checkpoint: durable when it returns (after any pending asynchronous ones)."""
    _check_id(checkpoint_id)
    storage = _storage(kb)
    cut = _Cut(kb, copy=False, incremental=True).serialize(cleanup_expired=True)
    return _submit(kb, storage, cut, checkpoint_id).result()


def checkpoint_async(kb, checkpoint_id):
    """Take the cut now (heap: a C copy of every table), serialize and write in the background.

    Updates made after this returns are not in the checkpoint.  A backend whose
    tables cannot be copied (``consistent_copy`` not supported) serializes the
    cut synchronously and only writes in the background.  Checkpoints of one
    keyed backend complete in the order they were taken.
    """
    _check_id(checkpoint_id)
    storage = _storage(kb)
    try:
        cut = _Cut(kb, copy=True, incremental=True)
    except NotImplementedError:
        cut = _Cut(kb, copy=False, incremental=True).serialize(cleanup_expired=True)
    return _submit(kb, storage, cut, checkpoint_id)


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
    spool_dir = getattr(kb, "db_dir", None)
    prefault = None
    try:
        mine = kb.key_group_range
        key_ser = list(kb.key_serializer.identity())
        for c in completed:
            body = c.metadata
            _check_keyed_states(body, c.location)
            if body.get("max_parallelism") != kb.max_parallelism:
                raise StateMigrationError(
                    f"checkpoint {c.location} was taken with max_parallelism={body.get('max_parallelism')}, "
                    f"restore asks for {kb.max_parallelism}; max_parallelism (the number of key groups) cannot "
                    "change on restore")
            if body.get("key_serializer") != key_ser:
                raise StateMigrationError(f"checkpoint {c.location} was written with key serializer "
                                          f"{body.get('key_serializer')}, restore uses {key_ser}")
        # Declare the (still empty) states and presize their tables from the metadata's counts, then let a
        # thread fault in the new tables' pages while the files are verified: the kernel zeroes ~100 MB
        # per million entries, work that otherwise lands on the first insert into each page.  No record
        # is read before every file verified; on any error the new backend is closed.
        tables = []
        for c in completed:
            theirs = c.key_group_range
            share = len(theirs.intersection(mine)) / max(len(theirs), 1)
            for st in c.metadata["states"]:
                _sid, table, _layout = kb._restore_state(st)
                if st["type"] != "map":  # map entries live in nested tables: the outer count is unknown
                    reserve_entries(table, int(st.get("entries", 0) * share))
                    tables.append(table)
        prefault = threading.Thread(target=prefault_tables, args=(tables,), name="statecore-restore-prefault",
                                    daemon=True)
        prefault.start()
        payloads = []
        for c in completed:
            body = c.metadata
            for f in body["files"]:
                wanted = [sec for sec in f["key_groups"] if sec[0] in mine]
                if not wanted:
                    continue
                where = f"{c.location}/{f['path']}"
                # Mapped (or spooled to a temp file and mapped): read through the page cache.
                data = stg.read_mapped(c.location, f["path"], expected_len=f["length"], spool_dir=spool_dir)
                fmt.verify_file(data, f["length"], f["sha256"], where)
                if data[:len(DATA_MAGIC)] != DATA_MAGIC:
                    raise CorruptCheckpointError(f"{where}: not a statecore data file (bad magic)")
                payloads.append((body, where, data, wanted))
        prefault.join()
        prefault = None
        # Everything verified: now load.
        kb.restore_clock_ms = kb._now_ms()
        _load(kb, payloads)
    except BaseException:
        if prefault is not None:
            prefault.join()  # it touches the tables' memory: close frees it
        kb.close()
        raise
    # The maps are unmapped when the last reference goes (here, on return).
    return kb


def _load(kb, payloads):
    """Load the wanted sections of verified data files, each key group's sections in checkpoint order (an
    incremental chain: its base, then its deltas).  A backend with a bulk path (the LMDB tier: ``_bulk_load``)
    takes the first section of every key group there, in key-group order; the rest, and whatever the bulk path
    leaves (a delta's tombstones), is replayed by ``load_section`` in order."""
    order = []
    for body, where, data, wanted in payloads:
        sidmap = {st["sid"]: kb._restore_state(st) for st in body["states"]}
        order.extend((data, off, length, kg, sidmap, where) for kg, off, length, _count in wanted)
    bulk = getattr(kb, "_bulk_load", None)
    replay = {}  # id of a section the bulk path took -> what of it is left to replay (None: nothing)
    if bulk is not None:
        first = {}
        for item in order:
            first.setdefault(item[3], item)
        firsts = sorted(first.values(), key=lambda item: item[3])
        left = {item[3]: item for item in bulk(firsts)}  # one first section per key group
        replay = {id(item): left.get(item[3]) for item in firsts}
    for item in order:
        item = replay.get(id(item), item)
        if item is not None:
            load_section(kb, *item)

