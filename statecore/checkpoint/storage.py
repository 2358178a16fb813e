"""Checkpoint storage: configuration classes and the layer that writes and reads checkpoint files.

A working-state backend keeps state; a checkpoint storage says where its
snapshots go.  ``JobManagerCheckpointStorage`` keeps them in process memory
(Flink's 5 MB rule applies); ``FileSystemCheckpointStorage`` writes them to any
fsspec URI.  The snapshot code decides *what* goes into a checkpoint; this module
decides *how* it reaches storage so that a checkpoint exists if and only if its
``_metadata`` was published, last and atomically (docs/checkpoint-format.md).

Layout::

    <base>/<job_id>/<operator_id>/chk-<id>-<instance>/   one checkpoint of one parallel instance
        <data files>                                   written and made durable first
        _metadata                                      published last; its presence = committed
    <base>/<job_id>/<operator_id>/shared/              files referenced by incremental checkpoints

Locations are plain strings (a path, ``file://``, ``memory://``, ``s3://`` ... or
``jobmanager://<storage id>/...``) so a location can be handed to another process
(file storages) and read back with :func:`read_metadata` / :func:`read_file` alone.

Failure behaviour, in one place: I/O failures while writing raise
:class:`~statecore.errors.CheckpointError` (chained to the OSError) and never
publish anything; a missing or malformed checkpoint raises
:class:`~statecore.errors.CorruptCheckpointError` naming the file.
"""
import functools
import hashlib
import mmap
import os
import posixpath
import re
import secrets
import shutil
import stat
import tempfile
import threading
import weakref
import logging
from itertools import count

from statecore.errors import CheckpointError, CheckpointSizeExceededError, CorruptCheckpointError
from statecore.checkpoint.format import CHECKSUM_SIZE, HEADER_SIZE, MAX_BODY_LENGTH

_log = logging.getLogger("statecore.checkpoint")

__all__ = [
    "DEFAULT_MAX_STATE_SIZE",
    "METADATA_NAME",
    "CheckpointStorage",
    "JobManagerCheckpointStorage",
    "FileSystemCheckpointStorage",
    "CheckpointWriter",
    "read_metadata",
    "read_file",
    "read_mapped",
    "storage_for_location",
    "set_io_hook",
]

DEFAULT_MAX_STATE_SIZE = 5 * 1024 * 1024
METADATA_NAME = "_metadata"
# Upper bound of a valid _metadata file; a reader never reads more than this + 1.
_MAX_METADATA_FILE = HEADER_SIZE + MAX_BODY_LENGTH + CHECKSUM_SIZE

# Names the writer accepts for files and path components.  Deliberately narrow:
# relpaths come back out of (untrusted) metadata, so anything that could climb
# out of the checkpoint folder or mean something to a shell/URL is refused.
_COMPONENT = re.compile(r"[A-Za-z0-9_=+-][A-Za-z0-9_.=+-]*\Z")
_CHK_FOLDER = re.compile(r"chk-(\d+)-([A-Za-z0-9_=+-][A-Za-z0-9_.=+-]*)\Z")
_SHARED_PREFIX = "../shared/"
_JM_SCHEME = "jobmanager://"


# ---------------------------------------------------------------------------
# durability switches and the I/O hook (one place each, so tests flip one thing)

_io_hook = None


def set_io_hook(hook):
    """Install ``hook(event, path)`` (or None) called at the durability points of the writer.

    Events: ``"write"`` before a file's bytes are written; ``"written"`` after they are
    written to a local file, before its fsync (local disk only); ``"fsync"`` after a file is
    fsynced; ``"dirsync"`` after a directory is fsynced; ``"publish"`` after ``_metadata``
    became visible; ``"delete"`` before a checkpoint folder is deleted.  Meant for the
    reliability harnesses (sync tracking, whitebox kill points); an exception from the
    hook propagates like an I/O error.  Returns the previous hook.
    """
    global _io_hook
    previous, _io_hook = _io_hook, hook
    return previous


def _event(name, path):
    hook = _io_hook
    if hook is not None:
        hook(name, path)


def _skip_fsync():
    # Read per call (cheap next to an fsync) so a test can flip it with monkeypatch.
    # Negative control only: with it set, a power loss can lose acknowledged checkpoints.
    return os.environ.get("STATECORE_DEBUG_SKIP_FSYNC") == "1"


def _fsync_fd(fd, path, event="fsync"):
    """The only place that fsyncs (files and directories), so STATECORE_DEBUG_SKIP_FSYNC is one switch."""
    if _skip_fsync():
        return
    os.fsync(fd)
    _event(event, path)


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        _fsync_fd(fd, path, "dirsync")
    finally:
        os.close(fd)


def _as_bytes_view(data):
    try:
        if isinstance(data, str):
            raise TypeError
        view = memoryview(data)
    except TypeError:
        raise TypeError("checkpoint file data must be bytes, bytearray, memoryview or another buffer, "
                        f"got {type(data).__name__}") from None
    if not view.c_contiguous:
        raise TypeError("checkpoint file data must be a C-contiguous buffer")
    # Byte-wise view: len() and slicing count bytes whatever the buffer's item format.
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def _as_payload(data):
    """File contents as a list of byte views: one buffer, or a list/tuple of buffers written in order.

    A list lets a checkpoint hand over its key-group sections as they lie in
    memory (and its spilled runs as file mappings) without joining them first.
    """
    if isinstance(data, (list, tuple)):
        return [_as_bytes_view(d) for d in data]
    return [_as_bytes_view(data)]


def _payload_bytes(payload):
    return sum(v.nbytes for v in payload)


def _joined(payload):
    return payload[0].tobytes() if len(payload) == 1 else b"".join(payload)


#: Files at least this large are hashed by a helper thread while they are written.
_PARALLEL_HASH_BYTES = 1 << 20


