"""Checkpoint storage layer and _metadata container (statecore.checkpoint.storage / .format).

One test body runs against every kind of location: plain path, file://, memory://,
S3 (moto's ThreadedMotoServer on loopback, through s3fs) and jobmanager://.
"""
import gc
import os
import struct
import uuid

import pytest

from statecore.checkpoint import format as fmt
from statecore.checkpoint import storage as st
from statecore.checkpoint.storage import (CheckpointWriter, FileSystemCheckpointStorage, JobManagerCheckpointStorage,
                                          read_file, read_metadata, storage_for_location)
from statecore.errors import CheckpointError, CheckpointSizeExceededError, CorruptCheckpointError

KINDS = ["local", "file", "memory", "s3", "jobmanager"]


# --------------------------------------------------------------------------- fixtures

# s3_server / s3_options: tests/conftest.py (shared with test_checkpoint_s3.py)


def make_storage(kind, tmp_path, request):
    if kind == "local":
        return FileSystemCheckpointStorage(str(tmp_path / "ckpt"))
    if kind == "file":
        return FileSystemCheckpointStorage("file://" + str(tmp_path / "ckpt"))
    if kind == "memory":
        root = f"memory://sc-{uuid.uuid4().hex}"

        def cleanup():
            import fsspec
            fs = fsspec.filesystem("memory")
            if fs.exists(root):
                fs.rm(root, recursive=True)
        request.addfinalizer(cleanup)
        return FileSystemCheckpointStorage(root)
    if kind == "s3":
        bucket, opts = request.getfixturevalue("s3_options")
        return FileSystemCheckpointStorage(f"s3://{bucket}/ckpt", storage_options=opts)
    if kind == "jobmanager":
        return JobManagerCheckpointStorage(max_state_size=10 * 1024 * 1024)
    raise AssertionError(kind)


@pytest.fixture(params=KINDS)
def storage(request, tmp_path):
    return make_storage(request.param, tmp_path, request)


def body(checkpoint_id, files):
    return {"checkpoint_id": checkpoint_id, "key_group_range": [0, 127],
            "files": [{"path": n, "length": ln, "sha256": h} for n, ln, h in files]}


def write_checkpoint(storage, checkpoint_id, payloads, *, instance="0", job="job", op="op"):
    w = storage.create_writer(job, op, checkpoint_id, instance)
    files = [w.write_file(name, data) for name, data in payloads.items()]
    return w.commit(fmt.encode_metadata(body(checkpoint_id, files))), files


# --------------------------------------------------------------------------- round trip

def test_round_trip(storage):
    payloads = {"kg-0-63.bin": b"a" * 1000, "kg-64-127.bin": bytearray(b"\x00\xff" * 300),
                "sub/extra.bin": memoryview(b"xyz"), "empty.bin": b""}
    shared = storage.write_shared_file("job", "op", "sst-1", b"shared bytes")
    assert shared == ("../shared/sst-1", 12, fmt.sha256_hex(b"shared bytes"))
    location, files = write_checkpoint(storage, 7, payloads)
    assert location.endswith("/job/op/chk-7-0")
    assert storage.shared_dir("job", "op").endswith("/job/op/shared")
    assert storage.list_checkpoints("job", "op") == [location]
    meta = fmt.decode_metadata(read_metadata(location), where=location)
    assert meta == body(7, files)
    for entry in meta["files"]:
        data = read_file(location, entry["path"], expected_len=entry["length"])
        fmt.verify_file(data, entry["length"], entry["sha256"], entry["path"])
        assert data == bytes(payloads[entry["path"]])
    assert read_file(location, "../shared/sst-1") == b"shared bytes"
    # A location string alone is enough to read it back.
    other = storage_for_location(location)
    assert fmt.decode_metadata(other.read_metadata(location), location) == meta
    storage.delete_location(location)
    storage.delete_location(location)  # missing is fine
    assert storage.list_checkpoints("job", "op") == []
    with pytest.raises(CorruptCheckpointError, match="_metadata"):
        read_metadata(location)
    storage.delete_shared("job", "op", "../shared/sst-1")
    with pytest.raises(CorruptCheckpointError, match="sst-1"):
        read_file(location, "../shared/sst-1")


