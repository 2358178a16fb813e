"""Exception hierarchy of statecore.

Every error raised on purpose by statecore derives from :class:`StateError`, so
``except statecore.StateError`` catches all of them. Where an error has an
obvious builtin counterpart it also subclasses that builtin (msgpack's
``exceptions.py`` does the same), so code written against plain Python
conventions (``except ValueError``, ``except TypeError``) keeps working.

These classes are plain Python on purpose: the compiled layer translates C
status codes into them in exactly one place and never defines its own.
Messages say what was wrong and what to do about it; none is swallowed.
"""

__all__ = [
    "StateError",
    "KeyGroupOutOfRangeError",
    "SerializationError",
    "StateMigrationError",
    "CheckpointError",
    "CorruptCheckpointError",
    "CheckpointSizeExceededError",
    "BackendClosedError",
]


class StateError(Exception):
    """Base class of every statecore error.

    Raised directly for misuse that has no more specific class, for example
    using a state before any ``set_current_key`` call, or a batch read into an
    int64 array that finds a missing key while neither ``fill`` nor a
    descriptor default is given.
    """


class KeyGroupOutOfRangeError(StateError, ValueError):
    """A key belongs to a key group this backend instance does not own.

    Raised by ``set_current_key`` (and by anything else that routes a key)
    when ``assign_to_key_group(key, max_parallelism)`` falls outside the
    backend's ``key_group_range``. The current key is left unchanged. Flink
    raises the same condition as an ``IllegalArgumentException``, hence the
    ``ValueError`` base.
    """


class SerializationError(StateError, TypeError):
    """A value cannot be encoded, or bytes cannot be decoded, by a serializer.

    Raised when a serializer meets an object it does not support (``Auto``
    names the type and suggests ``serializer=Pickle()``), when a key is not
    usable as a key (``dict``, ``float('nan')``), and when bytes handed to
    ``deserialize`` were not produced by that serializer (truncated, bad tag,
    impossible length). Decoding never crashes the process instead.
    """


class StateMigrationError(StateError):
    """Registered or restored state is incompatible with the descriptor in use.

    Raised when ``get_state`` is called with a name already registered under a
    different state type or serializer, when a restored state has a different
    state type or an incompatible key/value serializer than the descriptor
    (the message names the state and what differs), and when a checkpoint is
    restored with a different ``max_parallelism``. Turning TTL on or off is
    *not* an error: it is migrated, as Flink 2.2 does.
    """


class CheckpointError(StateError):
    """Base class of errors taking, storing, loading or restoring a checkpoint.

    Raised directly when a checkpoint cannot be written or read for a reason
    that is not corruption or size, e.g. the storage location is unreachable
    or a checkpoint id is reused.
    """


class CorruptCheckpointError(CheckpointError):
    """A checkpoint or savepoint is incomplete or its bytes fail verification.

    Raised by ``load_checkpoint`` and by restore, before any state is
    modified, when ``_metadata`` is missing or malformed, a file is missing or
    truncated, or a length or checksum does not match. Restore never falls
    back silently to another checkpoint.
    """


class CheckpointSizeExceededError(CheckpointError):
    """A checkpoint is larger than its storage accepts.

    Raised by ``JobManagerCheckpointStorage`` when a snapshot exceeds its
    ``max_state_size`` (Flink's 5 MiB rule for in-memory checkpoints). Use
    ``FileSystemCheckpointStorage`` or raise ``max_state_size``.
    """


class BackendClosedError(StateError):
    """A backend, or a state obtained from it, is used after ``close()``.

    Closing a keyed or operator state backend invalidates every state object
    it handed out; any later call on them raises this error.
    """
