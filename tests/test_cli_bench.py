"""``statecore bench`` end to end, in a subprocess (``python -m statecore``), against the imported package."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

import statecore
from statecore import workloads as w
from statecore.cli import main

PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(statecore.__file__)))


def _run(args, cwd, extra_path=(), timeout=180):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*extra_path, PKG_PARENT])
    env.pop("PYTHONSTARTUP", None)
    return subprocess.run([sys.executable, "-m", "statecore", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _load(path):
    with open(path) as f:
        return json.load(f)


def test_bench_quick_json_has_every_workload_and_backend(tmp_path):
    out = tmp_path / "out.json"
    r = _run(["bench", "--quick", "--json", str(out)], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    doc = _load(out)
    v = doc["versions"]
    for name in ("python", "numpy", "lmdb", "statecore"):
        assert v[name], name
    assert v["statecore"] == statecore.__version__
    m = doc["machine"]
    assert m["cpu_model"] and m["cores"] >= 1 and m["memory_bytes"] > 0
    assert doc["config"]["quick"] is True and doc["config"]["keys"] == 10_000
    assert doc["peak_rss_method"]
    assert 0 < doc["elapsed_s"] < 60  # --quick: under a minute

    rows = {(r["workload"], r["backend"]): r for r in doc["results"]}
    assert set(rows) == {(wl, b) for wl in w.WORKLOADS for b in w.BACKENDS}
    has_rocksdict = importlib.util.find_spec("rocksdict") is not None
    byte_workloads = {wl for wl, x in w.WORKLOADS.items() if x.unit == "B"}  # checkpoint/restore: bytes/s
    assert {"checkpoint", "restore", "incremental-checkpoint"} <= byte_workloads
    for (wl, b), row in rows.items():
        expect_skip = (wl == "spill" and b in ("dict", "hashmap")) or (b == "rocksdict" and not has_rocksdict) or \
            (wl in byte_workloads and b not in w.STATE_BACKENDS)
        if expect_skip:
            assert row["status"] == "skipped" and row["note"], row
            continue
        assert row["status"] == "ok", row
        assert row["ops_per_s"] > 0 and row["ns_per_op"] > 0 and row["ops"] > 0 and row["n"] > 0, row
        if wl not in byte_workloads:
            assert row["ops"] >= row["n"], row
        assert abs(row["ops_per_s"] * row["ns_per_op"] - 1e9) < 1e3
        assert row["peak_rss_mib"] is not None
        if wl != "spill" and wl not in byte_workloads:
            assert row["ratio_to_dict"] > 0, row
    for wl in w.WORKLOADS:
        if wl != "spill" and wl not in byte_workloads:
            assert rows[(wl, "dict")]["ratio_to_dict"] == pytest.approx(1.0)
    for b in w.STATE_BACKENDS:  # an incremental checkpoint after a 1 % change is >= 10x smaller than a full one
        assert rows[("incremental-checkpoint", b)]["ops"] * 10 <= rows[("checkpoint", b)]["ops"], b
    assert rows[("map", "hashmap")]["ops"] == 3 * 1000 * w.MAP_USER_KEYS  # 10k/10 keys x 100 user keys, 3 ops

    # the table on stdout names every workload and backend
    for name in [*w.WORKLOADS, *w.BACKENDS]:
        assert name in r.stdout, name
    assert "ops/s" in r.stdout and "ns/op" in r.stdout


def test_bench_subset(tmp_path):
    out = tmp_path / "sub.json"
    r = _run(["bench", "--backends", "hashmap", "--workloads", "value-rmw", "--keys", "3000", "--json", str(out)],
             tmp_path)
    assert r.returncode == 0, r.stderr
    doc = _load(out)
    assert [(x["workload"], x["backend"], x["status"]) for x in doc["results"]] == [("value-rmw", "hashmap", "ok")]
    row = doc["results"][0]
    assert row["n"] == 3000 and row["ops"] == 3000 and row["ops_per_s"] > 0
    assert row["ratio_to_dict"] is None  # no dict row in this run
    assert "value-rmw" in r.stdout and "hashmap" in r.stdout and "lmdb" not in r.stdout


@pytest.mark.parametrize("args, needle", [
    (["bench", "--backends", "hashmap,nosuch"], "unknown backend 'nosuch'"),
    (["bench", "--workloads", "bogus"], "unknown workload 'bogus'"),
    (["bench", "--keys", "0"], "--keys must be at least 1"),
    (["bench", "--json", "/nonexistent-dir/x.json"], "does not exist"),
    (["demo", "--records", "10"], "--records must be at least 500"),
    (["demo", "--records", "1000", "--checkpoint-every", "1000"], "--checkpoint-every must be between"),
])
def test_bad_command_line_is_one_line_exit_2(tmp_path, args, needle):
    r = _run(args, tmp_path)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("statecore: error:"), r.stderr
    assert r.stdout == ""


def test_plot_without_matplotlib_is_a_clear_error(tmp_path):
    fake = tmp_path / "fake"
    (fake / "matplotlib").mkdir(parents=True)
    (fake / "matplotlib" / "__init__.py").write_text("raise ImportError('no matplotlib here')\n")
    r = _run(["bench", "--workloads", "list", "--backends", "dict", "--keys", "100", "--plot", str(tmp_path / "p.png")],
             tmp_path, extra_path=[str(fake)])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--plot needs matplotlib" in r.stderr
    assert not (tmp_path / "p.png").exists()


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "bench.png"
    r = _run(["bench", "--workloads", "value-rmw,spill", "--backends", "dict,hashmap,lmdb", "--keys", "2000",
              "--plot", str(png)], tmp_path)
    assert r.returncode == 0, r.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_main_in_process(tmp_path, capsys):
    out = tmp_path / "x.json"
    assert main(["bench", "--backends", "dict,lmdb", "--workloads", "list,spill", "--keys", "500",
                 "--json", str(out)]) == 0
    rows = {(r["workload"], r["backend"]): r["status"] for r in _load(out)["results"]}
    assert rows == {("list", "dict"): "ok", ("list", "lmdb"): "ok", ("spill", "dict"): "skipped",
                    ("spill", "lmdb"): "ok"}
    assert "skipped" in capsys.readouterr().out


def test_every_workload_runs_on_its_backends():
    """Each registered (workload, backend) pair sets up, runs twice with the same op count, and closes."""
    for name, wl in w.WORKLOADS.items():
        for b in w.BACKENDS:
            try:
                run = wl.setup(b, wl.size(300))
            except w.Unavailable as e:
                assert str(e)
                continue
            try:
                ops = run()
                assert ops > 0 and run() == ops, (name, b)
            finally:
                w.close_run(run)
