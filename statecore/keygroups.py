"""Key groups: Flink's ``KeyGroupRange`` and ``KeyGroupRangeAssignment``.

Keyed state is partitioned into ``max_parallelism`` key groups, the unit of
rescaling. Parallel instance ``index`` of ``parallelism`` owns one contiguous,
inclusive range of key groups. The formulas below are Flink's, bit for bit;
only the hash of a key differs, because a Python object has no stable
``hashCode``: statecore hashes the key's *serialized bytes* with murmur3-32
(seed 0) and then applies Flink's ``MathUtils.murmurHash`` to that int, as
Flink applies it to ``key.hashCode()``.

This module is pure Python and imports without the compiled extension; only
:func:`assign_to_key_group` and :func:`key_group_for_bytes` need it, and
import it on first use.
"""

import operator

__all__ = [
    "UPPER_BOUND_MAX_PARALLELISM",
    "DEFAULT_LOWER_BOUND_MAX_PARALLELISM",
    "KeyGroupRange",
    "check_max_parallelism",
    "compute_key_group_range_for_operator_index",
    "compute_operator_index_for_key_group",
    "compute_key_group_for_key_hash",
    "compute_default_max_parallelism",
    "murmur_hash",
    "murmur3_32",
    "assign_to_key_group",
    "key_group_for_bytes",
]

#: Largest allowed max parallelism (Flink: ``Short.MAX_VALUE + 1``), because
#: key groups are written as 16-bit big-endian prefixes.
UPPER_BOUND_MAX_PARALLELISM = 1 << 15
#: Lower bound of :func:`compute_default_max_parallelism`.
DEFAULT_LOWER_BOUND_MAX_PARALLELISM = 1 << 7

_MASK32 = 0xFFFFFFFF


def _as_int(value, what):
    """Return ``value`` as int; refuse bool and non-integers with TypeError."""
    if isinstance(value, bool):
        raise TypeError(f"{what} must be an int, got bool")
    try:
        return operator.index(value)  # admits NumPy integers, refuses floats
    except TypeError:
        raise TypeError(f"{what} must be an int, got {type(value).__name__}") from None


class KeyGroupRange:
    """An immutable, inclusive range of key groups (Flink's ``KeyGroupRange``).

    Parameters
    ----------
    start : int
        First key group, >= 0.
    end : int
        Last key group, >= ``start``. The only empty range is ``(0, -1)``,
        available as :attr:`KeyGroupRange.EMPTY`; use :meth:`of` to map any
        ``start > end`` to it, as Flink's ``KeyGroupRange.of`` does.

    Raises
    ------
    TypeError
        ``start`` or ``end`` is not an int.
    ValueError
        ``start < 0`` or ``end < start`` (other than the empty range).

    Notes
    -----
    ``len(r)`` is the number of key groups, ``kg in r`` tests membership
    (anything that is not an int, bool included, is never a member) and
    iteration yields the key groups in order. Ranges pickle, hash and compare
    by ``(start, end)``.
    """

    __slots__ = ("_start", "_end")

    def __init__(self, start, end):
        start = _as_int(start, "KeyGroupRange start")
        end = _as_int(end, "KeyGroupRange end")
        if start < 0:
            raise ValueError(f"KeyGroupRange start must be >= 0, got {start}")
        if end < start and not (start == 0 and end == -1):
            raise ValueError(
                f"KeyGroupRange end must be >= start, got start={start}, end={end}; "
                "use KeyGroupRange.EMPTY or KeyGroupRange.of(start, end) for an empty range"
            )
        object.__setattr__(self, "_start", start)
        object.__setattr__(self, "_end", end)

    @classmethod
    def of(cls, start, end):
        """Return ``KeyGroupRange(start, end)``, or :attr:`EMPTY` when ``start > end``."""
        if _as_int(start, "KeyGroupRange start") > _as_int(end, "KeyGroupRange end"):
            return cls.EMPTY
        return cls(start, end)

    @property
    def start_key_group(self):
        """int: first key group (0 for the empty range)."""
        return self._start

    @property
    def end_key_group(self):
        """int: last key group, inclusive (-1 for the empty range)."""
        return self._end

    start = start_key_group
    end = end_key_group

    def get_number_of_key_groups(self):
        """Return the number of key groups, ``end - start + 1`` (0 when empty)."""
        return self._end - self._start + 1

    __len__ = get_number_of_key_groups

    def __contains__(self, key_group):
        if isinstance(key_group, bool):
            return False
        try:
            key_group = operator.index(key_group)
        except TypeError:
            return False
        return self._start <= key_group <= self._end

    def __iter__(self):
        return iter(range(self._start, self._end + 1))

    def intersection(self, other):
        """Return the key groups in both ranges; :attr:`EMPTY` when disjoint.

        Flink's ``getIntersection``.
        """
        if not isinstance(other, KeyGroupRange):
            raise TypeError(f"intersection needs a KeyGroupRange, got {type(other).__name__}")
        return KeyGroupRange.of(max(self._start, other._start), min(self._end, other._end))

    def to_tuple(self):
        """Return ``(start, end)``."""
        return (self._start, self._end)

    def __setattr__(self, name, value):
        raise AttributeError("KeyGroupRange is immutable")

    def __delattr__(self, name):
        raise AttributeError("KeyGroupRange is immutable")

    def __reduce__(self):
        # Slots + blocked __setattr__ would break the default pickle path.
        return (KeyGroupRange, (self._start, self._end))

    def __eq__(self, other):
        if isinstance(other, KeyGroupRange):
            return self._start == other._start and self._end == other._end
        return NotImplemented

    def __hash__(self):
        return hash((KeyGroupRange, self._start, self._end))

    def __repr__(self):
        return f"KeyGroupRange({self._start}, {self._end})"


