"""The LMDB spill tier: keyed state larger than memory (Flink's EmbeddedRocksDBStateBackend).

``LMDBStateBackend`` keeps working state in a C write buffer (the memtable)
flushed into one LMDB environment per keyed backend (statecore/_lmdb.pyx
describes the storage design).  ``RocksDBStateBackend`` is the legacy name:
the LMDB tier + ``FileSystemCheckpointStorage(checkpoint_uri)``.

Working directories are scratch (checkpoints are the durable copy):

* ``db_path=None``: a temporary directory, removed on close.
* ``db_path`` given: each keyed backend uses ``db_path/<job>-<operator>-kg<start>-<end>``.
  A directory left behind by an earlier (dead) process is wiped on open, but
  only when it carries our marker file and its lock is free; a directory in use
  by another process raises ``StateError`` (an ``flock`` on ``LOCK``); a
  non-empty directory without the marker is never touched.
"""
import fcntl
import os
import re
import shutil
import tempfile

from statecore import _mdb as lmdb  # LMDB C API (vendored), named as py-lmdb was

from statecore._lmdb import LMDBStateTable, LMDBStore, bulk_load
from statecore._states import KeyedStateBackend
from statecore.backends.base import StateBackend
from statecore.checkpoint.storage import FileSystemCheckpointStorage
from statecore.errors import StateError
from statecore.serializers import Auto

MIB = 1 << 20
_NAMESPACES = Auto()  # the namespace serializer of every keyed backend (KeyedStateBackend.ns_serializer)
MARKER = "STATECORE_LMDB"
_LAYOUTS = {"value": 0, "reducing": 0, "aggregating": 0, "list": 1, "map": 2}
LOCK = "LOCK"
_HELD = set()  # working directories this process holds (a second keyed backend picks another name)
_LOCK_FDS = {}  # directory -> lock fd, closed in forked children


def _after_fork_in_child():
    for fd in list(_LOCK_FDS.values()):
        try:
            os.close(fd)
        except OSError:
            pass
    _LOCK_FDS.clear()
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _acquire(path):
    """Lock (and wipe) working directory ``path``; return the lock fd.  StateError when in use.

    I/O failures (a full disk, EIO, a read-only file system) raise StateError naming the path.
    """
    try:
        return _acquire_dir(path)
    except StateError:
        raise
    except OSError as e:
        raise StateError(f"cannot prepare the LMDB working directory {path!r}: {e}") from e


