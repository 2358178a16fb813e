"""S3 faults (RELIABILITY.md T7): moto on 127.0.0.1, a fault-injecting TCP proxy and a flaky fsspec wrapper.

Every run takes checkpoint 1 cleanly, changes the state, then takes checkpoint 2 with ONE
injected fault at request (or fsspec call) number k, for every k of that checkpoint and every
fault kind (tests/s3_faults.py: reset after the request took effect, drop before it did,
500, 503 SlowDown, stall past the read timeout; FlakyFS: OSError / TimeoutError before or
after the call).  Each run must satisfy:

* checkpoint 2 returns a CompletedCheckpoint or raises CheckpointError: no other exception
  type escapes and nothing hangs (every run has a timeout);
* ``load_checkpoint`` never accepts a partial checkpoint: if chk-2 loads, it restores to the
  model of checkpoint 2; an acknowledged checkpoint loads; a failed one is not committed;
* the previous checkpoint (chk-1) still restores to its model when chk-2 failed;
* retention never deletes the newest complete checkpoint: the newest listed checkpoint
  restores to its model;
* no multipart upload is left open (ListMultipartUploads through boto3 against moto) and a
  failed checkpoint leaves no object in its folder.

s3fs is configured not to hide faults: botocore ``retries={"total_max_attempts": 1}`` (note:
botocore's ``max_attempts`` counts RETRIES, so ``max_attempts=1`` still retries once),
``read_timeout=0.5`` and ``S3FileSystem.retries = 1`` on the cached instance (see
``proxy_options``).  One more sweep keeps the clients' default retries (the production
configuration), where a lost answer to the ``_metadata`` PUT is retried by botocore and fails
its own ``If-None-Match``.

Negative controls: with ``storage._discard`` disabled (no multipart abort; fsspec's ``__del__``
may commit the partial object) or with the check that a retried ``_metadata`` PUT found its
own object disabled, the same harness reports violations.

CI: 3 scenarios x every request x 2-5 proxy fault kinds, 1 scenario x every fsspec call x 4
FlakyFS faults, and a reset/drop sweep with the clients' default retries (~230 faults).
``STATECORE_SOAK=1``: every fault kind on every scenario, FlakyFS on every scenario, and 5,000
random (scenario, request, fault kind) runs.
"""
import os
import random
import threading
import time
import uuid

import pytest

import statecore as sc
from statecore import ValueStateDescriptor
from statecore.checkpoint import storage as stg

from backends import BACKENDS
from s3_faults import MODES, FaultProxy, FlakyFS, FlakyState
from test_checkpoint import dump, populate

SOAK = os.environ.get("STATECORE_SOAK") == "1"
RUN_TIMEOUT_S = 60
MPU_BLOCK = 5 * 2 ** 20
BLOB = ValueStateDescriptor("blob", bytes)


@pytest.fixture(scope="module")
def bucket_and_client(s3_server):
    import boto3
    client = boto3.client("s3", endpoint_url=s3_server, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
    bucket = f"t7-{uuid.uuid4().hex[:10]}"
    client.create_bucket(Bucket=bucket)
    return bucket, client


@pytest.fixture(scope="module")
def proxy(s3_server):
    host, port = s3_server[len("http://"):].rsplit(":", 1)
    p = FaultProxy(host, int(port)).start()
    yield p
    p.stop()


def proxy_options(proxy):
    opts = {"anon": False, "key": "testing", "secret": "testing", "default_block_size": MPU_BLOCK,
            "client_kwargs": {"endpoint_url": proxy.url, "region_name": "us-east-1"},
            "config_kwargs": {"retries": {"total_max_attempts": 1, "mode": "standard"},
                              "read_timeout": 0.5, "connect_timeout": 1.0}}
    return opts


@pytest.fixture
def no_s3fs_retries(monkeypatch):
    """s3fs's own retry loop (``S3FileSystem.retries``, 5) is a class attribute, not a constructor
    argument; fsspec caches instances per thread (the checkpoint runs on an executor thread),
    so it is set on the class for the duration of a test."""
    import s3fs
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)


