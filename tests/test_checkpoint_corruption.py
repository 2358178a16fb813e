"""Corrupt, truncated and misplaced checkpoint files (RELIABILITY.md T2).

Real checkpoints (small fixtures: every state type over 30 keys x 3 namespaces) of
the heap and LMDB backends, native (``checkpoint``) and canonical (``savepoint``),
are mutated in place, one mutant at a time, for both files of a checkpoint
(``data.sckd`` and ``_metadata``):

* single-bit flips: every bit of the ``_metadata`` header and trailing checksum and
  of sampled body bytes; 1-3-bit flips at random positions of the data file;
* truncation to 0, 1, len-1 and 30 evenly spaced lengths; 1 and 4,096 appended bytes;
  each 4 KiB page zeroed;
* the file deleted; swapped with the same file of another checkpoint (both folders
  mutated); a same-named file copied from another checkpoint over it;
* crafted ``_metadata`` with a valid container checksum but a lying body (file path
  pointing at another ``chk-*`` folder or outside, absurd lengths, section offsets
  past the end, a wrong hash, an unknown state type, an unreadable version).

Every mutant must make ``restore_keyed_state_backend`` raise CorruptCheckpointError
(never another exception type, never success), and every mutant of ``_metadata``
must make ``load_checkpoint`` raise it too, except where the container is valid by
construction: the crafted ones (their lie is in what the body says about the data
file, which only restore reads) and another savepoint's whole ``_metadata`` copied
or swapped into a savepoint folder (nothing in ``_metadata`` names its folder; in a
``chk-<id>`` folder the id does, and load_checkpoint refuses it).  The previous valid checkpoint must still restore
to its original content throughout, and the unmutated target afterwards.
"""
import glob
import os
import random
import time

import pytest

import statecore as sc
from statecore import CorruptCheckpointError
from statecore.checkpoint import format as fmt

from backends import BACKENDS
from test_checkpoint import dump, populate

DATA, META = "data.sckd", "_metadata"
PAGE = 4096
META_BODY_FLIPS = 400
DATA_FLIPS = 500
TRUNCATIONS = 30


class Fixture:
    """prev (valid throughout), target (mutated) and donor (source of foreign files) of one config."""

    def __init__(self, backend_name, kind, root):
        self.backend_name, self.kind = backend_name, kind
        self.backend = BACKENDS[backend_name](root)
        if backend_name == "lmdb":
            # Restores in a fresh temporary directory each time (removed on close).
            self.backend = sc.LMDBStateBackend(write_buffer_size=4096)
        self.backend.checkpoint_storage = sc.FileSystemCheckpointStorage(str(root / "ckpt"))
        self.backend.num_retained = 10
        with self.backend.create_keyed_state_backend(max_parallelism=128) as kb:
            populate(kb, range(30), seed=1)
            self.prev_dump = dump(kb)
            self.prev = self._snapshot(kb, 1, root)
            populate(kb, range(20, 40), seed=2)
            self.target_dump = dump(kb)
            self.target = self._snapshot(kb, 2, root)
            populate(kb, range(35, 45), seed=3)
            self.donor = self._snapshot(kb, 3, root)

    def _snapshot(self, kb, cid, root):
        if self.kind == "native":
            return kb.checkpoint(cid).location
        return kb.savepoint(str(root / f"sp-{cid}")).location

    def restore_dump(self, location):
        with self.backend.restore_keyed_state_backend([location], max_parallelism=128) as kb:
            return dump(kb)


class Checker:
    def __init__(self, fx):
        self.fx = fx
        self.mutants = 0
        self.failures = []
        self.kinds = {}

    def expect_corrupt(self, location, label, *, metadata_mutant):
        """Both entry points must raise CorruptCheckpointError for this mutant."""
        self.mutants += 1
        self.kinds[label.split("@")[0]] = self.kinds.get(label.split("@")[0], 0) + 1
        where = f"[{self.fx.backend_name}/{self.fx.kind}] {label}"
        if metadata_mutant:
            try:
                sc.load_checkpoint(location)
                self.failures.append(f"{where}: load_checkpoint accepted it")
            except CorruptCheckpointError:
                pass
            except Exception as e:  # noqa: BLE001 - any other type is a finding
                self.failures.append(f"{where}: load_checkpoint raised {type(e).__name__}: {e}")
        try:
            kb = self.fx.backend.restore_keyed_state_backend([location], max_parallelism=128)
        except CorruptCheckpointError:
            return
        except Exception as e:  # noqa: BLE001
            self.failures.append(f"{where}: restore raised {type(e).__name__}: {e}")
            return
        kb.close()
        self.failures.append(f"{where}: restore succeeded")

    def check_prev(self, label):
        try:
            if self.fx.restore_dump(self.fx.prev) != self.fx.prev_dump:
                self.failures.append(f"[{self.fx.backend_name}/{self.fx.kind}] after {label}: previous checkpoint "
                                     f"restores to different state")
        except Exception as e:  # noqa: BLE001
            self.failures.append(f"[{self.fx.backend_name}/{self.fx.kind}] after {label}: previous checkpoint no "
                                 f"longer restores: {type(e).__name__}: {e}")


