"""Shared pieces of the fuzz harnesses: the no-code-execution audit hook, equality, the runner.

The audit hook (PEP 578) is installed once per process and is *armed* only
around a harness body, on the thread that runs it, after a warm-up that lets
every lazy import happen.  While armed, any of the events in ``FORBIDDEN``
means decoding asked the interpreter to look up, load or run code: the hook
records the event and raises :class:`ForbiddenEvent`, a ``BaseException`` so
that no ``except Exception`` inside a decoder can swallow it; ``Guard.__exit__``
re-raises it even if something did.

Checked on CPython 3.11: unpickling a ``__reduce__`` payload raises
``pickle.find_class`` before the callable is resolved, so the payload never
runs; ``json.loads`` raises none of these events.
"""
import math
import os
import struct
import sys
import threading

FORBIDDEN = frozenset({
    "pickle.find_class", "exec", "compile", "import", "os.system", "subprocess.Popen", "ctypes.dlopen",
    "ctypes.dlsym", "code.__new__", "function.__new__", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
    "os.forkpty", "builtins.input", "marshal.loads", "marshal.load",
})


class ForbiddenEvent(BaseException):
    """Decoding raised an audit event that means code lookup/loading/execution."""


class _Hook:
    def __init__(self):
        self.armed_thread = None  # thread id while armed, else None
        self.violations = []

    def __call__(self, event, args):
        # Keep this cheap and import-free: it runs for every audited event in the process.
        if self.armed_thread is None or event not in FORBIDDEN:
            return
        if threading.get_ident() != self.armed_thread:
            return
        self.violations.append((event, repr(args)[:200]))
        raise ForbiddenEvent(f"forbidden audit event during decoding: {event} {repr(args)[:200]}")


_HOOK = None


def audit_hook():
    """The process-wide hook (installed on first use; audit hooks cannot be removed)."""
    global _HOOK
    if _HOOK is None:
        _HOOK = _Hook()
        sys.addaudithook(_HOOK)
    return _HOOK


class Guard:
    """``with Guard():`` arms the audit hook for the current thread."""

    def __enter__(self):
        h = audit_hook()
        h.violations.clear()
        h.armed_thread = threading.get_ident()
        return self

    def __exit__(self, et, ev, tb):
        h = audit_hook()
        h.armed_thread = None
        if h.violations and not isinstance(ev, ForbiddenEvent):
            # Something caught our exception (e.g. a decoder's broad except): fail anyway.
            raise ForbiddenEvent(f"forbidden audit event during decoding (swallowed): {h.violations[0]}")
        return False


def same(a, b):
    """Strict structural equality for Auto values: same types, floats compared bit for bit (NaN-aware)."""
    if type(a) is not type(b):
        return False
    if type(a) is float:
        return struct.pack(">d", a) == struct.pack(">d", b)
    if type(a) in (list, tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if type(a) is dict:
        return len(a) == len(b) and all(same(ka, kb) and same(va, vb)
                                        for (ka, va), (kb, vb) in zip(a.items(), b.items()))
    return a == b


def loose_equal(a, b):
    """``==`` that treats NaN as equal to NaN (for key encodings, where -0.0 becomes 0.0)."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if type(a) in (list, tuple) and type(b) is type(a):
        return len(a) == len(b) and all(loose_equal(x, y) for x, y in zip(a, b))
    return a == b


def corpus_dir(target):
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus", target)


def corpus_inputs(target):
    d = corpus_dir(target)
    if not os.path.isdir(d):
        return []
    out = []
    for name in sorted(os.listdir(d)):
        with open(os.path.join(d, name), "rb") as f:
            out.append(f.read())
    return out


def run(test_one_input, warm_up, target):
    """Entry point of a harness script: warm up, then hand over to atheris (libFuzzer flags in argv).

    With no corpus directory on the command line, the target's seed corpus is
    used (read-only: new inputs go to a temporary directory unless the caller
    passes a writable corpus directory first, as libFuzzer does).
    """
    import atexit
    import shutil
    import tempfile

    import atheris

    warm_up()
    argv = list(sys.argv)
    if not any(not a.startswith("-") for a in argv[1:]):
        # libFuzzer writes new inputs into the first corpus directory: keep the repo's seeds read-only.
        scratch = tempfile.mkdtemp(prefix=f"statecore-fuzz-{target}-")
        atexit.register(shutil.rmtree, scratch, True)
        argv += [scratch, corpus_dir(target)]
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()