# ---------------------------------------------------------------------------------------------
# scenarios: how to build the backend, fill it, and take checkpoint 2

class Scenario:
    def __init__(self, name, backend, keys1, keys2, big=False, incremental=False, take="sync", retained=1,
                 modes=MODES):
        self.name, self.backend, self.keys1, self.keys2 = name, backend, keys1, keys2
        self.modes = MODES if SOAK else modes
        self.big, self.incremental, self.take, self.retained = big, incremental, take, retained

    def make_backend(self, tmp):
        if self.backend == "lmdb":
            return sc.LMDBStateBackend(db_path=str(tmp / "db"), write_buffer_size=4096, incremental=self.incremental)
        return BACKENDS[self.backend](tmp)

    def fill(self, kb, keys, seed):
        populate(kb, keys, seed=seed)
        if self.big:  # incompressible bytes: a data file > 5 MiB, i.e. a multipart upload
            rng = random.Random(seed)
            blob = kb.get_state(BLOB)
            for k in keys:
                kb.set_current_key(k)
                blob.update(rng.randbytes(9000))

    def model(self, kb):
        out = dump(kb)
        if self.big:
            blob = kb.get_state(BLOB)
            for k in kb.get_keys("blob"):
                kb.set_current_key(k)
                out[("blob", "None", repr(k))] = blob.value()
        return out

    def checkpoint(self, kb, cid):
        if self.take == "async":
            return kb.checkpoint_async(cid).result(timeout=RUN_TIMEOUT_S)
        return kb.checkpoint(cid)


SCENARIOS = [
    Scenario("heap-sync", "hashmap", range(120), range(100, 160)),
    Scenario("lmdb-async-multipart", "lmdb", range(700), range(650, 720), big=True, take="async",
             modes=("reset", "500")),
    Scenario("lmdb-incremental", "lmdb", range(150), range(140, 180), incremental=True, retained=2,
             modes=("reset", "503")),
]
if "lmdb" not in BACKENDS:  # pragma: no cover - builds without the LMDB tier
    SCENARIOS = SCENARIOS[:1]


def _with_timeout(fn):
    """Run fn in a thread; ('ok', value) | ('raised', exc) | ('hung', None)."""
    box = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - classified by the caller
            box["exc"] = e
    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(RUN_TIMEOUT_S)
    if t.is_alive():
        return "hung", None
    return ("raised", box["exc"]) if "exc" in box else ("ok", box["value"])


