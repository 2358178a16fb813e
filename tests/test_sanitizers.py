"""Memory-safety checks (issue 7 item 8; CONTRIBUTING.md "Sanitizers" and "Valgrind").

* ``test_c_core_under_asan_ubsan``: compiles the standalone C test of csrc/
  (tests/c/test_csrc.c: table, key codec, varints, murmur3 vectors) with
  ``-fsanitize=address,undefined -fno-sanitize-recover=all`` and runs it.
* ``test_sanitizer_negative_controls``: the same binary with a planted signed
  overflow and a planted heap over-read must abort, so the checks are known to be on.
* ``test_sanitized_extension_subset`` (slow): builds the extension with
  ``STATECORE_SANITIZE=1`` into a temporary copy of the source tree, checks that the
  modules carry ASan and abort-on-error UBSan instrumentation, and runs a representative
  subset of the suite under ASan + UBSan.  ``STATECORE_SOAK=1`` runs the whole suite.

Each test skips with its reason when gcc, a sanitizer runtime or (for the extension
build) Cython/numpy is missing.
"""

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
C_TEST = os.path.join(ROOT, "tests", "c", "test_csrc.c")
CORE_SOURCES = ["sc_hash.c", "sc_buf.c", "sc_keycodec.c", "sc_table.c"]
SOAK = os.environ.get("STATECORE_SOAK") == "1"

SAN_FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
SAN_ENV = {
    "ASAN_OPTIONS": "detect_leaks=1:halt_on_error=1:abort_on_error=0:exitcode=23",
    "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1:exitcode=24",
}

# The representative subset run against the sanitized extension in CI (about a minute under ASan).
SUBSET = [
    "tests/test_core.py",
    "tests/test_keyed_state.py",
    "tests/test_ttl.py",
    "tests/test_checkpoint.py::test_round_trip_every_state_type",
    "tests/test_checkpoint.py::test_async_checkpoint_is_a_consistent_cut",
    "tests/test_checkpoint_incremental.py",
    "tests/test_snapshot_sink.py",
    "tests/test_mdb.py",
]


def _gcc():
    gcc = shutil.which("gcc")
    if not gcc or not os.path.exists(C_TEST):
        pytest.skip("gcc or tests/c/test_csrc.c missing")
    return gcc


