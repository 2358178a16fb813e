"""The C core through its thin bindings: hash, composite keys, the hash table."""
import subprocess
import sys

from hypothesis import given, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from statecore import _core


def test_murmur3_reference_vectors():
    # Published MurmurHash3_x86_32 vectors (seed, input) -> hash.
    assert _core.murmur3_32(b"", 0) == 0
    assert _core.murmur3_32(b"", 1) == 0x514E28B7
    assert _core.murmur3_32(b"", 0xFFFFFFFF) == 0x81F16F39
    assert _core.murmur3_32(b"\xff\xff\xff\xff", 0) == 0x76293B50
    assert _core.murmur3_32(b"\x21\x43\x65\x87", 0) == 0xF55B516B
    assert _core.murmur3_32(b"\x21\x43\x65", 0) == 0x7E4A8634
    assert _core.murmur3_32(b"Hello, world!", 1234) == 0xFAF6CDB3
    assert _core.murmur3_32(b"The quick brown fox jumps over the lazy dog", 0x9747B28C) == 0x2FA826CD


def test_key_group_stable_across_hash_seeds(tmp_path):
    code = "from statecore import _core; print([_core.key_group_for_bytes(bytes([i]) * i, 128) for i in range(50)])"
    import os

    import statecore
    root = os.path.dirname(os.path.dirname(os.path.abspath(statecore.__file__)))  # installed or in-place
    # A minimal environment, except what a sanitizer run (CONTRIBUTING.md) needs to load the modules.
    keep = {k: v for k, v in os.environ.items()
            if k in ("LD_PRELOAD", "ASAN_OPTIONS", "UBSAN_OPTIONS", "PYTHONMALLOC")}
    outs = {subprocess.run([sys.executable, "-c", code], env={**keep, "PYTHONHASHSEED": s, "PATH": "", "PYTHONPATH": root},
                           capture_output=True, text=True, check=True, cwd=tmp_path).stdout for s in ("0", "1", "random")}
    assert len(outs) == 1


@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.binary(max_size=300), st.binary(max_size=300),
       st.binary(max_size=50))
def test_composite_key_round_trip(kg, sid, key, ns, uk):
    ck = _core.composite_key(kg, sid, key, ns, uk)
    assert ck[:2] == kg.to_bytes(2, "big") and ck[2:4] == sid.to_bytes(2, "big")
    assert _core.parse_composite_key(ck) == (kg, sid, key, ns, uk)


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 2), st.binary(max_size=6), st.binary(max_size=3),
                          st.binary(max_size=3)), min_size=2, max_size=40))
def test_composite_key_layout_is_contiguous(parts):
    """Sorted composite keys group by key group, then by (state, key, namespace) prefix."""
    keys = sorted(_core.composite_key(*p) for p in parts)
    seen_groups, seen_prefixes = [], []
    for k in keys:
        kg, sid, key, ns, _ = _core.parse_composite_key(k)
        if not seen_groups or seen_groups[-1] != kg:
            assert kg not in seen_groups
            seen_groups.append(kg)
        prefix = (kg, sid, key, ns)
        if not seen_prefixes or seen_prefixes[-1] != prefix:
            assert prefix not in seen_prefixes, "entries of one (state, key, namespace) must be contiguous"
            seen_prefixes.append(prefix)


class TableModel(RuleBasedStateMachine):
    """The C table against a dict, across growth, inline/external values and deletes."""

    def __init__(self):
        super().__init__()
        self.table = _core.KeyTable(8)
        self.model = {}

    keys = st.binary(min_size=0, max_size=40)
    values = st.binary(max_size=64)

    @rule(k=keys, v=values, ts=st.integers(-2**63, 2**63 - 1))
    def put(self, k, v, ts):
        self.table.put(k, v, ts)
        self.model[k] = (v, ts)

    @rule(k=keys, v=values)
    def append(self, k, v):
        self.table.append(k, v, 7)
        old = self.model.get(k)
        self.model[k] = (v, 7) if old is None else (old[0] + v, old[1])

    @rule(k=keys)
    def delete(self, k):
        assert self.table.delete(k) == (k in self.model)
        self.model.pop(k, None)

    @rule(k=keys)
    def get(self, k):
        assert self.table.get(k) == self.model.get(k)

    @rule()
    def clone_matches(self):
        c = self.table.clone()
        assert sorted(c.items()) == sorted(self.table.items())

    @invariant()
    def same(self):
        assert len(self.table) == len(self.model)
        assert {k: (v, ts) for k, v, ts in self.table.items()} == self.model


TestTableModel = TableModel.TestCase
TestTableModel.settings = settings(max_examples=60, stateful_step_count=60, deadline=None)


def test_table_growth_and_accounting():
    t = _core.KeyTable(8)
    base = t.bytes_in_use
    for i in range(10_000):
        t.put(i.to_bytes(4, "big"), b"x" * (i % 50))
    assert len(t) == 10_000 and t.capacity >= 10_000 / 0.75
    assert t.bytes_in_use > base
    for i in range(0, 10_000, 2):
        assert t.delete(i.to_bytes(4, "big"))
    assert len(t) == 5_000
    assert all(t.get(i.to_bytes(4, "big")) == (b"x" * (i % 50), 0) for i in range(1, 10_000, 2))
    t.clear()
    assert len(t) == 0 and t.items() == []