class Harness:
    """One run = fresh prefix, clean chk-1, faulty chk-2, then every check; returns violations."""

    def __init__(self, bucket, client, tmp_path, base_uri, options, arm, disarm):
        self.bucket, self.client, self.tmp_path = bucket, client, tmp_path
        self.base_uri, self.options, self.arm, self.disarm = base_uri, options, arm, disarm
        self.runs = 0
        self.outcomes = {"ok": 0, "CheckpointError": 0}

    def run(self, scenario, schedule):
        """``schedule``: called with the injector's arm function before checkpoint 2 is taken."""
        self.runs += 1
        run_id = f"r{self.runs}-{uuid.uuid4().hex[:6]}"
        tmp = self.tmp_path / run_id
        tmp.mkdir()
        backend = scenario.make_backend(tmp)
        backend.num_retained = scenario.retained
        storage = sc.FileSystemCheckpointStorage(f"{self.base_uri}/{run_id}", storage_options=self.options)
        backend.checkpoint_storage = storage
        clock = sc.ManualClock(1000)
        where = f"{scenario.name} {run_id}"
        violations = []
        status = None
        kb = backend.create_keyed_state_backend(max_parallelism=128, job_id="j", operator_id="op", clock=clock)
        try:
            self.disarm()
            scenario.fill(kb, scenario.keys1, 0)
            model1 = scenario.model(kb)
            cp1 = scenario.checkpoint(kb, 1)
            scenario.fill(kb, scenario.keys2, 1)
            model2 = scenario.model(kb)
            schedule(self.arm)
            status, value = _with_timeout(lambda: scenario.checkpoint(kb, 2))
            self.disarm()
        finally:
            if status != "hung":
                kb.close()
        if status == "hung":
            return [f"{where}: checkpoint 2 hung for {RUN_TIMEOUT_S} s"]
        if status == "raised":
            if not isinstance(value, sc.CheckpointError):
                return [f"{where}: {type(value).__module__}.{type(value).__name__} escaped: {value!r}"[:400]]
            self.outcomes["CheckpointError"] += 1
        else:
            self.outcomes["ok"] += 1
        acked = status == "ok"
        chk2 = cp1.location.replace("/chk-1-", "/chk-2-")

        def restores(location, model, what):
            try:
                with backend.restore_keyed_state_backend([location], max_parallelism=128, job_id="j",
                                                         operator_id="op", clock=clock) as kb2:
                    got = scenario.model(kb2)
            except sc.CheckpointError as e:
                violations.append(f"{where}: {what} {location} does not restore: {e!r}"[:400])
                return
            if got != model:
                violations.append(f"{where}: {what} {location} restored to different state (partial accepted)")

        # load_checkpoint never accepts a partial checkpoint; an acknowledged one is there.
        try:
            loaded = sc.load_checkpoint(chk2)
        except sc.CorruptCheckpointError:
            loaded = None
            if acked:
                violations.append(f"{where}: acknowledged checkpoint 2 is not committed")
        if loaded is not None:
            if not acked:
                violations.append(f"{where}: checkpoint 2 failed ({value!r}) but is committed"[:400])
            restores(chk2, model2, "checkpoint 2")
        # The previous checkpoint still restores when checkpoint 2 failed.
        listed = storage.list_checkpoints("j", "op")
        if not acked:
            if cp1.location not in listed:
                violations.append(f"{where}: checkpoint 1 lost after a failed checkpoint 2 (listed {listed})")
            else:
                restores(cp1.location, model1, "previous checkpoint")
        # Retention never deletes the newest complete checkpoint (restored above: chk-2 when it
        # loads, else chk-1, which must then still be listed).
        newest = chk2 if loaded is not None else cp1.location
        if not listed or listed[-1] != newest:
            violations.append(f"{where}: newest complete checkpoint is {newest}, listed {listed}")
        # No multipart upload left open; a failed checkpoint leaves no object behind.
        prefix = f"{self.base_uri.split('://', 1)[1].split('/', 1)[1]}/{run_id}/"
        uploads = self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=prefix).get("Uploads", [])
        if uploads:
            violations.append(f"{where}: multipart uploads left open: {[u['Key'] for u in uploads]}")
        if loaded is None:
            folder = chk2.split(f"/{self.bucket}/", 1)[1] + "/"
            objs = self.client.list_objects_v2(Bucket=self.bucket, Prefix=folder).get("Contents", [])
            if objs:
                violations.append(f"{where}: failed checkpoint 2 left objects: {[o['Key'] for o in objs]}")
        return violations


def _proxy_harness(proxy, bucket, client, tmp_path):
    return Harness(bucket, client, tmp_path, f"s3://{bucket}/proxy", proxy_options(proxy),
                   arm=proxy.arm, disarm=proxy.disarm)


def _count_requests(harness, proxy, scenario):
    v = harness.run(scenario, lambda arm: arm(None, None))
    assert v == [], v
    return proxy.requests()


# ---------------------------------------------------------------------------------------------
# the sweep through the proxy

@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_every_request_of_a_checkpoint_x_every_fault(no_s3fs_retries, scenario, proxy, bucket_and_client, tmp_path):
    bucket, client = bucket_and_client
    harness = _proxy_harness(proxy, bucket, client, tmp_path)
    requests = _count_requests(harness, proxy, scenario)
    if scenario.big:
        methods = [m + " " + t.split("?", 1)[-1][:20] for _, m, t, _ in requests]
        assert any("uploads" in m for m in methods), f"no multipart upload in {methods}"
    before = proxy.injected
    t0 = time.monotonic()
    violations = []
    for k in range(len(requests)):
        for mode in scenario.modes:
            for v in harness.run(scenario, lambda arm, k=k, mode=mode: arm(k, mode)):
                violations.append(f"fault {mode}@{k} ({requests[k][1]} {requests[k][2][:80]}): {v}")
    injected = proxy.injected - before
    print(f"\nT7 {scenario.name}: {len(requests)} requests x {scenario.modes} = {injected} injected, "
          f"outcomes {harness.outcomes}, {time.monotonic() - t0:.1f} s")
    assert injected == len(requests) * len(scenario.modes)
    assert harness.outcomes["CheckpointError"] > 0
    assert violations == [], "\n".join(violations[:40]) + f"\n({len(violations)} violations)"


