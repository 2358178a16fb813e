"""kill -9 crash test of checkpoints (RELIABILITY.md T1, with T1b power-loss emulation).

A writer CHILD (tests/crash_writer.py) applies a deterministic op stream (ValueState,
ListState and MapState over 2,000 keys) and checkpoints every 50-300 ops, alternating
``checkpoint`` and ``checkpoint_async(...).result()``, printing ``ACK <id> <op_index>``
after each one returns.  The PARENT is the oracle: it SIGKILLs the child, either
after a random delay (blackbox) or through a whitebox kill point the child arms with
``statecore.checkpoint.storage.set_io_hook`` (before the data file is written, after
it is written but before its fsync, after it is fsynced, at either directory fsync, before the metadata temp file is written,
after it is fsynced, right after ``_metadata`` is published, before a retention
delete) and, on the LMDB tier, with the test-only ``statecore._lmdb._set_crash_hook``
(``wb.spill``: a write buffer's flush starts; ``lmdb.commit``: right before a flush's
LMDB write transaction commits; both in the flush thread, which kills the process).
After every kill the parent checks EVERY ``chk-*`` folder on storage:

* a folder ``load_checkpoint`` accepts is in ``list_checkpoints`` and restores to
  exactly ``replay(seed, op_index)`` for its id (ids map to op indices through the
  seed's schedule, so unacknowledged checkpoints are checked too); otherwise it is
  rejected with ``CorruptCheckpointError``: never another exception, never partially
  accepted;
* the newest valid checkpoint is at least the newest ACKed one, and the newest ACKed
  one, while still committed, is valid (no acknowledged checkpoint is lost);
* retention: at most ``num_retained + 1`` committed folders.

The next child restores from the newest valid checkpoint in a fresh process and
continues the stream (chains of up to 10 restarts per seed; the LMDB tier reopens
the working directory the killed process left behind).  Every few cycles the parent
also emulates a power loss from the child's I/O log: files never fsynced are cut to
a random prefix and directory entries never made durable by a directory fsync are
dropped (RocksDB's DropUnsyncedFileData).

Kill-point coverage: whitebox cycles take the named kill points round-robin (not at
random), so each one gets the same number of attempts; a kill counts as a HIT of its
point only when the child's I/O log (always kept on whitebox cycles) ends with that
event and holds exactly n matching events, i.e. the child really died there (not on
the timer, not after finishing its stream).  A point short of its quota after the
main cycles gets bounded extra whitebox cycles; the test then asserts every named
point was hit at least ``KILL_POINT_QUOTA`` (10) times per backend, and prints the
hits, attempts and misses per point (plus where the ``dirsync`` kills landed: before
publishing, after publishing, or in a retention delete).

Configurations (``CONFIGS``): heap + local disk (8 storage points), LMDB + local disk
(the same 8 + ``wb.spill`` + ``lmdb.commit``) and LMDB + S3 (``s3://`` on moto's
ThreadedMotoServer on 127.0.0.1, the conftest ``s3_server``/``s3_options`` fixtures;
the 4 storage points the object store emits, see ``S3_KILL_POINTS`` for the excluded
ones and why, + the 2 LMDB points; no power-loss emulation, see ``Config.power_loss``).

Negative control: with ``STATECORE_DEBUG_SKIP_FSYNC=1`` (storage.py) the same
power-loss emulation must make the harness report a lost acknowledged checkpoint.

CI: per configuration just enough cycles for 10 whitebox attempts per named point
(1 in 5 cycles is blackbox): heap+file 100, lmdb+file 125, lmdb+s3 75 cycles; about
35 s, 50 s and 80 s on the 2-core box (S3 cycles are slower: s3fs start-up in every
child, HTTP to moto); 3 minutes with the negative control.  ``STATECORE_SOAK=1``:
1,000 cycles per configuration (~30 minutes); ``STATECORE_CRASH_CYCLES=N`` overrides
the number of cycles per configuration (e.g. the plan's 10,000 for a long soak).
"""
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import pytest

import statecore as sc
from statecore import CorruptCheckpointError
from statecore.checkpoint import storage as stg

