# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Serializers: Flink's TypeSerializer pair ``serialize``/``deserialize``, compiled.

Every serializer has a C-level twin (``encode`` into an ``sc_buf``, ``decode``
from a pointer) that the state layer calls without building Python ``bytes``.
User-written serializers subclass :class:`Serializer` and implement
``serialize``/``deserialize`` in Python; the base class's C twins call them.

Auto encoding (type-tagged, compact, decoding never runs code):

======  ==========================================================
tag     payload
======  ==========================================================
0x00    None
0x01    False
0x02    True
0x03    int in [-2**63, 2**63): 8 bytes big-endian, sign bit flipped
        (so byte order is numeric order)
0x04    other int: varint n, n bytes big-endian two's complement
        (minimal length)
0x05    float: 8 bytes IEEE-754 big-endian
0x06    str: varint n, n bytes UTF-8
0x07    bytes: varint n, n bytes
0x08    tuple: varint count, count encodings
0x09    list: varint count, count encodings
0x0A    dict: varint count, count (key, value) encoding pairs
======  ==========================================================

NumPy scalars encode as their Python equivalents (``np.int64(5)`` is ``5``).
Subclasses of tuple/list/dict (e.g. namedtuples) encode as the base type.
Nesting is limited to ``MAX_DEPTH`` levels on encode and decode.

Debug switch (negative control for the fuzz harnesses, never for production):
``STATECORE_DEBUG_AUTO_PICKLE_FALLBACK=1`` in the environment *at import time*
makes Auto decode an unknown tag by handing the remaining bytes to
``pickle.loads``: a planted code-execution bug that fuzz/ and
tests/test_fuzz.py must catch.  It is read once, into a C flag; default off.
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.float cimport PyFloat_AS_DOUBLE, PyFloat_FromDouble
from cpython.long cimport PyLong_AsLongLongAndOverflow, PyLong_FromLongLong
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.math cimport isnan
from libc.stdint cimport int64_t, uint8_t, uint64_t
from libc.string cimport memcpy

from statecore._csrc cimport (SC_OK, sc_be64_get, sc_be64_put, sc_buf, sc_buf_free, sc_buf_put_byte,
                              sc_buf_reserve, sc_buf_write, sc_varint_get, sc_varint_put)

import io as _io
import json as _json
import os as _os
import pickle as _pickle

from statecore.errors import SerializationError

cdef extern from "Python.h":
    const char *PyUnicode_AsUTF8AndSize(object s, Py_ssize_t *size) except NULL

#: Deepest nesting of tuples/lists/dicts Auto accepts (encode and decode).
MAX_DEPTH = 100
cdef int _MAX_DEPTH = MAX_DEPTH

cdef uint64_t SIGN = 0x8000000000000000ULL
cdef object _np = None

# Planted bug for the fuzzing negative control (see the module docstring); read once, default off.
cdef bint _DEBUG_AUTO_PICKLE_FALLBACK = _os.environ.get("STATECORE_DEBUG_AUTO_PICKLE_FALLBACK") == "1"


cdef inline object numpy():
    global _np
    if _np is None:
        import numpy
        _np = numpy
    return _np


cdef int write_bytes(sc_buf *out, const void *p, size_t n) except -1:
    if sc_buf_write(out, p, n) != SC_OK:
        raise MemoryError("statecore: out of memory while serializing")
    return 0


cdef inline int put_byte(sc_buf *out, uint8_t c) except -1:
    if sc_buf_put_byte(out, c) != SC_OK:
        raise MemoryError("statecore: out of memory while serializing")
    return 0


cdef inline int put_varint(sc_buf *out, uint64_t v) except -1:
    if sc_buf_reserve(out, 10) != SC_OK:
        raise MemoryError("statecore: out of memory while serializing")
    out.len += sc_varint_put(out.data + out.len, v)
    return 0


