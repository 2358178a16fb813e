"""``statecore demo``: the MarketLag job end to end, with a real ``kill -9`` and a restore.

The job (from the seed): a stream of prediction-market signals keyed by market; per market a
``MapState[outcome -> max_signal_delta]`` with a 7-day TTL (OnCreateAndWrite,
NeverReturnExpired) updated per record with ``max(delta, current)``.  The TTL clock is event
time: a callable returning the timestamp of the record being processed, so expiry follows the
stream and every run is deterministic.  Two more keyed states make the run auditable:
``records_seen`` (a per-market ValueState counter without TTL: a lost or duplicated record
changes it, whereas ``max`` is idempotent on duplicates) and ``source_offset`` (the stream
offset, a ValueState under the reserved key ``__source__``, so the offset is inside the
checkpoint and atomically consistent with the state).

What ``statecore demo`` does:

1. a crash-free reference run of the job in this process (and a pure-Python model of the same
   semantics, as an independent oracle for that reference);
2. a WORKER child process (``python -m statecore demo --worker ...``) processes the stream and
   checkpoints to ``FileSystemCheckpointStorage`` every N records; at a fixed record count,
   between two checkpoints, it stops and the parent kills it with SIGKILL;
3. a NEW worker process restores the latest complete checkpoint (``list_checkpoints`` +
   ``load_checkpoint``), reads the offset from it, replays the stream from there to the end and
   takes a final checkpoint;
4. this process restores that final checkpoint (a third process reading the state back) and
   proves exactly-once state: every market's map and counter equal the reference run's, the
   counters add up to the stream length, and markets whose last signal is more than 7 days (event
   time) before the end of the stream are gone.

Record ``i`` of the stream is a pure function of ``(seed, records, i)`` (splitmix64), so a
restored worker regenerates any offset without reading earlier records.
"""
import argparse
import datetime
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

JOB_ID = "marketlag"
OPERATOR_ID = "max-signal-delta"
MAX_PARALLELISM = 128
DAY_MS = 86_400_000
TTL_MS = 7 * DAY_MS
SPAN_MS = 10 * DAY_MS          # event time covered by the stream: more than the TTL
START_MS = 1_730_419_200_000   # 2024-11-01T00:00:00Z
SOURCE_KEY = "__source__"      # reserved key holding the stream offset
DEFAULT_RECORDS = 50_000
MIN_RECORDS = 500
MARKER = "statecore-demo.json"
EVENT_PREFIX = "@@statecore-demo "
LMDB_WRITE_BUFFER = 1 << 20    # small, so that the demo's state really flushes to the LMDB tier

_M64 = (1 << 64) - 1
_TOPICS = ("fed-rate-cut", "us-election", "btc-above-100k", "eth-etf-flows", "world-cup-final", "best-picture",
           "cpi-above-3pct", "starship-orbit", "ai-act-vote", "oil-above-90", "rain-in-london", "nba-finals")
_CANDIDATES = ("alice", "bob", "carol", "dave", "erin")


class UsageError(Exception):
    """A bad command line (exit code 2)."""


