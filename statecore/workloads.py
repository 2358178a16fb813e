"""Benchmark workloads, defined once: used by bench/ (pytest-benchmark) and ``statecore bench``.

Every workload is a function ``setup(n, seed) -> run`` where ``run()`` performs
the measured work once and returns the number of operations it did.  Keys
arrive in random order, and the measured pass visits them in a *different*
random order than the one they were inserted in: records do not arrive in key
order, and visiting a dict in insertion order would walk its entry array
sequentially and flatter it.
"""
import numpy as np

import statecore as sc


def random_keys(n, seed=1):
    """(insert order, access order): two independent permutations of range(n) as Python lists."""
    rng = np.random.default_rng(seed)
    insert = rng.permutation(n).tolist()
    access = list(insert)  # the same int objects, in another order
    rng.shuffle(access)
    return insert, access


def _value_state(ttl=False, backend=None):
    backend = backend or sc.HashMapStateBackend()
    kb = backend.create_keyed_state_backend(max_parallelism=128)
    desc = sc.ValueStateDescriptor("v", float, default=0.0)
    if ttl:
        desc.enable_time_to_live(sc.StateTtlConfig.new_builder(sc.Time.days(1)).build())
    return kb, kb.get_state(desc)


def record_rmw_dict(n, seed=1):
    """Per-record read-modify-write on a bare dict: ``d[k] = d.get(k, 0.0) + 1.0``."""
    insert, access = random_keys(n, seed)
    d = {}
    get = d.get
    for k in insert:
        d[k] = get(k, 0.0) + 1.0

    def run():
        for k in access:
            d[k] = get(k, 0.0) + 1.0
        return n
    return run


def record_rmw_state(n, seed=1, ttl=False, backend=None):
    """Per-record ``set_current_key(k); s.update(s.value() + 1.0)`` on a ValueState."""
    insert, access = random_keys(n, seed)
    kb, st = _value_state(ttl, backend)
    set_key, value, update = kb.set_current_key, st.value, st.update
    for k in insert:
        set_key(k)
        update(value() + 1.0)

    def run():
        for k in access:
            set_key(k)
            update(value() + 1.0)
        return n
    run.keyed_backend = kb
    return run


def batch_dict(n, seed=1):
    """The dict loop equivalent of value_batch + update_batch over int64 keys."""
    insert, access = random_keys(n, seed)
    d = dict.fromkeys(insert, 0.0)
    keys = np.array(access, dtype=np.int64)
    vals = np.random.default_rng(seed).random(n)

    def run():
        get = d.get
        out = np.fromiter((get(k, np.nan) for k in keys.tolist()), dtype=np.float64, count=n)
        for k, v in zip(keys.tolist(), (out + vals).tolist()):
            d[k] = v
        return 2 * n
    return run


def batch_state(n, seed=1, ttl=False, backend=None):
    """``value_batch`` then ``update_batch`` over n int64 keys (float64 values), loop in C."""
    insert, access = random_keys(n, seed)
    kb, st = _value_state(ttl, backend)
    st.update_batch(np.array(insert, dtype=np.int64), np.zeros(n))
    keys = np.array(access, dtype=np.int64)
    vals = np.random.default_rng(seed).random(n)

    def run():
        out = st.value_batch(keys)
        st.update_batch(keys, out + vals)
        return 2 * n
    run.keyed_backend = kb
    return run


def bytes_per_entry(n, seed=1):
    """Memory per entry of n int -> float entries: (statecore ValueState, bare dict).

    statecore's figure is its own accounting of C memory (tables, entries,
    blocks); the dict's is ``sys.getsizeof`` of the dict plus its key and value
    objects (ints >= 256 and floats are separate objects).
    """
    import sys
    insert, _ = random_keys(n, seed)
    kb, st = _value_state()
    st.update_batch(np.array(insert, dtype=np.int64), np.arange(n, dtype=np.float64) + 0.5)
    sc_bytes = kb.metrics()["bytes_in_memory"] / n
    kb.close()
    d = {k: k + 0.5 for k in insert}
    dict_bytes = (sys.getsizeof(d) + sum(sys.getsizeof(k) + sys.getsizeof(v) for k, v in d.items())) / n
    return sc_bytes, dict_bytes
