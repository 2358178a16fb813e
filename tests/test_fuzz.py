"""T3: fuzzing and no-code-execution checks (fuzz/, RELIABILITY.md T3, CONTRIBUTING.md "Fuzzing").

* The harness bodies run in-process under hypothesis (arbitrary bytes and
  mutated seeds): fast, always, atheris or not.
* Each atheris harness runs in a subprocess for a bounded number of executions
  (slow; skipped with a reason only when atheris cannot be imported).
* Negative controls: the audit hook catches a pickle ``__reduce__`` payload
  (and one a decoder swallows); with ``STATECORE_DEBUG_AUTO_PICKLE_FALLBACK=1``
  the harnesses catch Auto falling back to ``pickle.loads``.
"""
import os
import pickle
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FUZZ = os.path.join(ROOT, "fuzz")
sys.path.insert(0, FUZZ)

import _common  # noqa: E402
import fuzz_auto  # noqa: E402
import fuzz_datafile  # noqa: E402
import fuzz_metadata  # noqa: E402
import fuzz_serializers  # noqa: E402

import statecore  # noqa: E402
from statecore.errors import SerializationError  # noqa: E402
from statecore.serializers import Auto, Json, Pickle  # noqa: E402

try:
    import atheris  # noqa: F401
    ATHERIS = None
except ImportError as exc:  # pragma: no cover - depends on the environment
    ATHERIS = f"atheris cannot be imported ({exc}); pip install atheris (wheels for CPython 3.8-3.11 on x86-64 Linux)"

HARNESSES = {"auto": fuzz_auto, "serializers": fuzz_serializers, "metadata": fuzz_metadata,
             "datafile": fuzz_datafile}
#: Executions per target in CI: together about 2 minutes on the 2-core box (see CONTRIBUTING.md).
#: (auto and datafile run ~1-5k exec/s once inputs grow; metadata and serializers ~15-20k exec/s.)
CI_RUNS = {"auto": 100_000, "serializers": 300_000, "metadata": 300_000, "datafile": 100_000}
LIBFUZZER_FLAGS = ["-max_len=4096", "-timeout=5", "-rss_limit_mb=2048", "-print_final_stats=1"]
DEBUG_ENV = "STATECORE_DEBUG_AUTO_PICKLE_FALLBACK"


