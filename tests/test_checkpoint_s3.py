"""Keyed-state checkpoints through S3: moto's ThreadedMotoServer on 127.0.0.1 (fixture in conftest.py) + s3fs.

Round trip of every state type (with namespaces, and with TTL) on both backends,
sync and async checkpoints, a canonical savepoint restored into the other backend,
and a rescale 2 -> 3 reading the checkpoints of both old instances from S3.
"""
import pytest

import statecore as sc
from statecore.keygroups import compute_key_group_range_for_operator_index as kg_range

from backends import BACKENDS
from test_checkpoint import descriptors, dump, populate


def make(backend_name, tmp_path, s3_options, prefix="ckpt"):
    bucket, opts = s3_options
    backend = BACKENDS[backend_name](tmp_path)
    backend.checkpoint_storage = sc.FileSystemCheckpointStorage(f"s3://{bucket}/{prefix}", storage_options=opts)
    return backend


@pytest.mark.parametrize("ttl", [False, True], ids=["plain", "ttl"])
def test_s3_round_trip_every_state_type(backend_name, tmp_path, s3_options, ttl):
    backend = make(backend_name, tmp_path, s3_options)
    clock = sc.ManualClock(1000)
    keys = list(range(50)) + ["a", "β", ("t", 1), b"raw", 2 ** 70]
    with backend.create_keyed_state_backend(max_parallelism=128, job_id="j", operator_id="op", clock=clock) as kb:
        populate(kb, keys, ttl=ttl)
        expected = dump(kb, ttl=ttl)
        entries = kb.num_state_entries()
        sync = kb.checkpoint(1)
        assert sc.load_checkpoint(sync.location) == sync
        populate(kb, range(50, 60), ttl=ttl, seed=1)
        expected_async = dump(kb, ttl=ttl)
        fut = kb.checkpoint_async(2)
        kb.set_current_key(0)
        kb.get_state(descriptors(ttl)[0]).update(-1.0)  # after the cut: not in checkpoint 2
        asyn = fut.result(timeout=60)
    assert sync.location.startswith(f"s3://{s3_options[0]}/ckpt/j/op/chk-1-")
    assert sync.format == "native" and sync.size_bytes > 0
    # Retention (num_retained=1) deleted checkpoint 1 from S3 after checkpoint 2 committed.
    assert backend.checkpoint_storage.list_checkpoints("j", "op") == [asyn.location]
    with pytest.raises(sc.CorruptCheckpointError):
        sc.load_checkpoint(sync.location)
    with backend.restore_keyed_state_backend([asyn.location], max_parallelism=128, clock=clock) as kb2:
        assert dump(kb2, ttl=ttl) == expected_async
    assert expected != expected_async and entries > 0


def test_s3_retained_checkpoint_restores_exactly(backend_name, tmp_path, s3_options):
    backend = make(backend_name, tmp_path, s3_options)
    backend.num_retained = 2
    with backend.create_keyed_state_backend() as kb:
        populate(kb, range(80))
        expected = dump(kb)
        first = kb.checkpoint(1)
        populate(kb, range(80, 90), seed=4)
        kb.checkpoint(2)
    assert len(backend.checkpoint_storage.list_checkpoints("job", "operator")) == 2
    with backend.restore_keyed_state_backend([first.location]) as kb2:
        assert dump(kb2) == expected
        assert kb2.num_state_entries() > 0


def test_s3_savepoint_into_the_other_backend(backend_name, tmp_path, s3_options):
    bucket, _ = s3_options
    backend = make(backend_name, tmp_path, s3_options)
    with backend.create_keyed_state_backend() as kb:
        populate(kb, range(40))
        expected = dump(kb)
        sp = kb.savepoint(f"s3://{bucket}/ckpt/savepoints/sp-1")
    assert sp.format == "canonical" and sc.load_checkpoint(sp.location).format == "canonical"
    for other in BACKENDS:
        with BACKENDS[other](tmp_path / f"into-{other}").restore_keyed_state_backend([sp.location]) as kb2:
            assert dump(kb2) == expected, other


def test_s3_rescale_2_to_3(backend_name, tmp_path, s3_options):
    backend = make(backend_name, tmp_path, s3_options)
    keys = list(range(400))
    olds = []
    for i in range(2):
        kgr = kg_range(128, 2, i)
        kb = backend.create_keyed_state_backend(key_group_range=kgr, operator_id="op")
        populate(kb, [k for k in keys if sc.assign_to_key_group(k, 128) in kgr])
        olds.append(kb)
    cps = [kb.checkpoint(1) for kb in olds]
    expected = {}
    for kb in olds:
        expected.update(dump(kb))
        kb.close()
    assert all(c.location.startswith("s3://") for c in cps)
    total = {}
    for i in range(3):
        kgr = kg_range(128, 3, i)
        with backend.restore_keyed_state_backend([c.location for c in cps], max_parallelism=128, key_group_range=kgr,
                                                 operator_id="op") as kb:
            d = dump(kb)
            for (_, _, k) in d:
                assert sc.assign_to_key_group(eval(k), 128) in kgr  # noqa: S307 - repr of our own test keys
            assert not set(d) & set(total), "a key was restored into two instances"
            total.update(d)
    assert total == expected
    assert len({k for _, _, k in total}) == len(keys)


def test_s3_corrupt_object_refused(tmp_path, s3_options):
    """A data object changed on S3 after the commit is refused before any state is loaded."""
    import s3fs
    bucket, opts = s3_options
    backend = make("hashmap", tmp_path, s3_options)
    with backend.create_keyed_state_backend() as kb:
        populate(kb, range(20))
        cp = kb.checkpoint(1)
    fs = s3fs.S3FileSystem(**opts)
    path = cp.location[len("s3://"):] + "/" + cp.metadata["files"][0]["path"]
    data = fs.cat_file(path)
    fs.pipe_file(path, data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(sc.CorruptCheckpointError, match="data.sckd"):
        backend.restore_keyed_state_backend([cp.location])
    fs.rm_file(path)
    with pytest.raises(sc.CorruptCheckpointError, match="data.sckd"):
        backend.restore_keyed_state_backend([cp.location])
