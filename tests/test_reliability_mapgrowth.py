"""LMDB map growth under load (RELIABILITY.md T6).

An LMDB tier starts with ``map_size=1 MiB`` and is grown by writing state (values of
1-64 KiB, overwrites and deletes mixed in) until its map is at least 1024x larger
(1 GiB in CI; 16 GiB of sparse file with ``STATECORE_SOAK=1``).  Meanwhile:

* **4 reader threads** read random keys and check them against the dict model.
  A keyed backend is single-threaded (one current key, one long-lived LMDB read
  transaction, buffers retired by "the caller's thread"), so the design-supported
  way for several threads to share one is a lock around each call: the readers and
  the writer take ``lock`` per call and release it between calls, so reads from 5
  OS threads interleave with flushes and resizes.  The flush thread is the
  backend's own and runs unlocked: the resize it requests happens on whichever
  caller thread next enters the backend, with no transaction open.
* **checkpoint_async pending across >= 3 resizes.**  The LMDB tier cannot copy its
  tables, so ``checkpoint_async`` serializes the cut in the call (under the lock)
  and only the storage write runs in the background; an I/O hook holds that write
  until the writer has seen 3 more map resizes.  Two more checkpoints are taken
  later during growth.  The writer samples the resize count once per batch, and one
  batch (~1 MiB) can cause two resizes of a small map (the flush thread flushes it
  asynchronously; a loaded machine delays the writer), so each checkpoint is taken
  at the first sample AT OR PAST its resize count, never only at an exact count
  (an exact match used to skip a checkpoint under load: only 2 were taken).
  Every checkpoint is restored (into a fresh LMDB tier that itself starts at
  1 MiB and grows during the restore) and must equal the model copied when its
  ``checkpoint_async`` returned.
* At the end a full scan (``get_keys`` + ``value_batch``) must equal the model, and
  no ``lmdb.Error``/``MapFullError`` (nor anything else) may have reached a caller.

Negative control: ``--plant-bad-resize`` makes one reader resize the map itself
(``env.set_mapsize`` from a foreign thread, without the lock, with the backend's read
transaction open: the py-lmdb #475 / #379 race the design rules out).  The harness
must report it (an error reaching a caller, a mismatch, or a crashed child).
"""
import hashlib
import os
import random
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback

import pytest

import statecore as sc
from statecore import _mdb as lmdb  # statecore's own LMDB binding: its environments are not py-lmdb's
from statecore.checkpoint import storage as stg
from statecore.serializers import Bytes