cdef inline int put_be64(sc_buf *out, uint64_t v) except -1:
    if sc_buf_reserve(out, 8) != SC_OK:
        raise MemoryError("statecore: out of memory while serializing")
    sc_be64_put(out.data + out.len, v)
    out.len += 8
    return 0


cdef inline uint64_t double_bits(double d) noexcept:
    cdef uint64_t u
    memcpy(&u, &d, 8)
    return u


cdef inline double bits_double(uint64_t u) noexcept:
    cdef double d
    memcpy(&d, &u, 8)
    return d


cdef object _bytes_of(sc_buf *b):
    return PyBytes_FromStringAndSize(<const char *>b.data, b.len)


cdef object _bad(str what, object serializer):
    return SerializationError(f"{type(serializer).__name__}: cannot decode these bytes: {what}")


cdef class Serializer:
    """Base class of every serializer (Flink's TypeSerializer).

    Subclass it and implement ``serialize(obj) -> bytes`` and
    ``deserialize(data) -> obj``.  Checkpoints identify a serializer by its
    class's qualified name and its ``version`` class attribute (default 1):
    bump ``version`` when the byte format changes, and restoring state written
    with another version raises ``StateMigrationError``.  ``deserialize`` must
    raise ``SerializationError`` for bytes it did not produce.
    """

    version = 1

    def __cinit__(self, *args, **kwargs):
        self.kind = KIND_GENERIC

    def serialize(self, obj):
        """Return the bytes of ``obj``.  Subclasses must override this."""
        raise NotImplementedError(f"{type(self).__qualname__} must implement serialize(obj) -> bytes")

    def deserialize(self, data):
        """Return the object encoded by ``data``.  Subclasses must override this."""
        raise NotImplementedError(f"{type(self).__qualname__} must implement deserialize(data) -> object")

    def serialize_key(self, obj):
        """Bytes of ``obj`` used as a key: deterministic; refuses keys that cannot be."""
        return self.serialize(obj)

    def identity(self):
        """(qualified class name, version): how checkpoints name this serializer."""
        cls = type(self)
        return (f"{cls.__module__}.{cls.__qualname__}", getattr(self, "version", 1))

    cdef int encode(self, object obj, sc_buf *out) except -1:
        data = self.serialize(obj)
        if not isinstance(data, bytes):
            raise SerializationError(
                f"{type(self).__qualname__}.serialize returned {type(data).__name__}, expected bytes")
        return write_bytes(out, PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))

    cdef int encode_key(self, object obj, sc_buf *out) except -1:
        data = self.serialize_key(obj)
        if not isinstance(data, bytes):
            raise SerializationError(
                f"{type(self).__qualname__}.serialize_key returned {type(data).__name__}, expected bytes")
        return write_bytes(out, PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))

    cdef object decode(self, const uint8_t *p, Py_ssize_t n):
        return self.deserialize(PyBytes_FromStringAndSize(<const char *>p, n))

    def __eq__(self, other):
        return type(self) is type(other) and self.identity() == other.identity()

    def __ne__(self, other):
        return not self == other

    def __hash__(self):
        return hash(self.identity())

    def __repr__(self):
        return f"{type(self).__name__}()"

    def __reduce__(self):
        return (type(self), ())


cdef class _Builtin(Serializer):
    """Serializers whose C twins are the implementation; serialize/deserialize wrap them."""

    def serialize(self, obj):
        cdef sc_buf b
        b.data = NULL
        b.len = b.cap = 0
        try:
            self.encode(obj, &b)
            return _bytes_of(&b)
        finally:
            sc_buf_free(&b)

    def serialize_key(self, obj):
        cdef sc_buf b
        b.data = NULL
        b.len = b.cap = 0
        try:
            self.encode_key(obj, &b)
            return _bytes_of(&b)
        finally:
            sc_buf_free(&b)

    def deserialize(self, data):
        cdef const uint8_t[::1] view
        if isinstance(data, bytes):
            return self.decode(<const uint8_t *>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))
        try:
            view = memoryview(data).cast("B")
        except TypeError:
            raise SerializationError(
                f"{type(self).__name__}.deserialize needs bytes, got {type(data).__name__}") from None
        if view.shape[0] == 0:
            return self.decode(<const uint8_t *>b"", 0)
        return self.decode(&view[0], view.shape[0])

    cdef int encode_key(self, object obj, sc_buf *out) except -1:
        return self.encode(obj, out)