def _sha256_while(payload, write):
    """Run ``write()`` and return the SHA-256 (hex) of payload, computed at the same time.

    hashlib and os.write both release the GIL, so a large file costs about the
    slower of the two instead of their sum.  A plain thread, not a pool: a pool's
    worker would not survive a fork.
    """
    def digest():
        h = hashlib.sha256()
        for v in payload:
            h.update(v)
        return h.hexdigest()

    if _payload_bytes(payload) < _PARALLEL_HASH_BYTES:
        write()
        return digest()
    result = {}

    def run():
        try:
            result["hex"] = digest()
        except BaseException as exc:  # re-raised by the caller below
            result["error"] = exc

    helper = threading.Thread(target=run, name="statecore-sha256", daemon=True)
    helper.start()
    try:
        write()
    finally:
        helper.join()
    if "error" in result:
        raise result["error"]
    return result["hex"]


_IOV_MAX = 1024


def _write_all(fd, payload):
    """Write every view of payload to fd in order (writev, resuming after short writes)."""
    views = [v for v in payload if v.nbytes]
    i = 0
    while i < len(views):
        n = os.writev(fd, views[i:i + _IOV_MAX])
        while n:
            if n >= views[i].nbytes:
                n -= views[i].nbytes
                i += 1
            else:
                views[i] = views[i][n:]
                n = 0


def _check_name(name, what="file name"):
    """Validate a writer-chosen relative name: '/'-separated safe components."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"checkpoint {what} must be a non-empty string, got {name!r}")
    parts = name.split("/")
    if not all(_COMPONENT.match(p) for p in parts):
        raise ValueError(f"invalid checkpoint {what} {name!r}: use '/'-separated components of "
                         f"letters, digits and _.=+- (no leading dot, no '..')")
    if parts[0].startswith(METADATA_NAME):
        raise ValueError(f"checkpoint {what} {name!r} is reserved")
    return name


def _check_relpath(relpath, where):
    """Validate a relpath read back from metadata; anything odd is corruption, not a ValueError."""
    rest = relpath[len(_SHARED_PREFIX):] if isinstance(relpath, str) and relpath.startswith(_SHARED_PREFIX) else relpath
    try:
        _check_name(rest)
    except ValueError:
        raise CorruptCheckpointError(f"{where}: invalid file path {relpath!r} in checkpoint metadata") from None
    return relpath


def _join(base, *parts):
    # "memory://", "/" and "s3://bucket/" already end with a separator.
    return base + ("" if base.endswith("/") else "/") + "/".join(parts)


# ---------------------------------------------------------------------------
# stores: the primitive operations per kind of location.  Paths are store-internal
# (an absolute OS path, an fsspec path, or a registry key); locations are strings.
# ``write``/``put_atomic`` take a payload: a list of byte views (see _as_payload).

class _LocalStore:
    """Plain paths and file://: os calls directly, because fsspec's local transactions
    stage in the system tmpdir and shutil.move (not atomic across filesystems, no fsync)."""

    kind = "local"

    def makedirs(self, path):
        # Create missing ancestors and fsync the parent of each new one, so the new
        # directory entries survive a power loss together with the files in them.
        missing = []
        p = path
        while not os.path.isdir(p):
            missing.append(p)
            parent = os.path.dirname(p)
            if parent == p:
                break
            p = parent
        if not missing:
            return
        os.makedirs(path, exist_ok=True)
        for d in reversed(missing):
            _fsync_dir(os.path.dirname(d))

    def write(self, path, payload, exclusive=False):
        """Write the payload's views, fsync, close; on any failure unlink the partial file and re-raise."""
        _event("write", path)
        flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC) | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(path, flags, 0o644)
        try:
            _write_all(fd, payload)
            _event("written", path)
            _fsync_fd(fd, path)
        except BaseException:
            os.close(fd)
            _unlink_quietly(path)
            raise
        try:
            os.close(fd)
        except BaseException:
            # close() can report a deferred write error (NFS); the file is not trustworthy.
            _unlink_quietly(path)
            raise

    def sync_dirs(self, dirs):
        for d in sorted(dirs, key=len, reverse=True):
            _fsync_dir(d)

    def publish(self, dirpath, data):
        """Temp file in the same directory, fsync, atomic exclusive link, fsync directory."""
        final = os.path.join(dirpath, METADATA_NAME)
        tmp = os.path.join(dirpath, f"{METADATA_NAME}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        self.write(tmp, [data], exclusive=True)
        try:
            try:
                # link() fails with EEXIST instead of replacing: an existing committed
                # checkpoint is never overwritten, even by a racing writer.
                os.link(tmp, final)
            except FileExistsError:
                raise _AlreadyCommitted(final) from None
            except OSError:
                # File systems without hard links: check, then replace (atomic, but a
                # racing writer could win in between; one writer per location is the rule).
                if os.path.lexists(final):
                    raise _AlreadyCommitted(final) from None
                os.replace(tmp, final)
            _event("publish", final)
        finally:
            _unlink_quietly(tmp)
        _fsync_dir(dirpath)

    def put_atomic(self, path, payload):
        """Whole-file replace (shared files): temp + fsync + os.replace + directory fsync."""
        tmp = f"{path}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        self.write(tmp, payload, exclusive=True)
        try:
            os.replace(tmp, path)
        except BaseException:
            _unlink_quietly(tmp)
            raise
        _fsync_dir(os.path.dirname(path))

    def read(self, path, limit=None):
        with open(path, "rb") as f:
            return f.read() if limit is None else f.read(limit)

    def size(self, path):
        return os.stat(path).st_size

    def exists(self, path):
        return os.path.lexists(path)

    def remove(self, path):
        _unlink_quietly(path)

    def remove_tree(self, path, background=False):
        # _metadata first: an interrupted delete leaves an uncommitted folder,
        # never a "committed" one with missing files.
        meta = os.path.join(path, METADATA_NAME)
        if os.path.lexists(meta):
            os.unlink(meta)
            _fsync_dir(path)
        if background:
            # Freeing a large file's page cache takes a while (~20 ms for 34 MB): the folder is renamed
            # out of the way at once and removed by the reclaim thread.
            trash = os.path.join(os.path.dirname(path),
                                 f"{TRASH_PREFIX}{os.path.basename(path)}-{secrets.token_hex(4)}")
            try:
                os.rename(path, trash)
            except FileNotFoundError:
                return
            _reclaim(trash)
            return
        try:
            shutil.rmtree(path)
        except FileNotFoundError:
            pass

    def rmdir_quietly(self, path):
        try:
            os.rmdir(path)
        except OSError:
            pass

    def listdir(self, path):
        try:
            return os.listdir(path)
        except (FileNotFoundError, NotADirectoryError):
            return []


#: Folders being removed in the background are renamed to TRASH_PREFIX + name + "-" + random hex (hidden,
#: and never a checkpoint name); retention removes any a crash or an exit left behind.
TRASH_PREFIX = ".deleting-"
_reclaimer = None
_reclaimer_lock = threading.Lock()
_reclaimer_pid = None


def _reclaim(path):
    """Remove ``path`` (an uncommitted, renamed checkpoint folder) on the reclaim thread."""
    global _reclaimer, _reclaimer_pid
    import concurrent.futures
    with _reclaimer_lock:
        if _reclaimer is None or _reclaimer_pid != os.getpid():  # a forked child gets its own thread
            _reclaimer = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="statecore-reclaim")
            _reclaimer_pid = os.getpid()
        _reclaimer.submit(_remove_trash, path)


