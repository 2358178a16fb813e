"""Writer child of the kill -9 crash test (tests/test_checkpoint_crash.py), and the op stream it shares.

The op stream and the checkpoint schedule are pure functions of a seed, so the
parent (the oracle) can replay them with a plain dict model and never trusts
anything the child says beyond ``ACK <checkpoint_id> <op_index>``.

    python crash_writer.py '<json config>'

Config keys: ``backend`` (hashmap | lmdb), ``ckpt_dir`` (a local path or an
``s3://`` URI), ``storage_options`` (optional: the fsspec options of ``ckpt_dir``,
e.g. the moto endpoint), ``db_dir``, ``seed``, ``resume_id`` (0 = start empty)
and ``resume_location``, ``num_retained``.

Environment (whitebox kills and power-loss tracking, through
``statecore.checkpoint.storage.set_io_hook`` and, on the LMDB tier, the test-only
``statecore._lmdb._set_crash_hook``):

* ``STATECORE_CRASH_KILL="<event>:<path substring>:<n>"``: SIGKILL this process
  (from the thread that reaches the event) at the n-th event ``<event>`` whose
  path contains the substring.  Storage I/O events: write, written, fsync,
  dirsync, publish, delete (storage.py; object stores emit only write, publish,
  delete).  LMDB flush events (path: the ``db_dir``; armed only after READY, so
  flushes of the restore never count): ``wb.spill`` (a write buffer's flush
  starts, in the flush thread) and ``lmdb.commit`` (right before an LMDB write
  transaction of a flush commits).
* ``STATECORE_CRASH_IOLOG=<file>``: append ``<event>\\t<path>`` for every such
  event (before any kill), so the parent can confirm where the child died and
  emulate a power loss.

Output (stdout, one line each, flushed): ``READY <op_index>`` after start-up,
``BEGIN <id>`` before each checkpoint, ``ACK <id> <op_index>`` after it
returns, ``DONE <op_index>`` when the stream is exhausted.
"""
import json
import os
import random
import signal
import sys
import threading

KEYS = 2000
USER_KEYS = 24
JOB, OPERATOR = "job", "operator"
STREAM_LENGTH = 40_000   # ops per seed; a child that gets this far prints DONE
MIN_GAP, MAX_GAP = 50, 300  # ops between checkpoints


def op_stream(seed):
    """Yield the deterministic ops of ``seed``: (kind, key, arg1, arg2)."""
    rng = random.Random(f"ops-{seed}")
    for _ in range(STREAM_LENGTH):
        r = rng.random()
        key = rng.randrange(KEYS)
        if r < 0.33:
            yield ("v_put", key, rng.randrange(-10**12, 10**12), None)
        elif r < 0.37:
            yield ("v_clear", key, None, None)
        elif r < 0.62:
            yield ("l_add", key, rng.randrange(1000), None)
        elif r < 0.64:
            yield ("l_clear", key, None, None)
        elif r < 0.91:
            yield ("m_put", key, f"u{rng.randrange(USER_KEYS)}", rng.randrange(10**6))
        else:
            yield ("m_remove", key, f"u{rng.randrange(USER_KEYS)}", None)


def checkpoint_ops(seed):
    """op_index (number of ops applied) of checkpoint id 1, 2, ...: list, index = id - 1."""
    rng = random.Random(f"schedule-{seed}")
    out, at = [], 0
    while True:
        at += rng.randint(MIN_GAP, MAX_GAP)
        if at > STREAM_LENGTH:
            return out
        out.append(at)


def apply_model(model, op):
    """The oracle: apply one op to ``model`` = {"v": {}, "l": {}, "m": {}}."""
    kind, key, a, b = op
    if kind == "v_put":
        model["v"][key] = a
    elif kind == "v_clear":
        model["v"].pop(key, None)
    elif kind == "l_add":
        model["l"].setdefault(key, []).append(a)
    elif kind == "l_clear":
        model["l"].pop(key, None)
    elif kind == "m_put":
        model["m"].setdefault(key, {})[a] = b
    elif kind == "m_remove":
        m = model["m"].get(key)
        if m is not None:
            m.pop(a, None)
            if not m:
                del model["m"][key]


def new_model():
    return {"v": {}, "l": {}, "m": {}}


def canonical_model(model):
    """{(state, key): value} with empty lists/maps left out; lists as tuples, maps as sorted tuples."""
    out = {}
    for k, v in model["v"].items():
        out[("v", k)] = v
    for k, v in model["l"].items():
        if v:
            out[("l", k)] = tuple(v)
    for k, v in model["m"].items():
        if v:
            out[("m", k)] = tuple(sorted(v.items()))
    return out


def descriptors():
    import statecore as sc
    return (sc.ValueStateDescriptor("v", sc.Int64()), sc.ListStateDescriptor("l", sc.Int64()),
            sc.MapStateDescriptor("m", sc.Str(), sc.Int64()))