cdef inline bint _is_bool(object obj):
    if type(obj) is bool:
        return True
    return type(obj).__module__ == "numpy" and isinstance(obj, numpy().bool_)


cdef class Int64(_Builtin):
    """64-bit signed integers, 8 bytes big-endian (Flink's LongSerializer).

    Accepts ``int`` and NumPy integers in [-2**63, 2**63); ``bool`` is refused
    (use ``Bool()``), as is any other type.
    """

    def __cinit__(self, *args, **kwargs):
        self.kind = KIND_INT64

    cdef int encode(self, object obj, sc_buf *out) except -1:
        cdef int overflow = 0
        cdef long long v
        if type(obj) is not int:
            if _is_bool(obj) or not (isinstance(obj, int) or isinstance(obj, numpy().integer)):
                raise SerializationError(f"Int64 cannot serialize {type(obj).__name__!s} ({obj!r:.60}); "
                                         "pass an int or use serializer=Auto()")
            obj = int(obj)
        v = PyLong_AsLongLongAndOverflow(obj, &overflow)
        if overflow:
            raise SerializationError(f"Int64 holds -2**63..2**63-1, got {obj!r:.60}; use serializer=Auto() "
                                     "for integers of any size")
        return put_be64(out, <uint64_t>v)

    cdef object decode(self, const uint8_t *p, Py_ssize_t n):
        if n != 8:
            raise _bad(f"expected 8 bytes, got {n}", self)
        return PyLong_FromLongLong(<long long><int64_t>sc_be64_get(p))


cdef class Float64(_Builtin):
    """64-bit floats, 8 bytes IEEE-754 big-endian (Flink's DoubleSerializer).

    Accepts ``float``, ``int`` and NumPy real numbers (converted with
    ``float()``); ``bool`` is refused.  As a key, NaN is refused (it is not
    equal to itself) and -0.0 is stored as 0.0 (they are equal keys).
    """

    def __cinit__(self, *args, **kwargs):
        self.kind = KIND_FLOAT64

    cdef int encode(self, object obj, sc_buf *out) except -1:
        cdef double d
        if type(obj) is float:
            d = PyFloat_AS_DOUBLE(obj)
        elif _is_bool(obj) or not (isinstance(obj, (int, float)) or isinstance(obj, numpy().floating)
                                   or isinstance(obj, numpy().integer)):
            raise SerializationError(f"Float64 cannot serialize {type(obj).__name__} ({obj!r:.60}); "
                                     "pass a float or use serializer=Auto()")
        else:
            try:
                d = float(obj)
            except OverflowError:
                raise SerializationError(f"Float64: {obj!r:.60} is too large for a float") from None
        return put_be64(out, double_bits(d))

    cdef int encode_key(self, object obj, sc_buf *out) except -1:
        cdef Py_ssize_t start = out.len
        self.encode(obj, out)
        cdef double d = bits_double(sc_be64_get(out.data + start))
        if isnan(d):
            raise SerializationError("NaN cannot be a key: it is not equal to itself; map it to another value")
        if d == 0.0:
            sc_be64_put(out.data + start, 0)  # -0.0 == 0.0, so they must be the same key
        return 0

    cdef object decode(self, const uint8_t *p, Py_ssize_t n):
        if n != 8:
            raise _bad(f"expected 8 bytes, got {n}", self)
        return PyFloat_FromDouble(bits_double(sc_be64_get(p)))