#: Flink's ``KeyGroupRange.EMPTY_KEY_GROUP_RANGE``: start 0, end -1, length 0.
KeyGroupRange.EMPTY = KeyGroupRange(0, -1)


def check_max_parallelism(max_parallelism):
    """Validate a max parallelism (number of key groups) and return it as int.

    Raises
    ------
    TypeError
        Not an int.
    ValueError
        Outside ``1 .. UPPER_BOUND_MAX_PARALLELISM`` (32768).
    """
    mp = _as_int(max_parallelism, "max_parallelism")
    if not 1 <= mp <= UPPER_BOUND_MAX_PARALLELISM:
        raise ValueError(
            f"max_parallelism must be in 1..{UPPER_BOUND_MAX_PARALLELISM}, got {mp}"
        )
    return mp


def _check_parallelism(max_parallelism, parallelism):
    mp = check_max_parallelism(max_parallelism)
    p = _as_int(parallelism, "parallelism")
    if not 1 <= p <= mp:
        # Flink: "Maximum parallelism must not be smaller than parallelism."
        raise ValueError(
            f"parallelism must be in 1..max_parallelism ({mp}), got {p}"
        )
    return mp, p


def compute_key_group_range_for_operator_index(max_parallelism, parallelism, index):
    """Return the key groups owned by parallel instance ``index``.

    Flink's ``computeKeyGroupRangeForOperatorIndex``::

        start = (index * max_parallelism + parallelism - 1) // parallelism
        end = ((index + 1) * max_parallelism - 1) // parallelism

    The ranges of indices ``0 .. parallelism - 1`` are disjoint, contiguous
    and cover ``0 .. max_parallelism - 1``; none is empty.

    Raises
    ------
    ValueError
        ``max_parallelism`` out of range, ``parallelism`` not in
        ``1 .. max_parallelism``, or ``index`` not in ``0 .. parallelism - 1``.
    """
    mp, p = _check_parallelism(max_parallelism, parallelism)
    i = _as_int(index, "index")
    if not 0 <= i < p:
        raise ValueError(f"operator index must be in 0..{p - 1} for parallelism {p}, got {i}")
    start = (i * mp + p - 1) // p
    end = ((i + 1) * mp - 1) // p
    return KeyGroupRange(start, end)


def compute_operator_index_for_key_group(max_parallelism, parallelism, key_group):
    """Return the parallel instance that owns ``key_group``.

    Flink's ``computeOperatorIndexForKeyGroup``:
    ``key_group * parallelism // max_parallelism``; the inverse of
    :func:`compute_key_group_range_for_operator_index`.

    Raises
    ------
    ValueError
        Parallelism as in :func:`compute_key_group_range_for_operator_index`,
        or ``key_group`` not in ``0 .. max_parallelism - 1``.
    """
    mp, p = _check_parallelism(max_parallelism, parallelism)
    kg = _as_int(key_group, "key_group")
    if not 0 <= kg < mp:
        raise ValueError(f"key_group must be in 0..{mp - 1} for max_parallelism {mp}, got {kg}")
    return kg * p // mp


def _rotl32(x, r):
    return ((x << r) | (x >> (32 - r))) & _MASK32


def _fmix32(h):
    # Flink's MathUtils.bitMix, i.e. murmur3's fmix32 finalizer.
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _MASK32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _MASK32
    h ^= h >> 16
    return h


def murmur_hash(code):
    """Flink's ``MathUtils.murmurHash(int)``: mix a 32-bit int, return a non-negative int.

    ``code`` is reduced to 32 bits first (``code & 0xffffffff``), so signed
    (Java ``int``) and unsigned spellings of the same bits agree. The result
    is in ``0 .. 2**31 - 1``: a negative mix is negated, and ``INT_MIN``
    (whose negation overflows in Java) becomes 0, exactly as in Flink.
    """
    c = _as_int(code, "key hash") & _MASK32
    # One murmur3 round over a single 4-byte block, then the length-4 tail.
    c = (c * 0xCC9E2D51) & _MASK32
    c = _rotl32(c, 15)
    c = (c * 0x1B873593) & _MASK32
    c = _rotl32(c, 13)
    c = (c * 5 + 0xE6546B64) & _MASK32
    c ^= 4
    c = _fmix32(c)
    if c < 0x80000000:  # non-negative as a Java int
        return c
    if c != 0x80000000:  # negative, not INT_MIN: Java's -code
        return (1 << 32) - c
    return 0


