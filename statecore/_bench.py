"""``statecore bench``: run the workloads of :mod:`statecore.workloads` on several backends in one process.

Every (workload, backend) row is set up, run for a few timed passes (the best pass is reported),
then closed before the next row starts.  Rows run one after another in this process, so the
backends share the interpreter, the allocator and the machine state of one run.
"""
import gc
import json
import os
import platform
import statistics
import sys
import threading
import time

from statecore import workloads as w

DEFAULT_KEYS = 100_000
QUICK_KEYS = 10_000
SEED = 1
RSS_SAMPLE_S = 0.01
RSS_METHOD_PROC = ("peak RssAnon (anonymous resident memory, /proc/self/status, sampled every 10 ms by a "
                   "thread) while the row ran, minus its value when the row started; file-backed pages such "
                   "as LMDB's memory map are not counted")
RSS_METHOD_RUSAGE = ("resource.getrusage(RUSAGE_SELF).ru_maxrss: the process-wide peak RSS so far "
                     "(monotone over the run), since /proc/self/status is not available")


class UsageError(Exception):
    """A bad command line: one line on stderr, exit code 2."""


# ---------------------------------------------------------------------------------------------- memory
def _malloc_trim():
    """Hand freed heap memory back to the OS (glibc), so the next row's RssAnon baseline is its own."""
    try:
        import ctypes
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss_anon():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory of one row: RssAnon sampled by a thread, else ``ru_maxrss``."""

    def __init__(self):
        self.proc = _rss_anon() is not None
        self.method = RSS_METHOD_PROC if self.proc else RSS_METHOD_RUSAGE

    def __enter__(self):
        if self.proc:
            self.start = self.peak = _rss_anon()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, name="statecore-bench-rss", daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(RSS_SAMPLE_S):
            v = _rss_anon()
            if v is not None and v > self.peak:
                self.peak = v

    def __exit__(self, *exc):
        if self.proc:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss_anon() or 0)
        return False

    @property
    def peak_mib(self):
        """The figure reported in the table (MiB)."""
        if self.proc:
            return (self.peak - self.start) / 2**20
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ---------------------------------------------------------------------------------------------- running
def measure(run, min_rounds, max_rounds, min_time):
    """Time ``run()`` passes: at least min_rounds, then until min_time seconds or max_rounds."""
    times, ops = [], None
    spent = 0.0
    while len(times) < max_rounds and (len(times) < min_rounds or spent < min_time):
        t0 = time.perf_counter()
        got = run()
        dt = time.perf_counter() - t0
        if ops is None:
            ops = got
        elif got != ops:
            raise RuntimeError(f"run() returned {got} operations after {ops}: passes must do the same work")
        times.append(dt)
        spent += dt
    return ops, times


def run_row(workload, backend, keys, rounds, seed=SEED):
    """One table row as a dict (status ok / skipped / error)."""
    wl = w.WORKLOADS[workload]
    n = wl.size(keys)
    row = {"workload": workload, "backend": backend, "n": n, "unit": wl.unit}
    gc.collect()
    _malloc_trim()
    mem = PeakMemory()
    run = None
    try:
        with mem:
            t0 = time.perf_counter()
            run = wl.setup(backend, n, seed)
            row["setup_s"] = time.perf_counter() - t0
            ops, times = measure(run, *rounds)
    except w.Unavailable as e:
        row.update(status="skipped", note=str(e))
        return row
    except Exception as e:  # a failing row is reported, the others still run
        row.update(status="error", note=f"{type(e).__name__}: {e}")
        return row
    finally:
        if run is not None:
            w.close_run(run)
    best = min(times)
    row.update(status="ok", ops=ops, rounds=len(times), best_s=best, median_s=statistics.median(times),
               ops_per_s=ops / best, ns_per_op=best / ops * 1e9, peak_rss_mib=mem.peak_mib)
    return row


def add_ratios(rows):
    """``ratio_to_dict``: ns/op divided by the dict's ns/op on the same workload (None without a dict row)."""
    ref = {r["workload"]: r["ns_per_op"] for r in rows if r["backend"] == "dict" and r["status"] == "ok"}
    for r in rows:
        base = ref.get(r["workload"])
        r["ratio_to_dict"] = r["ns_per_op"] / base if r["status"] == "ok" and base else None


