"""State 10x the memory budget (RELIABILITY.md T9).

A CHILD process (``python tests/test_reliability_memory.py child <dir> <budget MiB> <value bytes>``)
runs an LMDB tier with ``memory_budget=BUDGET`` under ``RLIMIT_DATA = VmData at start + 2 x BUDGET``
(``resource.setrlimit``; not RLIMIT_AS, which the LMDB map reservation would exhaust; thread stacks are
kept at 1 MiB and ``MALLOC_ARENA_MAX=2`` so the limit measures the heap, not reservations).  A sampler
thread reads ``RssAnon`` from ``/proc/self/status`` every 50 ms (RSS would count LMDB's clean mapped
file pages).  Phases, each with its own peak RssAnon growth over the RssAnon at the phase start:

1. load 10 x BUDGET of payload with ``update_batch`` (int64 keys, ``Bytes`` values);
2. 1,000,000 random reads with ``value_batch``;
3. a ``get_keys`` scan;
4. a checkpoint (local file storage);
5. a restore (into another LMDB tier with the same budget).

Target: every phase's peak growth <= 1.5 x BUDGET and no MemoryError (the RLIMIT_DATA guard).
Every phase is asserted: ``get_keys`` streams on the LMDB tier; a checkpoint's snapshot sink spills
runs to a temp file past memory_budget / 4 and is written as views of its buffers and of the spill
file; a restore maps the data files (page cache, not anonymous memory) and loads through the
write buffers.

Negative control (``--plant``): a first phase holds 1.7 x BUDGET of anonymous memory; the harness
must flag it (over 1.5 x BUDGET, below the RLIMIT_DATA guard).
"""
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import pytest

SOAK = os.environ.get("STATECORE_SOAK") == "1"
MIB = 1 << 20
BUDGET_MIB = 32
VALUE_BYTES = 1024           # 10 x 32 MiB = 327,680 keys (the plan's 160 B values: 2M keys, ~2 min)
PAYLOAD_FACTOR = 100 if SOAK else 10
READS = 1_000_000
LIMIT = 1.5


