"""Checkpoint storage: where snapshots of keyed state are kept (separate from working state).

``storage`` writes and reads checkpoint folders (commit protocol per file system);
``format`` encodes and verifies the ``_metadata`` container and file checksums.
See docs/checkpoint-format.md.
"""
from statecore.checkpoint.format import (FORMAT_VERSION, READABLE_VERSIONS, decode_metadata, encode_metadata,
                                         sha256_hex, verify_file)
from statecore.checkpoint.storage import (METADATA_NAME, CheckpointStorage, CheckpointWriter,
                                          FileSystemCheckpointStorage, JobManagerCheckpointStorage, read_file,
                                          read_metadata, set_io_hook, storage_for_location)

__all__ = [
    "CheckpointStorage",
    "JobManagerCheckpointStorage",
    "FileSystemCheckpointStorage",
    "CheckpointWriter",
    "read_metadata",
    "read_file",
    "storage_for_location",
    "set_io_hook",
    "METADATA_NAME",
    "FORMAT_VERSION",
    "READABLE_VERSIONS",
    "encode_metadata",
    "decode_metadata",
    "sha256_hex",
    "verify_file",
]
