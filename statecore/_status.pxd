# cython: language_level=3
"""The one translation of C status codes into Python exceptions (plyvel's raise_for_status)."""
from statecore._csrc cimport sc_status, SC_OK, SC_NOTFOUND, SC_ENOMEM, SC_ECORRUPT, SC_ETOOBIG


cdef inline int check(sc_status st) except -1:
    """Return 0 for SC_OK / SC_NOTFOUND, else raise the matching exception."""
    if st == SC_OK or st == SC_NOTFOUND:
        return 0
    if st == SC_ENOMEM:
        raise MemoryError("statecore: the C core could not allocate memory")
    from statecore.errors import SerializationError, StateError
    if st == SC_ECORRUPT:
        raise SerializationError("statecore: malformed bytes in stored state")
    if st == SC_ETOOBIG:
        raise StateError("statecore: a key or value is larger than 2 GiB; split it into smaller entries")
    raise StateError(f"statecore: unexpected C status {<int>st}")