cdef class Str(_Builtin):
    """Unicode strings as UTF-8 (Flink's StringSerializer); surrogates are refused."""

    def __cinit__(self, *args, **kwargs):
        self.kind = KIND_STR

    cdef int encode(self, object obj, sc_buf *out) except -1:
        cdef Py_ssize_t n
        cdef const char *s
        if not isinstance(obj, str):
            raise SerializationError(f"Str cannot serialize {type(obj).__name__} ({obj!r:.60}); pass a str")
        try:
            s = PyUnicode_AsUTF8AndSize(obj, &n)
        except UnicodeEncodeError as exc:
            raise SerializationError(f"Str: string is not valid Unicode ({exc})") from None
        return write_bytes(out, s, n)

    cdef object decode(self, const uint8_t *p, Py_ssize_t n):
        try:
            return PyUnicode_DecodeUTF8(<const char *>p, n, NULL)
        except UnicodeDecodeError as exc:
            raise _bad(f"invalid UTF-8 ({exc.reason})", self) from None


cdef class Bytes(_Builtin):
    """Raw bytes (Flink's BytePrimitiveArraySerializer); bytes-like input is copied."""

    def __cinit__(self, *args, **kwargs):
        self.kind = KIND_BYTES

    cdef int encode(self, object obj, sc_buf *out) except -1:
        cdef const uint8_t[::1] view
        if isinstance(obj, bytes):
            return write_bytes(out, PyBytes_AS_STRING(obj), PyBytes_GET_SIZE(obj))
        if not isinstance(obj, (bytearray, memoryview)):
            raise SerializationError(f"Bytes cannot serialize {type(obj).__name__} ({obj!r:.60}); pass bytes")
        data = bytes(obj)
        return write_bytes(out, PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))

    cdef object decode(self, const uint8_t *p, Py_ssize_t n):
        return PyBytes_FromStringAndSize(<const char *>p, n)


cdef class Bool(_Builtin):
    """Booleans as one byte 0x00 / 0x01 (Flink's BooleanSerializer)."""

    def __cinit__(self, *args, **kwargs):
        self.kind = KIND_BOOL

    cdef int encode(self, object obj, sc_buf *out) except -1:
        if not _is_bool(obj):
            raise SerializationError(f"Bool cannot serialize {type(obj).__name__} ({obj!r:.60}); pass True/False")
        return put_byte(out, 1 if obj else 0)

    cdef object decode(self, const uint8_t *p, Py_ssize_t n):
        if n != 1 or p[0] > 1:
            raise _bad("expected one byte 0x00 or 0x01", self)
        return p[0] == 1


# ---------------------------------------------------------------- Auto

cdef int auto_encode(object obj, sc_buf *out, bint key, int depth) except -1:
    cdef type t = type(obj)
    cdef int overflow = 0
    cdef long long v
    cdef double d
    cdef Py_ssize_t n
    cdef const char *s
    if obj is None:
        return put_byte(out, TAG_NONE)
    if t is bool:
        return put_byte(out, TAG_TRUE if obj else TAG_FALSE)
    if t is int:
        v = PyLong_AsLongLongAndOverflow(obj, &overflow)
        if not overflow:
            put_byte(out, TAG_INT64)
            return put_be64(out, (<uint64_t>v) ^ SIGN)
        data = obj.to_bytes((obj.bit_length() + 8) // 8, "big", signed=True)
        put_byte(out, TAG_BIGINT)
        put_varint(out, PyBytes_GET_SIZE(data))
        return write_bytes(out, PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))
    if t is float:
        d = PyFloat_AS_DOUBLE(obj)
        if key:
            if isnan(d):
                raise SerializationError("NaN cannot be a key: it is not equal to itself; map it to another value")
            if d == 0.0:
                d = 0.0  # -0.0 == 0.0: equal keys must give equal bytes
        put_byte(out, TAG_FLOAT)
        return put_be64(out, double_bits(d))
    if t is str:
        try:
            s = PyUnicode_AsUTF8AndSize(obj, &n)
        except UnicodeEncodeError as exc:
            raise SerializationError(f"Auto: string is not valid Unicode ({exc})") from None
        put_byte(out, TAG_STR)
        put_varint(out, n)
        return write_bytes(out, s, n)
    if t is bytes:
        put_byte(out, TAG_BYTES)
        put_varint(out, PyBytes_GET_SIZE(obj))
        return write_bytes(out, PyBytes_AS_STRING(obj), PyBytes_GET_SIZE(obj))
    if t is tuple or t is list or t is dict:
        return auto_encode_container(obj, t, out, key, depth)
    return auto_encode_other(obj, out, key, depth)


