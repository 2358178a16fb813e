"""``statecore inspect LOCATION``: describe a checkpoint or savepoint without restoring it.

Reads ``<LOCATION>/_metadata`` (container checks of docs/checkpoint-format.md), then every
file the metadata lists, each verified with :func:`statecore.checkpoint.format.verify_file`
(length and SHA-256), then walks the records of each verified data file to count entries and
bytes per state and per key group.  Only bytes are looked at: no value is deserialized, and
nothing is ever unpickled.

Any problem (missing folder, no ``_metadata``, a bit flip, a truncated file, a record that does
not parse) is raised as :class:`~statecore.errors.StateError` (usually
``CorruptCheckpointError``) or ``OSError``; the command line turns it into one line on stderr
and exit code 1.
"""
import json
import os
import struct
import sys

from statecore.checkpoint import format as fmt
from statecore.checkpoint import storage as stg
from statecore.errors import CorruptCheckpointError

DATA_MAGIC = b"SCKDATA1"  # statecore._states.DATA_MAGIC (kept here so inspecting needs no compiled state code)
OPERATOR_DATA_MAGIC = b"SCOPDAT1"  # statecore.operator_state.OPERATOR_DATA_MAGIC
_KC_HEAD = 4  # composite key head: BE16 key group | BE16 state id


# ---------------------------------------------------------------------------------------------- reading
def _varint(data, p, end, where):
    """LEB128 varint at ``data[p:end]`` -> (value, new position); CorruptCheckpointError when malformed."""
    v = shift = 0
    while True:
        if p >= end or shift > 63:
            raise CorruptCheckpointError(f"{where}: malformed record (bad varint at byte {p})")
        b = data[p]
        p += 1
        v |= (b & 0x7F) << shift
        if b < 0x80:
            return v, p
        shift += 7


def scan_section(data, off, length, kg, where):
    """Walk one key-group section; yields ``(state id, record bytes, timestamp)`` per record.

    Same checks as the restore path (bounds, key group of every record); raises
    CorruptCheckpointError naming ``where``.
    """
    if off < len(DATA_MAGIC) or length < 0 or off + length > len(data):
        raise CorruptCheckpointError(f"{where}: key group {kg} section [{off}, +{length}) is outside the file")
    p, end = off, off + length
    be64 = struct.Struct(">q").unpack_from
    while p < end:
        start = p
        kl, p = _varint(data, p, end, where)
        if kl < _KC_HEAD or kl > end - p:
            raise CorruptCheckpointError(f"{where}: malformed record key in key group {kg}")
        rkg = (data[p] << 8) | data[p + 1]
        sid = (data[p + 2] << 8) | data[p + 3]
        if rkg != kg:
            raise CorruptCheckpointError(f"{where}: a record of key group {rkg} is filed under {kg}")
        p += kl
        vl, p = _varint(data, p, end, where)
        if vl > end - p or end - p - vl < 8:
            raise CorruptCheckpointError(f"{where}: malformed record value in key group {kg}")
        p += vl
        ts = be64(data, p)[0]
        p += 8
        yield sid, p - start, ts


def _ser_name(ident):
    """``["statecore._codec.Float64", 1]`` -> ``"Float64 v1"``; user serializers keep their qualified name."""
    if not ident:
        return None
    try:
        name, version = ident
    except (TypeError, ValueError):
        return str(ident)
    name = str(name)
    for prefix in ("statecore._codec.", "statecore.serializers."):
        if name.startswith(prefix):
            name = name[len(prefix):]
    return f"{name} v{version}"


def _duration(ms):
    if not isinstance(ms, int) or ms <= 0:
        return str(ms)
    parts = []
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000), ("ms", 1)):
        if ms >= size:
            parts.append(f"{ms // size}{unit}")
            ms %= size
    return "".join(parts)


def _ttl_text(ttl):
    if not ttl:
        return "off"
    cleanup = []
    if ttl.get("cleanup_full_snapshot"):
        cleanup.append("full-snapshot")
    if ttl.get("incremental_cleanup"):
        every = ", every record" if ttl.get("incremental_cleanup_every_record") else ""
        cleanup.append(f"incremental({ttl.get('incremental_cleanup_size')}{every})")
    if ttl.get("cleanup_in_background"):
        cleanup.append("background")
    return (f"{_duration(ttl.get('ttl_ms'))} {ttl.get('update_type')} {ttl.get('state_visibility')}"
            f" (cleanup: {', '.join(cleanup) or 'none'})")


