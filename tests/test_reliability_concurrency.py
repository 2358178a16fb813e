"""Concurrency, fork and reader slots (RELIABILITY.md T10).

(a) One processing thread makes many updates (Value/List/Map state, Auto values that are lists and
    dicts) with ~50 ``checkpoint_async`` calls at random points; every checkpoint must restore to the
    model copied when its call returned, although the test then mutates the lists/dicts it passed in
    and the ones it read back (Flink's CopyOnWriteStateMap lesson).  Negative control: comparing each
    checkpoint with the model of the NEXT call must find a mismatch (the oracle can fail).
(b) ``close()`` with futures pending (the first write held 1 s by an I/O hook, two more queued): close
    returns at once and every future completes or fails (BackendClosedError / cancellation) within 5 s.
(c) 64 threads, each with its own LMDB keyed backend with only ``max_readers=4`` reader slots, write,
    flush, read and checkpoint in rounds: a leaked reader slot would surface as ReadersFullError.
    Negative control: a thread that leaks raw read transactions on its environment must hit it.
(d) ``os.fork()``: using an LMDB-tier backend in the child raises StateError naming fork, closing it
    there does not touch the parent's environment, the parent keeps working (reads, writes, a
    checkpoint that restores); a ``spawn`` child creates its own backend and checkpoints.
(e) A process holding the db_path with read transactions open is killed with SIGKILL; reopening the
    same db_path works (the directory is wiped and rebuilt), 10 times in a row with max_readers=4, and
    the killed process's last checkpoint restores.

All under pytest-timeout, so a deadlock fails the test instead of hanging CI.
"""
import copy
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest

import statecore as sc
from statecore import BackendClosedError, StateError
from statecore.checkpoint import storage as stg

SOAK = os.environ.get("STATECORE_SOAK") == "1"
SEEDS = 20 if SOAK else 2
UPDATES = 200_000 if SOAK else 40_000
CHECKPOINTS = 50
KEYS = 500


def make_backend(kind, root, **kw):
    storage = sc.FileSystemCheckpointStorage(os.path.join(root, "ckpt"))
    if kind == "lmdb":
        b = sc.LMDBStateBackend(db_path=os.path.join(root, "db"), write_buffer_size=64 << 10,
                                checkpoint_storage=storage, **kw)
    else:
        b = sc.HashMapStateBackend(checkpoint_storage=storage)
    b.num_retained = 100
    return b


DESCS = lambda: (sc.ValueStateDescriptor("v"), sc.ListStateDescriptor("l"), sc.MapStateDescriptor("m"))  # noqa: E731


def dump(kb):
    v, lst, m = (kb.get_state(d) for d in DESCS())
    out = {}
    for name, st in (("v", v), ("l", lst), ("m", m)):
        for k in kb.get_keys(name):
            kb.set_current_key(k)
            val = st.value() if name == "v" else (st.get() if name == "l" else dict(st.items()))
            if val not in (None, [], {}):
                out[(name, k)] = val
    return out


# ----------------------------------------------------------------------------- (a)

