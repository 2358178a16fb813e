"""statecore: Apache Flink's keyed state backends for Python, with a compiled C hot path.

The public names of the contract (API.md) are importable from here.
"""
from statecore import serializers
from statecore._states import (AggregatingState, KeyedStateBackend, ListState, MapState, ReducingState, State,
                               ValueState)
from statecore.backends import (FsStateBackend, HashMapStateBackend, HeapKeyedStateBackend, LMDBKeyedStateBackend,
                                LMDBStateBackend, MemoryStateBackend, RocksDBStateBackend, StateBackend)
from statecore.backends.config import state_backend_from_config
from statecore.checkpoint import CheckpointStorage, FileSystemCheckpointStorage, JobManagerCheckpointStorage
from statecore.checkpoint.snapshot import CompletedCheckpoint, load_checkpoint
from statecore.descriptors import (AggregatingStateDescriptor, ListStateDescriptor, MapStateDescriptor,
                                   ReducingStateDescriptor, StateDescriptor, ValueStateDescriptor)
from statecore.errors import (BackendClosedError, CheckpointError, CheckpointSizeExceededError,
                              CorruptCheckpointError, KeyGroupOutOfRangeError, SerializationError, StateError,
                              StateMigrationError)
from statecore.keygroups import (KeyGroupRange, assign_to_key_group, compute_key_group_range_for_operator_index,
                                 compute_operator_index_for_key_group)
from statecore.serializers import Auto, Bool, Bytes, Float64, Int64, Json, Pickle, Serializer, Str
from statecore.ttl import ManualClock, StateTtlConfig, StateVisibility, Time, UpdateType

__version__ = "0.1.0"

__all__ = [
    "HashMapStateBackend", "MemoryStateBackend", "FsStateBackend", "LMDBStateBackend", "RocksDBStateBackend",
    "LMDBKeyedStateBackend", "StateBackend", "KeyedStateBackend",
    "HeapKeyedStateBackend", "CheckpointStorage", "JobManagerCheckpointStorage", "FileSystemCheckpointStorage",
    "CompletedCheckpoint", "load_checkpoint", "state_backend_from_config",
    "StateDescriptor", "ValueStateDescriptor", "ListStateDescriptor", "MapStateDescriptor",
    "ReducingStateDescriptor", "AggregatingStateDescriptor",
    "State", "ValueState", "ListState", "MapState", "ReducingState", "AggregatingState",
    "StateTtlConfig", "StateVisibility", "UpdateType", "Time", "ManualClock",
    "KeyGroupRange", "assign_to_key_group", "compute_key_group_range_for_operator_index",
    "compute_operator_index_for_key_group",
    "StateError", "KeyGroupOutOfRangeError", "SerializationError", "StateMigrationError", "CheckpointError",
    "CorruptCheckpointError", "CheckpointSizeExceededError", "BackendClosedError",
    "serializers", "Serializer", "Int64", "Float64", "Str", "Bytes", "Bool", "Auto", "Pickle", "Json",
]
