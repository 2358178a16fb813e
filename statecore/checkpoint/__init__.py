"""Checkpoint storage: where snapshots of keyed state are kept (separate from working state)."""
from statecore.checkpoint.storage import CheckpointStorage, FileSystemCheckpointStorage, JobManagerCheckpointStorage

__all__ = ["CheckpointStorage", "JobManagerCheckpointStorage", "FileSystemCheckpointStorage"]