def _acquire_dir(path):
    os.makedirs(path, exist_ok=True)
    names = set(os.listdir(path))
    if names and MARKER not in names:
        raise StateError(f"LMDB working directory {path!r} is not empty and was not created by statecore; "
                         f"refusing to wipe it: choose an empty or new db_path")
    fd = os.open(os.path.join(path, LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StateError(f"LMDB working directory {path!r} is in use by another process (its lock file is "
                         f"held); give each process its own db_path") from None
    try:
        # ours and not locked: left over by an earlier process, so scratch
        for name in names - {LOCK, MARKER}:
            p = os.path.join(path, name)
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p)
            else:
                os.unlink(p)
        with open(os.path.join(path, MARKER), "w") as f:
            f.write("statecore LMDB working directory (scratch; wiped on reopen)\n")
    except BaseException:
        os.close(fd)  # do not keep the directory locked by a backend that was never created
        raise
    return fd


class LMDBKeyedStateBackend(KeyedStateBackend):
    """Keyed state in a shared C write buffer + one LMDB environment."""

    def __init__(self, max_parallelism=128, key_group_range=None, key_serializer=None, clock=None, job_id="job",
                 operator_id="operator", *, db_path=None, write_buffer_size=64 * MIB, max_write_buffer_number=2,
                 memory_budget=None, cache_entries=0, sync=False, map_size=256 * MIB, max_readers=1024):
        super().__init__(max_parallelism=max_parallelism, key_group_range=key_group_range,
                         key_serializer=key_serializer, clock=clock, job_id=job_id, operator_id=operator_id)
        dirty_budget = 32 * MIB
        max_write_buffer_number = max(1, int(max_write_buffer_number))
        cache_entries = max(0, int(cache_entries or 0))
        cache_bytes = 0
        if memory_budget is not None:
            # budget split: all write buffers (+ slot arrays, prefix index) 1/3, read cache 1/6, LMDB dirty pages
            # of a flush chunk 1/4, the rest slack (Python objects, allocator overhead)
            budget = int(memory_budget)
            write_buffer_size = max(4096, min(write_buffer_size, budget // 3 // max_write_buffer_number))
            dirty_budget = max(MIB, budget // 4)
            cache_bytes = max(4096, budget // 6)
        self._temp = db_path is None
        if self._temp:
            self._root = tempfile.mkdtemp(prefix="statecore-lmdb-")
            self._dir = self._root
        else:
            self._root = os.fspath(db_path)
            kgr = self.key_group_range
            base = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{job_id}-{operator_id}-kg{kgr.start}-{kgr.end}")
            self._dir = os.path.join(self._root, base)
            i = 1
            while os.path.abspath(self._dir) in _HELD:
                self._dir = os.path.join(self._root, f"{base}.{i}")
                i += 1
        self._pid = os.getpid()  # before anything can fail: _release_dir reads it
        self._lock_fd = _acquire(self._dir)
        key = os.path.abspath(self._dir)
        _HELD.add(key)
        _LOCK_FDS[key] = self._lock_fd
        try:
            self._store = LMDBStore(os.path.join(self._dir, "env"), write_buffer_size=write_buffer_size, sync=sync,
                                    map_size=map_size, max_readers=max_readers, dirty_budget=dirty_budget,
                                    max_write_buffer_number=max_write_buffer_number, cache_entries=cache_entries,
                                    cache_bytes=cache_bytes, clock=clock)
        except lmdb.Error as e:
            self._release_dir()
            raise StateError(f"cannot open the LMDB environment in {os.path.join(self._dir, 'env')!r}: {e}") from e
        except BaseException:
            self._release_dir()
            raise
        self.memory_budget = memory_budget
        self.write_buffer_size = write_buffer_size
        self.max_write_buffer_number = max_write_buffer_number
        self.cache_entries = cache_entries

    @property
    def db_dir(self):
        """This keyed backend's working directory."""
        return self._dir

    def get_state(self, descriptor):
        self._pending = descriptor  # read by _new_table when the state is new
        try:
            return super().get_state(descriptor)
        finally:
            self._pending = None

    def _new_table(self, nested):
        d = getattr(self, "_pending", None)
        layout, drop_ttl = (2 if nested else 0), 0
        if d is not None:
            layout = _LAYOUTS.get(d.state_type, layout)
            cfg = d.ttl_config
            if cfg is not None and cfg.is_cleanup_in_background:
                drop_ttl = cfg.ttl_ms  # flushes drop expired entries (Flink's compaction filter)
        return LMDBStateTable(self._store, nested, layout, drop_ttl)

    def get_keys(self, state_name, namespace=None):
        """Iterator over the keys with an entry in ``state_name`` under ``namespace`` (as of this call).

        Streamed with bounded memory: the state's buffered keys of that namespace are copied and sorted (keys
        only) and merged with an LMDB cursor of its own read transaction, read in chunks; values are never
        read (statecore/_lmdb.pyx LMDBKeyScan).  Writing while iterating is fine: the keys stay those of the
        call.  As in Flink, keys whose entries have expired but are not cleaned up yet may appear."""
        for meta, _layout, table in self._snapshot_tables():  # registered and restored-unclaimed states
            if meta["name"] == state_name:
                if not isinstance(table, LMDBStateTable):
                    break
                scan = table.key_scan(_NAMESPACES.serialize_key(namespace))
                return map(self.key_serializer.deserialize, scan)
        return super().get_keys(state_name, namespace)  # the usual errors (closed, unknown state)

    def _bulk_load(self, sections):
        """A restore's fast path (``statecore._lmdb.bulk_load``): load the first section of each key group
        straight into LMDB; returns the sections it left to ``load_section``."""
        return bulk_load(self._store, sections)

    def flush(self):
        """Flush the write buffer to LMDB now.

        Raises ``LMDBFlushError`` (a ``StateError`` naming the directory) when LMDB cannot be written (a full
        disk...).  Not sticky: nothing is dropped, and the next flush (this call again, or a later operation)
        retries; see ``statecore._lmdb.LMDBStore.flush`` for the rules."""
        self._store.flush()

    def metrics(self):
        m = super().metrics()
        sm = self._store.metrics()
        m.update(sm)
        m["bytes_in_memory"] = self._bytes_in_memory() + sm["bytes_in_memory"]
        m["ttl_expired"] += sm["flush_expired"]
        return m

    def _release_dir(self):
        key = os.path.abspath(self._dir)
        fd = _LOCK_FDS.pop(key, None)
        _HELD.discard(key)
        if fd is not None and os.getpid() == self._pid:
            if self._temp:
                shutil.rmtree(self._root, ignore_errors=True)
            os.close(fd)

    def close(self):
        """Release the backend.  Nothing is flushed (the working DB is scratch, checkpoints are the durable
        copy): a flush in progress stops early, a temporary directory is removed, a ``db_path`` directory is
        left to be wiped by the next open."""
        if self.closed:
            return
        super().close()
        self._store.close()
        if os.getpid() == self._pid:
            self._release_dir()


class LMDBStateBackend(StateBackend):
    """Working state in a C write buffer + LMDB on local disk (Flink's EmbeddedRocksDBStateBackend).

    ``db_path`` is the root of the working directories (a temporary directory
    per keyed backend when None, removed on close).  ``write_buffer_size`` bytes
    of buffered writes trigger a flush to LMDB.  ``memory_budget`` (bytes) caps
    the write buffer.  ``sync=False``: the working DB is scratch, checkpoints are
    the durable copy.
    """

    def __init__(self, db_path=None, *, write_buffer_size=64 * MIB, max_write_buffer_number=2, memory_budget=None,
                 cache_entries=0, sync=False, incremental=False, checkpoint_storage=None, map_size=256 * MIB,
                 max_readers=1024):
        super().__init__(checkpoint_storage=checkpoint_storage)
        if write_buffer_size <= 0:
            raise ValueError(f"write_buffer_size must be positive, got {write_buffer_size}")
        if max_write_buffer_number < 1:
            raise ValueError(f"max_write_buffer_number must be >= 1, got {max_write_buffer_number}")
        if memory_budget is not None and memory_budget <= 0:
            raise ValueError(f"memory_budget must be positive, got {memory_budget}")
        if map_size < 4096:
            raise ValueError(f"map_size must be at least 4096 bytes, got {map_size}")
        self.db_path = None if db_path is None else os.fspath(db_path)
        self.write_buffer_size = int(write_buffer_size)
        self.max_write_buffer_number = int(max_write_buffer_number)
        self.memory_budget = memory_budget
        self.cache_entries = cache_entries
        self.sync = bool(sync)
        self.incremental = bool(incremental)
        self.map_size = int(map_size)
        self.max_readers = int(max_readers)

    def set_db_storage_path(self, path):
        """Where working directories are created (Flink's ``setDbStoragePath``); None: a temp dir."""
        self.db_path = None if path is None else os.fspath(path)

    def _create_keyed(self, max_parallelism=128, key_group_range=None, key_serializer=None, clock=None,
                                   job_id="job", operator_id="operator"):
        """A new, empty keyed backend owning ``key_group_range`` (default: all key groups)."""
        return LMDBKeyedStateBackend(max_parallelism=max_parallelism, key_group_range=key_group_range,
                                     key_serializer=key_serializer, clock=clock, job_id=job_id,
                                     operator_id=operator_id, db_path=self.db_path,
                                     write_buffer_size=self.write_buffer_size,
                                     max_write_buffer_number=self.max_write_buffer_number,
                                     memory_budget=self.memory_budget, cache_entries=self.cache_entries,
                                     sync=self.sync, map_size=self.map_size, max_readers=self.max_readers)

    def __repr__(self):
        return (f"{type(self).__name__}(db_path={self.db_path!r}, write_buffer_size={self.write_buffer_size}, "
                f"checkpoint_storage={self.checkpoint_storage!r})")


class RocksDBStateBackend(LMDBStateBackend):
    """Flink 1.x name: the LMDB tier + ``FileSystemCheckpointStorage(checkpoint_uri)``."""

    def __init__(self, checkpoint_uri, **lmdb_options):
        if "checkpoint_storage" in lmdb_options:
            raise TypeError("RocksDBStateBackend takes checkpoint_uri, not checkpoint_storage")
        db_path = lmdb_options.pop("db_path", None)
        super().__init__(db_path, checkpoint_storage=FileSystemCheckpointStorage(checkpoint_uri), **lmdb_options)
        self.checkpoint_uri = checkpoint_uri