def test_default_client_retries_reset_sweep(proxy, bucket_and_client, tmp_path):
    """The production configuration: botocore and s3fs retry. A reset after the request took
    effect makes them re-send it; for the _metadata PUT the retry fails its own If-None-Match."""
    bucket, client = bucket_and_client
    opts = {"anon": False, "key": "testing", "secret": "testing", "default_block_size": MPU_BLOCK,
            "client_kwargs": {"endpoint_url": proxy.url, "region_name": "us-east-1"}}
    harness = Harness(bucket, client, tmp_path, f"s3://{bucket}/retrying", opts, arm=proxy.arm, disarm=proxy.disarm)
    scenario = SCENARIOS[0]
    requests = _count_requests(harness, proxy, scenario)
    before = proxy.injected
    violations = []
    for k in range(len(requests)):
        for mode in ("reset", "drop"):
            for v in harness.run(scenario, lambda arm, k=k, mode=mode: arm(k, mode)):
                violations.append(f"fault {mode}@{k} ({requests[k][1]} {requests[k][2][:80]}): {v}")
    print(f"\nT7 default retries: {proxy.injected - before} injected, outcomes {harness.outcomes}")
    assert violations == [], "\n".join(violations[:40])


@pytest.mark.skipif(not SOAK, reason="soak only (STATECORE_SOAK=1)")
def test_random_fault_schedules_soak(no_s3fs_retries, proxy, bucket_and_client, tmp_path):
    """5,000 runs (``STATECORE_S3_SOAK_RUNS`` overrides), each one fault of a random kind at a random
    request of a random scenario."""
    bucket, client = bucket_and_client
    harness = _proxy_harness(proxy, bucket, client, tmp_path)
    rng = random.Random(7)
    counts = {s.name: len(_count_requests(harness, proxy, s)) for s in SCENARIOS}
    violations = []
    runs = int(os.environ.get("STATECORE_S3_SOAK_RUNS") or 5000)
    t0 = time.monotonic()
    for i in range(runs):
        scenario = rng.choice(SCENARIOS)
        k = rng.randrange(counts[scenario.name])
        mode = rng.choice(MODES)
        for v in harness.run(scenario, lambda arm: arm(k, mode)):
            violations.append(f"run {i} fault {mode}@{k}: {v}")
    print(f"\nT7 soak: {runs} random fault schedules, {proxy.injected} faults injected in total, "
          f"outcomes {harness.outcomes}, {len(violations)} violations, {time.monotonic() - t0:.0f} s")
    assert violations == [], "\n".join(violations[:40])


# ---------------------------------------------------------------------------------------------
# FlakyFS: faults at the fsspec API (before / after the call took effect)

@pytest.fixture(scope="module")
def flaky(s3_server):
    import fsspec
    import s3fs
    target = s3fs.S3FileSystem(anon=False, key="testing", secret="testing", default_block_size=MPU_BLOCK,
                               client_kwargs={"endpoint_url": s3_server, "region_name": "us-east-1"},
                               config_kwargs={"retries": {"total_max_attempts": 1, "mode": "standard"}})
    fid = uuid.uuid4().hex
    state = FlakyFS.states[fid] = FlakyState(target)
    state.fid = fid
    fsspec.register_implementation("flaky", FlakyFS, clobber=True)
    yield state
    FlakyFS.states.pop(fid, None)


FLAKY_FAULTS = [("before", OSError), ("before", TimeoutError), ("after", OSError), ("after", TimeoutError)]