def test_list_is_sorted_by_id_then_instance(storage):
    locs = [write_checkpoint(storage, cid, {"d": b"x"}, instance=inst)[0]
            for cid, inst in [(10, "0"), (9, "1"), (9, "0"), (100, "0")]]
    assert storage.list_checkpoints("job", "op") == [locs[2], locs[1], locs[0], locs[3]]
    assert storage.list_checkpoints("job", "other-op") == []


def test_savepoint_target(storage, tmp_path):
    target = "jobmanager://savepoints/sp-1" if isinstance(storage, JobManagerCheckpointStorage) else \
        st._join(storage._base_location(), "savepoints", "sp-1")
    w = storage.create_writer("job", "op", 3, "0", kind="savepoint", target=target)
    assert w.location == target
    f = w.write_file("state.bin", b"canonical")
    assert w.commit(fmt.encode_metadata(body(3, [f]))) == target
    assert fmt.decode_metadata(read_metadata(target), target)["checkpoint_id"] == 3
    with pytest.raises(CheckpointError, match="already exists"):
        storage.create_writer("job", "op", 3, "0", kind="savepoint", target=target)
    storage.delete_location(target)


def test_savepoint_to_plain_relative_path_is_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    w = JobManagerCheckpointStorage().create_writer("j", "o", 1, "0", kind="savepoint", target="sp")
    assert w.location == str(tmp_path / "sp")
    w.commit(fmt.encode_metadata({}))
    assert (tmp_path / "sp" / "_metadata").is_file()


# --------------------------------------------------------------------------- commit/abort semantics

def test_commit_refuses_to_overwrite(storage):
    location, _ = write_checkpoint(storage, 1, {"d": b"first"})
    before = read_metadata(location)
    with pytest.raises(CheckpointError, match="already exists"):
        storage.create_writer("job", "op", 1, "0")
    assert read_metadata(location) == before


def test_racing_writers_second_commit_refused(storage):
    # Both writers start before either commits; data files go to the same names.
    w1 = storage.create_writer("job", "op", 1, "0")
    w2 = storage.create_writer("job", "op", 1, "0")
    f1 = w1.write_file("d", b"one")
    meta1 = fmt.encode_metadata(body(1, [f1]))
    location = w1.commit(meta1)
    with pytest.raises(CheckpointError, match="already exists"):
        w2.commit(fmt.encode_metadata(body(1, [])))
    assert read_metadata(location) == meta1
    assert read_file(location, "d") == b"one"  # the refused writer did not clean up the winner's files
    assert storage.list_checkpoints("job", "op") == [location]


def test_abort_publishes_nothing(storage):
    w = storage.create_writer("job", "op", 2, "0")
    w.write_file("a", b"x" * 100)
    w.write_file("dir/b", b"y")
    w.abort()
    w.abort()  # idempotent
    assert storage.list_checkpoints("job", "op") == []
    with pytest.raises(CorruptCheckpointError, match="missing"):
        read_metadata(w.location)
    with pytest.raises(CorruptCheckpointError, match="missing"):
        read_file(w.location, "a")
    with pytest.raises(CheckpointError, match="aborted"):
        w.write_file("c", b"z")
    with pytest.raises(CheckpointError, match="aborted"):
        w.commit(fmt.encode_metadata({}))
    # The id can be used again after an abort.
    write_checkpoint(storage, 2, {"a": b"again"})