def _human_bytes(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def describe(location):
    """A JSON-able description of the checkpoint or savepoint at ``location``.

    Raises CorruptCheckpointError (or another StateError / OSError) when anything does not verify.
    """
    from statecore.checkpoint.snapshot import CompletedCheckpoint

    if isinstance(location, os.PathLike):
        location = os.fspath(location)
    location = location.rstrip("/") if len(location) > 1 else location
    if "://" not in location:
        location = os.path.abspath(location)
    raw = stg.read_metadata(location)
    where_meta = f"{location}/{stg.METADATA_NAME}"
    body = fmt.decode_metadata(raw, where_meta)
    version = struct.unpack_from(">H", raw, 8)[0]
    completed = CompletedCheckpoint.from_metadata(location, body)  # field checks, same as restore

    if body.get("kind") == "operator":
        return _describe_operator(location, body, raw, version, completed, where_meta)
    states = body.get("states")
    if not isinstance(states, list) or not all(isinstance(s, dict) and "sid" in s for s in states):
        raise CorruptCheckpointError(f"{where_meta}: missing or invalid field 'states'")
    by_sid = {}
    out_states = []
    for s in states:
        d = {
            "name": s.get("name"),
            "sid": s.get("sid"),
            "type": s.get("type"),
            "user_key_serializer": _ser_name(s.get("user_key_serializer")),
            "value_serializer": _ser_name(s.get("value_serializer")),
            "ttl": s.get("ttl"),
            "ttl_text": _ttl_text(s.get("ttl")),
            "entries_metadata": s.get("entries"),
            "entries": 0,
            "bytes": 0,
            "expired_at_checkpoint": 0 if s.get("ttl") else None,
            "min_ts": None,
            "max_ts": None,
        }
        by_sid[s["sid"]] = d
        out_states.append(d)

    created = body.get("created_ms")
    files, key_groups = [], {}
    for f in body["files"]:
        try:
            path, length, sha, sections = f["path"], int(f["length"]), f["sha256"], f.get("key_groups", [])
        except (KeyError, TypeError, ValueError):
            raise CorruptCheckpointError(f"{where_meta}: invalid file entry {f!r}") from None
        where = f"{location}/{path}"
        data = stg.read_file(location, path, expected_len=length)
        fmt.verify_file(data, length, sha, where)
        shared = path.startswith("../shared/")
        entry = {"path": path, "length": length, "sha256": sha, "verified": True, "shared": shared,
                 "key_groups": len(sections)}
        files.append(entry)
        if data[:len(DATA_MAGIC)] != DATA_MAGIC:
            entry["kind"] = "other"
            continue
        entry["kind"] = "records"
        for sec in sections:
            try:
                kg, off, slen, count = (int(x) for x in sec)
            except (TypeError, ValueError):
                raise CorruptCheckpointError(f"{where_meta}: invalid key-group section {sec!r}") from None
            if kg not in completed.key_group_range:
                raise CorruptCheckpointError(f"{where_meta}: key group {kg} is outside the checkpoint's range "
                                             f"{completed.key_group_range}")
            n = nbytes = 0
            for sid, rbytes, ts in scan_section(data, off, slen, kg, where):
                st = by_sid.get(sid)
                if st is None:
                    raise CorruptCheckpointError(f"{where}: a record names state id {sid}, which the metadata "
                                                 "does not declare")
                st["entries"] += 1
                st["bytes"] += rbytes
                st["min_ts"] = ts if st["min_ts"] is None else min(st["min_ts"], ts)
                st["max_ts"] = ts if st["max_ts"] is None else max(st["max_ts"], ts)
                ttl = st["ttl"]
                if ttl and isinstance(created, int) and ts + int(ttl.get("ttl_ms", 0)) <= created:
                    st["expired_at_checkpoint"] += 1
                n += 1
                nbytes += rbytes
            if n != count:
                raise CorruptCheckpointError(f"{where}: key group {kg} holds {n} records, the metadata says {count}")
            kgd = key_groups.setdefault(kg, {"key_group": kg, "entries": 0, "bytes": 0})
            kgd["entries"] += n
            kgd["bytes"] += nbytes

    for st in out_states:
        if st["ttl"] is None:
            del st["min_ts"], st["max_ts"]
    kgr = completed.key_group_range
    kg_list = [key_groups[k] for k in sorted(key_groups)]
    meta_len = len(raw)
    return {
        "location": location,
        "kind": "savepoint" if completed.format == "canonical" else "checkpoint",
        "format": completed.format,
        "format_version": version,
        "format_version_meaning": fmt.READABLE_VERSIONS.get(version),
        "checkpoint_id": completed.checkpoint_id,
        "job_id": body.get("job_id"),
        "operator_id": body.get("operator_id"),
        "backend": body.get("backend"),
        "incremental": completed.incremental,
        "created_ms": created,
        "max_parallelism": body.get("max_parallelism"),
        "key_group_range": [kgr.start, kgr.end],
        "key_serializer": _ser_name(body.get("key_serializer")),
        "states": out_states,
        "entries": sum(s["entries"] for s in out_states),
        "files": files,
        "metadata_bytes": meta_len,
        "data_bytes": sum(f["length"] for f in files),
        "total_bytes": meta_len + sum(f["length"] for f in files),
        "key_groups": kg_list,
        "key_groups_with_data": len(kg_list),
        "checksums_verified": all(f["verified"] for f in files),
    }


def _describe_operator(location, body, raw, version, completed, where_meta):
    """Operator-state checkpoint (``kind: "operator"``, data file ``operator.sckd``, docs/checkpoint-format.md)."""
    files = body["files"]
    states = body.get("states")
    if len(files) != 1 or not isinstance(states, list) or not all(isinstance(s, dict) for s in states):
        raise CorruptCheckpointError(f"{where_meta}: invalid operator-state metadata (files or states)")
    f = files[0]
    try:
        path, length, sha = f["path"], int(f["length"]), f["sha256"]
    except (KeyError, TypeError, ValueError):
        raise CorruptCheckpointError(f"{where_meta}: invalid file entry {f!r}") from None
    where = f"{location}/{path}"
    data = stg.read_file(location, path, expected_len=length)
    fmt.verify_file(data, length, sha, where)
    if data[:len(OPERATOR_DATA_MAGIC)] != OPERATOR_DATA_MAGIC:
        raise CorruptCheckpointError(f"{where}: not a statecore operator-state file (bad magic)")
    out_states = []
    for st in states:
        try:
            name, mode, pos, slen, count = st["name"], st["mode"], int(st["offset"]), int(st["length"]), \
                int(st["count"])
        except (KeyError, TypeError, ValueError):
            raise CorruptCheckpointError(f"{where_meta}: invalid operator state entry {st!r}") from None
        end = pos + slen
        if not len(OPERATOR_DATA_MAGIC) <= pos <= end <= len(data):
            raise CorruptCheckpointError(f"{where}: state {name!r} lies outside the file")
        items = 0
        while pos < end:
            n, pos = _varint(data, pos, end, where)
            if n > end - pos:
                raise CorruptCheckpointError(f"{where}: state {name!r}: element runs past its end")
            pos += n
            items += 1
        per = 2 if mode == "broadcast" else 1
        if items != count * per:
            raise CorruptCheckpointError(f"{where}: state {name!r} has {items // per} elements, metadata says "
                                         f"{count}")
        sers = [_ser_name(x) for x in st.get("serializers") or []]
        out_states.append({
            "name": name, "type": f"operator {mode}", "mode": mode,
            "user_key_serializer": sers[0] if mode == "broadcast" and len(sers) == 2 else None,
            "value_serializer": sers[-1] if sers else None,
            "ttl": None, "ttl_text": "off", "entries_metadata": count, "entries": count, "bytes": slen,
            "expired_at_checkpoint": None,
        })
    meta_len = len(raw)
    return {
        "location": location, "kind": "operator-state checkpoint", "format": completed.format,
        "format_version": version, "format_version_meaning": fmt.READABLE_VERSIONS.get(version),
        "checkpoint_id": completed.checkpoint_id, "job_id": body.get("job_id"),
        "operator_id": body.get("operator_id"), "backend": body.get("backend"), "incremental": completed.incremental,
        "created_ms": body.get("created_ms"), "max_parallelism": body.get("max_parallelism"),
        "key_group_range": None, "key_serializer": None, "states": out_states,
        "entries": sum(s["entries"] for s in out_states),
        "files": [{"path": path, "length": length, "sha256": sha, "verified": True, "shared": False,
                   "key_groups": 0, "kind": "operator"}],
        "metadata_bytes": meta_len, "data_bytes": length, "total_bytes": meta_len + length,
        "key_groups": [], "key_groups_with_data": 0, "checksums_verified": True,
    }


# ---------------------------------------------------------------------------------------------- output
def render(d, out=sys.stdout):
    w = out.write
    w(f"{d['kind']} {d['location']}\n")
    w(f"  format            {d['format']} (metadata format version {d['format_version']}: "
      f"{d['format_version_meaning']})\n")
    w(f"  checkpoint id     {d['checkpoint_id']}{'  (incremental)' if d['incremental'] else ''}\n")
    if d["backend"] is not None:
        w(f"  backend           {d['backend']}\n")
    if d["job_id"] is not None or d["operator_id"] is not None:
        w(f"  job / operator    {d['job_id']} / {d['operator_id']}\n")
    if d["key_group_range"] is not None:
        lo, hi = d["key_group_range"]
        w(f"  key groups        {lo}..{hi} of max_parallelism {d['max_parallelism']} "
          f"({d['key_groups_with_data']} of {hi - lo + 1} hold data)\n")
        w(f"  key serializer    {d['key_serializer']}\n")
    created = d["created_ms"]
    when = ""
    if isinstance(created, int) and 10 ** 11 < created < 10 ** 14:  # looks like epoch milliseconds
        import datetime
        when = datetime.datetime.fromtimestamp(created / 1000, datetime.timezone.utc).strftime(
            "  (%Y-%m-%d %H:%M:%S UTC)")
    if created is not None:
        w(f"  clock at cut      {created} ms{when}\n")
    w(f"  states            {len(d['states'])}\n")
    for s in d["states"]:
        sers = f"user key {s['user_key_serializer']}, value {s['value_serializer']}" if s["user_key_serializer"] \
            else f"value {s['value_serializer']}"
        w(f"    {s['name']!s:<20} {s['type']:<18} {s['entries']:>10,} entries {_human_bytes(s['bytes']):>10}"
          f"   [{sers}]\n")
        if s["ttl"]:
            w(f"    {'':<20} ttl {s['ttl_text']}; {s['expired_at_checkpoint']:,} expired at checkpoint time\n")
    w(f"  entries           {d['entries']:,}\n")
    if d["key_groups"]:
        counts = [k["entries"] for k in d["key_groups"]]
        w(f"  per key group     min {min(counts):,} / mean {sum(counts) / len(counts):,.1f} / max {max(counts):,}"
          f" entries\n")
    for f in d["files"]:
        w(f"  file              {f['path']}  {f['length']:,} bytes  sha256 {f['sha256'][:16]}…  "
          f"{'verified' if f['verified'] else 'MISMATCH'}\n")
    w(f"  size              {d['total_bytes']:,} bytes ({_human_bytes(d['total_bytes'])}: data "
      f"{d['data_bytes']:,} + _metadata {d['metadata_bytes']:,})\n")
    n = len(d["files"])
    w(f"  checksums         {'OK' if d['checksums_verified'] else 'FAILED'}: {n} file{'s' if n != 1 else ''} + "
      "_metadata verified (length and SHA-256)\n")


def add_parser(subparsers):
    p = subparsers.add_parser(
        "inspect", help="describe a checkpoint or savepoint",
        description="Describe the checkpoint or savepoint folder at LOCATION (a path or fsspec URI): format and "
                    "version, checkpoint id, backend, job/operator, key-group range, each state (type, "
                    "serializers, TTL, entries, bytes), sizes, and whether every file's length and SHA-256 "
                    "verify. Nothing is deserialized or unpickled. A missing or corrupt checkpoint is reported "
                    "in one line on stderr with exit code 1.")
    p.add_argument("location", metavar="LOCATION", help="checkpoint folder (the one holding _metadata)")
    p.add_argument("--json", action="store_true", help="print the description as JSON")
    p.set_defaults(func=main)
    return p


def _hint(location):
    """A short hint when LOCATION is a folder holding checkpoints further down (e.g. the demo's --dir)."""
    if "://" in location or not os.path.isdir(location):
        return ""
    found = []
    for root, dirs, names in os.walk(location):
        dirs.sort()
        if stg.METADATA_NAME in names:
            found.append(root)
        if len(found) >= 3 or root.count(os.sep) - location.count(os.sep) > 4:
            break
    return f" (checkpoints found below it, e.g. {found[-1]})" if found else ""


def main(args):
    try:
        d = describe(args.location)
    except CorruptCheckpointError as e:
        msg = str(e)
        if "missing: no committed checkpoint" in msg:
            msg += _hint(args.location)
        raise CorruptCheckpointError(msg) from None
    if args.json:
        json.dump(d, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        render(d)
    return 0
