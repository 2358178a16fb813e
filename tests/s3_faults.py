"""Fault injection between s3fs and moto (RELIABILITY.md T7), used by tests/test_reliability_s3_faults.py.

* :class:`FaultProxy`: an asyncio TCP proxy on 127.0.0.1 in front of moto's server.  It parses
  each HTTP/1.1 request (Content-Length or chunked body, ``Expect: 100-continue``), numbers it,
  and forwards it upstream with ``Connection: close`` (one request per connection keeps the
  framing trivial).  Request number ``k`` after :meth:`FaultProxy.arm` gets a fault instead:

  ``reset``  the request reaches moto (it takes effect), then the client gets half of the
             response followed by a TCP RST: the answer is lost, the outcome unknown;
  ``drop``   a TCP RST right after the request was read: it never reaches moto;
  ``500``    ``500 InternalError`` without forwarding;
  ``503``    ``503 SlowDown`` without forwarding;
  ``stall``  no answer at all until the client gives up (its read timeout).

* :class:`FlakyFS`: an fsspec ``AbstractFileSystem`` wrapping another file system (s3fs) that
  raises ``OSError`` or ``TimeoutError`` on the k-th call of open/write/close/pipe/mv/rm/...
  either before delegating (the call did nothing) or after it (the call took effect but the
  caller sees a failure).
"""
import asyncio
import socket
import struct
import threading

from fsspec.spec import AbstractFileSystem

MODES = ("reset", "drop", "500", "503", "stall")

_ERRORS = {
    "500": (b"500 Internal Server Error", b"InternalError", b"We encountered an internal error. Please try again."),
    "503": (b"503 Slow Down", b"SlowDown", b"Please reduce your request rate."),
}