def test_exception_inside_with_publishes_nothing(storage):
    with pytest.raises(RuntimeError, match="boom"):
        with storage.create_writer("job", "op", 4, "0") as w:
            w.write_file("a", b"data")
            raise RuntimeError("boom")
    assert storage.list_checkpoints("job", "op") == []
    with pytest.raises(CorruptCheckpointError):
        read_metadata(w.location)
    # Leaving the block without commit also discards; after commit the block is a no-op.
    with storage.create_writer("job", "op", 5, "0") as w:
        w.write_file("a", b"data")
    assert storage.list_checkpoints("job", "op") == []
    with storage.create_writer("job", "op", 6, "0") as w:
        w.commit(fmt.encode_metadata(body(6, [w.write_file("a", b"data")])))
    assert storage.list_checkpoints("job", "op") == [w.location]


def test_list_ignores_folders_without_metadata(storage):
    good, _ = write_checkpoint(storage, 1, {"d": b"x"})
    store, op_dir = st._resolve(st._join(storage._base_location(), "job", "op"))
    # A crashed writer: data files, a temp metadata, no _metadata.
    for rel in ["chk-2-0/d", "chk-3-0/_metadata.tmp-1-abcd", "not-a-chk/_metadata", "chk-x-0/_metadata"]:
        path = st._normjoin(store, op_dir, rel)
        store.makedirs(path.rsplit("/", 1)[0])
        store.write(path, [memoryview(b"junk")])
    assert storage.list_checkpoints("job", "op") == [good]


def test_write_file_argument_checks(storage):
    w = storage.create_writer("job", "op", 1, "0")
    w.write_file("a", b"1")
    for bad in ["", "/abs", "../x", "a/../b", ".hidden", "a//b", "_metadata", "_metadata.tmp-x", "sp ace", None]:
        with pytest.raises(ValueError):
            w.write_file(bad, b"1")
    with pytest.raises(ValueError, match="already written"):
        w.write_file("a", b"2")
    with pytest.raises(TypeError):
        w.write_file("s", "text")
    w.abort()
    for bad_id in [-1, True, 1.0, "1"]:
        with pytest.raises(ValueError):
            storage.create_writer("job", "op", bad_id, "0")
    for bad in ["", "a/b", "..", "."]:
        with pytest.raises(ValueError):
            storage.create_writer(bad, "op", 1, "0")
        with pytest.raises(ValueError):
            storage.create_writer("job", bad, 1, "0")
        with pytest.raises(ValueError):
            storage.create_writer("job", "op", 1, bad)
    with pytest.raises(ValueError):
        storage.create_writer("job", "op", 1, "0", kind="bogus")


def test_read_file_refuses_paths_escaping_the_checkpoint(storage):
    location, _ = write_checkpoint(storage, 1, {"d": b"x"})
    for bad in ["../../x", "/etc/passwd", "a/../../b", "../shared/../../x", "..", "", "../other/x", 5, None]:
        with pytest.raises(CorruptCheckpointError, match="invalid file path"):
            read_file(location, bad)


def test_read_file_bounded_by_expected_len(storage):
    location, _ = write_checkpoint(storage, 1, {"d": b"0123456789"})
    data = read_file(location, "d", expected_len=3)
    assert data == b"0123"  # one byte past the expected length: enough to say "too long"
    with pytest.raises(CorruptCheckpointError, match="too long"):
        fmt.verify_file(data, 3, fmt.sha256_hex(b"012"), "d")


# --------------------------------------------------------------------------- fsspec pitfalls

def test_s3_failed_upload_is_discarded_not_committed(tmp_path, request, monkeypatch):
    import s3fs
    storage = make_storage("s3", tmp_path, request)
    w = storage.create_writer("job", "op", 1, "0")
    calls = []
    real_commit = s3fs.core.S3File.commit

    def failing_commit(self):
        calls.append(self.path)
        raise OSError("injected: connection reset during PUT")
    monkeypatch.setattr(s3fs.core.S3File, "commit", failing_commit)
    with pytest.raises(CheckpointError, match="injected"):
        w.write_file("a", b"partial")
    monkeypatch.setattr(s3fs.core.S3File, "commit", real_commit)
    gc.collect()  # fsspec's __del__ would close() (= commit) a file that was not discarded
    store, path = st._resolve(w.location, storage.storage_options)
    assert calls and not store.exists(st._normjoin(store, path, "a"))
    with pytest.raises(CheckpointError, match="failed"):
        w.commit(fmt.encode_metadata({}))
    assert storage.list_checkpoints("job", "op") == []