def canonical_backend(kb):
    """The same canonical dump, read from a keyed state backend."""
    dv, dl, dm = descriptors()
    v, lst, m = kb.get_state(dv), kb.get_state(dl), kb.get_state(dm)
    out = {}
    for k in list(kb.get_keys("v")):
        kb.set_current_key(k)
        val = v.value()
        if val is not None:
            out[("v", k)] = val
    for k in list(kb.get_keys("l")):
        kb.set_current_key(k)
        val = lst.get()
        if val:
            out[("l", k)] = tuple(val)
    for k in list(kb.get_keys("m")):
        kb.set_current_key(k)
        items = sorted(m.items())
        if items:
            out[("m", k)] = tuple(items)
    return out


def make_backend(backend, ckpt_dir, db_dir, num_retained, storage_options=None):
    import statecore as sc
    storage = sc.FileSystemCheckpointStorage(ckpt_dir, storage_options=storage_options)
    if backend == "hashmap":
        b = sc.HashMapStateBackend()
        b.checkpoint_storage = storage
    elif backend == "lmdb":
        # A small write buffer: the LMDB tier spills (and commits LMDB transactions) all the time.
        b = sc.LMDBStateBackend(db_path=db_dir, write_buffer_size=64 * 1024, checkpoint_storage=storage)
    else:
        raise ValueError(backend)
    b.num_retained = num_retained
    return b


def _install_io_hook():
    """Install the storage I/O hook; returns it (``hook(event, path)``) or None when nothing is asked for."""
    spec = os.environ.get("STATECORE_CRASH_KILL")
    log_path = os.environ.get("STATECORE_CRASH_IOLOG")
    if not spec and not log_path:
        return None
    from statecore.checkpoint.storage import set_io_hook
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) if log_path else None
    kill_event = kill_sub = None
    if spec:
        kill_event, kill_sub, n = spec.split(":")
        remaining = [int(n)]
    # Events come from several threads (caller, async checkpoint, LMDB flush): one at a time, so the event
    # that kills is the log's last line (os.write releases the GIL; without the lock another thread could
    # log an event between the fatal one and the kill).
    lock = threading.Lock()

    def hook(event, path):
        with lock:
            if log_fd is not None:
                os.write(log_fd, f"{event}\t{path}\n".encode())  # one write(2) with O_APPEND: survives SIGKILL
            if event == kill_event and kill_sub in path:
                remaining[0] -= 1
                if remaining[0] <= 0:
                    os.kill(os.getpid(), signal.SIGKILL)  # from the thread that reached the point
    set_io_hook(hook)
    return hook


def _arm_lmdb_hook(hook, db_dir):
    """Route the LMDB tier's flush events (wb.spill, lmdb.commit) to ``hook`` with the working directory as path."""
    from statecore import _lmdb
    _lmdb._set_crash_hook(lambda event: hook(event, db_dir))


def main(cfg):
    hook = _install_io_hook()
    seed = cfg["seed"]
    backend = make_backend(cfg["backend"], cfg["ckpt_dir"], cfg["db_dir"], cfg["num_retained"],
                           cfg.get("storage_options"))
    schedule = checkpoint_ops(seed)
    resume_id = cfg["resume_id"]
    if resume_id:
        kb = backend.restore_keyed_state_backend([cfg["resume_location"]], max_parallelism=128,
                                                 job_id=JOB, operator_id=OPERATOR)
        start = schedule[resume_id - 1]
    else:
        kb = backend.create_keyed_state_backend(max_parallelism=128, job_id=JOB, operator_id=OPERATOR)
        start = 0
    dv, dl, dm = descriptors()
    v, lst, m = kb.get_state(dv), kb.get_state(dl), kb.get_state(dm)
    set_key = kb.set_current_key
    out = sys.stdout
    out.write(f"READY {start}\n")
    out.flush()
    if hook is not None and cfg["backend"] == "lmdb":
        # After READY: a kill in a flush of the restore would look like a child that failed to start.
        _arm_lmdb_hook(hook, cfg["db_dir"])
    next_id = resume_id + 1
    next_at = schedule[next_id - 1] if next_id <= len(schedule) else None
    for i, (kind, key, a, b) in enumerate(op_stream(seed)):
        if i < start:
            continue
        set_key(key)
        if kind == "v_put":
            v.update(a)
        elif kind == "v_clear":
            v.clear()
        elif kind == "l_add":
            lst.add(a)
        elif kind == "l_clear":
            lst.clear()
        elif kind == "m_put":
            m.put(a, b)
        else:
            m.remove(a)
        done = i + 1
        if done == next_at:
            out.write(f"BEGIN {next_id}\n")
            out.flush()
            if next_id % 2:
                kb.checkpoint(next_id)
            else:
                kb.checkpoint_async(next_id).result()
            out.write(f"ACK {next_id} {done}\n")
            out.flush()
            next_id += 1
            next_at = schedule[next_id - 1] if next_id <= len(schedule) else None
    kb.close()
    out.write(f"DONE {STREAM_LENGTH}\n")
    out.flush()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
