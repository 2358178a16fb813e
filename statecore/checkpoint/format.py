"""The ``_metadata`` container and file-checksum checks (docs/checkpoint-format.md).

Layout of ``_metadata`` (all integers big-endian)::

    offset  size  field
    0       8     magic  b"SCKPMETA"
    8       2     format version (u16)
    10      4     body length N (u32)
    14      N     body: canonical JSON of a dict (UTF-8, sort_keys, compact separators)
    14+N    32    SHA-256 over bytes [0, 14+N)

The container knows nothing about what the body says (checkpoint id, key-group
range, files ...): the snapshot code owns that.  It only guarantees that a body
handed to the caller is exactly the bytes some writer produced, so that a
reader can trust the per-file lengths and hashes inside it.

Every failure of :func:`decode_metadata` and :func:`verify_file` is a
:class:`~statecore.errors.CorruptCheckpointError` whose message names the file
(``where``) and what is wrong; nothing else escapes (no ``struct.error``,
``UnicodeDecodeError``, ``RecursionError`` ...), because a restore must fail
with one documented error before it touches any state.
"""
import hashlib
import json
import math
import struct

from statecore.errors import CorruptCheckpointError

__all__ = [
    "MAGIC",
    "FORMAT_VERSION",
    "READABLE_VERSIONS",
    "MAX_BODY_LENGTH",
    "HEADER_SIZE",
    "CHECKSUM_SIZE",
    "encode_metadata",
    "decode_metadata",
    "sha256_hex",
    "verify_file",
]

MAGIC = b"SCKPMETA"
FORMAT_VERSION = 1
# Versions this code can read, with what each one means.  Adding a version means
# adding a row here (and a decoder branch if the container changed), never
# removing one: old checkpoints must stay restorable.
READABLE_VERSIONS = {
    1: "JSON body, SHA-256 trailer (statecore 0.1)",
}
# A body bigger than this is refused before anything else is read: a flipped
# bit in the length field must not make a reader allocate gigabytes.
MAX_BODY_LENGTH = 64 * 1024 * 1024

_HEADER = struct.Struct(">8sHI")
HEADER_SIZE = _HEADER.size  # 14
CHECKSUM_SIZE = 32


def sha256_hex(data) -> str:
    """Lowercase hex SHA-256 of a bytes-like object (the checksum used for every file)."""
    return hashlib.sha256(data).hexdigest()


def _no_constant(name):
    # Python's json accepts NaN and +-Infinity; the writer never emits them (allow_nan=False).
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text):
    value = float(text)
    if not math.isfinite(value):  # e.g. 1E999: the writer never emits it, and int() of it would overflow
        raise ValueError(f"number {text[:40]} out of range")
    return value


def encode_metadata(body: dict) -> bytes:
    """Serialize ``body`` into a ``_metadata`` blob of the current FORMAT_VERSION.

    ``body`` must be a dict of JSON data (str keys; str/int/float/bool/None/list/dict
    values).  NaN and infinities are refused (``ValueError``) because they are not
    JSON and another reader could not parse them.  The encoding is canonical:
    equal bodies give identical bytes.
    """
    if not isinstance(body, dict):
        raise TypeError(f"checkpoint metadata body must be a dict, got {type(body).__name__}")
    raw = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                     allow_nan=False).encode("utf-8")
    if len(raw) > MAX_BODY_LENGTH:
        # Refuse to write what no reader would accept.
        raise ValueError(f"checkpoint metadata body is {len(raw)} bytes, over the {MAX_BODY_LENGTH}-byte limit")
    head = _HEADER.pack(MAGIC, FORMAT_VERSION, len(raw)) + raw
    return head + hashlib.sha256(head).digest()


def decode_metadata(data, where: str) -> dict:
    """Verify and parse a ``_metadata`` blob; return its body dict.

    Checks, in this order, each failing with CorruptCheckpointError naming ``where``:
    size of the header, magic, version (must be in READABLE_VERSIONS), declared body
    length (<= MAX_BODY_LENGTH, checked before reading further), total size (exactly
    header + body + checksum: truncated and over-long files are both refused),
    SHA-256, UTF-8 + JSON parse, and that the body is a dict.
    """
    data = bytes(data)
    n = len(data)
    if n < HEADER_SIZE:
        raise CorruptCheckpointError(f"{where}: truncated checkpoint metadata ({n} bytes, header needs {HEADER_SIZE})")
    magic, version, length = _HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        raise CorruptCheckpointError(f"{where}: not a statecore checkpoint metadata file (bad magic {magic!r})")
    if version not in READABLE_VERSIONS:
        raise CorruptCheckpointError(
            f"{where}: checkpoint metadata format version {version} is not readable by this statecore "
            f"(readable: {sorted(READABLE_VERSIONS)})")
    if length > MAX_BODY_LENGTH:
        raise CorruptCheckpointError(
            f"{where}: checkpoint metadata declares a {length}-byte body, over the {MAX_BODY_LENGTH}-byte limit")
    expected = HEADER_SIZE + length + CHECKSUM_SIZE
    if n != expected:
        what = "truncated" if n < expected else "has trailing bytes"
        raise CorruptCheckpointError(
            f"{where}: checkpoint metadata {what} ({n} bytes, header says {expected})")
    end = HEADER_SIZE + length
    if hashlib.sha256(data[:end]).digest() != data[end:]:
        raise CorruptCheckpointError(f"{where}: checkpoint metadata checksum mismatch")
    # Past the checksum a parse error means a writer bug, not bit rot; it is still
    # reported as corruption so the caller has one error type to handle.
    try:
        body = json.loads(data[HEADER_SIZE:end].decode("utf-8"), parse_constant=_no_constant,
                          parse_float=_finite_float)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CorruptCheckpointError(f"{where}: checkpoint metadata body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise CorruptCheckpointError(
            f"{where}: checkpoint metadata body is a {type(body).__name__}, expected an object")
    return body


def verify_file(data, expected_len: int, expected_sha256: str, where: str) -> None:
    """Check a data file's bytes against the length and SHA-256 recorded in the metadata.

    Raises CorruptCheckpointError naming ``where`` when the file is shorter
    ("truncated"), longer ("too long"), or its checksum differs.  Length is checked
    first so the message says which.  Returns None on success.
    """
    n = len(data)
    if n < expected_len:
        raise CorruptCheckpointError(f"{where}: truncated ({n} bytes, expected {expected_len})")
    if n > expected_len:
        raise CorruptCheckpointError(f"{where}: too long ({n} bytes, expected {expected_len})")
    if not isinstance(expected_sha256, str) or sha256_hex(data) != expected_sha256.lower():
        raise CorruptCheckpointError(f"{where}: checksum mismatch (SHA-256 differs from the checkpoint metadata)")
