"""``statecore demo`` and ``statecore inspect`` end to end, in subprocesses (``python -m statecore``).

The demo's verification must be real: the negative controls (records dropped or replayed twice
after the restore) must make it fail.  ``inspect`` is checked against a checkpoint whose content
this test knows, and against corrupt ones (one line on stderr, exit 1, no traceback).
"""
import hashlib
import json
import os
import subprocess
import sys

import pytest

import statecore
from statecore.demo import JOB_ID, MAX_PARALLELISM, OPERATOR_ID, SOURCE_KEY

PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(statecore.__file__)))
DAY = 86_400_000


def _run(args, cwd, timeout=120):
    env = dict(os.environ)
    env["PYTHONPATH"] = PKG_PARENT
    env.pop("PYTHONSTARTUP", None)
    return subprocess.run([sys.executable, "-m", "statecore", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _one_line_error(r, needle):
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("statecore: error: inspect:"), r.stderr
    assert needle in lines[0], lines[0]
    assert r.stdout == ""


# ---------------------------------------------------------------------------------------------- demo
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["hashmap", "lmdb"])
def test_demo_kill_restore_exactly_once(tmp_path, backend):
    run_dir = tmp_path / "run"
    r = _run(["demo", "--records", "3000", "--backend", backend, "--dir", str(run_dir)], tmp_path)
    out = r.stdout
    assert r.returncode == 0, out + r.stderr
    assert "Traceback" not in r.stderr
    # the story: checkpoints, a real SIGKILL of the worker between two checkpoints, a restore in a new process
    assert "checkpoint 4 at offset 1,500" in out
    assert "KILL -9 worker 1" in out and "at record 1,650" in out and "exit status -9 (SIGKILL)" in out
    assert "restores the latest complete checkpoint: 4" in out
    assert "stream offset in it: 1,500; replaying" in out
    assert "exactly-once: records_seen per market equals the reference" in out
    assert "they add up to 3,000 for a stream of 3,000: OK" in out
    assert "are gone; the other" in out and "FAILED" not in out
    assert out.rstrip().endswith("exactly-once state after kill -9 and restore: OK")
    assert "records/s" in out and "restore" in out

    # Independently of the demo's own check: the final checkpoint, restored here, holds the whole stream once.
    storage = statecore.FileSystemCheckpointStorage(str(run_dir / "checkpoints"))
    final = statecore.load_checkpoint(storage.list_checkpoints(JOB_ID, OPERATOR_ID)[-1])
    assert final.checkpoint_id == 8
    backend_obj = statecore.HashMapStateBackend()
    with backend_obj.restore_keyed_state_backend([final], max_parallelism=MAX_PARALLELISM, job_id=JOB_ID,
                                                 operator_id=OPERATOR_ID) as kb:
        seen = kb.get_state(statecore.ValueStateDescriptor("records_seen", int, default=0))
        offset = kb.get_state(statecore.ValueStateDescriptor("source_offset", int))
        kb.set_current_key(SOURCE_KEY)
        assert offset.value() == 3000
        total = 0
        for market in list(kb.get_keys("records_seen")):
            if market != SOURCE_KEY:
                kb.set_current_key(market)
                total += seen.value()
        assert total == 3000
    assert final.metadata["backend"] == ("HashMapStateBackend" if backend == "hashmap" else "LMDBStateBackend")


@pytest.mark.slow
@pytest.mark.parametrize("flag, count_line", [
    ("--debug-drop-records", "add up to 2,993 for a stream of 3,000: FAILED"),
    ("--debug-dup-records", "add up to 3,007 for a stream of 3,000: FAILED"),
])
def test_demo_verification_catches_lost_or_duplicated_records(tmp_path, flag, count_line):
    r = _run(["demo", "--records", "3000", "--backend", "hashmap", "--dir", str(tmp_path / "run"), flag, "7"],
             tmp_path)
    out = r.stdout
    assert r.returncode == 1, out + r.stderr
    assert "Traceback" not in r.stderr
    assert "KILL -9 worker 1" in out
    assert count_line in out
    assert out.rstrip().splitlines()[-2] == "exactly-once state after kill -9 and restore: FAILED"
    if flag == "--debug-dup-records":
        # max() is idempotent: replayed records leave the maps equal; only the counter sees them.
        assert "max_signal_delta equals the reference for 247 of 247 markets" in out


def test_demo_bad_command_line(tmp_path):
    r = _run(["demo", "--records", "10"], tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == "statecore: error: demo: --records must be at least 500, got 10"


# ---------------------------------------------------------------------------------------------- inspect
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint and a savepoint with known content: 40 markets x 3 outcomes (TTL), 40 counters."""
    base = tmp_path_factory.mktemp("ckpt")
    now = [10 * DAY]
    backend = statecore.HashMapStateBackend(checkpoint_storage=statecore.FileSystemCheckpointStorage(str(base)))
    kb = backend.create_keyed_state_backend(max_parallelism=64, clock=lambda: now[0], job_id="job1",
                                            operator_id="op1")
    ttl = (statecore.StateTtlConfig.new_builder(statecore.Time.days(7))
           .set_update_type(statecore.UpdateType.OnCreateAndWrite)
           .set_state_visibility(statecore.StateVisibility.NeverReturnExpired)
           .disable_cleanup_in_background().build())  # expired entries stay stored until read
    desc = statecore.MapStateDescriptor("max_signal_delta", str, float)
    desc.enable_time_to_live(ttl)
    m = kb.get_state(desc)
    c = kb.get_state(statecore.ValueStateDescriptor("records_seen", int, default=0))
    for i in range(40):
        now[0] = (1 if i < 10 else 10) * DAY  # the first 10 markets written 9 days before the cut
        kb.set_current_key(f"market-{i}")
        for o in ("YES", "NO", "MAYBE"):
            m.put(o, i / 100)
        c.update(i)
    now[0] = 10 * DAY
    cp = kb.checkpoint(5)
    sp = kb.savepoint(str(tmp_path_factory.mktemp("sp") / "savepoint-1"))
    kb.close()
    return cp, sp


def test_inspect_plain(tmp_path, checkpoint):
    cp, _ = checkpoint
    r = _run(["inspect", cp.location], tmp_path)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.startswith(f"checkpoint {cp.location}\n")
    assert "native (metadata format version 1" in out
    assert "checkpoint id     5" in out
    assert "HashMapStateBackend" in out and "job1 / op1" in out
    assert "key groups        0..63 of max_parallelism 64" in out
    assert "max_signal_delta" in out and "120 entries" in out and "user key Str v1, value Float64 v1" in out
    assert "ttl 7d OnCreateAndWrite NeverReturnExpired (cleanup: none)" in out
    assert "30 expired at checkpoint time" in out
    assert "records_seen" in out and "40 entries" in out and "value Int64 v1" in out
    assert "checksums         OK: 1 file + _metadata verified" in out


def test_inspect_json(tmp_path, checkpoint):
    cp, sp = checkpoint
    r = _run(["inspect", cp.location, "--json"], tmp_path)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert (d["kind"], d["format"], d["format_version"], d["checkpoint_id"]) == ("checkpoint", "native", 1, 5)
    assert (d["job_id"], d["operator_id"], d["backend"]) == ("job1", "op1", "HashMapStateBackend")
    assert d["key_group_range"] == [0, 63] and d["max_parallelism"] == 64
    states = {s["name"]: s for s in d["states"]}
    assert set(states) == {"max_signal_delta", "records_seen"}
    msd, seen = states["max_signal_delta"], states["records_seen"]
    assert (msd["type"], msd["entries"], msd["entries_metadata"]) == ("map", 120, 120)
    assert msd["ttl"]["ttl_ms"] == 7 * DAY and msd["ttl"]["update_type"] == "OnCreateAndWrite"
    assert msd["expired_at_checkpoint"] == 30 and msd["min_ts"] == DAY and msd["max_ts"] == 10 * DAY
    assert (seen["type"], seen["entries"], seen["ttl"], seen["value_serializer"]) == ("value", 40, None, "Int64 v1")
    # bytes per state and per key group add up to the data file (minus its 8-byte magic)
    data_path = os.path.join(cp.location, cp.metadata["files"][0]["path"])
    with open(data_path, "rb") as fh:
        data = fh.read()
    assert msd["bytes"] > seen["bytes"] > 0
    assert msd["bytes"] + seen["bytes"] == len(data) - 8 == sum(k["bytes"] for k in d["key_groups"])
    assert sum(k["entries"] for k in d["key_groups"]) == d["entries"] == 160
    [f] = d["files"]
    assert f["verified"] and f["length"] == len(data) and f["sha256"] == hashlib.sha256(data).hexdigest()
    assert d["checksums_verified"] is True
    assert d["total_bytes"] == len(data) + os.path.getsize(os.path.join(cp.location, "_metadata"))

    r = _run(["inspect", sp.location, "--json"], tmp_path)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert (d["kind"], d["format"]) == ("savepoint", "canonical")
    assert {s["name"]: s["entries"] for s in d["states"]} == {"max_signal_delta": 120, "records_seen": 40}


def test_inspect_operator_state_checkpoint(tmp_path):
    backend = statecore.HashMapStateBackend(
        checkpoint_storage=statecore.FileSystemCheckpointStorage(str(tmp_path / "ckpt")))
    ob = backend.create_operator_state_backend()
    ob.get_list_state(statecore.ListStateDescriptor("offsets", int)).add_all([1, 2, 3])
    rules = ob.get_broadcast_state(statecore.MapStateDescriptor("rules", str, float))
    rules.put("a", 1.0)
    rules.put("b", 2.0)
    cp = ob.checkpoint(3)
    ob.close()
    r = _run(["inspect", cp.location, "--json"], tmp_path)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert (d["kind"], d["checkpoint_id"], d["checksums_verified"]) == ("operator-state checkpoint", 3, True)
    states = {s["name"]: s for s in d["states"]}
    assert (states["offsets"]["mode"], states["offsets"]["entries"]) == ("split", 3)
    assert (states["rules"]["mode"], states["rules"]["entries"]) == ("broadcast", 2)
    assert states["rules"]["user_key_serializer"] == "Str v1" and states["rules"]["value_serializer"] == "Float64 v1"
    r = _run(["inspect", cp.location], tmp_path)
    assert r.returncode == 0 and "operator broadcast" in r.stdout and "rules" in r.stdout


def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_inspect_bit_flip_in_data_file(tmp_path, checkpoint):
    loc = _copy(checkpoint[0].location, tmp_path / "flipped")
    path, = loc.glob("*data.sckd")
    b = bytearray(path.read_bytes())
    b[len(b) // 2] ^= 0x10
    path.write_bytes(bytes(b))
    _one_line_error(_run(["inspect", str(loc)], tmp_path), "data.sckd: checksum mismatch")
    _one_line_error(_run(["inspect", str(loc), "--json"], tmp_path), "checksum mismatch")


def test_inspect_truncated_metadata(tmp_path, checkpoint):
    loc = _copy(checkpoint[0].location, tmp_path / "truncated")
    meta = loc / "_metadata"
    meta.write_bytes(meta.read_bytes()[:200])
    _one_line_error(_run(["inspect", str(loc)], tmp_path), "_metadata: checkpoint metadata truncated")


def test_inspect_truncated_data_file(tmp_path, checkpoint):
    loc = _copy(checkpoint[0].location, tmp_path / "short")
    path, = loc.glob("*data.sckd")
    path.write_bytes(path.read_bytes()[:-5])
    _one_line_error(_run(["inspect", str(loc)], tmp_path), "data.sckd: truncated")


def test_inspect_missing_location(tmp_path):
    _one_line_error(_run(["inspect", str(tmp_path / "nowhere")], tmp_path), "missing: no committed checkpoint")