def _file(folder, name):
    """Path of ``name`` in a checkpoint folder; the data file is stored as ``<writer token>-data.sckd``."""
    if name == DATA:
        found = glob.glob(os.path.join(glob.escape(folder), "*" + DATA))
        assert len(found) == 1, found
        return found[0]
    return os.path.join(folder, name)


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def _flip(data, pos, bits):
    b = bytearray(data)
    for bit in bits:
        b[pos] ^= 1 << bit
    return bytes(b)


def byte_mutants(data, rng, *, all_bits_at=(), sampled_positions=(), multi_bit=False):
    """(label, bytes) for flips, truncations, appends and zeroed pages of ``data``; never equal to ``data``."""
    n = len(data)
    for pos in all_bits_at:
        for bit in range(8):
            yield f"flip@{pos}.{bit}", _flip(data, pos, [bit])
    for pos in sampled_positions:
        bits = rng.sample(range(8), rng.randint(1, 3)) if multi_bit else [rng.randrange(8)]
        yield f"flip@{pos}.{bits}", _flip(data, pos, bits)
    lengths = {0, 1, n - 1} | {n * i // (TRUNCATIONS + 1) for i in range(1, TRUNCATIONS + 1)}
    for ln in sorted(x for x in lengths if 0 <= x < n):
        yield f"truncate@{ln}", data[:ln]
    yield "append@1", data + b"\x00"
    yield "append@4096", data + bytes(rng.randrange(256) for _ in range(PAGE))
    for start in range(0, n, PAGE):
        zeroed = data[:start] + bytes(min(PAGE, n - start)) + data[start + PAGE:]
        if zeroed != data:
            yield f"zero-page@{start}", zeroed


def crafted_metadata(meta_bytes, other_folder):
    """(label, bytes): _metadata with a valid container checksum but a lying body."""
    body = fmt.decode_metadata(meta_bytes, "fixture")

    def variant(label, mutate):
        b = fmt.decode_metadata(meta_bytes, "fixture")
        mutate(b)
        return label, fmt.encode_metadata(b)

    f0 = lambda b: b["files"][0]  # noqa: E731
    yield variant("crafted-path-other-chk", lambda b: f0(b).update(path=f"../{other_folder}"))
    yield variant("crafted-path-absolute", lambda b: f0(b).update(path="/etc/passwd"))
    yield variant("crafted-path-dotdot", lambda b: f0(b).update(path="../../../../etc/passwd"))
    yield variant("crafted-path-shared-missing", lambda b: f0(b).update(path="../shared/nosuch"))
    yield variant("crafted-length-2^63", lambda b: f0(b).update(length=2 ** 63))
    yield variant("crafted-length-minus-1", lambda b: f0(b).update(length=f0(b)["length"] - 1))
    yield variant("crafted-sha-zero", lambda b: f0(b).update(sha256="0" * 64))
    yield variant("crafted-sha-missing", lambda b: f0(b).pop("sha256"))
    yield variant("crafted-files-missing", lambda b: b.pop("files"))
    yield variant("crafted-state-type", lambda b: b["states"][0].update(type="nosuch"))
    sections = body["files"][0]["key_groups"]
    if sections:
        length = body["files"][0]["length"]
        yield variant("crafted-section-past-end",
                      lambda b: f0(b)["key_groups"][0].__setitem__(1, length + 10))
        yield variant("crafted-section-huge-length",
                      lambda b: f0(b)["key_groups"][0].__setitem__(2, 2 ** 62))
        yield variant("crafted-section-negative-offset",
                      lambda b: f0(b)["key_groups"][0].__setitem__(1, -5))
    head = bytearray(fmt.encode_metadata(body))
    head[8:10] = (fmt.FORMAT_VERSION + 1).to_bytes(2, "big")
    import hashlib
    end = len(head) - fmt.CHECKSUM_SIZE
    head[end:] = hashlib.sha256(bytes(head[:end])).digest()
    yield "crafted-version-unreadable", bytes(head)


CONFIGS = [(b, k) for b in sorted(BACKENDS) for k in ("native", "canonical")]


@pytest.mark.slow
@pytest.mark.parametrize("backend_name,kind", CONFIGS)
def test_every_mutant_is_refused_with_corrupt_checkpoint_error(backend_name, kind, tmp_path):
    t0 = time.monotonic()
    fx = Fixture(backend_name, kind, tmp_path)
    assert fx.restore_dump(fx.target) == fx.target_dump and fx.target_dump != fx.prev_dump
    chk = Checker(fx)
    rng = random.Random(f"{backend_name}-{kind}")
    target_files = {name: _file(fx.target, name) for name in (DATA, META)}
    donor_files = {name: _file(fx.donor, name) for name in (DATA, META)}
    originals = {name: _read(p) for name, p in target_files.items()}
    donor_originals = {name: _read(p) for name, p in donor_files.items()}

    def write(path, data):
        with open(path, "wb") as f:
            f.write(data)

    for name in (META, DATA):
        path, data = target_files[name], originals[name]
        is_meta = name == META
        if is_meta:
            header = range(fmt.HEADER_SIZE)
            trailer = range(len(data) - fmt.CHECKSUM_SIZE, len(data))
            body = rng.sample(range(fmt.HEADER_SIZE, len(data) - fmt.CHECKSUM_SIZE),
                              min(META_BODY_FLIPS, len(data) - fmt.HEADER_SIZE - fmt.CHECKSUM_SIZE))
            mutants = byte_mutants(data, rng, all_bits_at=[*header, *trailer], sampled_positions=body)
        else:
            mutants = byte_mutants(data, rng, sampled_positions=[rng.randrange(len(data)) for _ in range(DATA_FLIPS)],
                                   multi_bit=True)
        for i, (label, mutant) in enumerate(mutants):
            assert mutant != data, label
            write(path, mutant)
            chk.expect_corrupt(fx.target, f"{name}:{label}", metadata_mutant=is_meta)
            if i % 100 == 0:
                chk.check_prev(f"{name}:{label}")
        write(path, data)

        # Deleted.
        os.unlink(path)
        chk.expect_corrupt(fx.target, f"{name}:delete", metadata_mutant=is_meta)
        write(path, data)

        # A same-named file of another checkpoint copied over it.  A whole, valid _metadata of
        # another checkpoint is caught by load_checkpoint only in a chk-<id> folder (the id in
        # the folder name differs); a savepoint folder's name carries no identity, so there
        # only restore catches it (the data file's hash differs).
        foreign_meta = is_meta and kind == "native"
        assert donor_originals[name] != data
        write(path, donor_originals[name])
        chk.expect_corrupt(fx.target, f"{name}:copy-from-other", metadata_mutant=foreign_meta)
        write(path, data)

        # Swapped with another checkpoint's file: both folders are now wrong.
        os.rename(path, path + ".swap")
        os.rename(donor_files[name], path)
        os.rename(path + ".swap", donor_files[name])
        chk.expect_corrupt(fx.target, f"{name}:swap", metadata_mutant=foreign_meta)
        chk.expect_corrupt(fx.donor, f"{name}:swap(donor)", metadata_mutant=foreign_meta)
        write(path, data)
        write(donor_files[name], donor_originals[name])
        chk.check_prev(f"{name} mutants")

    # Crafted metadata: valid container, lying body.  Restore must still refuse with the one error type.
    prev = fx.prev.rstrip("/")
    for label, mutant in crafted_metadata(originals[META], os.path.relpath(_file(prev, DATA), os.path.dirname(prev))):
        write(target_files[META], mutant)
        chk.expect_corrupt(fx.target, f"{META}:{label}", metadata_mutant=label == "crafted-version-unreadable")
    write(target_files[META], originals[META])

    chk.check_prev("all mutants")
    assert fx.restore_dump(fx.target) == fx.target_dump, "the unmutated target no longer restores"
    elapsed = time.monotonic() - t0
    print(f"\n{backend_name}/{kind}: {chk.mutants} mutants in {elapsed:.1f}s "
          f"(data {len(originals[DATA])} B, _metadata {len(originals[META])} B); by kind {chk.kinds}")
    assert not chk.failures, f"{len(chk.failures)} of {chk.mutants} mutants not refused properly:\n" + \
        "\n".join(chk.failures[:30])
    assert chk.mutants >= 250