def _remove_trash(path):
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except OSError as e:  # the folder is already uncommitted and hidden; the next retention retries
        _log.warning("statecore: removing the deleted checkpoint folder %s failed: %s", path, e)


def wait_for_reclaim():
    """Block until every folder handed to the reclaim thread so far is removed (tests, tools)."""
    with _reclaimer_lock:
        r = _reclaimer if _reclaimer_pid == os.getpid() else None
    if r is not None:
        r.submit(lambda: None).result()


def _unlink_quietly(path):
    try:
        os.unlink(path)
    except OSError:
        pass


class _AlreadyCommitted(Exception):
    """Internal: publishing _metadata found one already there."""


_OBJECT_STORE_PROTOCOLS = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl"}
_TRANSPORT_ERRORS = None


def _transport_errors():
    """Transport failures of remote file systems that are not OSError (botocore's
    ConnectionClosedError, aiohttp's ClientPayloadError on a reset mid-response ...)."""
    global _TRANSPORT_ERRORS
    if _TRANSPORT_ERRORS is None:
        found = []
        try:
            from botocore.exceptions import BotoCoreError
            found.append(BotoCoreError)
        except ImportError:
            pass
        try:
            from aiohttp import ClientError
            found.append(ClientError)
        except ImportError:
            pass
        _TRANSPORT_ERRORS = tuple(found)
    return _TRANSPORT_ERRORS


def _as_oserror(method):
    """Re-raise a transport failure as OSError, so every caller's I/O error handling applies."""
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except _transport_errors() as e:
            if isinstance(e, OSError):
                raise
            raise OSError(f"{type(e).__name__}: {e}") from e
    return wrapper