def _runtime(gcc, name):
    """Absolute path of a gcc sanitizer runtime (libasan.so, ...), or None."""
    path = subprocess.run([gcc, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


@pytest.fixture(scope="module")
def csrc_binary(tmp_path_factory):
    gcc = _gcc()
    if not (_runtime(gcc, "libasan.so") and _runtime(gcc, "libubsan.so")):
        pytest.skip("gcc has no ASan/UBSan runtime (libasan.so / libubsan.so)")
    out = str(tmp_path_factory.mktemp("csrc") / "test_csrc")
    cmd = [gcc, "-std=c11", "-O1", "-g", "-Wall", "-Wextra", "-Werror", *SAN_FLAGS, "-I", CSRC, C_TEST,
           *(os.path.join(CSRC, s) for s in CORE_SOURCES), "-o", out]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return out


def _run_binary(path, *args):
    env = dict(os.environ, **SAN_ENV)
    env.pop("LD_PRELOAD", None)  # the binary links its own runtimes
    return subprocess.run([path, *args], capture_output=True, text=True, timeout=120, env=env)


def test_c_core_under_asan_ubsan(csrc_binary):
    res = _run_binary(csrc_binary)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "checks passed" in res.stdout
    assert "runtime error" not in res.stderr and "Sanitizer" not in res.stderr, res.stderr


@pytest.mark.parametrize("plant, marker", [("--plant-ub", "runtime error: signed integer overflow"),
                                            ("--plant-oob", "AddressSanitizer: heap-buffer-overflow")])
def test_sanitizer_negative_controls(csrc_binary, plant, marker):
    res = _run_binary(csrc_binary, plant)
    assert res.returncode != 0, f"{plant} was not caught: {res.stdout}"
    assert marker in res.stderr, res.stderr


# -- the extension built with STATECORE_SANITIZE=1 ----------------------------------------------

def _copy_tree(dst):
    """The sources needed to build and test, without compiled or generated files."""
    ignore = shutil.ignore_patterns("*.so", "*.o", "__pycache__", "build", "*.egg-info", ".hypothesis")
    for name in ("setup.py", "pyproject.toml", "README.md"):
        if os.path.exists(os.path.join(ROOT, name)):
            shutil.copy2(os.path.join(ROOT, name), dst / name)
    shutil.copytree(os.path.join(ROOT, "csrc"), dst / "csrc", ignore=ignore)
    shutil.copytree(os.path.join(ROOT, "tests"), dst / "tests", ignore=ignore)

    def ignore_pkg(d, names):
        # Cython writes statecore/*.c; drop them so that the copy regenerates its own.
        generated = {n for n in names if n.endswith(".c") and n[:-2] + ".pyx" in names}
        return set(ignore(d, names)) | generated

    shutil.copytree(os.path.join(ROOT, "statecore"), dst / "statecore", ignore=ignore_pkg)


@pytest.mark.slow
@pytest.mark.timeout(900 if SOAK else 300)
def test_sanitized_extension_subset(tmp_path):
    if "libasan" in os.environ.get("LD_PRELOAD", ""):
        pytest.skip("already running under the sanitized build")
    if not os.path.exists(os.path.join(ROOT, "setup.py")) or not os.path.isdir(os.path.join(ROOT, "statecore")):
        pytest.skip("no source tree next to the tests")
    for mod in ("Cython", "numpy", "setuptools"):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"{mod} is needed to build the sanitized extension")
    gcc = _gcc()
    asan = _runtime(gcc, "libasan.so")
    if not (asan and _runtime(gcc, "libubsan.so")):
        pytest.skip("gcc has no ASan/UBSan runtime (libasan.so / libubsan.so)")
    if sysconfig.get_config_var("Py_DEBUG") or "asan" in (sysconfig.get_config_var("CONFIG_ARGS") or ""):
        pytest.skip("this interpreter's own build is unusual; run the sanitized suite by hand")

    src = tmp_path / "src"
    src.mkdir()
    _copy_tree(src)
    env = dict(os.environ, STATECORE_SANITIZE="1")
    env.pop("LD_PRELOAD", None)
    build = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=src, env=env,
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]

    # The modules must be instrumented: ASan checks, and UBSan handlers that abort (-fno-sanitize-recover)
    # including signed overflow (present only without -fwrapv, which Python's CFLAGS carry).
    mods = [p for p in os.listdir(src / "statecore") if p.endswith(".so")]
    assert len(mods) >= 4, mods
    nm = shutil.which("nm")
    if nm:
        for m in mods:
            syms = subprocess.run([nm, "-D", str(src / "statecore" / m)], capture_output=True, text=True).stdout
            assert "__asan_report_load" in syms, m
            assert "__ubsan_handle_add_overflow_abort" in syms, m

    # libstdc++ is preloaded too: ASan's __cxa_throw interceptor needs it when a C++ extension
    # (matplotlib's ft2font) is loaded later.
    preload = [asan] + [p for p in [_runtime(gcc, "libstdc++.so")] if p]
    # allocator_may_return_null: hostile-input tests make CPython try absurd allocations
    # (a pickle claiming 2**62 bytes) and expect MemoryError, not an ASan abort.
    # log_path: pytest's fd capture would swallow a report written to stderr by a dying process.
    logs = tmp_path / "sanitizer-logs"
    logs.mkdir()
    run_env = dict(os.environ, LD_PRELOAD=" ".join(preload), PYTHONMALLOC="malloc",
                   ASAN_OPTIONS=f"detect_leaks=0:halt_on_error=1:allocator_may_return_null=1:log_path={logs}/asan",
                   UBSAN_OPTIONS=f"halt_on_error=1:print_stacktrace=1:log_path={logs}/ubsan")
    run_env.pop("PYTHONPATH", None)
    where = subprocess.run([sys.executable, "-c", "import statecore._core as c, statecore._states; print(c.__file__)"],
                           cwd=src, env=run_env, capture_output=True, text=True, timeout=120)
    assert where.returncode == 0, where.stderr[-3000:]
    assert where.stdout.strip().startswith(str(src)), where.stdout  # the sanitized copy, not an installed one

    targets = ["tests"] if SOAK else SUBSET
    deselect = ["--deselect", "tests/test_sanitizers.py"]
    marks = [] if SOAK else ["-m", "not slow"]
    res = subprocess.run([sys.executable, "-m", "pytest", *targets, *deselect, *marks, "-q", "-x", "-p",
                          "no:cacheprovider"],
                         cwd=src, env=run_env, capture_output=True, text=True, timeout=3600 if SOAK else 270)
    # A file holding only "AddressSanitizer failed to allocate ..." is allocator_may_return_null at work.
    texts = [(logs / n).read_text(errors="replace") for n in sorted(os.listdir(logs))]
    reports = "".join(t[:8000] for t in texts
                      if any(line and "failed to allocate" not in line for line in t.splitlines()))
    tail = res.stdout[-6000:] + res.stderr[-6000:] + "\n--- sanitizer reports ---\n" + reports
    assert not reports, tail
    assert res.returncode == 0, tail
    assert "runtime error" not in res.stdout + res.stderr, tail
    assert "ERROR: AddressSanitizer" not in res.stdout + res.stderr, tail