cdef int auto_encode_container(object obj, type t, sc_buf *out, bint key, int depth) except -1:
    if depth >= _MAX_DEPTH:
        raise SerializationError(f"Auto: nesting deeper than {_MAX_DEPTH} levels; flatten the value "
                                 "or use serializer=Pickle()")
    if t is dict:
        if key:
            raise SerializationError("a dict cannot be a key: its order is not part of its value; "
                                     "use a tuple of sorted items instead")
        put_byte(out, TAG_DICT)
        put_varint(out, len(obj))
        for k, v in (<dict>obj).items():
            auto_encode(k, out, key, depth + 1)
            auto_encode(v, out, key, depth + 1)
        return 0
    put_byte(out, TAG_TUPLE if t is tuple else TAG_LIST)
    put_varint(out, len(obj))
    for item in obj:
        auto_encode(item, out, key, depth + 1)
    return 0


cdef int auto_encode_other(object obj, sc_buf *out, bint key, int depth) except -1:
    """Subclasses of the supported types and NumPy scalars: encode as the Python equivalent."""
    if isinstance(obj, bool):
        return auto_encode(bool(obj), out, key, depth)
    if isinstance(obj, int):
        return auto_encode(int(obj), out, key, depth)
    if isinstance(obj, float):
        return auto_encode(float(obj), out, key, depth)
    if isinstance(obj, str):
        return auto_encode(str(obj), out, key, depth)
    if isinstance(obj, bytes):
        return auto_encode(bytes(obj), out, key, depth)
    if isinstance(obj, tuple):
        return auto_encode_container(obj, tuple, out, key, depth)
    if isinstance(obj, list):
        return auto_encode_container(obj, list, out, key, depth)
    if isinstance(obj, dict):
        return auto_encode_container(obj, dict, out, key, depth)
    if type(obj).__module__ == "numpy":
        np = numpy()
        if isinstance(obj, np.bool_):
            return auto_encode(bool(obj), out, key, depth)
        if isinstance(obj, np.integer):
            return auto_encode(int(obj), out, key, depth)
        if isinstance(obj, np.floating):
            return auto_encode(float(obj), out, key, depth)
    raise SerializationError(
        f"Auto cannot serialize objects of type {type(obj).__module__}.{type(obj).__qualname__}: it encodes only "
        "None, bool, int, float, str, bytes, tuple, list, dict and NumPy scalars. Pass serializer=Pickle() "
        "(only for trusted data) or write a Serializer subclass.")


cdef class _Reader:
    """Bounds-checked cursor over bytes being decoded."""
    cdef const uint8_t *p
    cdef const uint8_t *end

    cdef inline Py_ssize_t remaining(self):
        return self.end - self.p


cdef inline object _truncated():
    return SerializationError("Auto: cannot decode these bytes: truncated input")


cdef uint64_t read_len(_Reader r) except? 0xFFFFFFFFFFFFFFFF:
    cdef uint64_t v = 0
    cdef size_t used = sc_varint_get(r.p, r.end, &v)
    if used == 0:
        raise SerializationError("Auto: cannot decode these bytes: malformed or truncated length")
    r.p += used
    if v > <uint64_t>r.remaining():
        raise SerializationError(f"Auto: cannot decode these bytes: declared length {v} exceeds the "
                                 f"{r.remaining()} bytes left")
    return v