def compute_key_group_for_key_hash(key_hash, max_parallelism):
    """Return ``murmur_hash(key_hash) % max_parallelism`` (Flink's formula).

    Parameters
    ----------
    key_hash : int
        A 32-bit hash; only its low 32 bits are used (signed or unsigned).
    max_parallelism : int
        Number of key groups, ``1 .. UPPER_BOUND_MAX_PARALLELISM``.
    """
    mp = check_max_parallelism(max_parallelism)
    return murmur_hash(key_hash) % mp


def murmur3_32(data, seed=0):
    """Pure-Python MurmurHash3_x86_32 of ``data`` (reference implementation).

    The compiled layer computes the same function in C; this copy exists to
    document it and to cross-check the C code in tests. It is slow.

    Returns
    -------
    int
        The unsigned 32-bit hash.
    """
    data = bytes(data)
    h = _as_int(seed, "seed") & _MASK32
    n = len(data)
    nblocks = n // 4
    for i in range(nblocks):
        k = int.from_bytes(data[4 * i:4 * i + 4], "little")
        k = (k * 0xCC9E2D51) & _MASK32
        k = _rotl32(k, 15)
        k = (k * 0x1B873593) & _MASK32
        h ^= k
        h = _rotl32(h, 13)
        h = (h * 5 + 0xE6546B64) & _MASK32
    tail = data[4 * nblocks:]
    if tail:
        k = int.from_bytes(tail, "little")
        k = (k * 0xCC9E2D51) & _MASK32
        k = _rotl32(k, 15)
        k = (k * 0x1B873593) & _MASK32
        h ^= k
    h ^= n & _MASK32
    return _fmix32(h)


def compute_default_max_parallelism(operator_parallelism):
    """Return Flink's default max parallelism for an operator parallelism.

    ``round_up_to_power_of_two(p + p // 2)`` clamped to
    ``DEFAULT_LOWER_BOUND_MAX_PARALLELISM .. UPPER_BOUND_MAX_PARALLELISM``
    (128 .. 32768), as ``KeyGroupRangeAssignment.computeDefaultMaxParallelism``.

    Raises
    ------
    ValueError
        ``operator_parallelism`` not in ``1 .. 32768``.
    """
    p = _as_int(operator_parallelism, "operator_parallelism")
    if not 1 <= p <= UPPER_BOUND_MAX_PARALLELISM:
        raise ValueError(
            f"operator_parallelism must be in 1..{UPPER_BOUND_MAX_PARALLELISM}, got {p}"
        )
    x = p + p // 2
    rounded = 1 << (x - 1).bit_length()  # smallest power of two >= x
    return min(max(rounded, DEFAULT_LOWER_BOUND_MAX_PARALLELISM), UPPER_BOUND_MAX_PARALLELISM)


def key_group_for_bytes(data, max_parallelism):
    """Return the key group of already-serialized key bytes.

    ``murmur_hash(murmur3_32(data, 0)) % max_parallelism``, computed by the
    compiled ``statecore._core.key_group_for_bytes``.
    """
    # Lazy: this module must import before the extension is built.
    from . import _core

    return _core.key_group_for_bytes(data, check_max_parallelism(max_parallelism))


def assign_to_key_group(key, max_parallelism, key_serializer=None):
    """Return the key group of ``key`` (Flink's ``assignToKeyGroup``).

    The key is serialized with ``key_serializer.serialize_key(key)`` and its
    bytes are hashed (:func:`key_group_for_bytes`), so the result is stable
    across processes and independent of ``PYTHONHASHSEED``. It must be the
    same serializer the keyed backend uses, or keys land in other groups.

    Parameters
    ----------
    key : object
        The key. Typed as in Flink: ``1``, ``1.0`` and ``True`` are different
        keys and may fall in different groups.
    max_parallelism : int
        Number of key groups, ``1 .. UPPER_BOUND_MAX_PARALLELISM``.
    key_serializer : Serializer or type, optional
        Default ``serializers.Auto()``; a type such as ``int`` is resolved
        with ``serializers.resolve_serializer``.

    Raises
    ------
    SerializationError
        The key cannot be used as a key (e.g. ``dict``, ``float('nan')``) or
        cannot be encoded by the serializer.
    ValueError
        ``max_parallelism`` out of range.
    """
    mp = check_max_parallelism(max_parallelism)
    from . import serializers

    if key_serializer is None:
        key_serializer = serializers.Auto()
    else:
        key_serializer = serializers.resolve_serializer(key_serializer)
    return key_group_for_bytes(key_serializer.serialize_key(key), mp)