@pytest.mark.parametrize("fail_at", ["part", "final"])
def test_s3_large_file_failed_multipart_is_aborted(tmp_path, request, monkeypatch, fail_at):
    # "part": the failure happens inside write(), leaving an open fsspec file that
    # fsspec's __del__ would commit unless it is discarded; "final": inside close().
    import s3fs
    storage = make_storage("s3", tmp_path, request)
    bucket = storage.uri.split("/")[2]
    w = storage.create_writer("job", "op", 1, "0")
    real_upload = s3fs.core.S3File._upload_chunk
    parts = []

    def fail_on_final(self, final=False):
        parts.append(self.mpu["UploadId"])
        if final == (fail_at == "final"):
            raise OSError("injected: upload failed")
        return real_upload(self, final)
    monkeypatch.setattr(s3fs.core.S3File, "_upload_chunk", fail_on_final)
    # Over a 5 MiB block size: a multipart upload is started before the failure.
    monkeypatch.setattr(w._store.fs, "default_block_size", 5 * 2**20)
    with pytest.raises(CheckpointError, match="injected"):
        w.write_file("big", b"\x01" * (6 * 2**20))
    monkeypatch.undo()
    gc.collect()
    store, _ = st._resolve(w.location, storage.storage_options)
    uploads = store.fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", [])
    assert parts and uploads == []  # a multipart upload was started, and it was aborted
    assert not store.exists(st._normjoin(store, st._resolve(w.location, storage.storage_options)[1], "big"))
    w.abort()
    assert storage.list_checkpoints("job", "op") == []


def test_memory_write_is_all_or_nothing(tmp_path, request):
    storage = make_storage("memory", tmp_path, request)
    location, _ = write_checkpoint(storage, 1, {"d": b"x" * 10})
    import fsspec
    store = fsspec.filesystem("memory").store
    meta_keys = [k for k in store if k.endswith("/chk-1-0/_metadata")]
    assert len(meta_keys) == 1 and bytes(store[meta_keys[0]].getbuffer()) == read_metadata(location)


# --------------------------------------------------------------------------- local durability

def test_local_commit_order_and_fsync_switch(tmp_path, monkeypatch):
    storage = FileSystemCheckpointStorage(str(tmp_path))
    events = []
    previous = st.set_io_hook(lambda ev, path: events.append((ev, os.path.basename(path))))
    try:
        monkeypatch.delenv("STATECORE_DEBUG_SKIP_FSYNC", raising=False)
        write_checkpoint(storage, 1, {"a": b"1", "b": b"2"})
        names = list(events)
        assert ("fsync", "a") in names and ("fsync", "b") in names
        i_pub = names.index(("publish", "_metadata"))
        # data fsynced, folder fsynced, metadata temp fsynced, all before the publish; folder fsynced after
        assert names.index(("fsync", "b")) < i_pub
        assert ("dirsync", "chk-1-0") in names[:i_pub]
        assert any(ev == "fsync" and n.startswith("_metadata.tmp-") for ev, n in names[:i_pub])
        assert names[i_pub + 1:] == [("dirsync", "chk-1-0")]
        assert not [p for p in os.listdir(tmp_path / "job" / "op" / "chk-1-0") if ".tmp-" in p]

        events.clear()
        monkeypatch.setenv("STATECORE_DEBUG_SKIP_FSYNC", "1")
        write_checkpoint(storage, 2, {"a": b"1"})
        assert [ev for ev, _ in events if ev in ("fsync", "dirsync")] == []
        assert ("publish", "_metadata") in events
    finally:
        st.set_io_hook(previous)