# ---------------------------------------------------------------------------------------------- reporting
def versions():
    from importlib import metadata

    import lmdb
    import numpy

    import statecore

    def dist(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None
    return {"python": platform.python_version(), "python_implementation": platform.python_implementation(),
            "numpy": numpy.__version__, "lmdb": lmdb.__version__,
            "lmdb_library": ".".join(map(str, lmdb.version())), "statecore": statecore.__version__,
            "rocksdict": dist("rocksdict"), "rich": dist("rich")}


def machine():
    cpu = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = None
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu_model": cpu or platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "usable_cores": usable, "memory_bytes": mem, "machine": platform.machine(),
            "system": platform.system(), "release": platform.release()}


def _fmt_rate(v):
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if v >= div:
            return f"{v / div:.2f} {suffix}"
    return f"{v:.0f}"


def render_table(rows, console, keys):
    from rich.markup import escape
    from rich.table import Table
    t = Table(title=f"statecore bench (--keys {keys:,}; best of the timed passes)", title_justify="left")
    t.add_column("workload")
    t.add_column("backend")
    t.add_column("ops/s", justify="right")
    t.add_column("ns/op", justify="right")
    t.add_column("x dict", justify="right")
    t.add_column("peak RSS MiB", justify="right")
    t.add_column("n", justify="right")
    t.add_column("note", overflow="fold")
    last = None
    for r in rows:
        wname = r["workload"] if r["workload"] != last else ""
        if r["workload"] != last and last is not None:
            t.add_section()
        last = r["workload"]
        if r["status"] == "ok":
            unit = "" if r["unit"] == "op" else f" {r['unit']}"
            ratio = f"{r['ratio_to_dict']:.2f}" if r["ratio_to_dict"] is not None else "-"
            t.add_row(wname, r["backend"], _fmt_rate(r["ops_per_s"]) + unit, f"{r['ns_per_op']:,.0f}", ratio,
                      f"{r['peak_rss_mib']:.1f}", f"{r['n']:,}", "")
        else:
            style = "dim" if r["status"] == "skipped" else "red"
            note = f"[{style}]{r['status']}: {escape(r['note'])}[/{style}]"
            t.add_row(wname, r["backend"], "-", "-", "-", "-", f"{r['n']:,}", note)
    console.print(t)


