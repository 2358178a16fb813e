"""The heap backend: keyed state in C hash tables in process memory.

``HashMapStateBackend`` is Flink's HashMapStateBackend: fastest for state that
fits in memory.  ``MemoryStateBackend`` and ``FsStateBackend`` are the Flink 1.x
names, kept as the combinations they stood for (API.md section 1).
"""
from statecore._states import KeyedStateBackend
from statecore.backends.base import StateBackend
from statecore.checkpoint.storage import (DEFAULT_MAX_STATE_SIZE, FileSystemCheckpointStorage,
                                          JobManagerCheckpointStorage)


class HeapKeyedStateBackend(KeyedStateBackend):
    """Keyed state in one C hash table per state (nested tables for MapState)."""


class HashMapStateBackend(StateBackend):
    """Working state in process memory (a compiled hash table per state)."""

    def _create_keyed(self, max_parallelism=128, key_group_range=None, key_serializer=None, clock=None,
                                   job_id="job", operator_id="operator"):
        """A new, empty keyed backend owning ``key_group_range`` (default: all key groups)."""
        return HeapKeyedStateBackend(max_parallelism=max_parallelism, key_group_range=key_group_range,
                                     key_serializer=key_serializer, clock=clock, job_id=job_id,
                                     operator_id=operator_id)


class MemoryStateBackend(HashMapStateBackend):
    """Flink 1.x name: ``HashMapStateBackend`` + ``JobManagerCheckpointStorage(max_state_size)``."""

    def __init__(self, max_state_size=DEFAULT_MAX_STATE_SIZE):
        super().__init__(checkpoint_storage=JobManagerCheckpointStorage(max_state_size))


class FsStateBackend(HashMapStateBackend):
    """Flink 1.x name: ``HashMapStateBackend`` + ``FileSystemCheckpointStorage(checkpoint_uri)``."""

    def __init__(self, checkpoint_uri):
        super().__init__(checkpoint_storage=FileSystemCheckpointStorage(checkpoint_uri))