def test_local_io_error_fails_checkpoint(tmp_path):
    storage = FileSystemCheckpointStorage(str(tmp_path))
    w = storage.create_writer("job", "op", 1, "0")
    w.write_file("a", b"1")

    def hook(ev, path):
        if ev == "write" and path.endswith("/b"):
            raise OSError(28, "No space left on device")
    previous = st.set_io_hook(hook)
    try:
        with pytest.raises(CheckpointError, match="No space left"):
            w.write_file("b", b"2")
    finally:
        st.set_io_hook(previous)
    with pytest.raises(CheckpointError, match="cannot commit"):
        w.commit(fmt.encode_metadata({}))
    assert not (tmp_path / "job" / "op" / "chk-1-0").exists()
    assert storage.list_checkpoints("job", "op") == []


def test_failure_after_publish_unpublishes(tmp_path):
    storage = FileSystemCheckpointStorage(str(tmp_path))
    w = storage.create_writer("job", "op", 1, "0")
    f = w.write_file("a", b"1")

    def hook(ev, path):
        if ev == "publish":
            raise OSError(5, "Input/output error")
    previous = st.set_io_hook(hook)
    try:
        with pytest.raises(CheckpointError, match="Input/output"):
            w.commit(fmt.encode_metadata(body(1, [f])))
    finally:
        st.set_io_hook(previous)
    assert storage.list_checkpoints("job", "op") == []
    assert not (tmp_path / "job" / "op" / "chk-1-0").exists()


def test_oversized_metadata_file_refused_without_reading(tmp_path):
    storage = FileSystemCheckpointStorage(str(tmp_path))
    location, _ = write_checkpoint(storage, 1, {"d": b"x"})
    meta = os.path.join(location, "_metadata")
    os.truncate(meta, fmt.MAX_BODY_LENGTH + 1000)  # sparse: cheap
    with pytest.raises(CorruptCheckpointError, match="larger than any valid"):
        read_metadata(location)


def test_metadata_that_is_a_directory(tmp_path):
    (tmp_path / "cp" / "_metadata").mkdir(parents=True)
    with pytest.raises(CorruptCheckpointError, match="missing"):
        read_metadata(str(tmp_path / "cp"))


# --------------------------------------------------------------------------- JobManager storage

def test_jobmanager_size_limit():
    jm = JobManagerCheckpointStorage(max_state_size=1000)
    ok, _ = write_checkpoint(jm, 1, {"d": b"x" * 500})
    ok_meta = read_metadata(ok)

    # Over the limit in the data files: refused as soon as it is known.
    w = jm.create_writer("job", "op", 2, "0")
    w.write_file("a", b"y" * 600)
    with pytest.raises(CheckpointSizeExceededError) as info:
        w.write_file("b", b"y" * 600)
    msg = str(info.value)
    assert "1200" in msg and "1000" in msg and "FileSystemCheckpointStorage" in msg
    with pytest.raises(CheckpointError):
        w.commit(fmt.encode_metadata({}))

    # Over the limit only with the metadata: refused at commit.
    w = jm.create_writer("job", "op", 3, "0")
    f = w.write_file("a", b"z" * 990)
    with pytest.raises(CheckpointSizeExceededError, match="1000"):
        w.commit(fmt.encode_metadata(body(3, [f])))

    assert jm.list_checkpoints("job", "op") == [ok]
    assert read_metadata(ok) == ok_meta
    assert not [k for k in st._JM.files if k.startswith(jm.storage_id + "/job/op/chk-2")
                or k.startswith(jm.storage_id + "/job/op/chk-3")]
    with pytest.raises(CheckpointSizeExceededError):
        JobManagerCheckpointStorage(max_state_size=10).create_writer("j", "o", 1, "0").write_file("a", b"x" * 11)


def test_jobmanager_storages_are_separate_and_readable_by_location():
    a, b = JobManagerCheckpointStorage(), JobManagerCheckpointStorage()
    loc_a, _ = write_checkpoint(a, 1, {"d": b"a"})
    loc_b, _ = write_checkpoint(b, 1, {"d": b"b"})
    assert loc_a != loc_b and loc_a.startswith("jobmanager://")
    assert read_file(loc_a, "d") == b"a" and read_file(loc_b, "d") == b"b"
    assert storage_for_location(loc_a) is a
    del a
    gc.collect()
    assert storage_for_location(loc_a).read_file(loc_a, "d") == b"a"
    assert storage_for_location(loc_a).list_checkpoints("job", "op") == [loc_a]
    b.delete_location(loc_b)
    with pytest.raises(CorruptCheckpointError):
        read_metadata(loc_b)


