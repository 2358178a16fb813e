"""Disk full and EIO (RELIABILITY.md T8): real ENOSPC on a size-limited tmpfs, and strace fault injection.

Two mechanisms, each driving a CHILD process (``python tests/test_reliability_disk.py <mode> ...``):

(a) **tmpfs**: ``unshare -m`` + ``mount -t tmpfs -o size=64m`` (a private mount namespace, so nothing
    leaks to the host); both the LMDB ``db_path`` and the checkpoint directory live on it.  A filler
    file leaves a chosen number of bytes free (real ENOSPC from the kernel, short writes included).
    Skipped with the reason when the mount is refused (no CAP_SYS_ADMIN / EPERM).
    * checkpoint sweep: 30 free-space levels spanning the size of one checkpoint (ENOSPC lands in the
      data file, in the metadata temp file, or not at all), heap and LMDB tiers alternating,
      ``checkpoint`` and ``checkpoint_async`` alternating;
    * spill: an LMDB tier writes until a flush hits the full disk;
    * spill recovery (its own quick test): the filler is deleted and the next ``flush()`` succeeds.
(b) **strace** (``strace -f --seccomp-bpf -e inject=writev:error=ENOSPC:when=N`` / ``fsync:error=EIO``,
    run on ``sys.executable``, never a shim): a dry run lists the ``write``/``writev``/``fsync`` calls of
    the checkpoint thread over 4 checkpoints (data files are written with ``writev``; syscall injection
    is counted per thread); then one child per injection point (30 in CI) fails exactly that call.  The
    child's main thread first makes PAD calls of each kind (so only the checkpoint thread can be hit),
    and its LMDB tier never flushes (one big write buffer: flush threads write pages with ``writev``).
    A fault while deleting an older checkpoint after the new one committed is logged, not raised (as
    Flink's CheckpointsCleaner does): the child records that warning and the sweep accepts it.

Checked after every fault (in the child for (a), in the parent for (b)):
* a checkpoint that hits the fault raises ``CheckpointError`` (never another type, never success:
  an fsync EIO is never retried into a success);
* no partial checkpoint is accepted: every folder ``list_checkpoints`` reports loads and restores to
  exactly the model of its id; a failed id has no ``_metadata`` (``load_checkpoint`` rejects it);
* the previous checkpoint still restores; after the space is freed (or the single fault passed) the
  next checkpoint succeeds and restores to the model;
* spill: the full disk surfaces as ``StateError`` (``LMDBFlushError``, never a raw ``lmdb.Error``) naming the
  LMDB directory, every value written before stays readable, the child never dies of SIGBUS, and the error
  is not sticky: after the space is freed, writes and ``flush()`` work and nothing buffered was lost (the
  strace variant fails every LMDB page write (writev/pwritev on data.mdb) and checks the message).

Negative control: with ``STATECORE_DEBUG_SKIP_FSYNC=1`` (storage.py's planted bug) the fsync EIO
points are never reached, so the same sweep must report that the fsync faults were not detected.
"""
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import traceback

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SOAK = os.environ.get("STATECORE_SOAK") == "1"
TMPFS_POINTS = 120 if SOAK else 30
STRACE_POINTS = 200 if SOAK else 30
CHECKPOINTS = 4          # per strace child
NUM_RETAINED = 2         # so retention deletes (and fsyncs) happen inside the strace runs
KEYS = 600
PAD = 1000            # main-thread write calls made before any injection point can be reached
MIB = 1 << 20


# ----------------------------------------------------------------------------- shared helpers