@pytest.mark.parametrize("scenario", SCENARIOS if SOAK else SCENARIOS[:1], ids=lambda s: s.name)
def test_flaky_fsspec_every_call_x_every_fault(no_s3fs_retries, scenario, flaky, bucket_and_client, tmp_path):
    bucket, client = bucket_and_client

    harness = Harness(bucket, client, tmp_path, f"flaky://{bucket}/flaky", {"flaky_id": flaky.fid},
                      arm=flaky.arm, disarm=flaky.disarm)
    assert harness.run(scenario, lambda a: a(None)) == []
    calls = flaky.requests()
    assert any(op == "write" for _, op, _, _ in calls), calls
    before = flaky.injected
    violations = []
    for k in range(len(calls)):
        for when, error in FLAKY_FAULTS:
            for v in harness.run(scenario, lambda a, k=k, when=when, error=error: a(k, when, error)):
                violations.append(f"{error.__name__} {when} call {k} ({calls[k][1]} {calls[k][2]}): {v}")
    injected = flaky.injected - before
    print(f"\nT7 FlakyFS {scenario.name}: {len(calls)} calls x {len(FLAKY_FAULTS)} = {injected} injected, "
          f"outcomes {harness.outcomes}")
    assert injected == len(calls) * len(FLAKY_FAULTS)
    assert violations == [], "\n".join(violations[:40]) + f"\n({len(violations)} violations)"


# ---------------------------------------------------------------------------------------------
# two writers, one chk-N

def test_two_writers_same_checkpoint_second_raises(proxy, bucket_and_client, tmp_path):
    bucket, client = bucket_and_client
    proxy.disarm()
    storage = sc.FileSystemCheckpointStorage(f"s3://{bucket}/two-{uuid.uuid4().hex[:6]}",
                                             storage_options=proxy_options(proxy))
    # Interleaved: both writers open before either commits.
    a = storage.create_writer("j", "op", 5, "kg0-127")
    b = storage.create_writer("j", "op", 5, "kg0-127")
    a.write_file("a.bin", b"from a")
    b.write_file("b.bin", b"from b")
    a.commit(b"metadata of a")
    with pytest.raises(sc.CheckpointError, match="already exists"):
        b.commit(b"metadata of b")
    assert stg.read_metadata(a.location) == b"metadata of a"
    assert stg.read_file(a.location, "a.bin") == b"from a"
    # Sequential: the second writer is refused up front.
    with pytest.raises(sc.CheckpointError, match="already exists"):
        storage.create_writer("j", "op", 5, "kg0-127")
    # Through the keyed backend: a second backend committing the same chk-N raises.
    backend = BACKENDS["hashmap"](tmp_path)
    backend.checkpoint_storage = storage
    with backend.create_keyed_state_backend(job_id="k", operator_id="op") as kb1, \
            backend.create_keyed_state_backend(job_id="k", operator_id="op") as kb2:
        populate(kb1, range(30))
        expected = dump(kb1)
        populate(kb2, range(30, 40))
        cp = kb1.checkpoint(3)
        with pytest.raises(sc.CheckpointError, match="already exists"):
            kb2.checkpoint(3)
    with backend.restore_keyed_state_backend([cp.location], job_id="k", operator_id="op") as kb3:
        assert dump(kb3) == expected


def test_losing_writer_does_not_clobber_the_winner(proxy, bucket_and_client, tmp_path):
    """Two writers of one chk-N: data files are stored under per-writer names (write_file(unique=True),
    as checkpoints write them), so the writer whose commit loses neither overwrites nor deletes the
    winner's data."""
    bucket, _ = bucket_and_client
    proxy.disarm()
    storage = sc.FileSystemCheckpointStorage(f"s3://{bucket}/clobber-{uuid.uuid4().hex[:6]}",
                                             storage_options=proxy_options(proxy))
    a = storage.create_writer("j", "op", 5, "kg0-127")
    b = storage.create_writer("j", "op", 5, "kg0-127")
    name_a, _, _ = a.write_file("data.sckd", b"winner", unique=True)
    a.commit(b"metadata of a")
    name_b, _, _ = b.write_file("data.sckd", b"loser!", unique=True)
    assert name_a != name_b and name_a.endswith("-data.sckd")
    with pytest.raises(sc.CheckpointError):
        b.commit(b"metadata of b")
    assert stg.read_file(a.location, name_a) == b"winner"
    with pytest.raises(sc.CorruptCheckpointError, match="missing"):
        stg.read_file(b.location, name_b)  # the loser cleaned up only its own file