def test_bad_locations():
    for bad in ["", None, 5]:
        with pytest.raises(CheckpointError):
            read_metadata(bad)
    with pytest.raises(CheckpointError):
        read_metadata("nosuchprotocol-xyz://a/b")


# --------------------------------------------------------------------------- the _metadata container

SMALL = {"checkpoint_id": 1, "key_group_range": [0, 3], "files": [{"path": "d", "length": 1, "sha256": "00"}]}


def test_encode_is_canonical_and_decodes():
    blob = fmt.encode_metadata(SMALL)
    assert blob == fmt.encode_metadata(dict(reversed(list(SMALL.items()))))
    assert blob[:8] == b"SCKPMETA" and struct.unpack(">H", blob[8:10])[0] == fmt.FORMAT_VERSION
    n = struct.unpack(">I", blob[10:14])[0]
    assert len(blob) == 14 + n + 32
    assert fmt.decode_metadata(blob, "x") == SMALL
    assert fmt.decode_metadata(fmt.encode_metadata({"s": "ünïcode ☃"}), "x") == {"s": "ünïcode ☃"}
    assert fmt.FORMAT_VERSION in fmt.READABLE_VERSIONS
    with pytest.raises(ValueError):
        fmt.encode_metadata({"x": float("nan")})
    with pytest.raises(TypeError):
        fmt.encode_metadata([1])