def run_async_cut(kind, root, seed):
    rng = random.Random(seed)
    backend = make_backend(kind, root)
    kb = backend.create_keyed_state_backend(max_parallelism=128)
    v, lst, m = (kb.get_state(d) for d in DESCS())
    model = {}
    at = sorted(rng.sample(range(1, UPDATES), CHECKPOINTS))
    pending = []
    live_objects = []   # objects passed in / read back: mutated after each checkpoint call
    j = 0
    for i in range(UPDATES):
        k = rng.randrange(KEYS)
        kb.set_current_key(k)
        op = rng.random()
        if op < 0.35:
            val = [i, {"k": k, "i": i}]
            v.update(val)
            model[("v", k)] = copy.deepcopy(val)
            live_objects.append(val)
        elif op < 0.55:
            got = v.value()
            if got is not None:
                live_objects.append(got)
        elif op < 0.75:
            item = {"i": i}
            lst.add(item)
            model.setdefault(("l", k), []).append(copy.deepcopy(item))
            live_objects.append(item)
        elif op < 0.8:
            got = lst.get()
            if got:
                live_objects.append(got)
        elif op < 0.95:
            uk = rng.randrange(20)
            val = [uk, i]
            m.put(uk, val)
            model.setdefault(("m", k), {})[uk] = copy.deepcopy(val)
            live_objects.append(val)
        elif op < 0.98:
            v.clear()
            model.pop(("v", k), None)
        else:
            lst.clear()
            model.pop(("l", k), None)
        while j < len(at) and at[j] == i:
            j += 1
            fut = kb.checkpoint_async(j)
            pending.append((j, fut, copy.deepcopy(model)))
            for obj in live_objects:  # after the call returned: must not leak into the checkpoint
                if isinstance(obj, list):
                    obj.append("MUTATED")
                elif isinstance(obj, dict):
                    obj["MUTATED"] = True
            live_objects = []
    results = []
    for cid, fut, snap in pending:
        completed = fut.result(timeout=60)
        rkb = sc.HashMapStateBackend().restore_keyed_state_backend([completed], max_parallelism=128)
        try:
            results.append((cid, dump(rkb), snap))
        finally:
            rkb.close()
    kb.close()
    return results


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("kind", ["hashmap", "lmdb"])
def test_async_checkpoints_equal_the_model_at_the_call(tmp_path, kind):
    mismatches, total, shifted_mismatch = 0, 0, 0
    for seed in range(SEEDS):
        results = run_async_cut(kind, str(tmp_path / f"s{seed}"), seed)
        for n, (cid, got, want) in enumerate(results):
            total += 1
            if got != want:
                mismatches += 1
                diff = [k for k in set(got) | set(want) if got.get(k) != want.get(k)][:3]
                print(f"seed {seed} checkpoint {cid}: differs at {[(k, got.get(k), want.get(k)) for k in diff]}")
            # negative control: the oracle must tell neighbouring cuts apart
            if n + 1 < len(results) and got != results[n + 1][2]:
                shifted_mismatch += 1
    print(f"\nT10a {kind}: {SEEDS} seeds x {UPDATES} updates, {total} checkpoint_async cuts restored, "
          f"{mismatches} mismatches; negative control (model of the next call): "
          f"{shifted_mismatch}/{total - SEEDS} detected")
    assert total == SEEDS * CHECKPOINTS
    assert mismatches == 0
    assert shifted_mismatch == total - SEEDS


# ----------------------------------------------------------------------------- (b)

@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["hashmap", "lmdb"])
def test_close_with_pending_futures_never_hangs(tmp_path, kind):
    backend = make_backend(kind, str(tmp_path))
    kb = backend.create_keyed_state_backend(max_parallelism=128)
    v = kb.get_state(sc.ValueStateDescriptor("v"))
    for k in range(2000):
        kb.set_current_key(k)
        v.update(k)
    held = threading.Event()

    def hook(event, path):
        if event == "write" and "chk-1-" in path and not held.is_set():
            held.set()
            time.sleep(1.0)  # a slow storage write while close() runs

    previous = stg.set_io_hook(hook)
    try:
        futs = [kb.checkpoint_async(1)]
        assert held.wait(10)
        futs += [kb.checkpoint_async(2), kb.checkpoint_async(3)]
        t0 = time.monotonic()
        kb.close()
        close_s = time.monotonic() - t0
        outcomes = []
        for f in futs:
            try:
                c = f.result(timeout=5)  # never hangs: completes or fails within 5 s
                outcomes.append("ok")
                rkb = sc.HashMapStateBackend().restore_keyed_state_backend([c], max_parallelism=128)
                rv = rkb.get_state(sc.ValueStateDescriptor("v"))
                rkb.set_current_key(1999)
                assert rv.value() == 1999
                rkb.close()
            except (BackendClosedError, __import__("concurrent.futures").futures.CancelledError) as e:
                outcomes.append(type(e).__name__)
        done_s = time.monotonic() - t0
    finally:
        stg.set_io_hook(previous)
    print(f"\nT10b {kind}: close() took {close_s:.3f} s, all 3 futures resolved after {done_s:.2f} s: {outcomes}")
    assert close_s < 5 and done_s < 5
    with pytest.raises(BackendClosedError):
        kb.set_current_key(1)