class _FsspecStore:
    """Any other fsspec file system (memory://, s3:// via s3fs, ...).

    Object stores have no fsync or rename: durability is the completed PUT, and
    atomicity comes from publishing _metadata last as one object.
    """

    kind = "fsspec"

    def __init__(self, fs):
        self.fs = fs
        protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
        self.object_store = bool(_OBJECT_STORE_PROTOCOLS.intersection(protocols))
        try:
            from fsspec.implementations.memory import MemoryFileSystem
            self.memory = isinstance(fs, MemoryFileSystem)
        except ImportError:  # pragma: no cover
            self.memory = False

    @_as_oserror
    def makedirs(self, path):
        if not self.object_store:  # object stores have no directories (s3fs would try to create a bucket)
            self.fs.makedirs(path, exist_ok=True)

    @_as_oserror
    def write(self, path, payload, exclusive=False):
        _event("write", path)
        if self.memory:
            # MemoryFileSystem commits a file at open(); pipe_file stores the whole
            # value in one step, so no reader ever sees a partial object.
            self.fs.pipe_file(path, _joined(payload), mode="create" if exclusive else "overwrite")
            return
        # Not `with fs.open(...)`: fsspec's __exit__ (and __del__) call close(), which
        # COMMITS the partial object even when an exception is propagating.
        f = self.fs.open(path, "xb" if exclusive else "wb")
        try:
            for view in payload:
                f.write(view)
            f.close()  # completes the PUT / multipart upload: durable on return
        except BaseException:
            _discard(f)
            self._abort_orphan_uploads(path)
            raise

    def _abort_orphan_uploads(self, path):
        """A CreateMultipartUpload whose answer was lost started an upload whose id nobody
        holds, so discard() cannot abort it: abort every in-progress upload to exactly this
        key (s3fs only; the key is in this writer's own checkpoint folder). Best effort."""
        call, split = getattr(self.fs, "call_s3", None), getattr(self.fs, "split_path", None)
        if not self.object_store or call is None or split is None:
            return
        try:
            bucket, key, _ = split(path)
            for upload in call("list_multipart_uploads", Bucket=bucket, Prefix=key).get("Uploads", []):
                if upload.get("Key") == key:
                    call("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload["UploadId"])
        except Exception:  # noqa: BLE001 - cleanup after a failure must not mask it
            pass

    def sync_dirs(self, dirs):
        pass  # nothing to sync: each completed PUT is durable

    @_as_oserror
    def publish(self, dirpath, data):
        final = posixpath.join(dirpath, METADATA_NAME)
        # Checked first as well because not every fsspec backend honours "xb"
        # (those that don't silently overwrite); the exclusive write closes the race
        # where it is supported.
        if self.exists(final):
            raise _AlreadyCommitted(final)
        try:
            # "xb" = PUT with If-None-Match: * on s3fs (FileExistsError if the key
            # exists); memory:// checks existence in-process.
            self.write(final, [data], exclusive=True)
        except OSError as e:
            # Some S3 implementations answer the failed condition with a bare 412.
            if not (isinstance(e, FileExistsError) or "PreconditionFailed" in str(e) or "pre-condition" in str(e)):
                raise
            # A PUT whose answer was lost and that the client retried (botocore does, by
            # default) fails its own condition: the object there is then ours, byte for byte.
            if not self._holds(final, data):
                raise _AlreadyCommitted(final) from None
        _event("publish", final)

    def _holds(self, path, data):
        try:
            self._invalidate(path)
            return self.read(path) == bytes(data)
        except OSError:
            return False

    def put_atomic(self, path, payload):
        self.write(path, payload)  # one PUT is atomic on object stores

    @_as_oserror
    def read(self, path, limit=None):
        if limit is None:
            return self.fs.cat_file(path)
        # Ranged read only when the object is larger than the limit (a range on an
        # empty object is an error on S3).
        if self.size(path) <= limit:
            return self.fs.cat_file(path)
        return self.fs.cat_file(path, start=0, end=limit)

    @_as_oserror
    def spool(self, path, limit, spool_dir):
        """The first ``limit`` bytes of path as a read-only map of a local temp copy (see read_mapped)."""
        if self.size(path) == 0:  # a ranged read of an empty object is an error on S3
            return b""
        with self.fs.open(path, "rb", block_size=_SPOOL_CHUNK) as src:
            return _spool_to_map(src, limit, spool_dir)

    @_as_oserror
    def size(self, path):
        info = self.fs.info(path)
        if info.get("type") == "directory":
            raise IsADirectoryError(path)
        return info["size"]

    @_as_oserror
    def exists(self, path):
        self._invalidate(path)
        return self.fs.exists(path)

    @_as_oserror
    def remove(self, path):
        try:
            self.fs.rm_file(path)
        except FileNotFoundError:
            pass

    @_as_oserror
    def remove_tree(self, path):
        self.remove(posixpath.join(path, METADATA_NAME))  # uncommit first, see _LocalStore
        self._invalidate(path)
        try:
            self.fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass

    def rmdir_quietly(self, path):
        if not self.object_store:
            try:
                self.fs.rmdir(path)
            except (OSError, ValueError):
                pass

    @_as_oserror
    def listdir(self, path):
        self._invalidate(path)
        try:
            return [posixpath.basename(p.rstrip("/")) for p in self.fs.ls(path, detail=False)]
        except (FileNotFoundError, NotADirectoryError):
            return []

    def _invalidate(self, path):
        # s3fs caches listings; another writer (or process) may have changed them.
        try:
            self.fs.invalidate_cache(path)
        except Exception:  # pragma: no cover - a file system without a cache
            pass


def _discard(f):
    """Throw away a file being written: abort the upload and make sure nothing commits it later."""
    discard = getattr(f, "discard", None)
    if discard is not None:
        try:
            discard()  # s3fs: aborts the multipart upload
        except Exception:
            pass
    try:
        # Marking it closed stops __del__ from calling close(), which would commit.
        f.closed = True
    except AttributeError:
        pass


class _JobManagerStore:
    """The process-global registry behind jobmanager:// locations: key -> bytes."""

    kind = "jobmanager"

    def __init__(self):
        self.files = {}
        self.lock = threading.Lock()

    def makedirs(self, path):
        pass

    def write(self, path, payload, exclusive=False):
        _event("write", path)
        data = _joined(payload)
        with self.lock:
            if exclusive and path in self.files:
                raise FileExistsError(path)
            self.files[path] = data

    def sync_dirs(self, dirs):
        pass

    def publish(self, dirpath, data):
        final = posixpath.join(dirpath, METADATA_NAME)
        try:
            self.write(final, [data], exclusive=True)
        except FileExistsError:
            raise _AlreadyCommitted(final) from None
        _event("publish", final)

    def put_atomic(self, path, payload):
        self.write(path, payload)

    def read(self, path, limit=None):
        with self.lock:
            try:
                data = self.files[path]
            except KeyError:
                raise FileNotFoundError(path) from None
        return data if limit is None else data[:limit]

    def size(self, path):
        return len(self.read(path))

    def exists(self, path):
        with self.lock:
            return path in self.files

    def remove(self, path):
        with self.lock:
            self.files.pop(path, None)

    def remove_tree(self, path):
        prefix = path + "/"
        with self.lock:
            # One lock hold: the folder disappears atomically, _metadata included.
            for k in [k for k in self.files if k.startswith(prefix)]:
                del self.files[k]

    def rmdir_quietly(self, path):
        pass

    def listdir(self, path):
        prefix = path + "/"
        with self.lock:
            return sorted({k[len(prefix):].split("/", 1)[0] for k in self.files if k.startswith(prefix)})


_LOCAL = _LocalStore()
_JM = _JobManagerStore()

# storage_options given to FileSystemCheckpointStorage, by URI prefix, so that
# read_metadata(location) in the same process reaches e.g. the same S3 endpoint.
_OPTIONS_BY_PREFIX = {}
_OPTIONS_LOCK = threading.Lock()


def _options_for(location):
    with _OPTIONS_LOCK:
        best = ""
        for prefix in _OPTIONS_BY_PREFIX:
            if len(prefix) > len(best) and (location == prefix or location.startswith(prefix.rstrip("/") + "/")):
                best = prefix
        return dict(_OPTIONS_BY_PREFIX[best]) if best else {}


def _resolve(location, storage_options=None):
    """location string -> (store, store-internal path)."""
    if not isinstance(location, str) or not location:
        raise CheckpointError(f"checkpoint location must be a non-empty string, got {location!r}")
    if location.startswith(_JM_SCHEME):
        return _JM, posixpath.normpath(location[len(_JM_SCHEME):])
    import fsspec.core
    from fsspec.implementations.local import LocalFileSystem
    opts = _options_for(location) if storage_options is None else storage_options
    try:
        fs, path = fsspec.core.url_to_fs(location, **opts)
    except (ImportError, ValueError) as e:
        # e.g. s3:// without s3fs installed, or an unknown protocol.
        raise CheckpointError(f"cannot open checkpoint location {location!r}: {e} "
                              f"(s3:// needs the statecore[s3] extra)") from e
    if isinstance(fs, LocalFileSystem):
        return _LOCAL, os.path.abspath(path)
    return _FsspecStore(fs), path


def _normjoin(store, dirpath, relpath):
    if store is _LOCAL:
        return os.path.normpath(os.path.join(dirpath, relpath))
    return posixpath.normpath(posixpath.join(dirpath, relpath))


# ---------------------------------------------------------------------------
# the writer

class CheckpointWriter:
    """Writes one checkpoint (or savepoint) folder; nothing is visible as committed before :meth:`commit`.

    Obtained from :meth:`CheckpointStorage.create_writer`.  Not thread-safe: use one
    writer from one thread at a time (different writers may run concurrently).

    States: open -> committed | aborted.  A failed ``write_file`` marks the writer
    failed: ``commit`` then refuses, so a checkpoint with a missing file can never be
    published.  As a context manager, leaving the block without a successful
    ``commit`` (exception or not) calls :meth:`abort`.

    Attributes: ``location`` (str), ``bytes_written`` (data bytes so far, metadata excluded).
    """

    def __init__(self, store, location, dirpath, *, size_limit=None):
        self.location = location
        self.bytes_written = 0
        self._store = store
        self._dir = dirpath
        self._size_limit = size_limit
        self._names = {}        # name -> store path, for abort and duplicate checks
        self._dirs = {dirpath}  # directories to fsync before publishing
        self._state = "open"
        self._failure = None
        self._token = secrets.token_hex(6)
        try:
            if store.exists(_normjoin(store, dirpath, METADATA_NAME)):
                raise CheckpointError(f"{location}: a committed checkpoint already exists there; "
                                      f"checkpoint ids must not be reused")
            store.makedirs(dirpath)
        except CheckpointError:
            raise
        except OSError as e:
            raise CheckpointError(f"{location}: cannot create checkpoint folder: {e}") from e

    def write_file(self, name, data, *, unique=False):
        """Write data file ``name`` (relative to the folder; '/'-separated safe components).

        ``data`` is a buffer or a list of buffers written back to back (the file is
        their concatenation; nothing is joined in memory on local disk and S3).
        The SHA-256 is computed while the file is written.  With ``unique=True`` the
        file is stored as ``<writer token>-<name>`` (the returned name): two writers
        racing for one checkpoint id then never write the same file, so the one whose
        commit loses cannot overwrite the data of the one that won.

        Returns ``(name, length, sha256_hex)`` for the metadata.  Durable on return: on
        local disk written, flushed and fsynced (the directory entry is fsynced at commit,
        before _metadata); on object stores the PUT has completed.  Raises ValueError for
        a bad or duplicate name, CheckpointError on I/O failure (the partial file is
        removed or its upload aborted, and the writer can no longer commit), and
        CheckpointSizeExceededError as soon as a JobManager checkpoint passes its limit.
        """
        self._require_open("write_file")
        _check_name(name)
        if unique:
            name = f"{self._token}-{name}"
        if name in self._names:
            raise ValueError(f"{self.location}: file {name!r} was already written by this checkpoint")
        payload = _as_payload(data)
        length = _payload_bytes(payload)
        self._check_size(self.bytes_written + length, "data")
        path = _normjoin(self._store, self._dir, name)
        try:
            parent = os.path.dirname(path) if self._store is _LOCAL else posixpath.dirname(path)
            if parent != self._dir and parent not in self._dirs:
                self._store.makedirs(parent)
                self._dirs.add(parent)
            self._names[name] = path  # before writing: abort must clean up a partial file too
            digest = _sha256_while(payload, lambda: self._store.write(path, payload))
        except BaseException as e:
            self._failure = f"writing {name!r} failed: {e!r}"
            if isinstance(e, OSError):
                raise CheckpointError(f"{self.location}: cannot write checkpoint file {name!r}: {e}") from e
            raise
        self.bytes_written += length
        return name, length, digest

    def commit(self, metadata):
        """Publish ``metadata`` (bytes from format.encode_metadata) as ``_metadata``, last and atomically.

        Local disk: fsync every directory holding data files, write a temp file, fsync,
        hard-link it to ``_metadata`` (refuses if one exists), fsync the directory.
        Object stores: one conditional PUT (If-None-Match). Returns the location.

        Raises CheckpointError if a committed checkpoint already exists at the location
        (the existing one is left untouched), if an earlier write failed, or on I/O
        failure; CheckpointSizeExceededError for a JobManager checkpoint over its limit.
        Every failure aborts this writer (its files are removed); earlier checkpoints are
        never touched.
        """
        self._require_open("commit")
        if self._failure is not None:
            self.abort()
            raise CheckpointError(f"{self.location}: cannot commit, {self._failure}")
        view = _as_bytes_view(metadata)
        self._check_size(self.bytes_written + view.nbytes, "data and metadata")
        try:
            # Directory entries of the data files must be durable before _metadata
            # can be: otherwise a power loss could keep the metadata and lose a file.
            self._store.sync_dirs(self._dirs)
        except BaseException as e:
            self.abort()
            if isinstance(e, OSError):
                raise CheckpointError(f"{self.location}: cannot sync checkpoint files: {e}") from e
            raise
        try:
            self._store.publish(self._dir, view)
        except _AlreadyCommitted:
            # Clean up only the files stored under this writer's own token: files written
            # under plain names may be the committed checkpoint's.
            self._names = {n: p for n, p in self._names.items() if n.startswith(self._token + "-")}
            self._dirs = set()
            self.abort()
            raise CheckpointError(f"{self.location}: a committed checkpoint already exists there; "
                                  f"it was not overwritten") from None
        except BaseException as e:
            # Outcome unknown (e.g. the link happened but the directory fsync failed, or
            # the PUT's answer was lost): un-publish before discarding the data files, so
            # a checkpoint reported as failed is never left looking committed.
            try:
                self._store.remove(_normjoin(self._store, self._dir, METADATA_NAME))
            except Exception:
                pass
            self.abort()
            if isinstance(e, OSError):
                raise CheckpointError(f"{self.location}: cannot commit checkpoint metadata: {e}") from e
            raise
        self._state = "committed"
        return self.location

    def abort(self):
        """Discard what this writer wrote (best effort, never raises for I/O). Idempotent; no-op after commit."""
        if self._state != "open":
            return
        self._state = "aborted"
        for path in self._names.values():
            try:
                self._store.remove(path)
            except Exception:
                pass
        for d in sorted(self._dirs, key=len, reverse=True):
            self._store.rmdir_quietly(d)  # only succeeds when empty: never removes others' files

    @property
    def committed(self):
        return self._state == "committed"

    def _require_open(self, what):
        if self._state != "open":
            raise CheckpointError(f"{self.location}: {what} on a writer that is already {self._state}")

    def _check_size(self, total, what):
        if self._size_limit is not None and total > self._size_limit:
            self._failure = f"size limit exceeded ({total} bytes)"
            self.abort()
            raise CheckpointSizeExceededError(
                f"{self.location}: checkpoint {what} size {total} bytes exceeds the JobManagerCheckpointStorage "
                f"limit of {self._size_limit} bytes; use FileSystemCheckpointStorage for large state "
                f"(or raise max_state_size)")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.abort()
        return False

    def __repr__(self):
        return f"CheckpointWriter({self.location!r}, {self._state})"


# ---------------------------------------------------------------------------
# storages

def _check_component(value, what):
    if not isinstance(value, str) or not _COMPONENT.match(value):
        raise ValueError(f"{what} must be a non-empty string of letters, digits and _.=+- "
                         f"(no leading dot), got {value!r}")
    return value


def _check_checkpoint_id(checkpoint_id):
    if isinstance(checkpoint_id, bool) or not isinstance(checkpoint_id, int) or checkpoint_id < 0:
        raise ValueError(f"checkpoint_id must be a non-negative int, got {checkpoint_id!r}")
    return checkpoint_id


class CheckpointStorage:
    """Base class: where completed checkpoints are stored.

    Subclasses provide ``_base_location()`` (and may set a size limit); everything
    else is shared.  All methods taking a location work for any location string.
    """

    _size_limit = None

    def __repr__(self):
        return f"{type(self).__name__}()"

    def _base_location(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def _operator_location(self, job_id, operator_id):
        return _join(self._base_location(), _check_component(job_id, "job_id"),
                     _check_component(operator_id, "operator_id"))

    def create_writer(self, job_id, operator_id, checkpoint_id, instance, *, kind="chk", target=None):
        """Start writing a checkpoint; returns a :class:`CheckpointWriter`.

        kind "chk": location ``<base>/<job_id>/<operator_id>/chk-<checkpoint_id>-<instance>``
        (each parallel instance has its own folder, so their files never collide).
        kind "savepoint": location = ``target`` (any location string; a ``jobmanager://``
        name stays in process memory).  Savepoints must be self-contained (no
        ``../shared`` references).  Raises CheckpointError if a committed checkpoint
        already exists at the location, ValueError for malformed ids.
        """
        if kind == "chk":
            if target is not None:
                raise ValueError("target is only for kind='savepoint'")
            folder = f"chk-{_check_checkpoint_id(checkpoint_id)}-{_check_component(instance, 'instance')}"
            location = _join(self._operator_location(job_id, operator_id), folder)
        elif kind == "savepoint":
            if target is None:
                raise ValueError("a savepoint needs a target location")
            if isinstance(target, os.PathLike):
                target = os.fspath(target)
            if not isinstance(target, str) or not target:
                raise ValueError(f"savepoint target must be a non-empty string or path, got {target!r}")
            location = _absolutize(target)
        else:
            raise ValueError(f"kind must be 'chk' or 'savepoint', got {kind!r}")
        store, dirpath = self._resolve(location)
        limit = self._size_limit if store is _JM else None
        return CheckpointWriter(store, location, dirpath, size_limit=limit)

    def shared_dir(self, job_id, operator_id):
        """Location of the operator's shared folder (files referenced by incremental checkpoints)."""
        return _join(self._operator_location(job_id, operator_id), "shared")

    def write_shared_file(self, job_id, operator_id, name, data):
        """Write ``shared/<name>`` atomically and durably; returns ``(relpath, length, sha256_hex)``.

        ``relpath`` is ``"../shared/<name>"``, i.e. relative to any checkpoint folder of
        this operator, ready for the metadata and for :func:`read_file`.  An existing file
        of that name is replaced (choose unique names, e.g. with a content hash); on local
        disk the replacement is atomic (temp + fsync + rename + directory fsync).
        Raises CheckpointError on I/O failure.
        """
        _check_name(name)
        payload = _as_payload(data)
        location = self.shared_dir(job_id, operator_id)
        store, dirpath = self._resolve(location)
        path = _normjoin(store, dirpath, name)
        try:
            store.makedirs(os.path.dirname(path) if store is _LOCAL else posixpath.dirname(path))
            digest = _sha256_while(payload, lambda: store.put_atomic(path, payload))
        except OSError as e:
            raise CheckpointError(f"{location}: cannot write shared file {name!r}: {e}") from e
        return _SHARED_PREFIX + name, _payload_bytes(payload), digest

    def delete_shared(self, job_id, operator_id, relpath):
        """Delete a shared file given as ``"../shared/<name>"`` or ``"<name>"``; missing is fine."""
        name = relpath[len(_SHARED_PREFIX):] if relpath.startswith(_SHARED_PREFIX) else relpath
        _check_name(name)
        store, dirpath = self._resolve(self.shared_dir(job_id, operator_id))
        try:
            store.remove(_normjoin(store, dirpath, name))
        except OSError as e:
            raise CheckpointError(f"cannot delete shared file {relpath!r}: {e}") from e

    def list_checkpoints(self, job_id, operator_id):
        """Locations of the COMMITTED ``chk-*`` folders of this operator (``_metadata`` present),
        sorted by checkpoint id, then instance.  Folders without ``_metadata`` (failed,
        aborted or in-flight checkpoints) are ignored.  Presence is not validity: readers
        still verify."""
        op_location = self._operator_location(job_id, operator_id)
        store, op_dir = self._resolve(op_location)
        found = []
        try:
            for entry in store.listdir(op_dir):
                m = _CHK_FOLDER.match(entry)
                if m and store.exists(_normjoin(store, op_dir, posixpath.join(entry, METADATA_NAME))):
                    found.append((int(m.group(1)), m.group(2), _join(op_location, entry)))
        except OSError as e:
            raise CheckpointError(f"{op_location}: cannot list checkpoints: {e}") from e
        found.sort()
        return [loc for _, _, loc in found]

    def delete_location(self, location, background=False):
        """Remove a checkpoint folder (retention). ``_metadata`` goes first, so an interrupted
        delete leaves an uncommitted folder. Missing is fine. Raises CheckpointError on I/O failure.

        ``background=True`` (retention; Flink's CheckpointsCleaner also discards subsumed checkpoints
        asynchronously): on local disk the checkpoint is uncommitted (``_metadata`` removed, directory
        fsynced) and its folder renamed to a hidden ``.deleting-*`` name before this returns, and a
        thread removes the files (``wait_for_reclaim`` waits for it).  Other stores delete at once."""
        store, path = self._resolve(location)
        _event("delete", path)
        try:
            if background and isinstance(store, _LocalStore):
                store.remove_tree(path, background=True)
            else:
                store.remove_tree(path)
        except OSError as e:
            raise CheckpointError(f"{location}: cannot delete checkpoint: {e}") from e

    def remove_leftover_trash(self, job_id, operator_id):
        """Remove ``.deleting-*`` folders a crash or an exit left in an operator's folder (local disk)."""
        store, path = self._resolve(self._operator_location(job_id, operator_id))
        if not isinstance(store, _LocalStore):
            return
        for name in store.listdir(path):
            if name.startswith(TRASH_PREFIX):
                _reclaim(os.path.join(path, name))

    def read_metadata(self, location):
        return read_metadata(location)

    def read_file(self, location, relpath, *, expected_len=None):
        return read_file(location, relpath, expected_len=expected_len)

    def _resolve(self, location):
        return _resolve(location)


class JobManagerCheckpointStorage(CheckpointStorage):
    """Checkpoints in process memory (Flink's JobManagerCheckpointStorage).

    A checkpoint larger than ``max_state_size`` bytes fails with
    ``CheckpointSizeExceededError`` and leaves earlier checkpoints intact.
    Each instance has its own ``jobmanager://<storage id>/`` namespace in a
    process-global registry, so its locations are readable anywhere in this process
    (and nowhere else: they die with the process).  The size counted is every byte
    the checkpoint writes, data files and ``_metadata``.
    """

    _ids = count(1)
    _live = weakref.WeakValueDictionary()

    def __init__(self, max_state_size=DEFAULT_MAX_STATE_SIZE):
        if isinstance(max_state_size, bool) or not isinstance(max_state_size, int) or max_state_size <= 0:
            raise ValueError(f"max_state_size must be a positive number of bytes, got {max_state_size!r}")
        self.max_state_size = max_state_size
        self.storage_id = f"jm-{os.getpid()}-{next(self._ids)}"
        JobManagerCheckpointStorage._live[self.storage_id] = self

    @property
    def _size_limit(self):
        return self.max_state_size

    def _base_location(self):
        return _JM_SCHEME + self.storage_id

    def __repr__(self):
        return f"JobManagerCheckpointStorage(max_state_size={self.max_state_size})"


class FileSystemCheckpointStorage(CheckpointStorage):
    """Checkpoints under a file-system URI: a plain path, ``file://``, ``memory://``, ``s3://`` ...

    Any fsspec protocol works; ``s3://`` needs the ``statecore[s3]`` extra (s3fs).
    ``storage_options`` are passed to fsspec (e.g. ``{"client_kwargs": {"endpoint_url": ...}}``
    for s3fs) and remembered for this URI prefix, so :func:`read_metadata` on its locations
    works in this process; another process sets them through fsspec's configuration
    (``fsspec.config.conf``) or the usual environment (``AWS_ENDPOINT_URL`` ...).
    A relative plain path is made absolute when the storage is created.
    """

    def __init__(self, uri, *, storage_options=None):
        if isinstance(uri, os.PathLike):
            uri = os.fspath(uri)
        if not isinstance(uri, str) or not uri:
            raise ValueError(f"checkpoint URI must be a non-empty string or path, got {uri!r}")
        self.uri = uri
        self._base = _absolutize(uri)
        self.storage_options = dict(storage_options or {})
        if self.storage_options:
            with _OPTIONS_LOCK:
                _OPTIONS_BY_PREFIX[self._base] = dict(self.storage_options)

    def _base_location(self):
        return self._base

    def _resolve(self, location):
        if self.storage_options and (location == self._base or location.startswith(self._base.rstrip("/") + "/")):
            return _resolve(location, self.storage_options)
        return _resolve(location)

    def __repr__(self):
        return f"FileSystemCheckpointStorage({self.uri!r})"


def _absolutize(uri):
    # Plain relative paths become absolute, so a location stays valid when the cwd changes.
    if "://" in uri or uri.startswith(_JM_SCHEME) or "::" in uri:
        return uri
    return os.path.abspath(uri)


# ---------------------------------------------------------------------------
# reading, from a location string alone

def read_metadata(location):
    """Return the raw bytes of ``<location>/_metadata`` (decode with format.decode_metadata).

    Raises CorruptCheckpointError naming the file if it is missing (the checkpoint was
    never committed), not a file, or larger than any valid metadata (refused without
    reading it); CheckpointError for other I/O errors (storage unreachable).
    """
    store, dirpath = _resolve(location)
    path = _normjoin(store, dirpath, METADATA_NAME)
    where = _join(location, METADATA_NAME)
    try:
        size = store.size(path)
        if size > _MAX_METADATA_FILE:
            raise CorruptCheckpointError(f"{where}: {size} bytes, larger than any valid checkpoint metadata")
        return store.read(path)  # bounded by the size check above
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise CorruptCheckpointError(f"{where}: missing: no committed checkpoint at {location}") from None
    except OSError as e:
        raise CheckpointError(f"{where}: cannot read checkpoint metadata: {e}") from e


_SPOOL_CHUNK = 8 << 20


def read_mapped(location, relpath, *, expected_len, spool_dir=None):
    """Like :func:`read_file`, but the bytes are not held in process memory.

    Local files are memory-mapped read-only; files of other stores are streamed
    (in 8 MiB pieces, at most ``expected_len + 1`` bytes) into an unlinked temp
    file in ``spool_dir`` and mapped, so a restore of state larger than memory
    reads through the page cache.  JobManager checkpoints are in memory anyway.
    Returns a buffer (an ``mmap`` or ``bytes``) whose ``len`` is the file's
    size (capped as read_file caps it); verify it with format.verify_file before
    use.  Errors as :func:`read_file`.
    """
    limit = int(expected_len) + 1

    def read(store, path):
        if store is _LOCAL:
            return _map_local(path)
        if isinstance(store, _FsspecStore) and not store.memory:
            return store.spool(path, limit, spool_dir)
        return store.read(path, limit)
    return _read_checkpoint_file(location, relpath, read)


def _map_local(path):
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise IsADirectoryError(path)  # a folder, FIFO or device where a data file belongs
        if st.st_size == 0:
            return b""  # mmap cannot map an empty file
        return mmap.mmap(fd, st.st_size, access=mmap.ACCESS_READ)
    finally:
        os.close(fd)


def _spool_to_map(src, limit, spool_dir):
    """Copy at most limit bytes of the file object src to an unlinked temp file; map it."""
    with tempfile.TemporaryFile(dir=spool_dir, prefix=".statecore-restore-") as tmp:
        left = limit
        while left > 0:
            piece = src.read(min(_SPOOL_CHUNK, left))
            if not piece:
                break
            tmp.write(piece)
            left -= len(piece)
        tmp.flush()
        size = tmp.tell()
        if size == 0:
            return b""
        return mmap.mmap(tmp.fileno(), size, access=mmap.ACCESS_READ)  # the map outlives the file object


def read_file(location, relpath, *, expected_len=None):
    """Return the bytes of a file of the checkpoint at ``location``.

    ``relpath`` is relative to the checkpoint folder, as recorded in the metadata:
    ``"<name>"`` or ``"../shared/<name>"`` (the operator's shared folder); anything
    else (absolute, other ``..``, odd characters) raises CorruptCheckpointError.
    With ``expected_len``, at most ``expected_len + 1`` bytes are read, so a swapped-in
    huge file is reported as too long by format.verify_file without being loaded.
    Missing -> CorruptCheckpointError naming the file; other I/O errors -> CheckpointError.
    The bytes are NOT verified here: call format.verify_file before using them.
    """
    def read(store, path):
        if expected_len is None:
            if store is not _LOCAL:
                store.size(path)  # raises IsADirectoryError for folders on every store
            return store.read(path)
        return store.read(path, int(expected_len) + 1)
    return _read_checkpoint_file(location, relpath, read)


def _read_checkpoint_file(location, relpath, read):
    """``read(store, path)`` of a checkpoint file, with relpath checked and errors mapped as read_file says."""
    where = _join(location, relpath) if isinstance(relpath, str) else location
    _check_relpath(relpath, where)
    store, dirpath = _resolve(location)
    try:
        return read(store, _normjoin(store, dirpath, relpath))
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise CorruptCheckpointError(f"{where}: missing checkpoint file") from None
    except OSError as e:
        raise CheckpointError(f"{where}: cannot read checkpoint file: {e}") from e


def storage_for_location(location):
    """The storage that can read (and delete) ``location``.

    ``jobmanager://`` -> the JobManagerCheckpointStorage that wrote it (a read-only
    stand-in with the same storage id if that object is gone; the registry is
    process-global).  Anything else -> a FileSystemCheckpointStorage rooted at the
    location itself (its reading methods take full locations, so the root only matters
    for ``create_writer``).  Raises CheckpointError for an unusable location string.
    """
    if not isinstance(location, str) or not location:
        raise CheckpointError(f"checkpoint location must be a non-empty string, got {location!r}")
    if location.startswith(_JM_SCHEME):
        sid = location[len(_JM_SCHEME):].split("/", 1)[0]
        storage = JobManagerCheckpointStorage._live.get(sid)
        if storage is None:
            storage = JobManagerCheckpointStorage.__new__(JobManagerCheckpointStorage)
            storage.max_state_size = DEFAULT_MAX_STATE_SIZE
            storage.storage_id = sid
        return storage
    _resolve(location)  # fail early for e.g. s3:// without s3fs
    return FileSystemCheckpointStorage(location)
