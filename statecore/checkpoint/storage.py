"""Checkpoint storage configuration (Flink's CheckpointStorage family).

A working-state backend keeps state; a checkpoint storage says where its
snapshots go.  ``JobManagerCheckpointStorage`` keeps them in process memory
(Flink's 5 MB rule applies); ``FileSystemCheckpointStorage`` writes them to any
fsspec URI.  Writing and reading checkpoints is the checkpoint module's job.
"""
import os

DEFAULT_MAX_STATE_SIZE = 5 * 1024 * 1024


class CheckpointStorage:
    """Base class: where completed checkpoints are stored."""

    def __repr__(self):
        return f"{type(self).__name__}()"


class JobManagerCheckpointStorage(CheckpointStorage):
    """Checkpoints in process memory (Flink's JobManagerCheckpointStorage).

    A checkpoint larger than ``max_state_size`` bytes fails with
    ``CheckpointSizeExceededError`` and leaves earlier checkpoints intact.
    """

    def __init__(self, max_state_size=DEFAULT_MAX_STATE_SIZE):
        if isinstance(max_state_size, bool) or not isinstance(max_state_size, int) or max_state_size <= 0:
            raise ValueError(f"max_state_size must be a positive number of bytes, got {max_state_size!r}")
        self.max_state_size = max_state_size

    def __repr__(self):
        return f"JobManagerCheckpointStorage(max_state_size={self.max_state_size})"


class FileSystemCheckpointStorage(CheckpointStorage):
    """Checkpoints under a file-system URI: a plain path, ``file://``, ``memory://``, ``s3://`` ...

    Any fsspec protocol works; ``s3://`` needs the ``statecore[s3]`` extra (s3fs).
    """

    def __init__(self, uri):
        if isinstance(uri, os.PathLike):
            uri = os.fspath(uri)
        if not isinstance(uri, str) or not uri:
            raise ValueError(f"checkpoint URI must be a non-empty string or path, got {uri!r}")
        self.uri = uri

    def __repr__(self):
        return f"FileSystemCheckpointStorage({self.uri!r})"