# ----------------------------------------------------------------------------- (c)

def reader_worker(i, root, rounds, errors, stats, leak=False):
    try:
        backend = make_backend("lmdb", root, max_readers=4, map_size=1 << 20)
        backend.num_retained = 1
        kb = backend.create_keyed_state_backend(max_parallelism=128, operator_id=f"op{i}")
        v = kb.get_state(sc.ValueStateDescriptor("v"))
        leaked = []
        try:
            rng = random.Random(i)
            model = {}
            for r in range(rounds):
                for _ in range(50):
                    k = rng.randrange(300)
                    kb.set_current_key(k)
                    v.update((r, k))
                    model[k] = (r, k)
                if r % 3 == 0:
                    kb.flush()
                for k in rng.sample(sorted(model), min(20, len(model))):
                    kb.set_current_key(k)
                    if v.value() != model[k]:
                        errors.append(f"thread {i}: key {k} wrong")
                if r % 5 == 0:
                    fut = kb.checkpoint_async(r)
                    for k in list(model)[:10]:  # reads while the checkpoint runs
                        kb.set_current_key(k)
                        v.value()
                    fut.result(30)
                    stats["checkpoints"] += 1
                if leak and r >= 2:
                    leaked.append(kb._store.env.begin())  # PLANTED: a read transaction never ended
                stats["reads"] += 20
        finally:
            for t in leaked:
                t.abort()
            kb.close()
    except BaseException as e:  # noqa: BLE001
        errors.append(f"thread {i}: {type(e).__module__}.{type(e).__name__}: {e}")


