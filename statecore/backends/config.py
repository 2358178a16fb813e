"""``state_backend_from_config``: a backend from Flink-style configuration keys.

Keys (Flink 2.x names; Flink 1.x names are accepted as deprecated aliases):

==========================================  ==========================================  =====================
key                                         meaning                                     alias
==========================================  ==========================================  =====================
state.backend.type                          hashmap | lmdb | rocksdb (= lmdb)            state.backend
execution.checkpointing.storage             jobmanager | filesystem                     state.checkpoint-storage
execution.checkpointing.dir                 checkpoint URI (implies filesystem)         state.checkpoints.dir
execution.checkpointing.savepoint-dir       default savepoint URI                       state.savepoints.dir
execution.checkpointing.incremental         true | false (LMDB tier)                    state.backend.incremental
execution.checkpointing.num-retained        completed checkpoints kept (default 1)
pipeline.max-parallelism                    default max_parallelism of keyed backends
state.backend.lmdb.<option>                 LMDB tier options (sizes like "64mb")       state.backend.rocksdb.<option>
==========================================  ==========================================  =====================

LMDB options: ``localdir`` (db_path), ``write-buffer-size``, ``max-write-buffer-number``,
``memory-budget``, ``cache-entries``, ``sync``, ``map-size``, ``max-readers``.
Unknown keys under ``state.`` raise ``ValueError`` naming the key; other keys
(the rest of a Flink configuration) are ignored.
"""
import re

from statecore.checkpoint.storage import FileSystemCheckpointStorage, JobManagerCheckpointStorage

_ALIASES = {
    "state.backend": "state.backend.type",
    "state.checkpoint-storage": "execution.checkpointing.storage",
    "state.checkpoints.dir": "execution.checkpointing.dir",
    "state.savepoints.dir": "execution.checkpointing.savepoint-dir",
    "state.backend.incremental": "execution.checkpointing.incremental",
}
_KNOWN = {"state.backend.type", "execution.checkpointing.storage", "execution.checkpointing.dir",
          "execution.checkpointing.savepoint-dir", "execution.checkpointing.incremental",
          "execution.checkpointing.num-retained", "pipeline.max-parallelism"}
_LMDB_OPTIONS = {
    "localdir": ("db_path", str), "write-buffer-size": ("write_buffer_size", "size"),
    "max-write-buffer-number": ("max_write_buffer_number", int), "memory-budget": ("memory_budget", "size"),
    "cache-entries": ("cache_entries", int), "sync": ("sync", bool), "map-size": ("map_size", "size"),
    "max-readers": ("max_readers", int),
}
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
          "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}


def parse_size(value, key="size"):
    """Bytes from an int or a string like ``"64mb"``, ``"1 GiB"``, ``"512k"`` (binary units, as Flink's MemorySize)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    m = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"{key}: {value!r} is not a size; use bytes or a string like '64mb' or '1gb'")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def _parse_bool(value, key):
    if isinstance(value, bool):
        return value
    s = str(value).strip().lower()
    if s in ("true", "1", "yes"):
        return True
    if s in ("false", "0", "no"):
        return False
    raise ValueError(f"{key}: {value!r} is not a boolean; use true or false")


def _parse_int(value, key, minimum):
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key}: {value!r} is not an integer") from None
    if isinstance(value, bool) or n < minimum:
        raise ValueError(f"{key}: must be an integer >= {minimum}, got {value!r}")
    return n


def state_backend_from_config(config):
    """Build a StateBackend from a mapping of Flink-style string keys (see the module docstring)."""
    from statecore.backends.heap import HashMapStateBackend
    from statecore.backends.lmdb import LMDBStateBackend
    opts, lmdb_opts = {}, {}
    for key, value in dict(config).items():
        key = _ALIASES.get(key, key)
        m = re.fullmatch(r"state\.backend\.(?:lmdb|rocksdb)\.(.+)", key)
        if m:
            if m.group(1) not in _LMDB_OPTIONS:
                raise ValueError(f"unknown configuration key {key!r}; LMDB options are "
                                 + ", ".join(f"state.backend.lmdb.{o}" for o in sorted(_LMDB_OPTIONS)))
            name, kind = _LMDB_OPTIONS[m.group(1)]
            lmdb_opts[name] = (parse_size(value, key) if kind == "size" else _parse_bool(value, key) if kind is bool
                               else _parse_int(value, key, 0) if kind is int else str(value))
        elif key in _KNOWN:
            opts[key] = value
        elif key.startswith("state."):
            raise ValueError(f"unknown configuration key {key!r}; known keys: " + ", ".join(sorted(_KNOWN)))
    kind = str(opts.get("state.backend.type", "hashmap")).strip().lower()
    if kind not in ("hashmap", "lmdb", "rocksdb"):
        raise ValueError(f"state.backend.type: {kind!r} is not a backend; use hashmap, lmdb or rocksdb")
    if kind == "hashmap" and lmdb_opts:
        raise ValueError("state.backend.lmdb.* options need state.backend.type: lmdb")
    ckpt_dir = opts.get("execution.checkpointing.dir")
    storage_kind = str(opts.get("execution.checkpointing.storage",
                                "filesystem" if ckpt_dir else "jobmanager")).strip().lower()
    if storage_kind == "filesystem":
        if not ckpt_dir:
            raise ValueError("execution.checkpointing.storage: filesystem needs execution.checkpointing.dir")
        storage = FileSystemCheckpointStorage(str(ckpt_dir))
    elif storage_kind == "jobmanager":
        storage = JobManagerCheckpointStorage()
    else:
        raise ValueError(f"execution.checkpointing.storage: {storage_kind!r}; use jobmanager or filesystem")
    retained = _parse_int(opts.get("execution.checkpointing.num-retained", 1), "execution.checkpointing.num-retained",
                          1)
    incremental = _parse_bool(opts.get("execution.checkpointing.incremental", False),
                              "execution.checkpointing.incremental")
    if kind == "hashmap":
        backend = HashMapStateBackend(checkpoint_storage=storage, num_retained=retained)
    else:
        backend = LMDBStateBackend(checkpoint_storage=storage, incremental=incremental, **lmdb_opts)
        backend.num_retained = retained
    if "pipeline.max-parallelism" in opts:
        backend.default_max_parallelism = _parse_int(opts["pipeline.max-parallelism"], "pipeline.max-parallelism", 1)
    backend.savepoint_dir = opts.get("execution.checkpointing.savepoint-dir")
    return backend