def _env(**extra):
    env = dict(os.environ)
    env.pop(DEBUG_ENV, None)
    # The package under test: the installed one in CI, the in-place build in a checkout (never the bare
    # source tree, which has no compiled modules when the package is installed).
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(statecore.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([pkg_root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.update(extra)
    return env


class _System:
    """Unpickling this would run ``os.system(cmd)``."""

    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


# ---------------------------------------------------------------- the corpus


@pytest.mark.parametrize("target", sorted(HARNESSES))
def test_seed_corpus_passes_every_harness(target):
    seeds = _common.corpus_inputs(target)
    assert seeds, f"fuzz/corpus/{target} is empty; run python fuzz/make_corpus.py"
    for data in seeds:
        HARNESSES[target].TestOneInput(data)


def test_seed_corpus_size():
    assert len(_common.corpus_inputs("auto")) >= 1000
    total = sum(len(d) for t in HARNESSES for d in _common.corpus_inputs(t))
    assert total < 2 * 1024 * 1024, f"fuzz/corpus holds {total} bytes; keep it under 2 MB"


def test_edge_cases_raise_serialization_error():
    auto = Auto()
    with pytest.raises(SerializationError, match="nesting deeper"):
        auto.deserialize(b"\x09\x01" * 10 ** 5 + b"\x00")
    deep = []
    for _ in range(10 ** 5):
        deep = [deep]
    with pytest.raises(SerializationError, match="nesting deeper"):
        auto.serialize(deep)
    with pytest.raises(SerializationError):
        Json().deserialize(b"[" * 10 ** 5 + b"]" * 10 ** 5)
    with pytest.raises(SerializationError):
        Json().deserialize(b"9" * 5000)  # Python's 4300-digit int-string limit
    assert auto.deserialize(auto.serialize(10 ** 4400)) == 10 ** 4400  # Auto never goes through str
    with pytest.raises(SerializationError, match="exceeds"):
        auto.deserialize(b"\x07\xff\xff\xff\xff\xff\xff\xff\x7f")  # 2**63-ish length, checked before allocating
    with pytest.raises(SerializationError, match="UTF-8"):
        auto.deserialize(b"\x06\x03\xed\xa0\x80")  # a lone surrogate
    nan = auto.deserialize(auto.serialize(float("nan")))
    assert nan != nan


# ---------------------------------------------------------------- harness bodies under hypothesis


def _mutated(target):
    seeds = _common.corpus_inputs(target)[:300]

    @st.composite
    def strat(draw):
        data = bytearray(draw(st.sampled_from(seeds)))
        for _ in range(draw(st.integers(0, 4))):
            op = draw(st.integers(0, 3))
            pos = draw(st.integers(0, len(data)))
            if op == 0 and pos < len(data):
                data[pos] ^= 1 << draw(st.integers(0, 7))
            elif op == 1:
                data[pos:pos] = draw(st.binary(max_size=8))
            elif op == 2:
                del data[pos:pos + draw(st.integers(1, 16))]
            else:
                data = data[:pos]
        return bytes(data)
    return strat()


def _inputs(target):
    return st.one_of(st.binary(max_size=512), _mutated(target))


@settings(max_examples=1000)
@given(_inputs("auto"))
def test_auto_body(data):
    fuzz_auto.TestOneInput(data)


@settings(max_examples=500)
@given(st.one_of(st.binary(max_size=512), _mutated("serializers")))
def test_serializers_body(data):
    fuzz_serializers.TestOneInput(data)


@settings(max_examples=500)
@given(_inputs("metadata"))
def test_metadata_body(data):
    fuzz_metadata.TestOneInput(data)


@settings(max_examples=500)
@given(_inputs("datafile"))
def test_datafile_body(data):
    fuzz_datafile.TestOneInput(data)


# ---------------------------------------------------------------- negative controls


def test_audit_hook_catches_pickle_reduce_payload(tmp_path):
    """The harness's own negative control: pickle.loads of a __reduce__ payload under the guard."""
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_System(f"touch {marker}"))
    with pytest.raises(_common.ForbiddenEvent, match="pickle.find_class"):
        with _common.Guard():
            pickle.loads(payload)
    assert not marker.exists()
    # Through a decoder that catches Exception (Pickle.deserialize): ForbiddenEvent is a BaseException.
    with pytest.raises(_common.ForbiddenEvent, match="pickle.find_class"):
        with _common.Guard():
            Pickle().deserialize(payload)
    assert not marker.exists()
    # Swallowed even with `except BaseException`: Guard.__exit__ still fails the run.
    with pytest.raises(_common.ForbiddenEvent, match="swallowed"):
        with _common.Guard():
            try:
                pickle.loads(payload)
            except BaseException:
                pass
    assert not marker.exists()
    # Outside the guard, and for data-only decoders, nothing fires.
    with _common.Guard():
        Json().deserialize(b'{"a": [1, 2.5, null]}')
        with pytest.raises(SerializationError):
            Auto().deserialize(payload)


def _forbidden_actions():
    import ctypes.util  # noqa: F401  (imported before the guard is armed)
    import types
    code = (lambda: 0).__code__
    compiled = compile("1", "x", "exec")  # exec of a string would raise "compile" first
    return {
        "exec": lambda: exec(compiled),  # noqa: S102
        "compile": lambda: compile("1", "x", "eval"),
        "import": lambda: __import__("statecore_no_such_module_xyz"),
        "os.system": lambda: os.system("true"),
        "subprocess.Popen": lambda: subprocess.Popen(["true"]).wait(),
        "function.__new__": lambda: types.FunctionType(code, {}),
        "code.__new__": lambda: code.replace(co_name="x"),
        "ctypes.dlopen": lambda: __import__("ctypes").CDLL("libc.so.6"),
    }


@pytest.mark.parametrize("event", sorted(_forbidden_actions()))
def test_audit_hook_catches_each_forbidden_event(event):
    action = _forbidden_actions()[event]
    with pytest.raises(_common.ForbiddenEvent, match=event.replace(".", r"\.")):
        with _common.Guard():
            action()


def test_auto_refuses_pickle_without_debug_switch():
    with pytest.raises(SerializationError, match="unknown type tag 0x80"):
        Auto().deserialize(pickle.dumps(_System("true")))


def _varint(data, pos):
    v = shift = 0
    while True:
        c = data[pos]
        pos += 1
        v |= (c & 0x7F) << shift
        shift += 7
        if not c & 0x80:
            return v, pos


def _put_varint(n):
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _datafile_with_value(value_bytes):
    """A mode-0 fuzz_datafile input: one value-state record of the real fixture, its value replaced."""
    fx = fuzz_datafile.fixture()
    sid = next(st["sid"] for st in fx.body["states"] if st["name"] == "v")
    for kg, off, length, _count in fx.sections:
        pos, end = off, off + length
        while pos < end:
            kl, kpos = _varint(fx.data, pos)
            key = fx.data[kpos:kpos + kl]
            vl, vpos = _varint(fx.data, kpos + kl)
            ts = fx.data[vpos + vl:vpos + vl + 8]
            pos = vpos + vl + 8
            if int.from_bytes(key[2:4], "big") == sid:
                record = _put_varint(kl) + key + _put_varint(len(value_bytes)) + value_bytes + ts
                return b"\x00" + bytes([kg]) + record
    raise AssertionError("no value-state record in the fixture")


@pytest.mark.parametrize("target", ["auto", "datafile"])
def test_debug_pickle_fallback_is_caught(tmp_path, target):
    """Planted bug: Auto calls pickle.loads on an unknown tag. The harness body must fail on it."""
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_System(f"touch {marker}"))
    data = payload if target == "auto" else _datafile_with_value(payload)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import fuzz_%s as h; h.warm_up(); "
            "h.TestOneInput(bytes.fromhex(sys.argv[2]))" % target)
    for debug, expect_fail in (("0", False), ("1", True)):
        p = subprocess.run([sys.executable, "-c", code, FUZZ, data.hex()], env=_env(**{DEBUG_ENV: debug}),
                           capture_output=True, text=True, timeout=120, cwd=FUZZ)
        if expect_fail:
            assert p.returncode != 0 and "ForbiddenEvent" in p.stderr and "pickle.find_class" in p.stderr, \
                p.stderr[-2000:]
        else:
            assert p.returncode == 0, p.stderr[-2000:]
        assert not marker.exists()