def write_plot(rows, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    colors = {b: plt.get_cmap("tab10")(i % 10) for i, b in enumerate(backends)}
    ncols = min(3, len(workloads))
    nrows = -(-len(workloads) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.4 * nrows), squeeze=False)
    for ax, wname in zip(axes.flat, workloads):
        ok = [r for r in rows if r["workload"] == wname and r["status"] == "ok"]
        names = [r["backend"] for r in ok]
        vals = [r["ops_per_s"] for r in ok]
        bars = ax.bar(names, vals, color=[colors[b] for b in names])
        ax.set_yscale("log")
        if vals:
            import math
            ax.set_ylim(10 ** math.floor(math.log10(min(vals) / 2)), max(vals) * 4)
        ax.set_title(wname)
        unit = ok[0]["unit"] if ok else "op"
        ax.set_ylabel(f"{unit}s/s (log)")
        ax.tick_params(axis="x", labelrotation=30)
        for b, v in zip(bars, vals):
            ax.annotate(_fmt_rate(v), (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=7)
        skipped = [r["backend"] for r in rows if r["workload"] == wname and r["status"] != "ok"]
        if skipped:
            ax.text(0.99, 0.99, "skipped: " + ", ".join(skipped), transform=ax.transAxes, ha="right",
                    va="top", fontsize=7, color="grey")
    for ax in list(axes.flat)[len(workloads):]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- command
def _names(value, known, what):
    if value is None:
        return list(known)
    names = [x.strip() for x in value.split(",") if x.strip()]
    if not names:
        raise UsageError(f"--{what} needs at least one name (choose from {', '.join(known)})")
    bad = [x for x in names if x not in known]
    if bad:
        raise UsageError(f"unknown {what[:-1]} {bad[0]!r} (choose from {', '.join(known)})")
    return list(dict.fromkeys(names))


def add_parser(subparsers):
    p = subparsers.add_parser(
        "bench", help="compare backends on the standard workloads",
        description="Run the standard workloads on statecore's backends and the baselines a user would pick "
                    "instead (a bare dict, raw py-lmdb, rocksdict when installed), side by side in this process, "
                    "and print a table. Each row is set up, timed over a few passes (the best pass is "
                    "reported) and closed before the next.",
        epilog="columns: ops/s and ns/op of the best pass; 'x dict' = ns/op divided by the bare dict's ns/op on "
               "the same workload (1.00 = as fast as a dict, 3.00 = 3 times slower; '-' when dict is not among "
               "--backends or does not run that workload); 'peak RSS MiB' = " + RSS_METHOD_PROC + " (without "
               "/proc: " + RSS_METHOD_RUSAGE + "). Workloads: "
               + "; ".join(f"{k}: {v.description}" for k, v in w.WORKLOADS.items())
               + ". Backends: " + "; ".join(f"{k}: {v}" for k, v in w.BACKENDS.items()) + ".")
    p.add_argument("--keys", type=int, metavar="N",
                   help=f"number of keys per workload (default {DEFAULT_KEYS:,}; {QUICK_KEYS:,} with --quick); "
                        "map uses N/10 keys x 100 user keys")
    p.add_argument("--quick", action="store_true",
                   help=f"small and fast: {QUICK_KEYS:,} keys and at most 3 passes per row (under a minute)")
    p.add_argument("--backends", metavar="A,B", help=f"comma-separated subset of: {', '.join(w.BACKENDS)}")
    p.add_argument("--workloads", metavar="A,B", help=f"comma-separated subset of: {', '.join(w.WORKLOADS)}")
    p.add_argument("--json", metavar="FILE", help="also write results, versions and machine info as JSON")
    p.add_argument("--plot", metavar="FILE.png",
                   help="also write a bar chart (log scale, one panel per workload); needs matplotlib")
    p.add_argument("--seed", type=int, default=SEED, help=f"key-order seed (default {SEED})")
    p.set_defaults(func=main)
    return p


def main(args):
    try:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    except ImportError:
        raise UsageError("needs the rich package, which is not installed (pip install rich)") from None

    backends = _names(args.backends, w.BACKENDS, "backends")
    workloads = _names(args.workloads, w.WORKLOADS, "workloads")
    keys = args.keys if args.keys is not None else (QUICK_KEYS if args.quick else DEFAULT_KEYS)
    if keys < 1:
        raise UsageError(f"--keys must be at least 1, got {keys}")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError("--plot needs matplotlib, which is not installed (pip install matplotlib)") from None
    for opt, path in (("--json", args.json), ("--plot", args.plot)):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise UsageError(f"{opt}: directory of {path!r} does not exist")
    rounds = (1, 3, 0.2) if args.quick else (3, 10, 1.0)

    out = Console(width=None if sys.stdout.isatty() else 120)
    err = Console(stderr=True)
    pairs = [(wl, b) for wl in workloads for b in backends]
    rows = []
    started = time.time()
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=err, transient=True, disable=not err.is_terminal) as progress:
        task = progress.add_task("bench", total=len(pairs))
        for wl, b in pairs:
            progress.update(task, description=f"{wl} on {b}")
            rows.append(run_row(wl, b, keys, rounds, args.seed))
            progress.advance(task)
    add_ratios(rows)
    mem_method = PeakMemory().method
    render_table(rows, out, keys)
    info = machine()
    out.print(f"[dim]{info['cpu_model']}, {info['usable_cores']} of {info['cores']} cores usable, "
              f"{(info['memory_bytes'] or 0) / 2**30:.1f} GiB; Python {platform.python_version()}; "
              f"{time.time() - started:.1f} s[/dim]")
    if args.json:
        doc = {"command": "statecore bench", "argv": sys.argv[1:], "started_unix": started,
               "elapsed_s": time.time() - started,
               "config": {"keys": keys, "quick": bool(args.quick), "seed": args.seed, "backends": backends,
                          "workloads": workloads, "min_rounds": rounds[0], "max_rounds": rounds[1],
                          "min_time_s": rounds[2]},
               "peak_rss_method": mem_method, "ratio_to_dict": "ns_per_op / the dict's ns_per_op on the workload",
               "workloads": {k: w.WORKLOADS[k].description for k in workloads},
               "backends": {k: w.BACKENDS[k] for k in backends},
               "versions": versions(), "machine": info, "results": rows}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
    if args.plot:
        write_plot(rows, args.plot, f"statecore bench, --keys {keys:,}: {info['cpu_model']}, "
                                    f"{info['usable_cores']} cores, Python {platform.python_version()}")
    failed = [r for r in rows if r["status"] == "error"]
    for r in failed:
        err.print(f"statecore bench: {r['workload']} on {r['backend']} failed: {r['note']}", markup=False,
                  highlight=False)
    return 1 if failed else 0
