"""Tests of statecore.keygroups against independently computed Flink values.

Everything here is pure Python except ``test_assign_to_key_group_compiled``,
which needs the built extension and skips on its own without it.
"""

import pickle

import numpy as np
import pytest

from statecore.keygroups import (
    DEFAULT_LOWER_BOUND_MAX_PARALLELISM,
    UPPER_BOUND_MAX_PARALLELISM,
    KeyGroupRange,
    check_max_parallelism,
    compute_default_max_parallelism,
    compute_key_group_for_key_hash,
    compute_key_group_range_for_operator_index,
    compute_operator_index_for_key_group,
    murmur3_32,
    murmur_hash,
)


# --- an independent model of Java int arithmetic (numpy int32 wrap-around) ---

def _i32(x):
    return np.int32(np.uint32(x & 0xFFFFFFFF).view(np.int32))


def _java_ushr(x, n):  # Java's >>> on int
    return _i32(int(np.uint32(x.view(np.uint32))) >> n)


def _java_rotl(x, n):
    u = int(x.view(np.uint32))
    return _i32((u << n) | (u >> (32 - n)))


def _java_murmur_hash(code):
    """Flink MathUtils.murmurHash, written with numpy int32 operations."""
    with np.errstate(over="ignore"):
        c = _i32(code)
        c = c * np.int32(-862048943)      # 0xcc9e2d51 as a Java int
        c = _java_rotl(c, 15)
        c = c * np.int32(461845907)       # 0x1b873593
        c = _java_rotl(c, 13)
        c = c * np.int32(5) + np.int32(-430675100)  # 0xe6546b64
        c = c ^ np.int32(4)
        c = c ^ _java_ushr(c, 16)          # bitMix
        c = c * np.int32(-2048144789)     # 0x85ebca6b
        c = c ^ _java_ushr(c, 13)
        c = c * np.int32(-1028477387)     # 0xc2b2ae35
        c = c ^ _java_ushr(c, 16)
    c = int(c)
    if c >= 0:
        return c
    if c != -(1 << 31):
        return -c
    return 0


HASH_INPUTS = [0, 1, -1, 2, 42, 123456789, -123456789, 2**31 - 1, -(2**31), 0x7FFF, 0xDEADBEEF]


@pytest.mark.parametrize("code", HASH_INPUTS)
def test_murmur_hash_matches_java_int_model(code):
    assert murmur_hash(code) == _java_murmur_hash(code)
    assert 0 <= murmur_hash(code) < 2**31


def test_murmur_hash_signed_and_unsigned_spellings_agree():
    assert murmur_hash(-1) == murmur_hash(0xFFFFFFFF)
    assert murmur_hash(-(2**31)) == murmur_hash(2**31)
    assert murmur_hash(np.int32(-5)) == murmur_hash(-5)


def test_murmur_hash_is_murmur3_of_the_int_little_endian():
    # Flink's murmurHash(int) is murmur3_32(seed 0) of the int's 4 LE bytes,
    # made non-negative. Known murmur3 vectors (SMHasher verification set):
    # 00000000 -> 0x2362F9DE, FFFFFFFF -> 0x76293B50, 21436587 -> 0xF55B516B.
    assert murmur_hash(0) == 0x2362F9DE
    assert murmur_hash(-1) == 0x76293B50
    assert murmur_hash(0x87654321) == (1 << 32) - 0xF55B516B  # negative int32, negated
    for code in HASH_INPUTS:
        h = murmur3_32((code & 0xFFFFFFFF).to_bytes(4, "little"))
        signed = h - (1 << 32) if h >= 1 << 31 else h
        expected = signed if signed >= 0 else (-signed if signed != -(1 << 31) else 0)
        assert murmur_hash(code) == expected


@pytest.mark.parametrize(
    "data, seed, expected",
    [
        (b"", 0, 0),
        (b"", 1, 0x514E28B7),
        (b"", 0xFFFFFFFF, 0x81F16F39),
        (b"\xff\xff\xff\xff", 0, 0x76293B50),
        (b"\x21\x43\x65\x87", 0, 0xF55B516B),
        (b"\x21\x43\x65\x87", 0x5082EDEE, 0x2362F9DE),
        (b"\x21\x43\x65", 0, 0x7E4A8634),
        (b"\x21\x43", 0, 0xA0F7B07A),
        (b"\x21", 0, 0x72661CF4),
        (b"\x00\x00\x00\x00", 0, 0x2362F9DE),
        (b"\x00\x00\x00", 0, 0x85F0B427),
        (b"\x00\x00", 0, 0x30F4C306),
        (b"\x00", 0, 0x514E28B7),
        (b"Hello, world!", 0x9747B28C, 0x24884CBA),
        (b"The quick brown fox jumps over the lazy dog", 0x9747B28C, 0x2FA826CD),
    ],
)
def test_murmur3_32_known_vectors(data, seed, expected):
    assert murmur3_32(data, seed) == expected


@pytest.mark.parametrize("mp", [1, 7, 128, 1000, UPPER_BOUND_MAX_PARALLELISM])
def test_compute_key_group_for_key_hash(mp):
    for code in HASH_INPUTS:
        kg = compute_key_group_for_key_hash(code, mp)
        assert kg == _java_murmur_hash(code) % mp
        assert 0 <= kg < mp


def test_compute_key_group_for_key_hash_rejects_bad_max_parallelism():
    with pytest.raises(ValueError):
        compute_key_group_for_key_hash(1, 0)
    with pytest.raises(ValueError):
        compute_key_group_for_key_hash(1, UPPER_BOUND_MAX_PARALLELISM + 1)


# --- ranges and operator indices ---

