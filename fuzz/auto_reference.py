"""A pure-Python reference decoder of the Auto encoding (statecore/_codec.pyx docstring).

Used by fuzz_auto.py for differential fuzzing: the compiled decoder and this
one must agree on every input (same value, or both refuse it).  Being Python,
it is instrumented by atheris, which gives the fuzzer coverage feedback on the
format's structure even though the Cython decoder is not instrumented (gcc
cannot emit libFuzzer coverage; see CONTRIBUTING.md "Fuzzing").
"""
import struct

MAX_DEPTH = 100


class Invalid(Exception):
    pass


def _varint(data, pos):
    v = 0
    for i in range(10):
        if pos + i >= len(data):
            raise Invalid("truncated varint")
        c = data[pos + i]
        if i == 9 and c > 1:
            raise Invalid("varint overflow")
        v |= (c & 0x7F) << (7 * i)
        if not c & 0x80:
            return v, pos + i + 1
    raise Invalid("varint too long")


def _length(data, pos):
    n, pos = _varint(data, pos)
    if n > len(data) - pos:
        raise Invalid("length exceeds data")
    return n, pos


def _decode(data, pos, depth):
    if pos >= len(data):
        raise Invalid("truncated")
    tag = data[pos]
    pos += 1
    if tag == 0:
        return None, pos
    if tag == 1:
        return False, pos
    if tag == 2:
        return True, pos
    if tag in (3, 5):
        if len(data) - pos < 8:
            raise Invalid("truncated")
        raw = data[pos:pos + 8]
        if tag == 3:
            return int.from_bytes(raw, "big") - (1 << 63), pos + 8
        return struct.unpack(">d", raw)[0], pos + 8
    if tag == 4:
        n, pos = _length(data, pos)
        value = int.from_bytes(data[pos:pos + n], "big", signed=True)
        if -(1 << 63) <= value < (1 << 63) or n != (value.bit_length() + 8) // 8:
            raise Invalid("non-canonical int")
        return value, pos + n
    if tag == 6:
        n, pos = _length(data, pos)
        try:
            return bytes(data[pos:pos + n]).decode("utf-8"), pos + n
        except UnicodeDecodeError:
            raise Invalid("utf-8") from None
    if tag == 7:
        n, pos = _length(data, pos)
        return bytes(data[pos:pos + n]), pos + n
    if tag in (8, 9, 10):
        if depth >= MAX_DEPTH:
            raise Invalid("too deep")
        n, pos = _length(data, pos)
        if tag == 10:
            d = {}
            for _ in range(n):
                k, pos = _decode(data, pos, depth + 1)
                v, pos = _decode(data, pos, depth + 1)
                try:
                    d[k] = v
                except TypeError:
                    raise Invalid("unhashable key") from None
            return d, pos
        items = []
        for _ in range(n):
            item, pos = _decode(data, pos, depth + 1)
            items.append(item)
        return (tuple(items) if tag == 8 else items), pos
    raise Invalid(f"unknown tag {tag}")


def decode(data):
    """The value encoded by ``data``; raises Invalid for anything Auto must refuse."""
    value, pos = _decode(bytes(data), 0, 0)
    if pos != len(data):
        raise Invalid("trailing bytes")
    return value