def test_every_single_bit_flip_is_detected():
    blob = fmt.encode_metadata(SMALL)
    count = 0
    for i in range(len(blob) * 8):
        mutant = bytearray(blob)
        mutant[i // 8] ^= 1 << (i % 8)
        with pytest.raises(CorruptCheckpointError, match="chk-1-0/_metadata"):
            fmt.decode_metadata(bytes(mutant), "s3://b/chk-1-0/_metadata")
        count += 1
    assert count == len(blob) * 8 > 1000


def test_truncations_and_appends_are_detected():
    blob = fmt.encode_metadata(SMALL)
    for n in range(len(blob)):
        with pytest.raises(CorruptCheckpointError, match="where-file"):
            fmt.decode_metadata(blob[:n], "where-file")
    for extra in (b"\x00", b"x" * 4096):
        with pytest.raises(CorruptCheckpointError, match="trailing"):
            fmt.decode_metadata(blob + extra, "where-file")


def reseal(header_and_body):
    import hashlib
    return header_and_body + hashlib.sha256(header_and_body).digest()


def test_bad_magic_version_length_and_body():
    blob = fmt.encode_metadata(SMALL)
    raw = blob[14:-32]
    with pytest.raises(CorruptCheckpointError, match="magic"):
        fmt.decode_metadata(b"XCKPMETA" + blob[8:], "f")
    with pytest.raises(CorruptCheckpointError, match="magic"):
        fmt.decode_metadata(b"SQLite format 3\x00" + b"\x00" * 100, "f")
    for version in (0, 2, 0xFFFF):
        with pytest.raises(CorruptCheckpointError, match=f"version {version}"):
            fmt.decode_metadata(reseal(struct.pack(">8sHI", b"SCKPMETA", version, len(raw)) + raw), "f")
    for length in (fmt.MAX_BODY_LENGTH + 1, 2**32 - 1):
        with pytest.raises(CorruptCheckpointError, match="limit"):
            fmt.decode_metadata(struct.pack(">8sHI", b"SCKPMETA", 1, length) + b"\x00" * 64, "f")
    bodies = [b"[1,2]", b"3", b"null", b'"s"', b"{not json", b"\xff\xfe", b"[" * 100000 + b"]" * 100000,
              b'{"a":' + b"9" * 5000 + b"}", b""]
    for raw in bodies:
        with pytest.raises(CorruptCheckpointError, match="f:"):
            fmt.decode_metadata(reseal(struct.pack(">8sHI", b"SCKPMETA", 1, len(raw)) + raw), "f")
    with pytest.raises(CorruptCheckpointError):
        fmt.decode_metadata(b"", "f")


def test_verify_file():
    data = b"0123456789"
    h = fmt.sha256_hex(data)
    fmt.verify_file(data, 10, h, "kg-0.bin")
    fmt.verify_file(memoryview(data), 10, h.upper(), "kg-0.bin")
    with pytest.raises(CorruptCheckpointError, match="kg-0.bin: truncated"):
        fmt.verify_file(data[:9], 10, h, "kg-0.bin")
    with pytest.raises(CorruptCheckpointError, match="kg-0.bin: too long"):
        fmt.verify_file(data + b"x", 10, h, "kg-0.bin")
    with pytest.raises(CorruptCheckpointError, match="kg-0.bin: checksum mismatch"):
        fmt.verify_file(b"0123456788", 10, h, "kg-0.bin")
    with pytest.raises(CorruptCheckpointError, match="checksum"):
        fmt.verify_file(data, 10, None, "kg-0.bin")


def test_writer_repr_and_type():
    w = JobManagerCheckpointStorage().create_writer("j", "o", 1, "0")
    assert isinstance(w, CheckpointWriter) and "open" in repr(w)
    w.abort()
    assert "aborted" in repr(w)


@pytest.mark.parametrize("number", ["60E509143", "-1e400", "NaN", "Infinity", "-Infinity"])
def test_metadata_with_non_finite_numbers_is_corrupt(number):
    """Found by fuzz_metadata: a checkpoint_id of 60E509143 parsed to inf and int() raised OverflowError.
    The writer never emits non-finite numbers, so the reader refuses them as corruption."""
    import hashlib

    from statecore.checkpoint.snapshot import CompletedCheckpoint
    body = ('{"checkpoint_id": %s, "files": [], "format": "native", "key_group_range": [0, 3]}' % number).encode()
    head = fmt._HEADER.pack(fmt.MAGIC, fmt.FORMAT_VERSION, len(body)) + body
    raw = head + hashlib.sha256(head).digest()
    with pytest.raises(CorruptCheckpointError, match="not valid JSON"):
        CompletedCheckpoint.from_metadata("loc", fmt.decode_metadata(raw, "loc/_metadata"))


def test_retention_uncommits_at_once_and_removes_files_in_the_background(tmp_path):
    """Retention on local disk: the subsumed checkpoint is gone from listings (no _metadata, hidden folder)
    when checkpoint() returns; its files are removed by the reclaim thread, and leftovers of an interrupted
    removal are cleaned up by the next retention."""
    import statecore as sc
    backend = sc.HashMapStateBackend(checkpoint_storage=FileSystemCheckpointStorage(str(tmp_path)))
    op_dir = tmp_path / "job" / "operator"
    with backend.create_keyed_state_backend() as kb:
        kb.set_current_key(1)
        kb.get_state(sc.ValueStateDescriptor("v", float)).update(1.0)
        first = kb.checkpoint(1)
        second = kb.checkpoint(2)
        assert backend.checkpoint_storage.list_checkpoints("job", "operator") == [second.location]
        assert not os.path.exists(first.location)
        st.wait_for_reclaim()
        assert sorted(os.listdir(op_dir)) == [os.path.basename(second.location)]
        leftover = op_dir / (st.TRASH_PREFIX + "chk-0-kg0-127-0badc0de")  # as a crash would leave it
        leftover.mkdir()
        (leftover / "x-data.sckd").write_bytes(b"x" * 100)
        third = kb.checkpoint(3)
        st.wait_for_reclaim()
        assert sorted(os.listdir(op_dir)) == [os.path.basename(third.location)]