class FaultProxy:
    def __init__(self, upstream_host, upstream_port, stall_max_s=20.0):
        self.upstream = (upstream_host, upstream_port)
        self.stall_max_s = stall_max_s
        self.lock = threading.Lock()
        self.count = 0
        self.fault_at = None
        self.mode = None
        self.log = []          # (index, method, target, fault or None) since arm()
        self.armed = False
        self.last = []         # the log from arm() to disarm(): the requests of the faulted operation
        self.injected = 0      # faults injected over the proxy's lifetime
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="s3-fault-proxy", daemon=True)
        self.server = None
        self.port = None

    # -- control (any thread) -------------------------------------------------------------
    def start(self):
        self.thread.start()
        fut = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", 0, limit=1 << 20), self.loop)
        self.server = fut.result(10)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def stop(self):
        async def close():
            self.server.close()
            await self.server.wait_closed()
        try:
            asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
        except Exception:  # noqa: BLE001 - best effort at teardown
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        if not self.thread.is_alive():
            self.loop.close()  # else its self-pipe sockets leak into a later test's ResourceWarning

    def arm(self, fault_at, mode):
        """Count requests from 0 again; fault request ``fault_at`` (None: count only)."""
        assert mode is None or mode in MODES, mode
        with self.lock:
            self.count, self.fault_at, self.mode, self.log, self.armed = 0, fault_at, mode, [], True

    def disarm(self):
        with self.lock:
            self.fault_at = None
            if self.armed:
                self.last, self.armed = list(self.log), False

    def requests(self):
        """The requests between the last arm() and disarm()."""
        with self.lock:
            return list(self.last)

    # -- the proxy --------------------------------------------------------------------------
    async def _handle(self, reader, writer):
        try:
            await self._one(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass
        finally:
            if not writer.is_closing():
                writer.close()

    async def _one(self, reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head[:-4].split(b"\r\n")
        method, target, _version = lines[0].split(b" ", 2)
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers.append((name.strip(), value.strip()))
        lower = {n.lower(): v for n, v in headers}
        if lower.get(b"expect", b"").lower() == b"100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
        if b"content-length" in lower:
            body = await reader.readexactly(int(lower[b"content-length"]))
        elif b"chunked" in lower.get(b"transfer-encoding", b"").lower():
            body = await self._read_chunked(reader)
        else:
            body = b""
        with self.lock:
            index = self.count
            self.count += 1
            fault = self.mode if index == self.fault_at else None
            self.log.append((index, method.decode(), target.decode()[:200], fault))
            if fault:
                self.injected += 1
        if fault in ("500", "503"):
            status, code, message = _ERRORS[fault]
            xml = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>' + code + b"</Code><Message>" + message
                   + b"</Message><RequestId>fault</RequestId></Error>")
            out = (b"HTTP/1.1 " + status + b"\r\nContent-Type: application/xml\r\nContent-Length: "
                   + str(len(xml)).encode() + b"\r\nConnection: close\r\n\r\n")
            writer.write(out if method == b"HEAD" else out + xml)
            await writer.drain()
            return
        if fault == "drop":
            self._reset(writer)
            return
        if fault == "stall":
            try:  # until the client gives up and closes (its read timeout), bounded
                await asyncio.wait_for(reader.read(1), self.stall_max_s)
            except asyncio.TimeoutError:
                pass
            self._reset(writer)
            return
        keep = [(n, v) for n, v in headers if n.lower() not in (b"connection", b"expect", b"keep-alive")]
        upstream_head = b"\r\n".join([lines[0]] + [n + b": " + v for n, v in keep] + [b"Connection: close"])
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        try:
            up_writer.write(upstream_head + b"\r\n\r\n" + body)
            await up_writer.drain()
            response = await up_reader.read()  # Connection: close -> the response ends at EOF
        finally:
            up_writer.close()
        if fault == "reset":
            writer.write(response[:max(1, len(response) // 2)])
            await writer.drain()
            await asyncio.sleep(0.01)
            self._reset(writer)
            return
        writer.write(response)
        await writer.drain()

    @staticmethod
    async def _read_chunked(reader):
        raw = bytearray()
        while True:
            line = await reader.readuntil(b"\r\n")
            raw += line
            size = int(line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                while True:  # trailers, up to the empty line
                    trailer = await reader.readuntil(b"\r\n")
                    raw += trailer
                    if trailer == b"\r\n":
                        return bytes(raw)
            raw += await reader.readexactly(size + 2)

    @staticmethod
    def _reset(writer):
        sock = writer.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        writer.transport.abort()


# ---------------------------------------------------------------------------------------------
# FlakyFS: fault injection at the fsspec API

class FlakyFS(AbstractFileSystem):
    """Wraps a target fsspec file system (s3fs); the k-th counted call raises.

    ``when="before"`` raises instead of delegating; ``when="after"`` delegates first (the
    operation took effect) and raises afterwards.  ``error`` is ``OSError`` or ``TimeoutError``.
    ``protocol`` includes "s3" so statecore treats it as an object store.  fsspec caches
    instances per thread, so the counters live in a shared :class:`FlakyState` found by
    ``flaky_id`` (pass ``storage_options={"flaky_id": ...}`` for ``flaky://`` locations).
    """

    protocol = ("flaky", "s3")
    states = {}  # flaky_id -> FlakyState

    def __init__(self, flaky_id, **kwargs):
        super().__init__(flaky_id=flaky_id, **kwargs)
        self.st = self.states[flaky_id]
        self.target = self.st.target

    @classmethod
    def _strip_protocol(cls, path):
        for p in ("flaky://", "s3://"):
            if path.startswith(p):
                path = path[len(p):]
        return path.rstrip("/")

    def call(self, op, path, fn):
        return self.st.call(op, path, fn)

    # -- delegated, counted -------------------------------------------------------------------
    def open(self, path, mode="rb", **kwargs):
        path = self._strip_protocol(path)
        opened = []

        def do_open():
            opened.append(self.target.open(path, mode, **kwargs))
            return opened[0]
        try:
            inner = self.call("open", path, do_open)
        except BaseException:
            # An "after" fault on open: the caller never gets the file, so it cannot discard it;
            # without this its __del__ would commit an empty object at some later GC.
            for f in opened:
                if "r" not in mode:
                    f.discard()
                f.closed = True
            raise
        return _FlakyFile(self.st, inner, path) if "r" not in mode else inner

    def pipe_file(self, path, value, **kwargs):
        return self.call("pipe_file", path, lambda: self.target.pipe_file(path, value, **kwargs))

    def mv(self, path1, path2, **kwargs):
        return self.call("mv", path1, lambda: self.target.mv(path1, path2, **kwargs))

    def rm(self, path, recursive=False, **kwargs):
        return self.call("rm", path, lambda: self.target.rm(path, recursive=recursive, **kwargs))

    def rm_file(self, path, **kwargs):
        return self.call("rm_file", path, lambda: self.target.rm_file(path, **kwargs))

    def cat_file(self, path, start=None, end=None, **kwargs):
        return self.call("cat_file", path, lambda: self.target.cat_file(path, start=start, end=end, **kwargs))

    def info(self, path, **kwargs):
        return self.call("info", path, lambda: self.target.info(path, **kwargs))

    def ls(self, path, detail=True, **kwargs):
        return self.call("ls", path, lambda: self.target.ls(path, detail=detail, **kwargs))

    def exists(self, path, **kwargs):
        return self.call("exists", path, lambda: self.target.exists(path, **kwargs))

    # -- not counted ----------------------------------------------------------------------------
    def makedirs(self, path, exist_ok=False):
        pass

    def rmdir(self, path):
        pass

    def invalidate_cache(self, path=None):
        self.target.invalidate_cache(path)


class FlakyState:
    """Counters and the armed fault of every FlakyFS instance with one flaky_id."""

    def __init__(self, target):
        self.target = target
        self.lock = threading.Lock()
        self.count = 0
        self.fault_at = None
        self.when = "before"
        self.error = OSError
        self.log = []
        self.last = []
        self.armed = False
        self.injected = 0

    def arm(self, fault_at, when="before", error=OSError):
        with self.lock:
            self.count, self.fault_at, self.when, self.error, self.log = 0, fault_at, when, error, []
            self.armed = True

    def disarm(self):
        with self.lock:
            self.fault_at = None
            if self.armed:
                self.last, self.armed = list(self.log), False

    def requests(self):
        with self.lock:
            return list(self.last)

    def call(self, op, path, fn):
        with self.lock:
            index = self.count
            self.count += 1
            hit = index == self.fault_at
            self.log.append((index, op, path, hit))
            if hit:
                self.injected += 1
            when, error = self.when, self.error
        if hit and when == "before":
            raise error(f"injected {error.__name__} before {op} {path}")
        out = fn()
        if hit:
            raise error(f"injected {error.__name__} after {op} {path}")
        return out


class _FlakyFile:
    """A file being written through FlakyFS: write/close counted; discard and `closed` reach the inner file."""

    def __init__(self, state, inner, path):
        self._fs, self._inner, self._path = state, inner, path

    def write(self, data):
        return self._fs.call("write", self._path, lambda: self._inner.write(data))

    def close(self):
        return self._fs.call("close", self._path, self._inner.close)

    def discard(self):
        self._inner.discard()

    @property
    def closed(self):
        return self._inner.closed

    @closed.setter
    def closed(self, value):
        self._inner.closed = value