import crash_writer as cw

PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(sc.__file__)))
WRITER = os.path.abspath(cw.__file__)
SOAK = os.environ.get("STATECORE_SOAK") == "1"
CYCLES_OVERRIDE = int(os.environ.get("STATECORE_CRASH_CYCLES") or 0)   # cycles per configuration, if set
SOAK_CYCLES = 1000
NUM_RETAINED = 2
MAX_RESTARTS_PER_SEED = 10
POWER_LOSS_EVERY = 3           # every 3rd cycle also emulates a power loss
BLACKBOX_EVERY = 5             # every 5th cycle is a blackbox kill (random delay); the rest are whitebox
KILL_POINT_QUOTA = 10          # RELIABILITY.md T1: every named kill point hit >= 10 times (per backend here)
TOPUP_ATTEMPTS_PER_HIT = 3     # extra whitebox attempts allowed per missing hit after the main cycles
BLACKBOX_DELAY = (0.02, 0.4)   # seconds after READY
WHITEBOX_TIMEOUT = 8.0         # a kill point not reached by then: killed by the timer instead
START_TIMEOUT = 60.0

# (event, path substring) of the whitebox kill points; n-th occurrence drawn per cycle.  Storage I/O
# events (statecore.checkpoint.storage.set_io_hook) of the local-disk store:
KILL_POINTS = [
    ("write", "data.sckd"),        # before the data file is written
    ("written", "data.sckd"),      # data file written, NOT fsynced: power loss may cut it
    ("fsync", "data.sckd"),        # data file written and fsynced, nothing published
    ("dirsync", "chk-"),           # odd n: folder fsynced before publishing; even n: after publishing
    ("write", "_metadata.tmp"),    # just before the metadata is published (temp file about to be written)
    ("fsync", "_metadata.tmp"),    # metadata temp file durable, not yet linked to _metadata
    ("publish", "_metadata"),      # _metadata visible, directory not yet fsynced, checkpoint not returned
    ("delete", "chk-"),            # retention: before an older checkpoint is deleted
]
# The LMDB tier's flush path (statecore._lmdb._set_crash_hook, test-only; the child arms it after READY).
# Both run in the flush thread, which kills the process itself; the path is the child's db_dir, so "" matches.
LMDB_KILL_POINTS = [
    ("wb.spill", ""),              # a frozen write buffer's flush starts (nothing of it in LMDB yet)
    ("lmdb.commit", ""),           # right before the LMDB write transaction of a flush commits
]
# The S3 store (storage._FsspecStore) emits only write (before each PUT), publish (after the _metadata PUT
# completed) and delete (before a retention delete).  Excluded there, because they cannot occur on S3:
#   written:data.sckd     there is no "written, not yet fsynced" state: a PUT is durable when it completes
#   fsync:data.sckd       no fsync on an object store (the completed PUT is the durability point)
#   dirsync:chk-          no directories to fsync (_FsspecStore.sync_dirs is a no-op)
#   write/fsync:_metadata.tmp   no temp file: _metadata is ONE conditional PUT (If-None-Match), so its
#                         "before the metadata is written" point is write:_metadata instead
S3_KILL_POINTS = [
    ("write", "data.sckd"),        # before a data PUT (the earlier ones of this checkpoint completed)
    ("write", "_metadata"),        # data complete, before the _metadata PUT (nothing published)
    ("publish", "_metadata"),      # _metadata PUT completed (committed), checkpoint not returned
    ("delete", "chk-"),            # retention: before an older checkpoint is deleted
]