def _java_range(mp, p, i):
    # Flink's formulas with Java int division (all operands non-negative here).
    return ((i * mp + p - 1) // p, ((i + 1) * mp - 1) // p)


def test_known_flink_ranges_128_by_3():
    got = [compute_key_group_range_for_operator_index(128, 3, i).to_tuple() for i in range(3)]
    assert got == [(0, 42), (43, 85), (86, 127)]


@pytest.mark.parametrize("mp, p", [(1, 1), (128, 1), (128, 3), (128, 128), (10, 4), (32768, 7), (100, 33)])
def test_ranges_partition_all_key_groups(mp, p):
    covered = []
    for i in range(p):
        r = compute_key_group_range_for_operator_index(mp, p, i)
        assert r.to_tuple() == _java_range(mp, p, i)
        assert len(r) >= 1
        covered.extend(r)
        for kg in (r.start, r.end):
            assert compute_operator_index_for_key_group(mp, p, kg) == i
    assert covered == list(range(mp))


def test_range_and_index_validation():
    with pytest.raises(ValueError, match="parallelism"):
        compute_key_group_range_for_operator_index(4, 5, 0)
    with pytest.raises(ValueError, match="index"):
        compute_key_group_range_for_operator_index(128, 3, 3)
    with pytest.raises(ValueError, match="index"):
        compute_key_group_range_for_operator_index(128, 3, -1)
    with pytest.raises(ValueError):
        compute_key_group_range_for_operator_index(128, 0, 0)
    with pytest.raises(ValueError, match="key_group"):
        compute_operator_index_for_key_group(128, 3, 128)
    with pytest.raises(TypeError):
        compute_operator_index_for_key_group(128, 3, 1.0)


def test_check_max_parallelism():
    assert check_max_parallelism(1) == 1
    assert check_max_parallelism(np.int64(128)) == 128
    assert check_max_parallelism(UPPER_BOUND_MAX_PARALLELISM) == 32768
    for bad in (0, -1, UPPER_BOUND_MAX_PARALLELISM + 1):
        with pytest.raises(ValueError, match=str(bad)):
            check_max_parallelism(bad)
    with pytest.raises(TypeError):
        check_max_parallelism(True)
    with pytest.raises(TypeError):
        check_max_parallelism(128.0)


@pytest.mark.parametrize(
    "p, expected",
    [(1, 128), (2, 128), (85, 128), (86, 256), (100, 256), (1000, 2048), (20000, 32768), (32768, 32768)],
)
def test_compute_default_max_parallelism(p, expected):
    assert compute_default_max_parallelism(p) == expected
    assert DEFAULT_LOWER_BOUND_MAX_PARALLELISM == 128


# --- KeyGroupRange ---

def test_key_group_range_basics():
    r = KeyGroupRange(3, 7)
    assert (r.start_key_group, r.end_key_group, r.start, r.end) == (3, 7, 3, 7)
    assert len(r) == r.get_number_of_key_groups() == 5
    assert list(r) == [3, 4, 5, 6, 7]
    assert 3 in r and 7 in r and 8 not in r and 2 not in r
    assert np.int64(5) in r
    assert "5" not in r and 5.0 not in r and True not in KeyGroupRange(0, 3)
    assert r == KeyGroupRange.of(3, 7) and hash(r) == hash(KeyGroupRange(3, 7))
    assert r != KeyGroupRange(3, 8)
    assert repr(r) == "KeyGroupRange(3, 7)"
    assert pickle.loads(pickle.dumps(r)) == r
    with pytest.raises(AttributeError):
        r.start = 0


def test_key_group_range_empty_and_validation():
    e = KeyGroupRange.EMPTY
    assert e.to_tuple() == (0, -1) and len(e) == 0 and list(e) == [] and 0 not in e
    assert KeyGroupRange.of(5, 4) is e
    assert KeyGroupRange(0, -1) == e
    with pytest.raises(ValueError, match="start"):
        KeyGroupRange(-1, 3)
    with pytest.raises(ValueError, match="EMPTY"):
        KeyGroupRange(5, 4)
    with pytest.raises(TypeError):
        KeyGroupRange(0.0, 3)


def test_key_group_range_intersection():
    a = KeyGroupRange(0, 42)
    assert a.intersection(KeyGroupRange(40, 85)) == KeyGroupRange(40, 42)
    assert a.intersection(KeyGroupRange(43, 85)) == KeyGroupRange.EMPTY
    assert a.intersection(KeyGroupRange.EMPTY) == KeyGroupRange.EMPTY
    assert a.intersection(a) == a


# --- compiled path: independent of every test above ---

def test_assign_to_key_group_compiled():
    core = pytest.importorskip("statecore._core")
    serializers = pytest.importorskip("statecore.serializers")
    from statecore.errors import SerializationError
    from statecore.keygroups import assign_to_key_group, key_group_for_bytes

    for data in (b"", b"a", b"abcd", b"hello world", bytes(range(256))):
        expected = murmur_hash(murmur3_32(data)) % 128
        assert key_group_for_bytes(data, 128) == expected
        assert core.key_group_for_bytes(data, 128) == expected
    auto = serializers.Auto()
    for key in (0, 1, -7, "user-1", b"\x00", (1, "a"), 1.5, True):
        data = auto.serialize_key(key)
        kg = assign_to_key_group(key, 128)
        assert kg == murmur_hash(murmur3_32(data)) % 128
        assert assign_to_key_group(key, 128, auto) == kg
    assert assign_to_key_group(5, 128, int) == key_group_for_bytes(
        serializers.resolve_serializer(int).serialize_key(5), 128
    )
    with pytest.raises(SerializationError):
        assign_to_key_group({"a": 1}, 128)
    with pytest.raises(SerializationError):
        assign_to_key_group(float("nan"), 128)
    with pytest.raises(ValueError):
        assign_to_key_group(1, 0)
