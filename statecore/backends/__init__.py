"""Working-state backends: where keyed state lives while the job runs."""
from statecore.backends.base import StateBackend
from statecore.backends.heap import FsStateBackend, HashMapStateBackend, HeapKeyedStateBackend, MemoryStateBackend
from statecore.backends.lmdb import LMDBKeyedStateBackend, LMDBStateBackend, RocksDBStateBackend

__all__ = ["StateBackend", "HashMapStateBackend", "HeapKeyedStateBackend", "MemoryStateBackend", "FsStateBackend",
           "LMDBStateBackend", "LMDBKeyedStateBackend", "RocksDBStateBackend"]