cdef object auto_decode(_Reader r, int depth):
    cdef uint8_t tag
    cdef uint64_t n, i
    cdef int64_t v
    if r.p >= r.end:
        raise _truncated()
    tag = r.p[0]
    r.p += 1
    if tag == TAG_NONE:
        return None
    if tag == TAG_FALSE:
        return False
    if tag == TAG_TRUE:
        return True
    if tag == TAG_INT64 or tag == TAG_FLOAT:
        if r.remaining() < 8:
            raise _truncated()
        n = sc_be64_get(r.p)
        r.p += 8
        if tag == TAG_INT64:
            v = <int64_t>(n ^ SIGN)
            return PyLong_FromLongLong(v)
        return PyFloat_FromDouble(bits_double(n))
    if tag == TAG_BIGINT:
        n = read_len(r)
        value = int.from_bytes(PyBytes_FromStringAndSize(<const char *>r.p, n), "big", signed=True)
        r.p += n
        # Only the canonical (minimal, outside int64) form is valid: one value, one encoding.
        if -(1 << 63) <= value < (1 << 63) or n != (value.bit_length() + 8) // 8:
            raise SerializationError("Auto: cannot decode these bytes: non-canonical integer encoding")
        return value
    if tag == TAG_STR:
        n = read_len(r)
        try:
            s = PyUnicode_DecodeUTF8(<const char *>r.p, n, NULL)
        except UnicodeDecodeError as exc:
            raise SerializationError(f"Auto: cannot decode these bytes: invalid UTF-8 ({exc.reason})") from None
        r.p += n
        return s
    if tag == TAG_BYTES:
        n = read_len(r)
        b = PyBytes_FromStringAndSize(<const char *>r.p, n)
        r.p += n
        return b
    if tag == TAG_TUPLE or tag == TAG_LIST or tag == TAG_DICT:
        if depth >= _MAX_DEPTH:
            raise SerializationError(f"Auto: cannot decode these bytes: nesting deeper than {_MAX_DEPTH} levels")
        n = read_len(r)  # every item takes >= 1 byte, so count <= remaining bytes
        if tag == TAG_DICT:
            d = {}
            for i in range(n):
                k = auto_decode(r, depth + 1)
                val = auto_decode(r, depth + 1)
                try:
                    d[k] = val
                except TypeError:
                    raise SerializationError(
                        f"Auto: cannot decode these bytes: unhashable dict key of type {type(k).__name__}") from None
            return d
        items = [auto_decode(r, depth + 1) for i in range(n)]
        return tuple(items) if tag == TAG_TUPLE else items
    if _DEBUG_AUTO_PICKLE_FALLBACK:  # planted bug, off unless the debug env var was set at import
        try:
            value = _pickle.loads(PyBytes_FromStringAndSize(<const char *>r.p - 1, r.end - r.p + 1))
        except Exception as exc:  # a careful-looking bug: only code execution gives it away
            raise SerializationError(f"Auto: cannot decode these bytes: {exc}") from None
        r.p = r.end
        return value
    raise SerializationError(f"Auto: cannot decode these bytes: unknown type tag 0x{tag:02x}")


cdef class Auto(_Builtin):
    """The default serializer: compact, type-tagged and safe.

    Encodes None, bool, int (any size), float, str, bytes, tuple, list, dict and
    NumPy scalars (as their Python equivalents).  Decoding only builds those
    types: it never imports, looks up or calls anything, so untrusted bytes
    cannot run code.  Any other type raises ``SerializationError`` naming the
    type and suggesting ``serializer=Pickle()``.  As a key, ``dict`` and NaN are
    refused and -0.0 is stored as 0.0; ``1``, ``1.0`` and ``True`` are three
    different keys (they have different tags), as in Flink's typed keys.
    """

    def __cinit__(self, *args, **kwargs):
        self.kind = KIND_AUTO

    cdef int encode(self, object obj, sc_buf *out) except -1:
        return auto_encode(obj, out, False, 0)

    cdef int encode_key(self, object obj, sc_buf *out) except -1:
        return auto_encode(obj, out, True, 0)

    cdef object decode(self, const uint8_t *p, Py_ssize_t n):
        cdef _Reader r = _Reader.__new__(_Reader)
        r.p = p
        r.end = p + n
        value = auto_decode(r, 0)
        if r.p != r.end:
            raise SerializationError(f"Auto: cannot decode these bytes: {r.remaining()} trailing bytes")
        return value


