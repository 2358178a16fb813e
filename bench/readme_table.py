"""Render a ``statecore bench --json`` result into README.md (between the bench markers).

The README's benchmark table is regenerated from a real run, never typed in:

    statecore bench --keys 200000 --json docs/bench/bench.json --plot docs/bench/bench.png
    python bench/readme_table.py docs/bench/bench.json
"""
import json
import pathlib
import sys

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def render(data):
    m, v = data["machine"], data["versions"]
    cmd = " ".join(["statecore"] + list(data.get("argv") or ["bench"]))
    lines = [f"Measured by `{cmd}` on {m['cpu_model']}, {m['cores']} cores, "
             f"{m['memory_bytes'] / 2**30:.0f} GiB, {m['system']} {m['release']}; Python {v['python']}, "
             f"numpy {v['numpy']}, py-lmdb {v['lmdb']} (LMDB {v['lmdb_library']}), "
             f"rocksdict {v.get('rocksdict') or 'not installed'}. Best of the timed passes; "
             "`x dict` = ns/op relative to a bare dict on the same workload; checkpoint rows give "
             "bytes per second and the bytes one pass moves.", "",
             "| workload | backend | n | ops/s | ns/op | x dict | peak RSS MiB |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in data["results"]:
        if r.get("status") != "ok":
            lines.append(f"| {r['workload']} | {r['backend']} | | | | | {r.get('note', r.get('status', ''))} |")
            continue
        ratio = r.get("ratio_to_dict")
        if r.get("unit") == "B":  # checkpoint workloads move bytes: throughput, not ops
            rate, per = f"{r['ops_per_s'] / 1e6:,.1f} MB/s", f"{r['ops'] / 1e6:.1f} MB per pass"
        else:
            rate, per = f"{r['ops_per_s']:,.0f}", f"{r['ns_per_op']:,.0f}"
        lines.append(f"| {r['workload']} | {r['backend']} | {r['n']:,} | {rate} | "
                     f"{per} | {'-' if ratio is None else f'{ratio:.2f}'} | "
                     f"{r['peak_rss_mib']:.1f} |")
    return "\n".join(lines)


def main(path, readme="README.md"):
    data = json.loads(pathlib.Path(path).read_text())
    text = pathlib.Path(readme).read_text()
    if BEGIN not in text or END not in text:
        sys.exit(f"{readme} has no {BEGIN} ... {END} block")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    pathlib.Path(readme).write_text(f"{head}{BEGIN}\n{render(data)}\n{END}{tail}")


if __name__ == "__main__":
    main(*sys.argv[1:])