def _mix(x):
    """splitmix64 finalizer: a well-mixed 64-bit function of x."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


# ---------------------------------------------------------------------------------------------- the stream
class SignalStream:
    """Deterministic synthetic prediction-market signals: record ``i`` depends only on (seed, records, i).

    A tenth of the markets are "popular" (signals all the time); the others are listed on a rolling
    window that moves through them as event time advances, so early markets go quiet and expire
    before the end of the stream.  Timestamps are non-decreasing and span 10 days.
    """

    def __init__(self, seed, records):
        self.seed, self.records = seed, records
        self.n_markets = max(24, min(5000, records // 12))
        self.n_popular = max(3, self.n_markets // 10)
        self.rolling = self.n_markets - self.n_popular
        self.window = max(3, self.rolling // 6)
        self.step = max(1, SPAN_MS // records)
        self._base = _mix(seed & _M64)
        self.markets = [f"{_TOPICS[m % len(_TOPICS)]}-{m:04d}" for m in range(self.n_markets)]
        self.outcomes = []
        for m in range(self.n_markets):
            k = 2 + _mix(self._base ^ (0xA5A5 + m)) % 4
            self.outcomes.append(("YES", "NO") if k == 2 else _CANDIDATES[:k])

    def record(self, i):
        """(event time ms, market, outcome, signal delta) of record ``i``."""
        h1 = _mix((self._base + i) & _M64)
        h2 = _mix(h1)
        h3 = _mix(h2)
        ts = START_MS + i * SPAN_MS // self.records + h1 % self.step
        if h2 % 10 < 3:
            m = (h2 >> 8) % self.n_popular
        else:
            start = (self.rolling - self.window) * i // self.records
            m = self.n_popular + start + (h2 >> 8) % self.window
        outs = self.outcomes[m]
        delta = round((h3 >> 11) / 9007199254740992.0 * 0.35, 6)  # |market move - reference move|
        return ts, self.markets[m], outs[(h3 >> 3) % len(outs)], delta

    @property
    def end_ms(self):
        return self.record(self.records - 1)[0]


# ---------------------------------------------------------------------------------------------- the job
class EventClock:
    """The TTL clock: the event time of the record being processed (callable -> int ms)."""

    def __init__(self, now=0):
        self.now = now

    def __call__(self):
        return self.now


def ttl_config():
    from statecore import StateTtlConfig, StateVisibility, Time, UpdateType
    return (StateTtlConfig.new_builder(Time.days(7))
            .set_update_type(UpdateType.OnCreateAndWrite)
            .set_state_visibility(StateVisibility.NeverReturnExpired)
            .build())


class MarketLagJob:
    """Per record: ``set_current_key(market)``; ``max_signal_delta[outcome] = max(delta, current)``."""

    def __init__(self, kb, clock):
        from statecore import Float64, Int64, MapStateDescriptor, Str, ValueStateDescriptor
        self.kb, self.clock = kb, clock
        desc = MapStateDescriptor("max_signal_delta", Str(), Float64())
        desc.enable_time_to_live(ttl_config())
        self.max_delta = kb.get_state(desc)
        self.seen = kb.get_state(ValueStateDescriptor("records_seen", Int64(), default=0))
        self.offset = kb.get_state(ValueStateDescriptor("source_offset", Int64()))

    def process(self, record):
        ts, market, outcome, delta = record
        self.clock.now = ts
        self.kb.set_current_key(market)
        current = self.max_delta.get(outcome)
        self.max_delta.put(outcome, delta if current is None or delta > current else current)
        self.seen.update(self.seen.value() + 1)

    def set_offset(self, offset):
        self.kb.set_current_key(SOURCE_KEY)
        self.offset.update(offset)

    def get_offset(self):
        self.kb.set_current_key(SOURCE_KEY)
        return self.offset.value()

    def final_state(self):
        """{market: {"records_seen": n, "max_signal_delta": {outcome: value}}} as visible now (TTL applied)."""
        keys = sorted(k for k in self.kb.get_keys("records_seen") if k != SOURCE_KEY)
        out = {}
        for market in keys:
            self.kb.set_current_key(market)
            out[market] = {"records_seen": self.seen.value(), "max_signal_delta": dict(sorted(self.max_delta.items()))}
        return out


def model_state(stream):
    """The same job as a plain-Python model (Flink's TTL rule: written at t, expired when t + ttl <= now).

    Returns (final state in the format of MarketLagJob.final_state, {market: last event time},
    {(market, outcome): last write time}).
    """
    entries, seen, last = {}, {}, {}
    for i in range(stream.records):
        ts, market, outcome, delta = stream.record(i)
        e = entries.get((market, outcome))
        current = e[0] if e is not None and e[1] + TTL_MS > ts else None
        entries[(market, outcome)] = (delta if current is None or delta > current else current, ts)
        seen[market] = seen.get(market, 0) + 1
        last[market] = ts
    now = stream.end_ms
    state = {m: {"records_seen": n, "max_signal_delta": {}} for m, n in seen.items()}
    for (market, outcome), (value, ts) in entries.items():
        if ts + TTL_MS > now:
            state[market]["max_signal_delta"][outcome] = value
    for m in state:
        state[m]["max_signal_delta"] = dict(sorted(state[m]["max_signal_delta"].items()))
    return dict(sorted(state.items())), last, {k: ts for k, (_, ts) in entries.items()}


def digest(state):
    raw = json.dumps(state, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(raw).hexdigest()


def _map_digest(state):
    return digest({m: v["max_signal_delta"] for m, v in state.items()})


def make_backend(name, db_path, checkpoint_dir=None):
    from statecore import FileSystemCheckpointStorage, HashMapStateBackend, LMDBStateBackend
    storage = FileSystemCheckpointStorage(checkpoint_dir) if checkpoint_dir else None
    if name == "hashmap":
        return HashMapStateBackend(checkpoint_storage=storage)
    return LMDBStateBackend(db_path=db_path, write_buffer_size=LMDB_WRITE_BUFFER, checkpoint_storage=storage)


def _kb_kwargs(clock):
    return dict(max_parallelism=MAX_PARALLELISM, clock=clock, job_id=JOB_ID, operator_id=OPERATOR_ID)


def run_in_process(stream, backend_name, workdir, progress=None):
    """The crash-free reference run: (final state, seconds, metrics)."""
    clock = EventClock()
    backend = make_backend(backend_name, os.path.join(workdir, "lmdb"))
    with backend.create_keyed_state_backend(**_kb_kwargs(clock)) as kb:
        job = MarketLagJob(kb, clock)
        record, process = stream.record, job.process
        every = max(1, stream.records // 100)
        t0 = time.perf_counter()
        for i in range(stream.records):
            process(record(i))
            if progress is not None and (i + 1) % every == 0:
                progress(i + 1)
        elapsed = time.perf_counter() - t0
        job.set_offset(stream.records)
        return job.final_state(), elapsed, kb.metrics()


# ---------------------------------------------------------------------------------------------- the worker
def _emit(event, **fields):
    sys.stdout.write(EVENT_PREFIX + json.dumps(dict(fields, event=event)) + "\n")
    sys.stdout.flush()


def worker(args):
    """One worker process: (restore and) process the stream, checkpointing every N records."""
    from statecore import CheckpointError, load_checkpoint
    stream = SignalStream(args.seed, args.records)
    clock = EventClock()
    wdir = os.path.join(args.dir, f"worker-{args.attempt}")
    os.makedirs(wdir, exist_ok=True)
    backend = make_backend(args.backend, os.path.join(wdir, "lmdb"), os.path.join(args.dir, "checkpoints"))
    _emit("start", pid=os.getpid(), attempt=args.attempt)
    restore_s = None
    if args.restore:
        storage = backend.checkpoint_storage
        found = storage.list_checkpoints(JOB_ID, OPERATOR_ID)
        if not found:
            raise CheckpointError(f"no complete checkpoint to restore from under {storage.uri}")
        completed = load_checkpoint(found[-1])
        t0 = time.perf_counter()
        kb = backend.restore_keyed_state_backend([completed], **_kb_kwargs(clock))
        restore_s = time.perf_counter() - t0
        job = MarketLagJob(kb, clock)
        offset = job.get_offset()
        if offset is None:
            raise CheckpointError(f"{completed.location} holds no stream offset")
        _emit("restored", checkpoint_id=completed.checkpoint_id, location=completed.location, offset=offset,
              restore_s=restore_s, bytes=completed.size_bytes)
        next_id = completed.checkpoint_id + 1
        # Negative controls for the tests: deliberately lose or duplicate records after the restore.
        offset = min(args.records, offset + args.debug_drop_records)
        offset = max(0, offset - args.debug_dup_records)
    else:
        kb = backend.create_keyed_state_backend(**_kb_kwargs(clock))
        job = MarketLagJob(kb, clock)
        offset, next_id = 0, 1
    start = offset
    n, every, pause_at = args.records, args.checkpoint_every, args.pause_at
    progress_every = max(1, n // 200)
    record, process = stream.record, job.process
    checkpoints, ckpt_s = 0, 0.0
    t0 = time.perf_counter()

    def take_checkpoint(done):
        nonlocal next_id, checkpoints, ckpt_s
        job.set_offset(done)
        c0 = time.perf_counter()
        completed = kb.checkpoint(next_id)
        dt = time.perf_counter() - c0
        ckpt_s += dt
        checkpoints += 1
        _emit("checkpoint", checkpoint_id=next_id, offset=done, location=completed.location,
              bytes=completed.size_bytes, seconds=dt)
        next_id += 1

    for i in range(start, n):
        process(record(i))
        done = i + 1
        if done == pause_at:
            # The parent kills this process now (SIGKILL): the records since the last
            # checkpoint are in memory (and the LMDB tier) only.
            _emit("paused", offset=done, seconds=time.perf_counter() - t0)
            sys.stdin.read()
            os._exit(3)  # only reached if the parent went away without killing us
        if done % every == 0 and done < n:
            take_checkpoint(done)
        if done % progress_every == 0:
            _emit("progress", offset=done)
    elapsed = time.perf_counter() - t0
    take_checkpoint(n)
    state = job.final_state()
    dump = os.path.join(wdir, "final-state.json")
    with open(dump, "w") as f:
        json.dump(state, f, sort_keys=True)
    metrics = kb.metrics()
    kb.close()
    _emit("done", offset=n, processed=n - start, seconds=elapsed, checkpoints=checkpoints, checkpoint_s=ckpt_s,
          digest=digest(state), dump=dump, restore_s=restore_s, metrics=metrics)
    return 0


# ---------------------------------------------------------------------------------------------- the parent
class _Ui:
    """Step lines on stdout; a rich progress bar on stderr only when stderr is a terminal."""

    def __init__(self, total):
        self.progress = None
        if sys.stderr.isatty():
            try:
                from rich.console import Console
                from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
            except ImportError:
                return
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                     TextColumn("{task.completed:,}/{task.total:,} records"), TimeElapsedColumn(),
                                     console=Console(stderr=True), transient=True)
            self.total = total

    def __enter__(self):
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.stop()
        return False

    def task(self, description):
        if self.progress is None:
            return lambda done: None
        tid = self.progress.add_task(description, total=self.total)
        return lambda done: self.progress.update(tid, completed=done)

    def say(self, text=""):
        print(text, flush=True)


def _fmt_ts(ms):
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")


def _kib(n):
    return f"{n / 1024:,.1f} KiB" if n < 1 << 20 else f"{n / (1 << 20):,.1f} MiB"


def _spawn_worker(args, run_dir, attempt, *, restore, pause_at=0):
    import statecore
    env = dict(os.environ)
    parent = os.path.dirname(os.path.dirname(os.path.abspath(statecore.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([parent, *filter(None, [env.get("PYTHONPATH")])])
    cmd = [sys.executable, "-m", "statecore", "demo", "--worker", "--attempt", str(attempt),
           "--backend", args.backend, "--records", str(args.records), "--checkpoint-every", str(args.checkpoint_every),
           "--seed", str(args.seed), "--dir", run_dir, "--pause-at", str(pause_at)]
    if restore:
        cmd += ["--restore", "--debug-drop-records", str(args.debug_drop_records),
                "--debug-dup-records", str(args.debug_dup_records)]
    log = open(os.path.join(run_dir, f"worker-{attempt}.log"), "w")
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env, text=True,
                            bufsize=1)
    proc.log_path = log.name
    log.close()
    return proc


def _events(proc):
    for line in proc.stdout:
        if line.startswith(EVENT_PREFIX):
            yield json.loads(line[len(EVENT_PREFIX):])


def _worker_failed(proc, what):
    from statecore import StateError
    proc.wait()
    last = ""
    try:
        with open(proc.log_path) as f:
            lines = [ln.strip() for ln in f if ln.strip()]
        last = lines[-1] if lines else ""
    except OSError:
        pass
    return StateError(f"worker {what} exited with status {proc.returncode} ({last or 'no output'}; "
                      f"log: {proc.log_path})")


def _compare(got, want, field):
    """[(market, what differs)] for one field of two final states (a market missing on either side counts)."""
    diffs = []
    for m in sorted(set(got) | set(want)):
        g, w = got.get(m), want.get(m)
        if g is None or w is None:
            diffs.append((m, "missing after the restore" if g is None else "not in the reference"))
        elif g[field] != w[field]:
            diffs.append((m, f"{field} {g[field]} != reference {w[field]}"))
    return diffs


def _prepare_dir(path):
    if path is None:
        return tempfile.mkdtemp(prefix="statecore-demo-"), True
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"--dir {path} is not a directory")
    if os.path.isdir(path) and os.listdir(path):
        if not os.path.exists(os.path.join(path, MARKER)):
            raise UsageError(f"--dir {path} is not empty and was not made by statecore demo; "
                             "use an empty or new folder")
        for name in os.listdir(path):  # a previous demo run: start afresh
            p = os.path.join(path, name)
            shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.unlink(p)
    os.makedirs(path, exist_ok=True)
    return path, False


def run(args):
    stream = SignalStream(args.seed, args.records)
    n, every = args.records, args.checkpoint_every
    kill_at = args.kill_at
    if kill_at is None:
        kill_at = n * 55 // 100
        if kill_at % every == 0:
            kill_at += max(1, every // 3)
    if not args.no_crash and not (every <= kill_at < n):
        raise UsageError(f"the kill must come after the first checkpoint and before the end: need "
                         f"--checkpoint-every ({every}) <= kill point ({kill_at}) < --records ({n})")
    run_dir, is_temp = _prepare_dir(args.dir)
    with open(os.path.join(run_dir, MARKER), "w") as f:
        json.dump({"records": n, "seed": args.seed, "backend": args.backend, "checkpoint_every": every}, f)
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    ok = False
    procs = []
    ui = _Ui(n)
    say = ui.say
    try:
        with ui:
            ok = _run(args, stream, run_dir, is_temp, ckpt_dir, kill_at, ui, say, procs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            if p.stdout:
                p.stdout.close()
            if p.stdin:
                p.stdin.close()
    if is_temp and ok:
        shutil.rmtree(run_dir, ignore_errors=True)
    elif not ok:
        say(f"files kept for a look: {run_dir}")
    return 0 if ok else 1


def _run(args, stream, run_dir, is_temp, ckpt_dir, kill_at, ui, say, procs):
    from statecore import load_checkpoint
    n, every = args.records, args.checkpoint_every
    outcomes = sum(len(o) for o in stream.outcomes)
    backend_text = "lmdb (LMDB tier: write buffer + LMDB on local disk)" if args.backend == "lmdb" \
        else "hashmap (heap tier)"
    say("statecore demo: the MarketLag job, per market a MapState[outcome -> max_signal_delta] with a 7-day TTL "
        "(OnCreateAndWrite, NeverReturnExpired), event-time clock")
    say(f"  stream     {n:,} signals, seed {args.seed}: {stream.n_markets:,} markets, {outcomes:,} outcomes, "
        f"event time {_fmt_ts(START_MS)} -> {_fmt_ts(stream.end_ms)} UTC "
        f"({(stream.end_ms - START_MS) / DAY_MS:.1f} days)")
    say(f"  backend    {backend_text}")
    say(f"  checkpoint every {every:,} records (state + stream offset, one atomic checkpoint) to {ckpt_dir}")
    steps = 4 if args.no_crash else 5
    step = iter(range(1, steps + 1))

    # 1. reference
    say(f"[{next(step)}/{steps}] reference run in this process, no crash ...")
    ref_state, ref_s, _ = run_in_process(stream, args.backend, os.path.join(run_dir, "reference"),
                                         ui.task("reference run"))
    model, last_ms, written_ms = model_state(stream)
    model_ok = ref_state == model
    say(f"      {n:,} records in {ref_s:.2f} s ({n / ref_s:,.0f} records/s); equals the pure-Python model of the job: "
        f"{'yes' if model_ok else 'NO'}")
    if not model_ok:
        d = _compare(ref_state, model, "records_seen") + _compare(ref_state, model, "max_signal_delta")
        say(f"      FAILED: the reference run disagrees with the model for {len(d)} markets, e.g. {d[0][0]}: {d[0][1]}")
        return False

    # 2. first worker, killed mid-stream
    bar = ui.task("worker stream offset")
    attempt = 1
    last_ckpt = None
    if args.no_crash:
        say(f"[{next(step)}/{steps}] worker 1: processing the whole stream (--no-crash) ...")
        proc = _spawn_worker(args, run_dir, attempt, restore=False)
        procs.append(proc)
        done_ev = _pump(proc, say, bar, f"worker {attempt}", n)
        if done_ev is None:
            raise _worker_failed(proc, attempt)
        proc.wait()
        w1 = None
    else:
        proc = _spawn_worker(args, run_dir, attempt, restore=False, pause_at=kill_at)
        procs.append(proc)
        first = next(_events(proc), None)
        if first is None:
            raise _worker_failed(proc, attempt)
        say(f"[{next(step)}/{steps}] worker 1 (pid {first['pid']}): processing from offset 0 ...")
        paused = None
        for ev in _events(proc):
            if ev["event"] == "checkpoint":
                last_ckpt = ev
                say(f"      checkpoint {ev['checkpoint_id']} at offset {ev['offset']:,} "
                    f"({_kib(ev['bytes'])}, {ev['seconds'] * 1000:.1f} ms)")
                bar(ev["offset"])
            elif ev["event"] == "progress":
                bar(ev["offset"])
            elif ev["event"] == "paused":
                paused = ev
                break
        if paused is None or last_ckpt is None:
            raise _worker_failed(proc, attempt)
        os.kill(proc.pid, getattr(signal, "SIGKILL", signal.SIGTERM))
        rc = proc.wait()
        lost = paused["offset"] - last_ckpt["offset"]
        say(f"      KILL -9 worker 1 (pid {proc.pid}) at record {paused['offset']:,}: the {lost:,} records since "
            f"checkpoint {last_ckpt['checkpoint_id']} were in its memory only; exit status {rc}"
            f"{' (SIGKILL)' if rc == -getattr(signal, 'SIGKILL', 9) else ''}")
        w1 = {"records": paused["offset"], "seconds": paused["seconds"]}

        # 3. second worker: restore + replay
        attempt = 2
        latest = _latest(ckpt_dir)
        cp = load_checkpoint(latest)
        say(f"[{next(step)}/{steps}] new worker process restores the latest complete checkpoint: "
            f"{cp.checkpoint_id} ({latest})")
        if cp.checkpoint_id != last_ckpt["checkpoint_id"]:
            say(f"      FAILED: the latest complete checkpoint is {cp.checkpoint_id}, worker 1 reported "
                f"{last_ckpt['checkpoint_id']}")
            return False
        proc = _spawn_worker(args, run_dir, attempt, restore=True)
        procs.append(proc)
        done_ev = _pump(proc, say, bar, f"worker {attempt}", n)
        if done_ev is None:
            raise _worker_failed(proc, attempt)
        proc.wait()

    # 4. read the final checkpoint back in this process
    say(f"[{next(step)}/{steps}] reading the final checkpoint back in this process ...")
    final_loc = _latest(ckpt_dir)
    final_cp = load_checkpoint(final_loc)
    clock = EventClock(stream.end_ms)
    backend = make_backend(args.backend, os.path.join(run_dir, "readback", "lmdb"))
    t0 = time.perf_counter()
    with backend.restore_keyed_state_backend([final_cp], **_kb_kwargs(clock)) as kb:
        readback_s = time.perf_counter() - t0
        job = MarketLagJob(kb, clock)
        end_offset = job.get_offset()
        got = job.final_state()
    say(f"      checkpoint {final_cp.checkpoint_id} ({_kib(final_cp.size_bytes)}) restored in "
        f"{readback_s * 1000:.1f} ms; stream offset {end_offset:,}")

    # 5. verify
    say(f"[{next(step)}/{steps}] verifying against the crash-free reference ...")
    ok = True

    def check(passed, text):
        nonlocal ok
        ok = ok and passed
        say(f"      {text}: {'OK' if passed else 'FAILED'}")

    check(end_offset == n, f"stream offset in the final checkpoint is {end_offset:,} of {n:,}")
    check(done_ev["digest"] == digest(got), "worker's own digest equals the state read back from its final checkpoint")
    total = sum(v["records_seen"] for v in got.values())
    count_diffs = _compare(got, ref_state, "records_seen")
    check(not count_diffs and total == n,
          f"exactly-once: records_seen per market equals the reference for {len(ref_state) - len(count_diffs):,} of "
          f"{len(ref_state):,} markets; they add up to {total:,} for a stream of {n:,}")
    for m, what in count_diffs[:3]:
        say(f"        {m}: {what}")
    map_diffs = _compare(got, ref_state, "max_signal_delta")
    check(not map_diffs, f"max_signal_delta equals the reference for {len(ref_state) - len(map_diffs):,} of "
                         f"{len(ref_state):,} markets (digest {_map_digest(got)[:16]}, reference "
                         f"{_map_digest(ref_state)[:16]})")
    for m, what in map_diffs[:3]:
        say(f"        {m}: {what}")
    expired = {m for m, ts in last_ms.items() if ts + TTL_MS <= stream.end_ms}
    live = [m for m in got if m not in expired]
    gone_ok = bool(expired) and all(got.get(m, {}).get("max_signal_delta") == {} for m in expired) \
        and all(got[m]["max_signal_delta"] for m in live)
    single = sum(1 for (m, _), ts in written_ms.items() if m not in expired and ts + TTL_MS <= stream.end_ms)
    check(gone_ok, f"TTL: the {len(expired):,} markets whose last signal is more than 7 days (event time) before "
                   f"the end are gone; the other {len(live):,} are present")
    say(f"        (in live markets, {single:,} outcome entries expired one by one, "
        f"{sum(len(got[m]['max_signal_delta']) for m in live):,} remain)")

    say("summary")
    if w1:
        say(f"  worker 1    {w1['records']:,} records in {w1['seconds']:.2f} s "
            f"({w1['records'] / max(w1['seconds'], 1e-9):,.0f} records/s), then killed")
    rs = done_ev.get("restore_s")
    say(f"  worker {attempt}    {done_ev['processed']:,} records in {done_ev['seconds']:.2f} s "
        f"({done_ev['processed'] / max(done_ev['seconds'], 1e-9):,.0f} records/s, checkpoints included)"
        + (f", restore {rs * 1000:.1f} ms" if rs is not None else ""))
    say(f"  reference   {n:,} records in {ref_s:.2f} s ({n / ref_s:,.0f} records/s)")
    say(f"  checkpoints {final_cp.checkpoint_id} taken (every {every:,} records + 1 at the end), "
        f"final {_kib(final_cp.size_bytes)}"
        + ("" if is_temp and ok else f"; inspect it with: statecore inspect {final_loc}"))
    say(f"exactly-once state after kill -9 and restore: {'OK' if ok else 'FAILED'}" if not args.no_crash
        else f"state equals the reference: {'OK' if ok else 'FAILED'}")
    return ok


def _latest(ckpt_dir):
    from statecore import CheckpointError, FileSystemCheckpointStorage
    found = FileSystemCheckpointStorage(ckpt_dir).list_checkpoints(JOB_ID, OPERATOR_ID)
    if not found:
        raise CheckpointError(f"no complete checkpoint under {ckpt_dir}")
    return found[-1]


def _pump(proc, say, bar, name, records):
    """Relay a worker's events until it is done; returns the "done" event (None if it died)."""
    for ev in _events(proc):
        kind = ev["event"]
        if kind == "start":
            say(f"      {name} started (pid {ev['pid']})")
        elif kind == "restored":
            say(f"      restored checkpoint {ev['checkpoint_id']} ({_kib(ev['bytes'])}) in "
                f"{ev['restore_s'] * 1000:.1f} ms;"
                f" stream offset in it: {ev['offset']:,}; replaying from there to the end")
            bar(ev["offset"])
        elif kind == "checkpoint":
            end = " (end of stream)" if ev["offset"] == records else ""
            say(f"      checkpoint {ev['checkpoint_id']} at offset {ev['offset']:,}{end} "
                f"({_kib(ev['bytes'])}, {ev['seconds'] * 1000:.1f} ms)")
            bar(ev["offset"])
        elif kind == "progress":
            bar(ev["offset"])
        elif kind == "done":
            return ev
    return None


# ---------------------------------------------------------------------------------------------- command line
def _positive(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {v}")
    return v


def add_parser(subparsers):
    p = subparsers.add_parser(
        "demo", help="run the MarketLag job end to end with a kill -9 and a restore",
        description="Run the MarketLag job (per market a MapState[outcome -> max_signal_delta] with a 7-day TTL) "
                    "over a deterministic synthetic stream of prediction-market signals in a worker process that "
                    "checkpoints state and stream offset every N records, kill the worker with SIGKILL "
                    "mid-stream, restore the latest complete checkpoint in a new worker, replay from its offset, "
                    "and verify that the final state equals a crash-free reference run (exactly once) and that "
                    "markets idle for more than 7 days of event time are gone. Exit code 0 only when it does.")
    p.add_argument("--backend", choices=("lmdb", "hashmap"), default="lmdb",
                   help="working-state backend (default lmdb: the LMDB tier, Flink's RocksDB stand-in)")
    p.add_argument("--records", type=_positive, default=DEFAULT_RECORDS, metavar="N",
                   help=f"signals in the stream (default {DEFAULT_RECORDS:,}; at least {MIN_RECORDS})")
    p.add_argument("--checkpoint-every", type=_positive, default=None, metavar="N",
                   help="records between checkpoints (default: records / 8)")
    p.add_argument("--dir", metavar="PATH", default=None,
                   help="folder for checkpoints and worker files (default: a temporary folder, removed on success)")
    p.add_argument("--seed", type=int, default=1, help="stream seed (default 1)")
    p.add_argument("--no-crash", action="store_true", help="do not kill the worker (one worker runs to the end)")
    p.add_argument("--kill-at", type=_positive, default=None, metavar="R",
                   help="record count at which the worker is killed (default: 55%% of the stream, between two "
                        "checkpoints)")
    # Internal: the worker process, and negative controls that break exactly-once on purpose.
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--attempt", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--restore", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--pause-at", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--debug-drop-records", type=_positive, default=0, help=argparse.SUPPRESS)
    p.add_argument("--debug-dup-records", type=_positive, default=0, help=argparse.SUPPRESS)
    p.set_defaults(func=main)
    return p


def main(args):
    from statecore._bench import UsageError as CliUsageError
    if args.records < MIN_RECORDS:
        raise CliUsageError(f"--records must be at least {MIN_RECORDS}, got {args.records}")
    if args.checkpoint_every is None:
        args.checkpoint_every = max(1, args.records // 8)
    if not 1 <= args.checkpoint_every < args.records:
        raise CliUsageError(f"--checkpoint-every must be between 1 and --records - 1, got {args.checkpoint_every}")
    if args.worker:
        if not args.dir:
            raise CliUsageError("--worker needs --dir")
        return worker(args)
    try:
        return run(args)
    except UsageError as e:
        raise CliUsageError(str(e)) from None
