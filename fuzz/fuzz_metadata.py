"""Fuzz target: the checkpoint ``_metadata`` reader (T3).

Input byte 0 picks the mode:

* even: the rest is a whole ``_metadata`` file for ``format.decode_metadata``
  (header, version, length and SHA-256 checks);
* odd: the rest is a metadata *body*, wrapped in a valid header and checksum,
  so the fuzzer reaches the JSON parse and the field checks behind the
  checksum (random bytes almost never pass SHA-256).

A decoded body then goes through what ``load_checkpoint`` and ``restore`` do
with it (``CompletedCheckpoint.from_metadata``, the keyed-state checks).
Allowed outcomes: a dict / CompletedCheckpoint, or ``CorruptCheckpointError``;
no audit event in ``_common.FORBIDDEN`` may fire.
"""
import hashlib
import os
import struct
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)                  # the fuzz/ helpers
sys.path.append(os.path.dirname(_HERE))    # the in-place built statecore, unless PYTHONPATH names another

import atheris_shim  # noqa: E402
atheris_shim.ACTIVE = __name__ == "__main__"
from _common import Guard, run  # noqa: E402

from statecore.checkpoint import format as fmt  # noqa: E402
from statecore.checkpoint import snapshot  # noqa: E402
from statecore.errors import CorruptCheckpointError  # noqa: E402
from statecore.keygroups import KeyGroupRange  # noqa: E402

atheris_shim.instrument(fmt.decode_metadata, snapshot.CompletedCheckpoint.from_metadata, snapshot._check_files,
                        snapshot._check_keyed_states, snapshot._int_field, KeyGroupRange.__init__)

LOCATION = "memory://statecore-fuzz/j/op/chk-1-kg0-127"


def wrap(body: bytes) -> bytes:
    """``body`` in a valid version-1 container (any bytes, not necessarily JSON)."""
    head = struct.pack(">8sHI", fmt.MAGIC, fmt.FORMAT_VERSION, len(body)) + body
    return head + hashlib.sha256(head).digest()


def check(data):
    if not data:
        return
    blob = data[1:] if data[0] % 2 == 0 else wrap(data[1:])
    try:
        body = fmt.decode_metadata(blob, f"{LOCATION}/_metadata")
        if not isinstance(body, dict):
            raise AssertionError(f"decode_metadata returned {type(body).__name__}")
        snapshot.CompletedCheckpoint.from_metadata(LOCATION, body)
        snapshot._check_keyed_states(body, LOCATION)
    except CorruptCheckpointError:
        pass


atheris_shim.instrument(check)


def TestOneInput(data):
    with Guard():
        check(data)


WARM_UP = [b"\x00", b"\x00" + b"SCKPMETA" + bytes(40), b"\x01", b"\x01{}", b"\x01[]", b"\x01\xff",
           b"\x01{\"files\":[],\"key_group_range\":[0,1],\"checkpoint_id\":1,\"format\":\"native\"}",
           b"\x01" + b"[" * 5000, b"\x01" + b"9" * 5000, b"\x01{\"key_group_range\":[1e999]}"]


def warm_up():
    for data in WARM_UP:
        check(data)


if __name__ == "__main__":
    run(TestOneInput, warm_up, "metadata")
