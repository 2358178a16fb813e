# cython: language_level=3
"""LMDB's C API (csrc/lmdb/, vendored) for statecore: the types, and the C-level entry points of statecore._mdb.

Only the types are declared here: the mdb_* functions are declared in _mdb.pyx alone, so LMDB is linked into
statecore._mdb only (one copy of LMDB per process) and other modules reach it through the cdef methods below
(C calls through the extension types' vtables: no Python object per call).
"""
from cpython.ref cimport PyObject
from libc.stdint cimport uint8_t


cdef extern from "lmdb.h" nogil:
    ctypedef struct MDB_env:
        pass
    ctypedef struct MDB_txn:
        pass
    ctypedef struct MDB_cursor:
        pass
    ctypedef unsigned int MDB_dbi
    ctypedef struct MDB_val:
        size_t mv_size
        void *mv_data


cdef enum:
    MDB_OP_PUT = 0        # put key -> value
    MDB_OP_DEL = 1        # delete key (absent: nothing)
    MDB_OP_DEL_SUFFIXED = 2  # key = prefix + 8 zero bytes: delete every key of that length starting with prefix


cdef struct mdb_op:       # one write of Transaction.capply; key and value are at offsets into its arena
    int kind
    size_t koff
    size_t klen
    size_t voff
    size_t vlen


cdef class Environment:
    cdef MDB_env *env
    cdef MDB_txn *spare          # a reset read transaction, renewed by the next read begin (max_spare_txns)
    cdef MDB_dbi dbi             # the main (unnamed) database
    cdef int max_spare
    cdef bint valid
    cdef bint readonly
    cdef long pid                # the creating process: a forked child never touches the environment
    cdef unsigned long write_tid # thread of the active top-level write transaction (0: none)
    cdef int active              # GIL-released LMDB calls in flight (close and set_mapsize wait / refuse)
    cdef PyObject *txn_head      # live Transactions (borrowed: each unlinks itself when it ends or dies)
    cdef object keys             # (st_dev, st_ino) of data.mdb while open
    cdef object path_

    cdef int check_valid(self) except -1
    cdef int invalidate_txns(self) except -1


cdef class Transaction:
    cdef MDB_txn *txn
    cdef Environment env
    cdef MDB_dbi dbi
    cdef bint valid
    cdef bint reset_              # ended read transaction: reset, its reader slot kept until __dealloc__
    cdef bint write
    cdef bint buffers
    cdef unsigned long mutations  # puts/deletes so far: cursors refresh their position after one
    cdef PyObject *cur_head       # live Cursors (borrowed, as txn_head)
    cdef PyObject *prev_          # Environment.txn_head list
    cdef PyObject *next_

    cdef int check_valid(self) except -1
    cdef int end(self, bint commit) except -1
    cdef int kill(self) noexcept                   # end it (abort) and unlink it; its cursors first
    cdef int kill_cursors(self) noexcept
    cdef int unlink(self) noexcept
    cdef int finish(self, bint spare_ok) noexcept
    # C entry points: pointers into the map stay valid until the transaction ends (read transaction) or
    # the next write through it (write transaction)
    cdef int cget(self, const uint8_t *k, size_t kl, MDB_val *out) except -1   # 1 found, 0 not
    cdef int cput(self, const uint8_t *k, size_t kl, const uint8_t *v, size_t vl, unsigned int flags) except -1
    cdef Cursor ccursor(self)
    # ops[0..n) in order, the GIL released once for all (no Python object per record); MDB_APPEND is tried
    # for the puts while they land after the database's last key (LMDB's bulk-load path), plain puts after
    cdef int capply(self, const uint8_t *arena, const mdb_op *ops, size_t n) except -1


cdef class Cursor:
    cdef MDB_cursor *cur
    cdef Transaction txn
    cdef MDB_val key_
    cdef MDB_val val_
    cdef bint valid
    cdef bint positioned
    cdef unsigned long last_mutation
    cdef PyObject *prev_          # Transaction.cur_head list
    cdef PyObject *next_

    cdef int check_valid(self) except -1
    cdef int kill(self) noexcept                   # close it and unlink it
    cdef int op(self, int op) except -1            # MDB_cursor_get with the cursor's own key/val
    # C entry points: 1 positioned (key_/val_ hold the record), 0 not
    cdef int cset_range(self, const uint8_t *k, size_t kl) except -1
    cdef int cnext(self) except -1
    cdef int cfirst(self) except -1
    cdef int crefresh(self) except -1              # after a write through the transaction
    # the same without the GIL (a read transaction's scan): 1 positioned, 0 not, -1 failed (raise_err raises)
    cdef int err                                   # the LMDB code of the last failed *_nogil call (0: invalid)
    cdef int op_nogil(self, int op) noexcept nogil
    cdef int cset_range_nogil(self, const uint8_t *k, size_t kl) noexcept nogil
    cdef int cnext_nogil(self) noexcept nogil
    cdef int raise_err(self) except -1