def rss_anon():
    with open("/proc/self/status") as f:
        for ln in f:
            if ln.startswith("RssAnon:"):
                return int(ln.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def vm_data():
    with open("/proc/self/status") as f:
        for ln in f:
            if ln.startswith("VmData:"):
                return int(ln.split()[1]) * 1024
    raise RuntimeError("no VmData in /proc/self/status")


def child(root, budget, value_bytes, plant=False):
    import resource

    threading.stack_size(1 * MIB)
    import numpy as np

    import statecore as sc
    from statecore.serializers import Bytes

    report = {"budget": budget, "value_bytes": value_bytes, "phases": []}
    backend = sc.LMDBStateBackend(db_path=os.path.join(root, "db"), memory_budget=budget,
                                  checkpoint_storage=sc.FileSystemCheckpointStorage(os.path.join(root, "ckpt")))
    kb = backend.create_keyed_state_backend(max_parallelism=128)
    st = kb.get_state(sc.ValueStateDescriptor("v", Bytes()))
    peak = [0]
    stop = threading.Event()

    def sampler():
        while not stop.is_set():
            v = rss_anon()
            if v > peak[0]:
                peak[0] = v
            time.sleep(0.05)

    threading.Thread(target=sampler, daemon=True).start()
    time.sleep(0.1)
    report["vmdata_start"] = vm_data()
    limit = report["vmdata_start"] + 2 * budget
    hard = resource.getrlimit(resource.RLIMIT_DATA)[1]  # only the soft limit is set, so it can be lifted again
    resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))
    report["rlimit_data"] = limit

    def phase(name, fn, guarded=True):
        if not guarded:  # figures only: the same phase again without the RLIMIT_DATA guard
            resource.setrlimit(resource.RLIMIT_DATA, (hard, hard))
        time.sleep(0.06)
        start = rss_anon()
        peak[0] = start
        t0 = time.monotonic()
        rec = {"phase": name}
        try:
            rec["result"] = fn()
        except MemoryError as e:
            rec["memory_error"] = f"MemoryError: {e}"
        except BaseException as e:  # noqa: BLE001
            rec["error"] = f"{type(e).__name__}: {e}"
        time.sleep(0.1)  # one more sample
        rec["seconds"] = round(time.monotonic() - t0, 1)
        rec["peak_growth"] = max(peak[0], rss_anon()) - start
        if not guarded:
            rec["phase"] += " (unguarded)"
            resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))
        report["phases"].append(rec)
        return "memory_error" not in rec and "error" not in rec

    n = PAYLOAD_FACTOR * budget // value_bytes
    fill = os.urandom(value_bytes)

    def load():
        batch = 4096
        for i in range(0, n, batch):
            ks = np.arange(i, min(n, i + batch), dtype=np.int64)
            st.update_batch(ks, [k.to_bytes(8, "little") + fill[8:] for k in ks.tolist()])
        return {"keys": n, "payload_bytes": n * value_bytes}

    def reads():
        rng = np.random.default_rng(1)
        bad = 0
        for _ in range(READS // 10000):
            ks = rng.integers(0, n, 10000)
            for k, v in zip(ks.tolist(), st.value_batch(ks)):
                bad += v is None or v[:8] != k.to_bytes(8, "little")
        return {"reads": READS, "wrong": bad}

    def scan():
        count = 0
        for _ in kb.get_keys("v"):
            count += 1
        return {"keys": count}

    holder = {}

    def checkpoint():
        holder["ckpt"] = kb.checkpoint(1)
        return {"bytes": sum(f["length"] for f in holder["ckpt"].metadata["files"])}

    def restore():
        kb.close()
        kb2 = backend.restore_keyed_state_backend([holder["ckpt"]], max_parallelism=128)
        try:
            st2 = kb2.get_state(sc.ValueStateDescriptor("v", Bytes()))
            probe = np.arange(0, n, max(1, n // 1000), dtype=np.int64)
            ok = all(v is not None and v[:8] == k.to_bytes(8, "little")
                     for k, v in zip(probe.tolist(), st2.value_batch(probe)))
            return {"probe_ok": ok, "entries": kb2.num_state_entries()}
        finally:
            kb2.close()

    def planted():
        blob = bytearray(int(1.7 * budget))  # PLANTED: anonymous memory beyond the 1.5 x budget bound
        blob[::4096] = b"\1" * len(blob[::4096])
        time.sleep(0.2)
        return {"held": len(blob)}

    if plant:
        phase("planted", planted)
    phase("load", load)
    phase("reads", reads)
    if not phase("get_keys scan", scan):
        phase("get_keys scan", scan, guarded=False)
    if not phase("checkpoint", checkpoint):
        phase("checkpoint", checkpoint, guarded=False)
    if "ckpt" in holder and not phase("restore", restore):
        phase("restore", restore, guarded=False)
    stop.set()
    return report


def run_child(tmp_path, plant=False, budget_mib=BUDGET_MIB, value_bytes=VALUE_BYTES):
    out = tmp_path / ("plant.json" if plant else "report.json")
    env = dict(os.environ, MALLOC_ARENA_MAX="2", PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    cmd = [sys.executable, os.path.abspath(__file__), "child", str(tmp_path), str(budget_mib), str(value_bytes),
           str(out)] + (["--plant"] if plant else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900 if SOAK else 240, env=env)
    assert proc.returncode == 0, f"child exit {proc.returncode}:\n{proc.stderr[-3000:]}"
    return json.loads(out.read_text())


def verdicts(report):
    """{phase: problem or None} against the 1.5 x budget bound."""
    budget = report["budget"]
    out = {}
    for p in report["phases"]:
        problem = None
        if "memory_error" in p:
            problem = f"hit RLIMIT_DATA ({p['memory_error']})"
        elif "error" in p:
            problem = p["error"]
        elif p["peak_growth"] > LIMIT * budget:
            problem = f"peak RssAnon growth {p['peak_growth'] / MIB:.1f} MiB > {LIMIT} x budget"
        out[p["phase"]] = problem
    return out


def describe(report):
    b = report["budget"]
    rows = [f"  {p['phase']:<14} {p['seconds']:>6} s  peak RssAnon growth {p['peak_growth'] / MIB:7.1f} MiB "
            f"({p['peak_growth'] / b:4.2f} x budget)  {p.get('result') or p.get('memory_error') or p.get('error')}"
            for p in report["phases"]]
    return (f"T9: budget {b // MIB} MiB, values {report['value_bytes']} B, RLIMIT_DATA "
            f"{report['rlimit_data'] // MIB} MiB (VmData at start {report['vmdata_start'] // MIB} MiB + 2 x budget)\n"
            + "\n".join(rows))


@pytest.fixture(scope="module")
def t9_report(tmp_path_factory):
    report = run_child(tmp_path_factory.mktemp("t9"))
    print("\n" + describe(report))
    return report


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_load_and_random_reads_stay_within_budget(t9_report):
    v = verdicts(t9_report)
    phases = {p["phase"]: p for p in t9_report["phases"]}
    assert phases["load"]["result"]["payload_bytes"] >= 10 * t9_report["budget"]
    assert phases["reads"]["result"]["wrong"] == 0
    assert v["load"] is None and v["reads"] is None, v


def phase_problems(report, name):
    """{phase run: problem} of phase ``name`` (its guarded run, and the unguarded rerun when there was one)."""
    return {k: p for k, p in verdicts(report).items() if k.split(" (")[0] == name and p}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_get_keys_scan_stays_within_budget(t9_report):
    """get_keys streams on the LMDB tier (statecore/_lmdb.pyx LMDBKeyScan)."""
    phases = {p["phase"]: p for p in t9_report["phases"]}
    assert phases["get_keys scan"].get("result", {}).get("keys") == phases["load"]["result"]["keys"], phases
    bad = phase_problems(t9_report, "get_keys scan")
    assert not bad, bad


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_checkpoint_stays_within_budget(t9_report):
    bad = phase_problems(t9_report, "checkpoint")
    assert not bad, bad


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_restore_stays_within_budget(t9_report):
    phases = {p["phase"] for p in t9_report["phases"]}
    assert "restore" in phases, "no restore phase ran (the checkpoint failed)"
    bad = phase_problems(t9_report, "restore")
    assert not bad, bad


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_negative_control_planted_allocation_is_caught(tmp_path):
    """Smaller run (16 MiB budget) with 1.7 x budget held in a first phase: the harness must flag that phase."""
    report = run_child(tmp_path, plant=True, budget_mib=16, value_bytes=1024)
    v = verdicts(report)
    print("\nnegative control:\n" + describe(report))
    assert v["planted"] is not None, v
    assert v["load"] is None and v["reads"] is None, v


if __name__ == "__main__":
    if sys.argv[1] == "child":
        rep = child(sys.argv[2], int(sys.argv[3]) * MIB, int(sys.argv[4]), plant="--plant" in sys.argv)
        with open(sys.argv[5], "w") as f:
            json.dump(rep, f)
