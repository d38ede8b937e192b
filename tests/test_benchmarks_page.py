"""docs/benchmarks.md is written by the benchmark scripts (benchmarks/docpage.py).

Every table and code block on the page lies in a block a script wrote (``--write-docs``),
each block names the command that wrote it, and a script rewrites only its own block.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import docpage  # noqa: E402

PAGE = ROOT / "docs" / "benchmarks.md"
HEADER = re.compile(
    r"^`python (benchmarks/[\w.]+\.py)( [^`]*)?` · \d{4}-\d\d-\d\d · [^·]+ · torch "
)


def _outside_blocks(text: str) -> str:
    return docpage.BLOCK.sub("", text)


def test_every_table_and_code_block_is_in_a_generated_block():
    loose = [
        line
        for line in _outside_blocks(PAGE.read_text()).splitlines()
        if line.startswith("|") or line.startswith("```")
    ]
    assert not loose, f"tables outside a --write-docs block: {loose[:3]}"


def test_each_block_names_the_script_that_wrote_it():
    blocks = docpage.blocks(PAGE.read_text())
    assert len(blocks) >= 15
    for key, body in blocks.items():
        m = HEADER.match(body)
        assert m, f"block {key!r} has no generated header: {body[:120]!r}"
        script = ROOT / m.group(1)
        assert script.is_file(), script
        assert script.stem == key.split()[0], (key, script)
        assert "docpage.Output(" in script.read_text(), script
        assert body.count("\n") > 2, f"block {key!r} is empty"


def test_write_docs_replaces_only_its_block(tmp_path):
    page = tmp_path / "benchmarks.md"
    page.write_text(
        "# page\n\nprose before\n\n<!-- stefx-bench: bench_ste -->\nold table\n"
        "<!-- /stefx-bench: bench_ste -->\n\nprose after | with a bar\n"
        "<!-- stefx-bench: other -->\nuntouched\n<!-- /stefx-bench: other -->\n"
    )
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_ste.py"), "--quick",
           "--repeats", "1", "--warmup", "0", "--write-docs", str(page)]  # fmt: skip
    for _ in range(2):  # a second run replaces the first run's block, it does not add one
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
        assert done.returncode == 0, done.stderr
    text = page.read_text()
    blocks = docpage.blocks(text)
    body = blocks["bench_ste"]
    assert HEADER.match(body), body[:200]
    assert body.startswith("`python benchmarks/bench_ste.py --quick --repeats 1 --warmup 0` · ")
    assert "--write-docs" not in body and "old table" not in body
    assert "| weight |" in body and "stefx/torch" in body
    assert blocks["other"] == "untouched\n"
    assert text.startswith("# page\n\nprose before\n\n<!-- stefx-bench: bench_ste -->\n")
    assert text.endswith("prose after | with a bar\n<!-- stefx-bench: other -->\nuntouched\n"
                         "<!-- /stefx-bench: other -->\n")  # fmt: skip


def test_a_page_without_the_block_is_refused_before_the_run(tmp_path):
    page = tmp_path / "benchmarks.md"
    page.write_text("# page\n")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_ste.py"), "--quick",
           "--write-docs", str(page)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "has no block 'bench_ste'" in done.stderr
    assert "<!-- stefx-bench: bench_ste -->" in done.stderr
    assert "Traceback" not in done.stderr
    assert page.read_text() == "# page\n"


@pytest.mark.parametrize(
    "argv, want",
    [
        (["benchmarks/x.py", "--a", "1", "--write-docs"], "python benchmarks/x.py --a 1"),
        (["benchmarks/x.py", "--write-docs", "p.md", "--a"], "python benchmarks/x.py --a"),
        (["benchmarks/x.py", "--write-docs", "--a", "b c"], "python benchmarks/x.py --a 'b c'"),
        (["benchmarks/x.py", "--write-docs=p.md"], "python benchmarks/x.py"),
    ],
)
def test_the_command_line_leaves_out_write_docs(argv, want):
    assert docpage.command_line([str(ROOT / argv[0]), *argv[1:]]) == want


def test_duplicate_blocks_are_an_error():
    text = "<!-- stefx-bench: a -->\n1\n<!-- /stefx-bench: a -->\n" * 2
    with pytest.raises(ValueError, match="appears twice"):
        docpage.blocks(text)


def test_every_table_on_the_page_has_as_many_cells_in_each_row_as_its_header():
    table: list[str] = []
    for line in [*PAGE.read_text().splitlines(), ""]:
        if line.startswith("|"):
            table.append(line)
            continue
        if table:
            widths = {len(re.findall(r"(?<!\\)\|", row)) for row in table}
            assert len(widths) == 1, f"a cell holds an unescaped '|': {table[0][:80]}"
        table = []


def test_an_image_is_linked_relative_to_the_page(tmp_path, capsys):
    page = tmp_path / "docs" / "benchmarks.md"
    page.parent.mkdir()
    page.write_text("<!-- stefx-bench: k -->\n<!-- /stefx-bench: k -->\n")
    out = docpage.Output(page, "k", ["benchmarks/x.py"])
    out.image(tmp_path / "docs" / "img" / "plot.png", "a plot")
    out.write()
    assert "![a plot](img/plot.png)\n<!-- /stefx-bench: k -->" in page.read_text()