# ---------------------------------------------------------------- atheris, bounded


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.skipif(ATHERIS is not None, reason=ATHERIS or "")
@pytest.mark.parametrize("target", sorted(HARNESSES))
def test_atheris_bounded(tmp_path, target):
    runs = CI_RUNS[target]
    p = subprocess.run([sys.executable, os.path.join(FUZZ, f"fuzz_{target}.py"), f"-atheris_runs={runs}",
                        *LIBFUZZER_FLAGS, f"-artifact_prefix={tmp_path}/", str(tmp_path),
                        _common.corpus_dir(target)],
                       env=_env(), capture_output=True, text=True, timeout=580)
    assert p.returncode == 0, p.stderr[-4000:]
    assert f"Done {runs} " in p.stderr, p.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.skipif(ATHERIS is not None, reason=ATHERIS or "")
def test_atheris_catches_debug_pickle_fallback(tmp_path):
    """Negative control under atheris: with the planted bug, a pickle payload seed fails the run."""
    marker = tmp_path / "pwned"
    seeds, scratch = tmp_path / "seeds", tmp_path / "scratch"
    seeds.mkdir()
    scratch.mkdir()
    (seeds / "payload").write_bytes(pickle.dumps(_System(f"touch {marker}")))
    p = subprocess.run([sys.executable, os.path.join(FUZZ, "fuzz_auto.py"), "-atheris_runs=1000",
                        *LIBFUZZER_FLAGS, f"-artifact_prefix={tmp_path}/", str(scratch), str(seeds)],
                       env=_env(**{DEBUG_ENV: "1"}), capture_output=True, text=True, timeout=280)
    out = p.stdout + p.stderr  # atheris prints the Python traceback on stdout
    assert p.returncode != 0
    assert "ForbiddenEvent" in out and "pickle.find_class" in out, out[-3000:]
    assert any(n.startswith("crash-") for n in os.listdir(tmp_path))
    assert not marker.exists()
    # The same run without the planted bug passes.
    p = subprocess.run([sys.executable, os.path.join(FUZZ, "fuzz_auto.py"), "-atheris_runs=1000",
                        *LIBFUZZER_FLAGS, str(scratch), str(seeds)],
                       env=_env(), capture_output=True, text=True, timeout=280)
    assert p.returncode == 0, p.stderr[-3000:]
    assert not marker.exists()
