"""The README's quickstart runs as written and prints what it says."""
import contextlib
import io
import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_quickstart_block_runs():
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Quickstart"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.strip().splitlines()) <= 25
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    assert out.getvalue().strip() == "2 [('yes', 0.5)]"


def test_bench_table_is_rendered_from_the_committed_run():
    """The README's benchmark table is exactly what bench/readme_table.py renders from docs/bench/bench.json."""
    import importlib.util
    import json
    root = README.parent
    spec = importlib.util.spec_from_file_location("readme_table", root / "bench" / "readme_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    data = json.loads((root / "docs" / "bench" / "bench.json").read_text())
    text = README.read_text(encoding="utf-8")
    block = text.split(mod.BEGIN, 1)[1].split(mod.END, 1)[0].strip()
    assert block == mod.render(data)
    assert (root / "docs" / "bench" / "bench.png").stat().st_size > 10_000
