# cython: language_level=3
"""Re-exports for sibling modules: the storage interface lives in _tables.pxd, the snapshot sink in _sink.pxd."""
from statecore._sink cimport SnapshotSink
from statecore._tables cimport StateTable