def check_key(obj, depth=0):
    """Refuse values that cannot be keys: dicts and NaN, also inside tuples/lists."""
    if isinstance(obj, dict):
        raise SerializationError("a dict cannot be a key: its order is not part of its value; "
                                 "use a tuple of sorted items instead")
    if isinstance(obj, float) and obj != obj:
        raise SerializationError("NaN cannot be a key: it is not equal to itself; map it to another value")
    if isinstance(obj, (tuple, list)) and depth < _MAX_DEPTH:
        for item in obj:
            check_key(item, depth + 1)


class Pickle(Serializer):
    """Any picklable object, via :mod:`pickle` (protocol 5).

    Only for trusted data: unpickling can run arbitrary code, which is why it is
    never the default.  Not deterministic enough for keys in general (use it for
    values).
    """

    protocol = 5

    def serialize(self, obj):
        try:
            return _pickle.dumps(obj, protocol=self.protocol)
        except (_pickle.PicklingError, TypeError, AttributeError) as exc:
            raise SerializationError(f"Pickle cannot serialize {type(obj).__name__}: {exc}") from exc

    def serialize_key(self, obj):
        check_key(obj)
        return self.serialize(obj)

    def deserialize(self, data):
        stream = _io.BytesIO(data)
        try:
            value = _pickle.Unpickler(stream).load()
        except Exception as exc:  # pickle raises many types for bad input; report them as one
            raise SerializationError(f"Pickle: cannot decode these bytes: {type(exc).__name__}: {exc}") from exc
        if stream.tell() != len(stream.getbuffer()):
            raise SerializationError(f"Pickle: cannot decode these bytes: "
                                     f"{len(stream.getbuffer()) - stream.tell()} trailing bytes")
        return value


class Json(Serializer):
    """JSON-compatible values as UTF-8 JSON (sorted keys, compact: deterministic).

    Decoding never runs code.  Tuples come back as lists, as JSON has no tuple.
    """

    def serialize(self, obj):
        try:
            return _json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        except (TypeError, ValueError, RecursionError) as exc:
            raise SerializationError(f"Json cannot serialize {type(obj).__name__}: {exc}") from exc

    def serialize_key(self, obj):
        check_key(obj)
        return self.serialize(obj)

    def deserialize(self, data):
        try:
            return _json.loads(bytes(data).decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError, TypeError) as exc:
            raise SerializationError(f"Json: cannot decode these bytes: {exc}") from None


_TYPE_SERIALIZERS = {int: Int64, float: Float64, str: Str, bytes: Bytes, bool: Bool}


def resolve_serializer(spec):
    """Turn a serializer argument into a serializer object.

    ``None`` is ``Auto()``; the types ``int``, ``float``, ``str``, ``bytes``,
    ``bool`` stand for ``Int64()``, ``Float64()``, ``Str()``, ``Bytes()``,
    ``Bool()``; a :class:`Serializer` instance is returned as is; a Serializer
    subclass is instantiated.  Anything else raises ``TypeError``.
    """
    if spec is None:
        return Auto()
    if isinstance(spec, Serializer):
        return spec
    if isinstance(spec, type):
        if spec in _TYPE_SERIALIZERS:
            return _TYPE_SERIALIZERS[spec]()
        if issubclass(spec, Serializer):
            return spec()
    raise TypeError(f"not a serializer: {spec!r}; pass a statecore.serializers.Serializer instance or one of "
                    "int, float, str, bytes, bool (or None for Auto)")
