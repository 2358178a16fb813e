"""Stubs of the LMDB tier's storage (statecore/_lmdb.pyx)."""
from typing import Any

from statecore._states import StateTable
from statecore.errors import StateError

RETRY_DELAY: float

class LMDBFlushError(StateError): ...
class MapGrowError(StateError): ...

def _debug_flush_faults(after: int = ..., count: int = ..., kind: str = ...) -> None: ...
def _set_crash_hook(hook: Any) -> Any: ...

class LMDBStore:
    env: Any
    path: str
    write_buffer_size: int
    txn_entries: int
    closed: bool
    flushes: int
    stalls: int
    cache_hits: int
    cache_misses: int
    map_resizes: int
    flush_expired: int
    flush_failures: int
    flush_retries: int
    env_reopens: int
    env_failed: bool
    ndeltas: int
    kf_skips: int
    max_write_buffer_number: int
    epoch: int
    def __init__(self, path: str, write_buffer_size: int = ..., sync: bool = ..., map_size: int = ...,
                 max_readers: int = ..., dirty_budget: int = ..., max_write_buffer_number: int = ...,
                 cache_entries: int = ..., cache_bytes: int = ..., clock: Any = ...) -> None: ...
    def run_worker(self) -> None: ...
    def flush(self) -> None: ...
    def close(self, remove_dir: bool = ...) -> None: ...
    def metrics(self) -> dict[str, int]: ...

class LMDBStateTable(StateTable):
    layout: int
    drop_ttl: int
    n: int
    def __init__(self, store: LMDBStore, nested: bool, layout: int = ..., drop_ttl: int = ...) -> None: ...
    def key_scan(self, ns: bytes) -> LMDBKeyScan: ...

class LMDBKeyScan:
    def __init__(self, s: LMDBStore, sid: int, sidb: bytes, ns: bytes) -> None: ...
    def __iter__(self) -> LMDBKeyScan: ...
    def __next__(self) -> bytes: ...