def test_losing_checkpoint_does_not_clobber_the_winner(tmp_path):
    """The same race through the snapshot layer on local disk: two keyed backends of one operator
    instance both hold a writer for chk-7; the first commits, the second writes its data afterwards and
    its commit fails; the first checkpoint still restores exactly."""
    from statecore.checkpoint import snapshot
    backend = sc.HashMapStateBackend(sc.FileSystemCheckpointStorage(str(tmp_path / "c")))
    with backend.create_keyed_state_backend(job_id="k", operator_id="op") as kb1, \
            backend.create_keyed_state_backend(job_id="k", operator_id="op") as kb2:
        populate(kb1, range(30))
        expected = dump(kb1)
        populate(kb2, range(30, 60))
        cut1 = snapshot._Cut(kb1, copy=False).serialize(cleanup_expired=True)
        cut2 = snapshot._Cut(kb2, copy=False).serialize(cleanup_expired=True)
        storage = backend.checkpoint_storage
        w1 = storage.create_writer("k", "op", 7, snapshot._instance(kb1))
        w2 = storage.create_writer("k", "op", 7, snapshot._instance(kb2))
        with w1:
            cp = snapshot._write(cut1, w1, 7, "native")
        with w2, pytest.raises(sc.CheckpointError, match="already exists"):
            snapshot._write(cut2, w2, 7, "native")
    with backend.restore_keyed_state_backend([cp.location], job_id="k", operator_id="op") as kb3:
        assert dump(kb3) == expected


# ---------------------------------------------------------------------------------------------
# negative controls: plant a bug, the harness must report it

@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the planted bug's __del__
def test_negative_control_no_discard(no_s3fs_retries, proxy, bucket_and_client, tmp_path, monkeypatch):
    """Without storage._discard and the orphan-upload abort (no multipart abort; fsspec's __del__
    may commit the partial object), the harness sees open uploads or objects left behind."""
    bucket, client = bucket_and_client
    monkeypatch.setattr(stg, "_discard", lambda f: None)
    monkeypatch.setattr(stg._FsspecStore, "_abort_orphan_uploads", lambda self, path: None)
    harness = _proxy_harness(proxy, bucket, client, tmp_path)
    scenario = SCENARIOS[1] if len(SCENARIOS) > 1 else SCENARIOS[0]
    requests = _count_requests(harness, proxy, scenario)
    targets = [i for i, (_, m, t, _) in enumerate(requests) if m in ("PUT", "POST") and "_metadata" not in t]
    found = []
    for k in targets:
        for mode in ("500", "reset"):
            found += harness.run(scenario, lambda arm, k=k, mode=mode: arm(k, mode))
            import gc
            gc.collect()
    assert any("multipart uploads left open" in v or "left objects" in v for v in found), found


def test_negative_control_retried_commit_not_recognized(no_s3fs_retries, proxy, bucket_and_client, tmp_path,
                                                        monkeypatch):
    """A reset after the _metadata PUT took effect makes the HTTP client re-send it; the retry fails
    its own If-None-Match.  Without storage.py's check that the object there is byte-for-byte
    ours (_FsspecStore._holds), that committed checkpoint is reported as failed."""
    bucket, client = bucket_and_client
    harness = _proxy_harness(proxy, bucket, client, tmp_path)
    scenario = SCENARIOS[0]
    requests = _count_requests(harness, proxy, scenario)
    k = next(i for i, (_, m, t, _) in enumerate(requests) if m == "PUT" and t.split("?")[0].endswith("/_metadata"))
    assert harness.run(scenario, lambda arm: arm(k, "reset")) == []  # the fixed code: committed and acknowledged
    monkeypatch.setattr(stg._FsspecStore, "_holds", lambda self, path, data: False)  # planted bug
    found = harness.run(scenario, lambda arm: arm(k, "reset"))
    assert any("failed" in v and "but is committed" in v for v in found), found