SOAK = os.environ.get("STATECORE_SOAK") == "1"
MIB = 1 << 20
START_MAP = 1 * MIB
TARGET_MAP = (16 << 30) if SOAK else (1 << 30)     # >= 1024x the start
READERS = 4
BATCH = 32
MAX_VALUE = 64 << 10
BLOCK_RESIZES = 3                                  # resizes a pending checkpoint_async must span
FILL = hashlib.sha256(b"statecore-t6").digest() * (MAX_VALUE // 32)


def value_of(key, version, size):
    return struct.pack("<QQ", key, version) + FILL[:size - 16]


def expected_map(model):
    return {k: value_of(k, ver, size) for k, (ver, size) in model.items()}


def scan(kb, st, model, where, report):
    """Compare every key and value of ``kb`` with the model; record mismatches in report."""
    keys = set(kb.get_keys("v"))
    if keys != set(model):
        missing, extra = set(model) - keys, keys - set(model)
        report["failures"].append(f"{where}: key set differs: {len(missing)} missing (e.g. {sorted(missing)[:3]}), "
                                  f"{len(extra)} extra (e.g. {sorted(extra)[:3]})")
        return
    ordered = sorted(keys)
    bad = 0
    for i in range(0, len(ordered), 256):
        chunk = ordered[i:i + 256]
        for k, v in zip(chunk, st.value_batch(chunk)):
            ver, size = model[k]
            if v != value_of(k, ver, size):
                bad += 1
                if bad <= 3:
                    report["failures"].append(f"{where}: key {k}: got {None if v is None else v[:16]!r}"
                                              f"/{None if v is None else len(v)} B, want version {ver} size {size}")
    if bad:
        report["failures"].append(f"{where}: {bad} values differ")
    report["scanned"] += len(ordered)


def run_growth(root, target_map=TARGET_MAP, seed=1, plant_bad_resize=False, time_limit=240.0):
    """The T6 scenario; returns a report dict (``failures`` empty on success)."""
    rng = random.Random(seed)
    report = {"failures": [], "reads": [0] * READERS, "writes": 0, "deletes": 0, "resizes": 0, "scanned": 0,
              "checkpoints": [], "restores": 0, "blocked_span": None, "payload_bytes": 0,
              "unsampled_resizes": []}  # resize counts the writer never saw (two resizes between two samples)
    ckpt_dir = os.path.join(root, "ckpt")
    backend = sc.LMDBStateBackend(db_path=os.path.join(root, "db"), map_size=START_MAP, memory_budget=8 * MIB,
                                  checkpoint_storage=sc.FileSystemCheckpointStorage(ckpt_dir))
    backend.num_retained = 10  # keep every checkpoint of the run for the restores below
    kb = backend.create_keyed_state_backend(max_parallelism=128)
    desc = sc.ValueStateDescriptor("v", Bytes())
    st = kb.get_state(desc)
    lock = threading.Lock()
    model = {}           # key -> (version, size)
    next_key = [0]
    stop = threading.Event()
    release = threading.Event()
    hook_state = {"blocked": 0, "target": None}

    def fail(msg):
        report["failures"].append(msg)

    def hook(event, path):
        # Hold the first checkpoint's data write until the writer has seen BLOCK_RESIZES resizes.
        if event == "write" and hook_state["target"] and hook_state["target"] in path and not release.is_set():
            hook_state["blocked"] += 1
            if not release.wait(120):
                fail("checkpoint write hook was never released")

    def reader(i):
        r = random.Random(seed * 100 + i)
        planted = 0
        while not stop.is_set():
            try:
                if plant_bad_resize and i == 0 and report["resizes"] >= 3 and planted < 20:
                    # PLANTED BUG: resize the map from a foreign thread, without the lock, while the
                    # backend may hold its read transaction (+1 MiB: the run's own growth is unchanged).
                    planted += 1
                    env = kb._store.env
                    try:
                        env.set_mapsize(env.info()["map_size"] + MIB)
                        report["planted"] = report.get("planted", 0) + 1
                    except lmdb.Error:
                        pass  # refused (a write transaction is active): try again later
                    time.sleep(0.002)
                with lock:
                    n = next_key[0]
                    if n == 0:
                        continue
                    ks = [r.randrange(n) for _ in range(8)]
                    got = st.value_batch(ks)
                    for k, v in zip(ks, got):
                        m = model.get(k)
                        want = None if m is None else value_of(k, *m)
                        if v != want:
                            fail(f"reader {i}: key {k}: got {None if v is None else v[:16]!r}, want {m}")
                    report["reads"][i] += len(ks)
            except BaseException as e:  # noqa: BLE001 - anything reaching a caller is a failure
                fail(f"reader {i}: {type(e).__module__}.{type(e).__name__}: {e}")
                return
            time.sleep(0)

    threads = [threading.Thread(target=reader, args=(i,), daemon=True) for i in range(READERS)]
    previous_hook = stg.set_io_hook(hook)
    checkpoints = []     # (future, model copy, resizes at call)
    t0 = time.monotonic()
    try:
        for t in threads:
            t.start()
        ckpt_at = {2: True, 6: False, 8: False}  # resizes -> take a checkpoint (True: hold it pending)
        blocked = None
        while True:
            with lock:
                resizes = kb.metrics()["map_resizes"]
                map_size = kb.metrics()["map_size"]
            report["unsampled_resizes"].extend(range(report["resizes"] + 1, resizes))
            report["resizes"] = resizes
            if map_size >= target_map:
                break
            if time.monotonic() - t0 > time_limit:
                fail(f"time limit: map only {map_size} bytes after {time_limit} s")
                break
            if report["failures"]:
                break
            due = [r for r in sorted(ckpt_at) if r <= resizes]
            if due:  # at or past the planned resize count (one checkpoint per sample)
                hold = ckpt_at.pop(due[0])
                cid = len(checkpoints) + 1
                with lock:
                    if hold:
                        hook_state["target"] = f"chk-{cid}-"
                    fut = kb.checkpoint_async(cid)
                    checkpoints.append((cid, fut, dict(model), resizes))
                if hold:
                    blocked = (fut, resizes)
            if blocked is not None and resizes >= blocked[1] + BLOCK_RESIZES:
                if blocked[0].done():
                    fail("the held checkpoint_async completed before it was released")
                report["blocked_span"] = resizes - blocked[1]
                release.set()
                blocked = None
            keys, vals = [], []
            for _ in range(BATCH):
                x = rng.random()
                if x < 0.05 and model:
                    k = rng.randrange(next_key[0])
                    keys.append(k)
                    vals.append(None)
                    continue
                k = rng.randrange(next_key[0]) if x < 0.2 and next_key[0] else next_key[0] + len(keys)
                size = rng.randrange(1024, MAX_VALUE + 1)
                ver = (model.get(k, (0, 0))[0] + 1)
                keys.append(k)
                vals.append((ver, size))
            dedup = {}
            for k, v in zip(keys, vals):
                dedup[k] = v  # last wins, as update_batch does
            ks = list(dedup)
            payload = [None if v is None else value_of(k, *v) for k, v in dedup.items()]
            try:
                with lock:
                    st.update_batch(ks, payload)
                    for k, v in dedup.items():
                        if v is None:
                            model.pop(k, None)
                            report["deletes"] += 1
                        else:
                            model[k] = v
                            report["payload_bytes"] += v[1]
                    next_key[0] = max(next_key[0], max(ks) + 1)
                    report["writes"] += len(ks)
            except BaseException as e:  # noqa: BLE001
                fail(f"writer: {type(e).__module__}.{type(e).__name__}: {e}")
                break
        release.set()
        stop.set()
        for t in threads:
            t.join(30)
        report["final_map_size"] = map_size
        if not report["failures"]:
            with lock:
                report["final_resizes"] = kb.metrics()["map_resizes"]
                scan(kb, st, model, "final scan", report)
        for cid, fut, snap, resizes in checkpoints:
            try:
                completed = fut.result(timeout=120)
            except BaseException as e:  # noqa: BLE001
                fail(f"checkpoint {cid} (at resize {resizes}): {type(e).__name__}: {e}")
                continue
            report["checkpoints"].append((cid, resizes, len(snap)))
            restore_backend = sc.LMDBStateBackend(db_path=os.path.join(root, f"restore{cid}"), map_size=START_MAP,
                                                  memory_budget=8 * MIB)
            rkb = restore_backend.restore_keyed_state_backend([completed], max_parallelism=128)
            try:
                scan(rkb, rkb.get_state(desc), snap, f"checkpoint {cid} (taken at resize {resizes})", report)
                report["restores"] += 1
            finally:
                rkb.close()
    except BaseException as e:  # noqa: BLE001
        fail(f"harness: {type(e).__name__}: {e}\n{traceback.format_exc()}")
    finally:
        release.set()
        stop.set()
        stg.set_io_hook(previous_hook)
        try:
            kb.close()
        except BaseException as e:  # noqa: BLE001
            fail(f"close: {type(e).__name__}: {e}")
    report["seconds"] = round(time.monotonic() - t0, 1)
    return report


def check_report(report, target_map):
    assert not report["failures"], "\n".join(report["failures"][:20])
    assert report["final_map_size"] >= target_map >= 1024 * START_MAP
    assert report["blocked_span"] is not None and report["blocked_span"] >= BLOCK_RESIZES, report
    assert len(report["checkpoints"]) == 3 and report["restores"] == 3, report
    assert all(n > 0 for n in report["reads"]), report


@pytest.mark.slow
@pytest.mark.timeout(3600 if SOAK else 240)
@pytest.mark.parametrize("seed", [1] if SOAK else [1, 2, 3])
def test_map_grows_1024x_with_readers_and_pending_checkpoint(tmp_path, seed):
    report = run_growth(str(tmp_path), TARGET_MAP, seed=seed, time_limit=3000 if SOAK else 200)
    print(f"\nT6: map {START_MAP} -> {report.get('final_map_size')} bytes "
          f"({report.get('final_resizes')} resizes) in {report['seconds']} s; payload written "
          f"{report['payload_bytes'] / MIB:.0f} MiB ({report['writes']} writes, {report['deletes']} deletes); "
          f"reads per reader {report['reads']}; checkpoint held pending across {report['blocked_span']} resizes; "
          f"checkpoints (id, taken at resize, keys) {report['checkpoints']} restored {report['restores']}; "
          f"final scan {report['scanned']} values checked; resize counts not sampled by the writer "
          f"{report['unsampled_resizes']}")
    check_report(report, TARGET_MAP)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_negative_control_foreign_thread_resize_is_caught(tmp_path):
    """Planted bug: a reader resizes the map itself.  The harness must notice (in a child: it may crash)."""
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--plant-bad-resize", str(tmp_path),
                           str(64 * MIB)], capture_output=True, text=True, timeout=200,
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    out = proc.stdout + proc.stderr
    print(f"\nnegative control: child exit {proc.returncode}; {out.strip().splitlines()[-1] if out.strip() else ''}")
    # Caught = the harness reported it, or the child died of a signal (SIGSEGV/SIGBUS from the race).
    # Any other exit (an import error, a harness bug) is not evidence that the harness works.
    assert "HARNESS CAUGHT" in out or proc.returncode < 0, \
        f"the harness did not catch the planted resize race (exit {proc.returncode}):\n{out[-3000:]}"


def _main(argv):
    plant = "--plant-bad-resize" in argv
    args = [a for a in argv if not a.startswith("--")]
    root = args[0] if args else tempfile.mkdtemp(prefix="statecore-t6-")
    target = int(args[1]) if len(args) > 1 else TARGET_MAP
    report = run_growth(root, target, plant_bad_resize=plant, time_limit=150)
    if report["failures"]:
        print("HARNESS CAUGHT:", report["failures"][0][:500], "| planted:", report.get("planted"))
        return 1
    print("HARNESS OK", {k: v for k, v in report.items() if k != "failures"})
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