def run_readers(root, threads, rounds, leak_thread=None):
    errors, stats = [], {"reads": 0, "checkpoints": 0}
    ts = [threading.Thread(target=reader_worker, args=(i, root, rounds, errors, stats, i == leak_thread))
          for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    return errors, stats, any(t.is_alive() for t in ts)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_many_threads_own_backends_no_readers_full(tmp_path):
    threads = 128 if SOAK else 64
    errors, stats, hung = run_readers(str(tmp_path), threads, 20)
    print(f"\nT10c: {threads} threads x own LMDB backend (max_readers=4): {stats['reads']} reads, "
          f"{stats['checkpoints']} checkpoint_async while reading, errors {len(errors)}")
    assert not hung
    assert not errors, errors[:5]
    assert not any("ReadersFull" in e for e in errors)


@pytest.mark.timeout(120)
def test_negative_control_leaked_read_txns_hit_readers_full(tmp_path):
    errors, stats, hung = run_readers(str(tmp_path), 4, 12, leak_thread=0)
    print(f"\nnegative control (planted read-txn leak in thread 0): {errors[:1]}")
    assert not hung
    assert any("ReadersFull" in e for e in errors), errors


# ----------------------------------------------------------------------------- (d)

@pytest.mark.timeout(120)
def test_fork_child_gets_state_error_parent_unaffected(tmp_path):
    backend = make_backend("lmdb", str(tmp_path))
    kb = backend.create_keyed_state_backend(max_parallelism=128)
    v = kb.get_state(sc.ValueStateDescriptor("v"))
    for k in range(5000):
        kb.set_current_key(k)
        v.update(k * 2)
    kb.flush()
    kb.set_current_key(7)
    assert v.value() == 14  # the parent holds a read transaction across the fork
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report through the pipe, never return into pytest
        code = 1
        try:
            os.close(r)
            msg = "no error"
            try:
                kb.set_current_key(8)
                v.value()
            except StateError as e:
                msg = str(e)
            kb.close()  # must not close the parent's environment
            os.write(w, msg.encode()[:4000])
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        child_msg = f.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    print(f"\nT10d child error: {child_msg[:200]}")
    assert "fork" in child_msg.lower(), child_msg
    # parent unaffected: reads, writes, flush, checkpoint
    for k in range(0, 5000, 97):
        kb.set_current_key(k)
        assert v.value() == k * 2
    for k in range(5000, 6000):
        kb.set_current_key(k)
        v.update(k * 2)
    kb.flush()
    c = kb.checkpoint(1)
    kb.close()
    rkb = backend.restore_keyed_state_backend([c], max_parallelism=128)
    rv = rkb.get_state(sc.ValueStateDescriptor("v"))
    assert sorted(rkb.get_keys("v")) == list(range(6000))
    rkb.set_current_key(5999)
    assert rv.value() == 11998
    rkb.close()


def spawn_child(root, q):
    import statecore as sc2
    b = sc2.LMDBStateBackend(db_path=os.path.join(root, "db"),
                             checkpoint_storage=sc2.FileSystemCheckpointStorage(os.path.join(root, "ckpt")))
    kb = b.create_keyed_state_backend(max_parallelism=128)
    v = kb.get_state(sc2.ValueStateDescriptor("v"))
    for k in range(1000):
        kb.set_current_key(k)
        v.update(-k)
    kb.flush()
    q.put(kb.checkpoint(1).location)
    kb.close()


@pytest.mark.timeout(120)
def test_spawn_child_works(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=spawn_child, args=(str(tmp_path), q))
    p.start()
    location = q.get(timeout=90)
    p.join(30)
    assert p.exitcode == 0
    kb = sc.HashMapStateBackend().restore_keyed_state_backend([location], max_parallelism=128)
    v = kb.get_state(sc.ValueStateDescriptor("v"))
    kb.set_current_key(999)
    assert v.value() == -999 and len(list(kb.get_keys("v"))) == 1000
    kb.close()


# ----------------------------------------------------------------------------- (e)

HOLDER = r"""
import os, sys, time, statecore as sc
root, rnd = sys.argv[1], int(sys.argv[2])
b = sc.LMDBStateBackend(db_path=os.path.join(root, "db"), write_buffer_size=16 << 10, max_readers=4,
                        checkpoint_storage=sc.FileSystemCheckpointStorage(os.path.join(root, "ckpt")))
b.num_retained = 100
kb = b.create_keyed_state_backend(max_parallelism=128)
v = kb.get_state(sc.ValueStateDescriptor("v"))
for k in range(3000):
    kb.set_current_key(k); v.update((rnd, k))
kb.flush()
kb.checkpoint(rnd)
kb.set_current_key(5); v.value()              # the backend's own read transaction is open
extra = [kb._store.env.begin() for _ in range(2)]  # and two more reader slots taken
print("READY", kb.db_dir, flush=True)
time.sleep(600)
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_reopen_after_kill9_with_read_txns_open(tmp_path):
    root = str(tmp_path)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    cycles = 10
    for rnd in range(1, cycles + 1):
        p = subprocess.Popen([sys.executable, "-c", HOLDER, root, str(rnd)], stdout=subprocess.PIPE, text=True,
                             env=env, cwd=root)  # not the source tree: it has no compiled modules when installed
        line = p.stdout.readline()
        assert line.startswith("READY"), (line, p.poll())
        os.kill(p.pid, signal.SIGKILL)
        p.wait(30)
        p.stdout.close()
    # reopen in this process: the stale reader slots of 10 killed holders must not matter
    backend = make_backend("lmdb", root, max_readers=4)
    kb = backend.create_keyed_state_backend(max_parallelism=128)
    v = kb.get_state(sc.ValueStateDescriptor("v"))
    for k in range(100):
        kb.set_current_key(k)
        assert v.value() is None  # scratch: wiped on reopen
        v.update(k)
    kb.flush()
    for k in range(100):
        kb.set_current_key(k)
        assert v.value() == k
    kb.close()
    last = sc.FileSystemCheckpointStorage(os.path.join(root, "ckpt")).list_checkpoints("job", "operator")[-1]
    rkb = backend.restore_keyed_state_backend([last], max_parallelism=128)
    rv = rkb.get_state(sc.ValueStateDescriptor("v"))
    rkb.set_current_key(2999)
    assert rv.value() == (cycles, 2999)
    rkb.close()
    print(f"\nT10e: {cycles} SIGKILLed holders (3 read txns each, max_readers=4), reopen + restore of "
          f"{os.path.basename(last)} ok")