def model_at(seed, step):
    """The deterministic state after ``step`` update rounds: {key: str value}."""
    rng = random.Random(seed)
    model = {}
    for s in range(step + 1):
        for k in rng.sample(range(KEYS), KEYS // 2 if s else KEYS):
            model[k] = f"{s}:{k}:" + "x" * rng.randrange(100, 500)
        for k in rng.sample(range(KEYS), 20 if s else 0):
            model.pop(k, None)
    return model


def apply(kb, st, old, new):
    for k in old.keys() - new.keys():
        kb.set_current_key(k)
        st.clear()
    for k, v in new.items():
        if old.get(k) != v:
            kb.set_current_key(k)
            st.update(v)


def dump(kb, name="v"):
    import statecore as sc
    st = kb.get_state(sc.ValueStateDescriptor(name))
    out = {}
    for k in kb.get_keys(name):
        kb.set_current_key(k)
        out[k] = st.value()
    return out


def restore_dump(location):
    import statecore as sc
    kb = sc.HashMapStateBackend().restore_keyed_state_backend([location], max_parallelism=128)
    try:
        return dump(kb)
    finally:
        kb.close()


def make_backend(kind, root, num_retained=NUM_RETAINED, write_buffer_size=32 << 10):
    import statecore as sc
    storage = sc.FileSystemCheckpointStorage(os.path.join(root, "ckpt"))
    if kind == "lmdb":
        backend = sc.LMDBStateBackend(db_path=os.path.join(root, "db"), write_buffer_size=write_buffer_size,
                                      map_size=MIB, checkpoint_storage=storage)
    else:
        backend = sc.HashMapStateBackend(checkpoint_storage=storage)
    backend.num_retained = num_retained
    return backend


def folder_verdicts(storage, job="job", op="operator"):
    """{checkpoint id: (committed, error or None)} for every chk-* folder on storage."""
    from statecore import CorruptCheckpointError, load_checkpoint
    base = os.path.join(storage.uri, job, op)
    listed = set(storage.list_checkpoints(job, op))
    out = {}
    for name in sorted(os.listdir(base)) if os.path.isdir(base) else []:
        m = re.match(r"chk-(\d+)-", name)
        if not m:
            continue
        loc = os.path.join(base, name)
        try:
            load_checkpoint(loc)
            out[int(m.group(1))] = (loc, loc in listed, None)
        except CorruptCheckpointError as e:
            out[int(m.group(1))] = (loc, loc in listed, f"CorruptCheckpointError: {e}")
    return out


def err_name(e):
    return f"{type(e).__module__}.{type(e).__name__}"


# ----------------------------------------------------------------------------- (a) tmpfs child

def _fill(mnt, leave):
    """Create/resize the filler so that about ``leave`` bytes stay free; returns the free bytes."""
    path = os.path.join(mnt, "filler")
    if os.path.exists(path):
        os.unlink(path)
    st = os.statvfs(mnt)
    free = st.f_bavail * st.f_frsize
    want = max(0, free - leave)
    # Unbuffered: a flush of the LMDB tier may still be writing (a background thread) and take part of the
    # space meanwhile; a buffered filler would then keep its failed tail and raise ENOSPC again at close.
    with open(path, "wb", buffering=0) as f:
        chunk = b"\0" * MIB
        while want > 0:
            try:
                f.write(chunk[:min(want, MIB)])
                f.flush()
            except OSError:
                break
            want -= min(want, MIB)
    st = os.statvfs(mnt)
    return st.f_bavail * st.f_frsize


def _free(mnt):
    try:
        os.unlink(os.path.join(mnt, "filler"))
    except FileNotFoundError:
        pass


def tmpfs_checkpoint_point(mnt, i, leave, report):
    import statecore as sc
    from statecore import CheckpointError
    root = os.path.join(mnt, f"p{i}")
    os.makedirs(root)
    kind = "lmdb" if i % 2 == 0 else "hashmap"
    use_async = (i // 2) % 2 == 1
    rec = {"point": i, "backend": kind, "async": use_async, "leave": leave}
    backend = make_backend(kind, root, num_retained=1)
    kb = backend.create_keyed_state_backend(max_parallelism=128)
    try:
        st = kb.get_state(sc.ValueStateDescriptor("v"))
        m1, m2 = model_at(i, 0), model_at(i, 1)
        apply(kb, st, {}, m1)
        c1 = kb.checkpoint(1)
        apply(kb, st, m1, m2)
        rec["free"] = _fill(mnt, leave)
        try:
            c2 = kb.checkpoint_async(2).result(60) if use_async else kb.checkpoint(2)
            rec["chk2"] = "ok"
        except CheckpointError as e:
            rec["chk2"] = f"CheckpointError: {str(e)[-200:]}"
            c2 = None
        except BaseException as e:  # noqa: BLE001
            report["failures"].append(f"point {i}: checkpoint 2 raised {err_name(e)}: {e}")
            c2 = None
        verdicts = folder_verdicts(backend.checkpoint_storage)
        for cid, (loc, listed, err) in verdicts.items():
            if listed and err:
                report["failures"].append(f"point {i}: {loc} is listed as committed but rejected: {err}")
            if listed and not err:
                got, want = restore_dump(loc), (m1 if cid == 1 else m2)
                if got != want:
                    report["failures"].append(f"point {i}: committed checkpoint {cid} does not match its model")
        if c2 is None:
            if verdicts.get(2, (None, False, None))[1]:
                report["failures"].append(f"point {i}: failed checkpoint 2 is listed as committed")
            if restore_dump(c1.location) != m1:
                report["failures"].append(f"point {i}: previous checkpoint 1 no longer restores")
        elif restore_dump(c2.location) != m2:
            report["failures"].append(f"point {i}: checkpoint 2 reported ok but does not restore to the model")
        _free(mnt)
        c3 = kb.checkpoint(3)
        if restore_dump(c3.location) != m2:
            report["failures"].append(f"point {i}: checkpoint 3 after freeing space does not restore to the model")
        rec["chk3"] = "ok"
    except BaseException as e:  # noqa: BLE001
        report["failures"].append(f"point {i}: {err_name(e)}: {e}\n{traceback.format_exc()}")
    finally:
        _free(mnt)
        kb.close()
        shutil.rmtree(root, ignore_errors=True)
    report["points"].append(rec)


def tmpfs_spill(mnt, j, leave, report):
    """An LMDB tier writes until a flush hits the full disk."""
    import statecore as sc
    from statecore import StateError
    root = os.path.join(mnt, f"s{j}")
    os.makedirs(root)
    backend = make_backend("lmdb", root, num_retained=1)
    kb = backend.create_keyed_state_backend(max_parallelism=128)
    rec = {"leave": leave}
    try:
        st = kb.get_state(sc.ValueStateDescriptor("v"))
        db_dir = kb.db_dir
        rec["free"] = _fill(mnt, leave)
        model, failed_key, err = {}, None, None
        for k in range(10 ** 6):
            v = f"{k}:" + "s" * 300
            try:
                kb.set_current_key(k)
                st.update(v)
            except BaseException as e:  # noqa: BLE001
                failed_key, err = k, e
                break
            model[k] = v
        rec["written_before_error"] = len(model)
        if err is None:
            report["failures"].append(f"spill {j}: no error after {len(model)} writes on a full disk")
            return
        rec["error"] = f"{err_name(err)}: {err}"
        rec["names_path"] = db_dir in str(err) or os.path.join(db_dir, "env") in str(err)
        if not isinstance(err, StateError):
            report["failures"].append(f"spill {j}: the full disk surfaced as {err_name(err)}, not StateError: {err}")
        # In-memory (and already flushed) state stays readable.
        bad = 0
        for k, v in model.items():
            try:
                kb.set_current_key(k)
                if st.value() != v:
                    bad += 1
            except BaseException as e:  # noqa: BLE001
                report["failures"].append(f"spill {j}: reading key {k} after the error raised {err_name(e)}: {e}")
                break
        rec["unreadable"] = bad
        if bad:
            report["failures"].append(f"spill {j}: {bad} of {len(model)} values wrong after the spill error")
        # The failing write's value is indeterminate (the error reports an earlier background flush).
        kb.set_current_key(failed_key)
        got = st.value()
        rec["failed_write_applied"] = got is not None
        want = dict(model)
        if got is not None:
            want[failed_key] = got
        try:
            kb.checkpoint(1)
            rec["chk_full"] = "ok"
        except BaseException as e:  # noqa: BLE001
            rec["chk_full"] = f"{err_name(e)}: {str(e)[:160]}"
            if not isinstance(e, sc.CheckpointError):
                report["failures"].append(f"spill {j}: checkpoint on the full disk raised {err_name(e)}: {e}")
        _free(mnt)
        c = kb.checkpoint(2)
        if restore_dump(c.location) != want:
            report["failures"].append(f"spill {j}: checkpoint after freeing space does not restore to the model")
        rec["chk_after_free"] = "ok"
        try:
            kb.set_current_key(10 ** 7)
            st.update("after")
            kb.flush()
            rec["writes_after_free"] = "ok"
        except BaseException as e:  # noqa: BLE001
            rec["writes_after_free"] = f"{err_name(e)}: {str(e)[:120]}"
            report["failures"].append(f"spill {j}: flush errors are not sticky, yet a write + flush() after "
                                      f"freeing space raised {err_name(e)}: {e}")
        # nothing buffered was dropped by the failed flushes
        want[10 ** 7] = "after"
        got = {}
        for k in want:
            kb.set_current_key(k)
            got[k] = st.value()
        if got != want:
            report["failures"].append(f"spill {j}: after freeing space and flushing, "
                                      f"{sum(got[k] != v for k, v in want.items())} values are wrong")
    except BaseException as e:  # noqa: BLE001
        report["failures"].append(f"spill {j}: {err_name(e)}: {e}\n{traceback.format_exc()}")
    finally:
        _free(mnt)
        kb.close()
        shutil.rmtree(root, ignore_errors=True)
        report["spills"].append(rec)


def tmpfs_child(mnt, out_path, points):
    import statecore as sc
    report = {"failures": [], "points": [], "spills": []}
    # size one checkpoint of the sweep's state (step 1): the free levels span it
    probe = os.path.join(mnt, "probe")
    kb = make_backend("hashmap", probe).create_keyed_state_backend(max_parallelism=128)
    st = kb.get_state(sc.ValueStateDescriptor("v"))
    apply(kb, st, {}, model_at(0, 1))
    c = kb.checkpoint(1)
    size = sum(f["length"] for f in c.metadata["files"]) + 8192
    kb.close()
    shutil.rmtree(probe)
    report["checkpoint_bytes"] = size
    for i in range(points):
        leave = (size + 3 * 4096) * i // max(1, points - 1)
        tmpfs_checkpoint_point(mnt, i, leave, report)
    for j, leave in enumerate([0, 256 << 10, 2 * MIB]):
        tmpfs_spill(mnt, j, leave, report)
    with open(out_path, "w") as f:
        json.dump(report, f)


# ----------------------------------------------------------------------------- (b) strace child

def strace_child(kind, root, seed, out_path):
    """4 checkpoints of a deterministic stream; outcomes written with writev (never 'write')."""
    import statecore as sc
    # strace counts injections per syscall and per THREAD: move this (main) thread's write and fsync
    # counters past every injection point, so only the checkpoint thread can be hit.
    fd = os.open(os.devnull, os.O_WRONLY)
    for _ in range(PAD):
        for call in (os.write, os.writev):
            try:
                call(fd, b"" if call is os.write else [b""])
            except OSError:
                pass  # this padding call was the injection point's victim
    os.close(fd)
    import logging
    results = []
    warnings = []
    # LMDB writes its pages with writev from flush threads (each new thread's counter starts at 1): one write
    # buffer big enough for the whole run means no flush thread, so only the checkpoint thread is hit
    lmdb_buffer = 64 * MIB

    class Keep(logging.Handler):
        def emit(self, record):
            warnings.append(record.getMessage())

    logging.getLogger("statecore.checkpoint").addHandler(Keep(logging.WARNING))
    backend = make_backend(kind, root, write_buffer_size=lmdb_buffer)
    kb = backend.create_keyed_state_backend(max_parallelism=128)
    st = kb.get_state(sc.ValueStateDescriptor("v"))
    prev = {}
    for cid in range(1, CHECKPOINTS + 1):
        m = model_at(seed, cid)
        apply(kb, st, prev, m)
        prev = m
        try:
            if cid % 2:
                kb.checkpoint(cid)
            else:
                kb.checkpoint_async(cid).result(60)
            results.append({"id": cid, "ok": True})
            retention = [w for w in warnings if "deleting older checkpoints failed" in w]
            if retention:  # committed; only the deletion of an older checkpoint failed (logged, as Flink does)
                results[-1]["retention_warning"] = retention[-1][:300]
            warnings.clear()
        except BaseException as e:  # noqa: BLE001
            results.append({"id": cid, "ok": False, "type": err_name(e), "error": str(e)[:300],
                            "is_checkpoint_error": isinstance(e, sc.CheckpointError)})
    kb.close()
    fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.writev(fd, [json.dumps(results).encode()])
    os.close(fd)


def strace_cmd(log, inject=None):
    cmd = ["strace", "-f", "-qq", "--seccomp-bpf", "-e", "trace=write,writev,fsync,openat,unlink,unlinkat,rmdir",
           "-o", log]
    if inject:
        cmd += ["-e", f"inject={inject}"]
    return cmd + [sys.executable, os.path.abspath(__file__)]


def ckpt_thread_calls(log):
    """(tids, [(tid, syscall, injected, in_retention)]) of the checkpoint thread's write/writev/fsync calls (in
    order) from an strace log.  ``in_retention``: the call belongs to the deletion of an older checkpoint after
    the new one was committed (it follows the unlink of an older ``_metadata``, an ``unlinkat`` or a ``rmdir``,
    and precedes the next data write)."""
    with open(log) as f:
        lines = f.read().splitlines()
    tids = set()
    for ln in lines:
        m = re.match(r"(\d+)\s+openat\(.*/chk-\d+", ln)  # not the reclaim thread's /.deleting-chk-* folders
        if m:
            tids.add(m.group(1))
    calls = []
    retention = False
    for ln in lines:
        m = re.match(r"(\d+)\s+(\w+)\(", ln)
        if not m or m.group(1) not in tids:
            continue
        call = m.group(2)
        if call in ("unlinkat", "rmdir") or (call == "unlink" and re.search(r'/_metadata"', ln)):
            retention = True
        elif call in ("write", "writev"):
            retention = False  # the next checkpoint's data
        if call in ("write", "writev", "fsync"):
            calls.append((m.group(1), call, "INJECTED" in ln, retention))
    return tids, calls


# ----------------------------------------------------------------------------- tests

def _env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join([p for p in sys.path if p]))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_tmpfs_enospc_checkpoints_and_spill(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    out = tmp_path / "report.json"
    script = (f"mount -t tmpfs -o size=64m statecore-t8 {mnt} || exit 77; "
              f"exec {sys.executable} {os.path.abspath(__file__)} tmpfs-child {mnt} {out} {TMPFS_POINTS}")
    try:
        proc = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                              capture_output=True, text=True, timeout=540, env=_env())
    except FileNotFoundError:
        pytest.skip("unshare (util-linux) is not installed")
    if proc.returncode == 77 or (proc.returncode != 0 and ("Operation not permitted" in proc.stderr
                                                           or "permission denied" in proc.stderr.lower())):
        pytest.skip(f"cannot mount a private tmpfs here (needs CAP_SYS_ADMIN): {proc.stderr.strip()[:200]}")
    assert proc.returncode != -signal.SIGBUS, "the child died of SIGBUS"
    assert proc.returncode == 0, f"child exit {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    report = json.loads(out.read_text())
    outcomes = {}
    for p in report["points"]:
        key = "ok" if p.get("chk2") == "ok" else ("ENOSPC" if "Errno 28" in p.get("chk2", "") else
                                                   p.get("chk2", "missing"))
        outcomes[key] = outcomes.get(key, 0) + 1
    print(f"\nT8 tmpfs: {len(report['points'])} free-space levels over a {report['checkpoint_bytes']} B checkpoint: "
          f"checkpoint 2 outcomes {outcomes}; spills:")
    for s in report["spills"]:
        print(f"  leave {s.get('leave')} B: {s.get('written_before_error')} writes before "
              f"{s.get('error', '')[:150]!r}; names path: {s.get('names_path')}; unreadable {s.get('unreadable')}; "
              f"failing write applied: {s.get('failed_write_applied')}; checkpoint on full disk: "
              f"{s.get('chk_full', '')[:80]!r}; after free: {s.get('chk_after_free')}; "
              f"writes after free: {s.get('writes_after_free', '')[:100]!r}")
    assert not report["failures"], "\n".join(report["failures"][:10])
    assert len(report["points"]) == TMPFS_POINTS and len(report["spills"]) == 3
    # the sweep really hit ENOSPC (and also succeeded where there was room)
    assert outcomes.get("ENOSPC", 0) >= TMPFS_POINTS // 3 and outcomes.get("ok", 0) >= 1, outcomes


def _strace_sweep(tmp_path, env, points):
    """Dry runs + one child per injection point; returns (report dict, list of failure strings)."""
    failures, runs = [], []
    dry = {}
    for kind in ("hashmap", "lmdb"):
        root = tmp_path / f"dry-{kind}"
        log = str(tmp_path / f"dry-{kind}.strace")
        out = root / "out.json"
        root.mkdir()
        proc = subprocess.run(strace_cmd(log) + ["strace-child", kind, str(root), "7", str(out)],
                              capture_output=True, text=True, timeout=120, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        res = json.loads(out.read_text())
        assert all(r["ok"] for r in res), res
        tids, calls = ckpt_thread_calls(log)
        assert len(tids) == 1, f"expected one checkpoint thread, saw {tids}"
        dry[kind] = [c[1] for c in calls]
    plan = []
    for kind, calls in dry.items():
        for syscall in ("write", "writev", "fsync"):
            n = sum(1 for c in calls if c == syscall)
            for i in range(1, n + 1):
                plan.append((kind, syscall, i))
    rng = random.Random(5)
    if len(plan) > points:
        # keep every write point (few), sample the fsync points
        writes = [p for p in plan if p[1] != "fsync"]
        rest = [p for p in plan if p[1] == "fsync"]
        plan = writes + sorted(rng.sample(rest, max(0, points - len(writes))))
    for idx, (kind, syscall, n) in enumerate(plan):
        err = "EIO" if syscall == "fsync" else "ENOSPC"
        root = tmp_path / f"run{idx}"
        root.mkdir()
        log = str(tmp_path / f"run{idx}.strace")
        out = root / "out.json"
        proc = subprocess.run(strace_cmd(log, f"{syscall}:error={err}:when={n}") +
                              ["strace-child", kind, str(root), "7", str(out)],
                              capture_output=True, text=True, timeout=120, env=env)
        where = f"{kind} {syscall}#{n} {err}"
        if proc.returncode == -signal.SIGBUS:
            failures.append(f"{where}: SIGBUS")
            continue
        if proc.returncode != 0 or not out.exists():
            failures.append(f"{where}: child exit {proc.returncode}: {proc.stderr[-1500:]}")
            continue
        results = json.loads(out.read_text())
        _, calls = ckpt_thread_calls(log)
        injected = sum(1 for c in calls if c[2])
        in_retention = any(c[2] and c[3] for c in calls)
        failed = [r for r in results if not r["ok"]]
        logged = [r for r in results if r.get("retention_warning")]
        run = {"where": where, "injected": injected, "failed": [(r["id"], r["error"][:100]) for r in failed],
               "in_retention": in_retention, "logged": len(logged)}
        runs.append(run)
        if injected != 1:
            failures.append(f"{where}: {injected} faults injected into the checkpoint thread (expected 1)")
        if injected and not failed and not (in_retention and logged):
            # a fault while deleting an older checkpoint after the commit is logged, not raised (Flink's
            # CheckpointsCleaner does the same): the completed checkpoint must not be reported lost
            failures.append(f"{where}: the injected {err} was not detected: every checkpoint reported success"
                            + (" (in retention, but nothing was logged)" if in_retention else ""))
        for r in failed:
            if not r["is_checkpoint_error"]:
                failures.append(f"{where}: checkpoint {r['id']} raised {r['type']} (not CheckpointError): {r['error']}")
        if len(failed) > 1:
            failures.append(f"{where}: a single fault failed {len(failed)} checkpoints: {run['failed']}")
        # storage verdicts: committed folders restore exactly to their model; failed ids are not committed
        import statecore as sc
        storage = sc.FileSystemCheckpointStorage(str(root / "ckpt"))
        verdicts = folder_verdicts(storage)
        for cid, (loc, listed, verr) in verdicts.items():
            if listed and verr:
                failures.append(f"{where}: committed folder {loc} is rejected: {verr}")
            elif listed and restore_dump(loc) != model_at(7, cid):
                failures.append(f"{where}: committed checkpoint {cid} does not restore to its model")
        for r in failed:
            retention = "cannot delete checkpoint" in r["error"]
            if verdicts.get(r["id"], (None, False, None))[1] and not retention:
                failures.append(f"{where}: failed checkpoint {r['id']} is committed: {r['error']}")
            run.setdefault("retention_failures", 0)
            run["retention_failures"] += retention
        newest_ok = max([r["id"] for r in results if r["ok"]], default=None)
        if newest_ok is None or not verdicts.get(newest_ok, (None, False))[1]:
            failures.append(f"{where}: the newest successful checkpoint {newest_ok} is not committed")
        if results[-1]["ok"] is False and failed and failed[0]["id"] == CHECKPOINTS:
            pass  # the fault hit the last checkpoint: nothing after it to show recovery
        elif failed and not all(r["ok"] for r in results if r["id"] > failed[0]["id"]):
            failures.append(f"{where}: checkpoints after the single fault did not all succeed")
        shutil.rmtree(root, ignore_errors=True)
    return {"plan": plan, "runs": runs, "dry": dry}, failures


def _need_strace(tmp_path):
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed")
    probe = subprocess.run(["strace", "-f", "-qq", "--seccomp-bpf", "-e", "trace=none", sys.executable, "-c", "0"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"strace cannot trace here: {probe.stderr.strip()[:200]}")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_strace_enospc_and_fsync_eio_fail_that_checkpoint_only(tmp_path):
    _need_strace(tmp_path)
    report, failures = _strace_sweep(tmp_path, _env(), STRACE_POINTS)
    runs = report["runs"]
    retention = sum(r.get("retention_failures", 0) for r in runs)
    print(f"\nT8 strace: checkpoint-thread calls per 4 checkpoints (dry run): "
          f"{ {k: {s: v.count(s) for s in ('write', 'writev', 'fsync')} for k, v in report['dry'].items()} }; "
          f"{len(runs)} injection runs ({sum(1 for p in report['plan'] if p[1] != 'fsync')} write/writev ENOSPC, "
          f"{sum(1 for p in report['plan'] if p[1] == 'fsync')} fsync EIO), "
          f"{sum(r['injected'] for r in runs)} faults injected, "
          f"{sum(1 for r in runs if r['failed'])} runs with a failed checkpoint "
          f"({retention} of them failed in retention after the commit), "
          f"{sum(1 for r in runs if r['logged'] and not r['failed'])} retention faults logged after the commit")
    assert not failures, "\n".join(failures[:15])
    assert len(runs) >= min(STRACE_POINTS, len(report["plan"])) and len(runs) >= 20


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_negative_control_skip_fsync_is_caught(tmp_path):
    """Planted bug STATECORE_DEBUG_SKIP_FSYNC=1: the fsync EIO faults can no longer be detected."""
    _need_strace(tmp_path)
    env = dict(_env(), STATECORE_DEBUG_SKIP_FSYNC="1")
    # the dry run itself still works (there are just no fsync calls); inject the fsyncs of a normal run
    root = tmp_path / "neg"
    root.mkdir()
    log = str(tmp_path / "neg.strace")
    out = root / "out.json"
    proc = subprocess.run(strace_cmd(log, "fsync:error=EIO:when=2") + ["strace-child", "hashmap", str(root), "7",
                                                                      str(out)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(out.read_text())
    _, calls = ckpt_thread_calls(log)
    injected = sum(1 for c in calls if c[2])
    # The harness's checks for this run: exactly one injected fault and a failed checkpoint.
    caught = injected != 1 or all(r["ok"] for r in results)
    print(f"\nnegative control (skip fsync): {injected} faults injected, outcomes "
          f"{[r['ok'] for r in results]} -> harness reports a failure: {caught}")
    assert caught


def _data_mdb(root):
    """The LMDB data file of make_backend("lmdb", root)'s keyed backend (strace -P filters on it)."""
    return os.path.join(root, "db", "job-operator-kg0-127", "env", "data.mdb")


def _strace_spill_run(tmp_path, mode, when=None):
    """Run ``mode`` (strace-spill) with every (or the ``when``-th) LMDB page write failing with ENOSPC.  LMDB 0.9 writes a commit's pages with writev/pwritev and its meta page with pwrite64; only the
    page writes fail (as on a full disk, where the preallocated meta pages are still writable), and only on
    data.mdb (-P), so the report file and everything else are unaffected."""
    _need_strace(tmp_path)
    root, out = tmp_path / "r", tmp_path / f"{mode}.json"
    inject = "writev,pwritev:error=ENOSPC" + (f":when={when}" if when else "")
    proc = subprocess.run(["strace", "-f", "-qq", "--seccomp-bpf", "-P", _data_mdb(str(root)),
                           "-e", "trace=pwrite64,pwritev,writev", "-e", f"inject={inject}",
                           "-o", str(tmp_path / f"{mode}.strace"),
                           sys.executable, os.path.abspath(__file__), mode, str(root), str(out)],
                          capture_output=True, text=True, timeout=100, env=_env())
    assert proc.returncode != -signal.SIGBUS, "the child died of SIGBUS"
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(tmp_path / f"{mode}.strace") as f:
        injected = sum("INJECTED" in ln for ln in f)
    return json.loads(out.read_text()), injected


@pytest.mark.timeout(120)
def test_spill_error_names_the_path(tmp_path):
    """Quick strace variant of the spill: every LMDB data-page write fails with ENOSPC."""
    res, injected = _strace_spill_run(tmp_path, "strace-spill")
    print(f"\nspill under strace ENOSPC ({injected} writes failed): {res}")
    assert injected >= 1, "no LMDB page write was hit: the injection does not reach the flush any more"
    assert res["is_state_error"] and res["readable"], res
    assert res["names_path"], res["error"]
    assert "free disk space" in res["error"], res["error"]


@pytest.mark.timeout(180)
def test_spill_error_is_not_sticky_after_space_is_freed(tmp_path):
    """Real ENOSPC on a private tmpfs (mechanism (a)): an LMDB tier (values + list appends) writes until a flush
    hits the full disk, keeps writing (refused writes raise and are not applied), the filler is deleted, and
    the next flush() succeeds: nothing written is lost, later writes work, a checkpoint restores to the model.
    (strace cannot model "space returns": its injection counters are per thread, and each retry of a failed
    flush runs on a new flush thread.)"""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    out = tmp_path / "recover.json"
    script = (f"mount -t tmpfs -o size=16m statecore-t8r {mnt} || exit 77; "
              f"exec {sys.executable} {os.path.abspath(__file__)} tmpfs-recover {mnt} {out}")
    try:
        proc = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                              capture_output=True, text=True, timeout=150, env=_env())
    except FileNotFoundError:
        pytest.skip("unshare (util-linux) is not installed")
    if proc.returncode == 77 or (proc.returncode != 0 and ("Operation not permitted" in proc.stderr
                                                           or "permission denied" in proc.stderr.lower())):
        pytest.skip(f"cannot mount a private tmpfs here (needs CAP_SYS_ADMIN): {proc.stderr.strip()[:200]}")
    assert proc.returncode != -signal.SIGBUS, "the child died of SIGBUS"
    assert proc.returncode == 0, f"child exit {proc.returncode}:\n{proc.stderr[-4000:]}"
    runs = json.loads(out.read_text())
    for res in runs:
        print(f"\nleave {res['leave']} B: {res['written']} writes, then {res.get('error', '')[:160]!r}; "
              f"{res['refused']} refused; reads during the failure ok: {res['readable_while_full']}; "
              f"flush() errors before freeing: {res['flush_errors_full']}; after freeing: {res.get('flushed')}; "
              f"metrics {res.get('metrics')}")
    for res in runs:
        assert not res.get("failures"), res["failures"]
        assert res["is_state_error"] and res["names_path"], res
        assert res["readable_while_full"] and res["flush_errors_full"] >= 1, res
        assert res["flushed"] and res["wrong_after_recovery"] == 0 and res["checkpoint_matches"], res
        assert res["metrics"]["flush_failures"] >= 1 and res["metrics"]["immutable_buffers"] == 0, res


def strace_spill(root, out_path):
    import statecore as sc
    backend = make_backend("lmdb", root)
    kb = backend.create_keyed_state_backend(max_parallelism=128)
    st = kb.get_state(sc.ValueStateDescriptor("v"))
    res = {}
    model = {}
    for k in range(100000):
        try:
            kb.set_current_key(k)
            st.update("q" * 200)
        except BaseException as e:  # noqa: BLE001
            res.update(error=f"{err_name(e)}: {e}", is_state_error=isinstance(e, sc.StateError),
                       names_path=kb.db_dir in str(e))
            break
        model[k] = "q" * 200
    ok = 0
    for k, v in model.items():
        kb.set_current_key(k)
        ok += st.value() == v
    res["readable"] = ok == len(model)
    res["written"] = len(model)
    kb.close()
    fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.writev(fd, [json.dumps(res).encode()])
    os.close(fd)


def tmpfs_recover(mnt, leave):
    """Write (values + list appends) until the full disk surfaces, keep writing (refused writes are not
    applied), flush() on the full disk (raises), free the space, flush() (succeeds); check every value, write
    more, checkpoint and restore."""
    import statecore as sc
    root = os.path.join(mnt, f"rec{leave}")
    os.makedirs(root)
    backend = make_backend("lmdb", root)
    kb = backend.create_keyed_state_backend(max_parallelism=128)
    st = kb.get_state(sc.ValueStateDescriptor("v"))
    lst = kb.get_state(sc.ListStateDescriptor("l"))
    res = {"leave": leave, "flush_errors_full": 0, "failures": []}
    model, lmodel = {}, {}

    def write(k):
        v = f"{k}:" + "q" * 300
        kb.set_current_key(k)
        st.update(v)
        model[k] = v
        kb.set_current_key(-(k % 97))
        lst.add(k)  # append-deltas: a retried flush must not write one twice
        lmodel.setdefault(-(k % 97), []).append(k)

    def check():
        bad = 0
        for key, v in model.items():
            kb.set_current_key(key)
            bad += st.value() != v
        for key, v in lmodel.items():
            kb.set_current_key(key)
            bad += lst.get() != v
        return bad

    try:
        res["free"] = _fill(mnt, leave)
        k, refused = 0, 0
        while k < 200000 and refused < 5:
            try:
                write(k)  # a refused update or add raises before it is applied (the model records neither)
            except sc.StateError as e:
                if "error" not in res:
                    res.update(error=f"{err_name(e)}: {e}", is_state_error=True, names_path=kb.db_dir in str(e))
                refused += 1
            k += 1
        res["written"], res["refused"] = len(model), refused
        res["readable_while_full"] = check() == 0
        for _ in range(2):
            try:
                kb.flush()
            except sc.StateError:
                res["flush_errors_full"] += 1
        _free(mnt)
        res["flushed"] = False
        try:
            kb.flush()
            res["flushed"] = True
        except sc.StateError as e:
            res["failures"].append(f"flush() after freeing space raised {e}")
        for j in range(k, k + 3000):
            write(j)
        kb.flush()
        res["wrong_after_recovery"] = check()
        c = kb.checkpoint(1)
        res["checkpoint_matches"] = restore_dump(c.location) == model
        res["metrics"] = {m: kb.metrics()[m] for m in ("flush_failures", "flush_retries", "immutable_buffers")}
    except BaseException as e:  # noqa: BLE001
        res["failures"].append(f"{err_name(e)}: {e}\n{traceback.format_exc()}")
    finally:
        _free(mnt)
        kb.close()
        shutil.rmtree(root, ignore_errors=True)
    return res


def tmpfs_recover_child(mnt, out_path):
    with open(out_path, "w") as f:
        json.dump([tmpfs_recover(mnt, leave) for leave in (0, 256 << 10)], f)


def _main(argv):
    mode = argv[0]
    if mode == "tmpfs-child":
        tmpfs_child(argv[1], argv[2], int(argv[3]))
    elif mode == "strace-child":
        os.makedirs(argv[2], exist_ok=True)
        strace_child(argv[1], argv[2], int(argv[3]), argv[4])
    elif mode == "strace-spill":
        os.makedirs(argv[1], exist_ok=True)
        strace_spill(argv[1], argv[2])
    elif mode == "tmpfs-recover":
        tmpfs_recover_child(argv[1], argv[2])
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    _main(sys.argv[1:])