@dataclass(frozen=True)
class Config:
    """One configuration of the crash test: working-state backend x checkpoint storage."""
    name: str               # test id
    backend: str            # "hashmap" | "lmdb"
    storage: str            # "file" | "s3" (moto's ThreadedMotoServer on 127.0.0.1, conftest.s3_server)
    kill_points: tuple
    seed: int

    @property
    def power_loss(self):
        # T1b applies to local disk only.  On S3 nothing is durable "in the client": a PUT is acknowledged once
        # the server stored the object, the storage never fsyncs or renames (no fsync/dirsync events to track),
        # and the server (moto, in the parent) is not what loses power.  So kills still happen, power loss not.
        return self.storage == "file"

    @property
    def cycles(self):
        """Cycles per run: STATECORE_CRASH_CYCLES, else 1,000 in soak, else just enough that the main loop
        gives every named point KILL_POINT_QUOTA whitebox attempts (top-up cycles cover the misses)."""
        if CYCLES_OVERRIDE:
            return CYCLES_OVERRIDE
        if SOAK:
            return SOAK_CYCLES
        return -(-len(self.kill_points) * KILL_POINT_QUOTA * BLACKBOX_EVERY // (BLACKBOX_EVERY - 1))


CONFIGS = [
    Config("hashmap", "hashmap", "file", tuple(KILL_POINTS), seed=17),
    Config("lmdb", "lmdb", "file", tuple(KILL_POINTS + LMDB_KILL_POINTS), seed=29),
    Config("lmdb-s3", "lmdb", "s3", tuple(S3_KILL_POINTS + LMDB_KILL_POINTS), seed=41),
]


def point_name(point):
    event, sub = point
    return f"{event}:{sub}" if sub else event


@dataclass
class Chain:
    """One seed's run through successive writer children sharing one checkpoint directory."""
    backend: str
    root: str
    seed: int
    ckpt_uri: str = ""                               # default: <root>/ckpt on local disk
    storage_options: dict = field(default_factory=dict)
    acked: dict = field(default_factory=dict)   # checkpoint id -> op index, from ACK lines
    resume_id: int = 0
    resume_location: str = ""
    restarts: int = 0
    committed: int = 0    # committed folders after the last verification
    done: bool = False

    def __post_init__(self):
        if not self.ckpt_uri:
            self.ckpt_uri = os.path.join(self.root, "ckpt")

    def storage(self):
        return sc.FileSystemCheckpointStorage(self.ckpt_uri, storage_options=self.storage_options or None)

    @property
    def db_dir(self):
        return os.path.join(self.root, "db")


@dataclass
class Report:
    cycles: int = 0
    kills: int = 0
    inside_checkpoint: int = 0
    power_losses: int = 0
    unsynced_dropped: int = 0
    unsynced_truncated: int = 0
    completed_streams: int = 0
    kill_points: Counter = field(default_factory=Counter)      # confirmed kills per point ("blackbox" too)
    kill_attempts: Counter = field(default_factory=Counter)    # whitebox cycles per named point
    kill_misses: Counter = field(default_factory=Counter)      # "<point> <why>": attempts that were no hit
    dirsync_phases: Counter = field(default_factory=Counter)   # where the dirsync kills landed
    topup_cycles: int = 0
    lost: int = 0          # acknowledged checkpoints lost (newest valid < newest ACKed, or ACKed+committed rejected)
    mismatches: int = 0    # accepted checkpoints that do not restore to replay(seed, op_index)
    folders_checked: int = 0
    valid: int = 0
    rejected: int = 0
    acks: int = 0
    failures: list = field(default_factory=list)

    def fail(self, msg):
        self.failures.append(msg)


# ----------------------------------------------------------------------------- oracle

class _Replay:
    """replay(seed, op_index) for increasing op indices in one pass: a chain's checkpoints only move forward."""

    def __init__(self, seed):
        self.seed = seed
        self.stream = cw.op_stream(seed)
        self.model = cw.new_model()
        self.at = 0
        self.dumps = {0: {}}

    def dump(self, op_index):
        if op_index not in self.dumps:
            if op_index < self.at:  # behind the cursor and not cached: start over
                self.__init__(self.seed)
            for op in self.stream:
                cw.apply_model(self.model, op)
                self.at += 1
                if self.at == op_index:
                    break
            assert self.at == op_index, (self.seed, op_index, self.at)
            self.dumps[op_index] = cw.canonical_model(self.model)
        return self.dumps[op_index]


_REPLAYS = {}


def oracle(seed, op_indices):
    """{op_index: canonical dump of replay(seed, op_index)}; replays each seed's stream once, forward."""
    r = _REPLAYS.get(seed)
    if r is None:
        _REPLAYS.clear()  # one chain (seed) at a time: keep memory flat in soak runs
        r = _REPLAYS[seed] = _Replay(seed)
    return {i: r.dump(i) for i in sorted(set(op_indices))}


def restore_dump(chain, location):
    """Canonical dump of a restore of ``location`` into a fresh backend of the same type (in this process)."""
    b = cw.make_backend(chain.backend, os.path.join(chain.root, "unused"), None, NUM_RETAINED)
    kb = b.restore_keyed_state_backend([location], max_parallelism=128, job_id=cw.JOB, operator_id=cw.OPERATOR)
    try:
        return cw.canonical_backend(kb)
    finally:
        kb.close()


# ----------------------------------------------------------------------------- power loss

def emulate_power_loss(log_path, rng):
    """Undo what was not durable when the child died, from its I/O-event log.

    A file's bytes are durable after an ``fsync`` event following its last ``write``;
    a directory entry (file created by ``write``, ``_metadata`` linked by ``publish``)
    after a ``dirsync`` of its directory.  Not durable: the entry is dropped, or the
    content is cut to a random prefix.  Returns (dropped, truncated) counts.
    """
    try:
        with open(log_path) as f:
            events = [line.rstrip("\n").split("\t", 1) for line in f if "\t" in line]
    except FileNotFoundError:
        return 0, 0
    content_ok, entry_ok, last_tmp = {}, {}, {}
    for ev, path in events:
        if ev == "write":
            content_ok[path] = False
            entry_ok[path] = False
            if os.path.basename(path).startswith("_metadata.tmp"):
                last_tmp[os.path.dirname(path)] = path
        elif ev == "fsync":
            content_ok[path] = True
        elif ev == "publish":
            tmp = last_tmp.get(os.path.dirname(path))
            content_ok[path] = content_ok.get(tmp, False)  # a hard link to the temp file's inode
            entry_ok[path] = False
        elif ev == "dirsync":
            for p in entry_ok:
                if os.path.dirname(p) == path:
                    entry_ok[p] = True
    dropped = truncated = 0
    for path in entry_ok:
        if not os.path.exists(path):
            continue
        if not entry_ok[path]:
            os.unlink(path)
            dropped += 1
        elif not content_ok.get(path, False):
            size = os.path.getsize(path)
            keep = rng.randrange(size + 1) if size else 0
            if keep < size:
                os.truncate(path, keep)
                truncated += 1
    return dropped, truncated


# ----------------------------------------------------------------------------- verification

def verify(chain, report, *, power_loss, acked_now):
    """Check every chk-* folder of the chain's storage against the oracle; set the resume point."""
    storage = chain.storage()
    committed = set(storage.list_checkpoints(cw.JOB, cw.OPERATOR))
    schedule = cw.checkpoint_ops(chain.seed)
    # Every chk-* folder (committed or not), listed through the storage's own store: a local directory or,
    # on S3, the common prefixes under the operator's location.
    op_location = storage._operator_location(cw.JOB, cw.OPERATOR)
    store, op_path = storage._resolve(op_location)
    folders = []
    for name in store.listdir(op_path):
        if name.startswith("chk-"):
            cid = int(name.split("-")[1])
            folders.append((cid, stg._join(op_location, name)))
    folders.sort()
    expected = oracle(chain.seed, [schedule[cid - 1] for cid, _ in folders])
    valid = []
    for cid, loc in folders:
        report.folders_checked += 1
        what = f"[{chain.backend} seed={chain.seed} chk-{cid}]"
        try:
            completed = sc.load_checkpoint(loc)
            if loc not in committed:
                report.fail(f"{what} load_checkpoint accepted a folder list_checkpoints does not list")
            if completed.checkpoint_id != cid:
                report.fail(f"{what} metadata says checkpoint {completed.checkpoint_id}")
            got = restore_dump(chain, loc)
        except CorruptCheckpointError:
            report.rejected += 1
            if cid in chain.acked and loc in committed:
                report.lost += 1
                report.fail(f"{what} an acknowledged, committed checkpoint is rejected as corrupt")
            continue
        except Exception as e:  # noqa: BLE001 - any other exception type is a finding
            report.fail(f"{what} {type(e).__name__} instead of CorruptCheckpointError: {e}")
            continue
        want = expected[schedule[cid - 1]]
        if got != want:
            missing = len(set(want) - set(got))
            extra = len(set(got) - set(want))
            diff = sum(1 for k in set(want) & set(got) if want[k] != got[k])
            report.mismatches += 1
            report.fail(f"{what} restored state differs from replay(seed, {schedule[cid - 1]}): "
                        f"{missing} missing, {extra} extra, {diff} different entries (partially accepted)")
            continue
        if chain.acked.get(cid, schedule[cid - 1]) != schedule[cid - 1]:
            report.fail(f"{what} ACKed at op {chain.acked[cid]}, schedule says {schedule[cid - 1]}")
        report.valid += 1
        valid.append((cid, loc))
    # Retention: an ACK means that checkpoint's retention ran (all older committed folders but the
    # newest NUM_RETAINED deleted), so after an ACK at most one newer commit can be pending; a child
    # killed before any ACK adds at most its one unretained commit to what was there.
    limit = NUM_RETAINED + 1 if acked_now else chain.committed + 1
    if len(committed) > limit:
        report.fail(f"[{chain.backend} seed={chain.seed}] {len(committed)} committed checkpoints, retention "
                    f"allows {limit} (num_retained={NUM_RETAINED}, ACKed in this run: {acked_now})")
    chain.committed = len(committed)
    newest_acked = max(chain.acked, default=0)
    newest_valid = valid[-1][0] if valid else 0
    if newest_valid < newest_acked:
        report.lost += 1
        report.fail(f"[{chain.backend} seed={chain.seed}] lost acknowledged checkpoint {newest_acked}: newest valid "
                    f"checkpoint on storage is {newest_valid or 'none'}" + (" (after power loss)" if power_loss else ""))
        chain.done = True  # the chain cannot continue meaningfully
        return
    chain.resume_id, chain.resume_location = (valid[-1] if valid else (0, ""))


# ----------------------------------------------------------------------------- one cycle

def read_io_log(log_path):
    try:
        with open(log_path) as f:
            return [tuple(line.rstrip("\n").split("\t", 1)) for line in f if "\t" in line]
    except FileNotFoundError:
        return []


def confirm_kill_point(events, point, n):
    """Why a whitebox kill at the n-th ``point`` event is NOT confirmed by the I/O log, or None if it is.

    The child's hook logs every event before it acts on it, so a kill at the point leaves a log
    whose last event is that point, with exactly n events matching it."""
    event, sub = point  # sub "" (the LMDB points) matches any path
    matching = sum(1 for ev, path in events if ev == event and sub in path)
    if not events or events[-1][0] != event or sub not in events[-1][1]:
        return f"died elsewhere ({matching}/{n} reached)"
    if matching != n:
        return f"died at occurrence {matching}, armed for {n}"
    return None


def dirsync_phase(events):
    """Where a kill at a ``dirsync`` of a chk- folder landed, from the events of that folder before it."""
    folder = events[-1][1]
    for ev, path in reversed(events[:-1]):
        if ev == "publish" and os.path.dirname(path) == folder:
            return "after publish"
        if ev == "delete" and path == folder:
            return "retention delete"
        if ev in ("write", "fsync") and os.path.dirname(path) == folder:
            return "before publish"
    return "other"


def run_cycle(chain, report, rng, cycle, *, point, power_loss, extra_env=None):
    """One child run killed at the whitebox ``point`` ((event, path substring)), or blackbox if None."""
    log_path = os.path.join(chain.root, f"io-{cycle}.log")
    env = dict(os.environ)
    env.pop("STATECORE_CRASH_KILL", None)
    env.pop("STATECORE_CRASH_IOLOG", None)
    env["PYTHONPATH"] = PKG_PARENT
    env.update(extra_env or {})
    blackbox = point is None
    if power_loss or not blackbox:
        # Whitebox cycles always log: the log's last event confirms where the child died.
        env["STATECORE_CRASH_IOLOG"] = log_path
    n = None
    if not blackbox:
        n = rng.randint(1, 8)
        env["STATECORE_CRASH_KILL"] = f"{point[0]}:{point[1]}:{n}"
        report.kill_attempts[point_name(point)] += 1
    cfg = {"backend": chain.backend, "ckpt_dir": chain.ckpt_uri, "storage_options": chain.storage_options,
           "db_dir": chain.db_dir, "seed": chain.seed, "resume_id": chain.resume_id,
           "resume_location": chain.resume_location, "num_retained": NUM_RETAINED}
    stderr_path = os.path.join(chain.root, f"stderr-{cycle}.txt")
    with open(stderr_path, "wb") as err:
        p = subprocess.Popen([sys.executable, WRITER, json.dumps(cfg)], cwd=chain.root, env=env,
                             stdout=subprocess.PIPE, stderr=err, text=True)
    watchdog = threading.Timer(START_TIMEOUT, p.kill)
    timer_killed = False
    watchdog.start()
    try:
        first = p.stdout.readline()
        if blackbox and first.startswith("READY"):
            time.sleep(rng.uniform(*BLACKBOX_DELAY))
            p.send_signal(signal.SIGKILL)
            rest, _ = p.communicate()
        else:
            try:
                rest, _ = p.communicate(timeout=WHITEBOX_TIMEOUT)
            except subprocess.TimeoutExpired:
                p.kill()
                rest, _ = p.communicate()
                timer_killed = True
    finally:
        watchdog.cancel()
    lines = [first.strip()] + rest.splitlines()
    with open(stderr_path, errors="replace") as f:
        stderr = f.read()
    report.cycles += 1
    what = f"[{chain.backend} seed={chain.seed} cycle={cycle}]"
    if not lines[0].startswith("READY"):
        report.fail(f"{what} child did not start (rc={p.returncode}): {stderr[-2000:]}")
        chain.done = True
        return
    schedule = cw.checkpoint_ops(chain.seed)
    last = ""
    acked_now = False
    for line in lines[1:]:
        parts = line.split()
        if parts and parts[0] == "ACK":
            cid, op = int(parts[1]), int(parts[2])
            chain.acked[cid] = op
            acked_now = True
            report.acks += 1
            if schedule[cid - 1] != op:
                report.fail(f"{what} ACK {cid} at op {op}, schedule says {schedule[cid - 1]}")
        if parts:
            last = parts[0]
    name = "blackbox" if blackbox else point_name(point)
    if p.returncode == 0 and last == "DONE":
        report.completed_streams += 1
        chain.done = True
        if not blackbox:
            report.kill_misses[f"{name} stream completed first"] += 1
    elif p.returncode == -signal.SIGKILL:
        report.kills += 1
        if last == "BEGIN":
            report.inside_checkpoint += 1
        if blackbox:
            report.kill_points[name] += 1
        else:
            events = read_io_log(log_path)
            why = "not reached in time: timer kill" if timer_killed else confirm_kill_point(events, point, n)
            if why is None:
                report.kill_points[name] += 1
                if point[0] == "dirsync":
                    report.dirsync_phases[dirsync_phase(events)] += 1
            else:
                report.kill_misses[f"{name} {why}"] += 1
    else:
        report.fail(f"{what} child exited with rc={p.returncode}: {stderr[-2000:]}")
        chain.done = True
        return
    if power_loss:
        dropped, truncated = emulate_power_loss(log_path, rng)
        report.power_losses += 1
        report.unsynced_dropped += dropped
        report.unsynced_truncated += truncated
    verify(chain, report, power_loss=power_loss, acked_now=acked_now)
    chain.restarts += 1


def run_harness(config, tmp_path, cycles, *, seed=None, s3=None, extra_env=None, stop_on_failure=False,
                power_loss_every=None, quota=0):
    """``cycles`` kill cycles of ``config``: every BLACKBOX_EVERY-th blackbox, the others whitebox,
    round-robin over ``config.kill_points``.  Then, while a named point has fewer than ``quota``
    confirmed hits, extra whitebox cycles at it (at most TOPUP_ATTEMPTS_PER_HIT per missing hit, so
    an unreachable point fails the quota check instead of looping).  ``s3``: (bucket, storage_options)
    for a config on S3; every chain gets its own prefix in the bucket."""
    seed = config.seed if seed is None else seed
    rng = random.Random(seed)
    report = Report()
    state = {"chain": None, "n_chain": 0}
    every = POWER_LOSS_EVERY if power_loss_every is None else power_loss_every
    points = config.kill_points

    def one(cycle, point):
        chain = state["chain"]
        if chain is None or chain.done or chain.restarts >= MAX_RESTARTS_PER_SEED:
            state["n_chain"] += 1
            name = f"{config.name}-chain{state['n_chain']}"
            root = tmp_path / name
            root.mkdir()
            chain = Chain(config.backend, str(root), seed=seed * 1000 + state["n_chain"])
            if config.storage == "s3":
                bucket, opts = s3
                chain.ckpt_uri, chain.storage_options = f"s3://{bucket}/{name}/ckpt", dict(opts)
            state["chain"] = chain
        power_loss = config.power_loss and cycle % every == every - 1
        run_cycle(chain, report, rng, cycle, point=point, power_loss=power_loss, extra_env=extra_env)
        return not (stop_on_failure and report.failures)

    whitebox = 0
    for cycle in range(cycles):
        point = None
        if cycle % BLACKBOX_EVERY:
            point = points[whitebox % len(points)]
            whitebox += 1
        if not one(cycle, point):
            return report
    cycle = cycles
    for point in points:
        name = point_name(point)
        budget = TOPUP_ATTEMPTS_PER_HIT * max(0, quota - report.kill_points[name])
        while report.kill_points[name] < quota and budget > 0:
            budget -= 1
            report.topup_cycles += 1
            if not one(cycle, point):
                return report
            cycle += 1
    return report


def summarize(config, report, elapsed):
    hits = ", ".join(f"{n} {report.kill_points[n]}/{report.kill_attempts[n]}"
                     for n in map(point_name, config.kill_points))
    return (f"{config.name} ({config.backend}+{config.storage}): {report.cycles} cycles ({report.topup_cycles} top-up), {report.kills} kills "
            f"({report.inside_checkpoint} inside a checkpoint, {report.kill_points['blackbox']} blackbox), "
            f"{report.power_losses} power losses ({report.unsynced_dropped} entries dropped, "
            f"{report.unsynced_truncated} files cut), {report.completed_streams} streams completed, "
            f"{report.acks} ACKs, {report.folders_checked} folders checked ({report.valid} valid, "
            f"{report.rejected} rejected), lost ACKed {report.lost}, mismatches {report.mismatches}, "
            f"{len(report.failures)} failures, {elapsed:.1f}s\n"
            f"  kill points hit/attempted (quota {KILL_POINT_QUOTA}): {hits}\n"
            f"  dirsync kills: {dict(report.dirsync_phases)}; misses: {dict(report.kill_misses) or 'none'}")


def _configs():
    from backends import BACKENDS
    return [pytest.param(c, id=c.name) for c in CONFIGS if c.backend in BACKENDS]


@pytest.mark.slow
@pytest.mark.parametrize("config", _configs())
def test_kill9_during_checkpoints_never_loses_acked_or_accepts_partial(config, tmp_path, request):
    # S3: moto's server on 127.0.0.1 and a fresh bucket (conftest.s3_options; skips without moto[server]/s3fs).
    s3 = request.getfixturevalue("s3_options") if config.storage == "s3" else None
    t0 = time.monotonic()
    report = run_harness(config, tmp_path, config.cycles, s3=s3, quota=KILL_POINT_QUOTA)
    elapsed = time.monotonic() - t0
    summary = summarize(config, report, elapsed)
    print("\n" + summary)
    assert not report.failures, "\n".join(report.failures[:20]) + "\n" + summary
    assert report.lost == 0 and report.mismatches == 0, summary
    assert report.kills >= report.cycles * 0.9, summary
    assert report.acks > 0 and report.valid > 0, summary
    # Most kills must land inside a checkpoint (whitebox kills always do).
    assert report.inside_checkpoint >= report.kills * 0.5, summary
    # Every named kill point of the checkpoint protocol really killed the child >= KILL_POINT_QUOTA times.
    short = {n: report.kill_points[n] for n in map(point_name, config.kill_points)
             if report.kill_points[n] < KILL_POINT_QUOTA}
    assert not short, f"kill points below the quota of {KILL_POINT_QUOTA}: {short}\n{summary}"


@pytest.mark.slow
def test_negative_control_skipped_fsync_loses_acked_checkpoint_on_power_loss(tmp_path):
    """A harness that cannot fail proves nothing: planting the "no fsync" bug must be caught."""
    report = run_harness(CONFIGS[0], tmp_path, 12, seed=3, extra_env={"STATECORE_DEBUG_SKIP_FSYNC": "1"},
                         stop_on_failure=True, power_loss_every=1)
    assert report.failures, "the crash harness did not detect checkpoints written without fsync"
    assert any("lost acknowledged checkpoint" in f or "acknowledged, committed" in f for f in report.failures), \
        report.failures


def test_power_loss_emulation_keeps_fsynced_and_drops_unsynced(tmp_path):
    """The emulation itself: synced content and entries survive, the rest does not."""
    d = tmp_path / "d"
    d.mkdir()
    a, b, c = d / "a", d / "b", d / "c"
    for p in (a, b, c):
        p.write_bytes(b"x" * 100)
    log = tmp_path / "log"
    log.write_text(f"write\t{a}\nfsync\t{a}\nwrite\t{b}\ndirsync\t{d}\nwrite\t{c}\nfsync\t{c}\n")

    class KeepNothing:
        def randrange(self, n):
            return 0
    dropped, truncated = emulate_power_loss(str(log), KeepNothing())
    assert a.read_bytes() == b"x" * 100          # fsynced, entry synced
    assert b.read_bytes() == b"" and truncated == 1  # entry synced, content never fsynced
    assert not c.exists() and dropped == 1       # fsynced content but no directory fsync afterwards


def test_lmdb_crash_hook_reports_spill_and_commit_in_the_flush_thread(tmp_path):
    """The test-only hook behind the wb.spill / lmdb.commit kill points (statecore._lmdb._set_crash_hook):
    called in the flush thread, a spill before its commit(s), and never once cleared."""
    from backends import BACKENDS
    if "lmdb" not in BACKENDS:
        pytest.skip("no LMDB tier in this build")
    from statecore import _lmdb
    seen = []
    hook = lambda event: seen.append((event, threading.current_thread().name))  # noqa: E731
    assert _lmdb._set_crash_hook(hook) is None
    try:
        kb = BACKENDS["lmdb"](tmp_path).create_keyed_state_backend(max_parallelism=128)
        try:
            v = kb.get_state(sc.ValueStateDescriptor("v", sc.Int64()))
            for k in range(2000):
                kb.set_current_key(k)
                v.update(k)
            kb.flush()
            assert ("wb.spill", "statecore-lmdb-flush") in seen and ("lmdb.commit", "statecore-lmdb-flush") in seen
            assert {t for _, t in seen} == {"statecore-lmdb-flush"}, seen
            assert seen[0][0] == "wb.spill" and seen.count(("lmdb.commit", "statecore-lmdb-flush")) >= \
                seen.count(("wb.spill", "statecore-lmdb-flush")), seen
            assert _lmdb._set_crash_hook(None) is hook
            n = len(seen)
            for k in range(2000):
                kb.set_current_key(k)
                v.update(-k)
            kb.flush()
            assert len(seen) == n  # cleared: no calls
        finally:
            kb.close()
    finally:
        _lmdb._set_crash_hook(None)
