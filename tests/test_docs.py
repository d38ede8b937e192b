"""Every ```python block of README.md and docs/*.md runs, and docs/recipes.md is current.

The blocks of one file run in order in one namespace (a later block uses the names of an
earlier one), in a temporary working directory. A block is skipped only when the line
before its fence is an HTML comment starting ``<!-- no-test`` (say why in the comment).
A fence inside an HTML comment is a hidden setup block: it runs like the others but
GitHub does not show it (the guide uses these to build the ``model`` its snippets assume).
"""

from __future__ import annotations

import importlib.util
import re
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^([ \t]*)```(\w*)[^\n]*\n(.*?)^\1```[ \t]*$", re.M | re.S)
SKIP = "<!-- no-test"

# What a file's snippets take as given, for files whose text this test does not own.
PRELUDES = {
    # README: `model` is any torch model
    "README.md": (
        "import torch\n"
        "model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), "
        "torch.nn.Linear(32, 4))\n"
    ),
}


def code_blocks(text: str, lang: str = "python") -> list[tuple[int, str]]:
    """``(line, code)`` of every fenced ``lang`` block not marked ``<!-- no-test``."""
    blocks = []
    for m in FENCE.finditer(text):
        if m.group(2) != lang:
            continue
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
        if before.startswith(SKIP):
            continue
        indent = len(m.group(1))
        code = "".join(line[indent:] + "\n" for line in m.group(3).splitlines())
        blocks.append((text.count("\n", 0, m.start()) + 2, code))
    return blocks


def test_extractor():
    text = (
        "a\n```python\nx = 1\n```\n<!-- no-test: needs a GPU -->\n```python\nboom()\n```\n"
        "<!-- setup\n```python\ny = 2\n```\n-->\n- item\n  ```python\n  z = 3\n  ```\n"
        "```yaml\nk: v\n```\n"
    )
    assert code_blocks(text) == [(3, "x = 1\n"), (11, "y = 2\n"), (16, "z = 3\n")]
    assert code_blocks(text, "yaml") == [(19, "k: v\n")]


WITH_CODE = [doc for doc in DOCS if code_blocks(doc.read_text())]


@pytest.mark.parametrize("doc", WITH_CODE, ids=lambda p: p.name)
def test_code_blocks_run(doc: Path, tmp_path, monkeypatch):
    """Run the file's python blocks in order, in one namespace, in a scratch directory."""
    blocks = code_blocks(doc.read_text())
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT))
    namespace: dict = {"__name__": f"docs_{doc.stem}"}
    prelude = PRELUDES.get(doc.name)
    if prelude:
        exec(compile(prelude, f"<prelude of {doc.name}>", "exec"), namespace)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for line, code in blocks:
            # line numbers in a traceback are the file's own
            source = "\n" * (line - 1) + code
            try:
                exec(compile(source, str(doc.relative_to(ROOT)), "exec"), namespace)
            except Exception as e:
                raise AssertionError(
                    f"{doc.relative_to(ROOT)}: the block at line {line} failed: "
                    f"{type(e).__name__}: {e}"
                ) from e


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_yaml_recipes_load(doc: Path):
    """Every ```yaml block with ``rules:`` is a valid recipe."""
    import yaml

    from stefx.recipe import load_recipe

    for line, code in code_blocks(doc.read_text(), "yaml"):
        data = yaml.safe_load(code)
        if isinstance(data, dict) and "rules" in data:
            try:
                load_recipe(data)
            except Exception as e:
                raise AssertionError(f"{doc.name}: the recipe at line {line}: {e}") from e


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_recipe_reference_is_current():
    """docs/recipes.md is what tools/gen_recipe_docs.py writes now (regenerate if not)."""
    gen = _load_tool("gen_recipe_docs")
    assert (ROOT / "docs" / "recipes.md").read_text() == gen.render(), (
        "docs/recipes.md is stale: run `python tools/gen_recipe_docs.py`"
    )


@pytest.mark.slow
def test_plot_ste_draws_every_figure(tmp_path):
    """tools/plot_ste.py runs and writes the figures docs/ste.md shows (about 15 s)."""
    plot = _load_tool("plot_ste")
    written = {p.name for p in plot.main(["--out", str(tmp_path)])}
    shown = set(re.findall(r"img/(ste_\w+\.png)", (ROOT / "docs" / "ste.md").read_text()))
    assert shown and shown <= written


def test_every_doc_page_is_linked_from_the_index():
    index = (ROOT / "docs" / "index.md").read_text()
    for page in sorted((ROOT / "docs").glob("*.md")):
        if page.name != "index.md":
            assert f"({page.name})" in index, f"docs/index.md does not link {page.name}"
    mkdocs = ROOT / "mkdocs.yml"
    if mkdocs.exists():
        text = mkdocs.read_text()
        for page in sorted((ROOT / "docs").glob("*.md")):
            assert page.name in text, f"mkdocs.yml does not list {page.name}"


def test_images_referenced_exist():
    for doc in DOCS:
        for target in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", doc.read_text()):
            if not target.startswith("http"):
                assert (doc.parent / target).is_file(), f"{doc.name}: missing image {target}"


def test_readme_example_prints_what_the_readme_shows():
    """The ten-line example's printed output in README.md is what it prints today."""
    import contextlib
    import io
    import re

    text = (ROOT / "README.md").read_text()
    found = re.search(
        r"## In ten lines\n\n```python\n(.*?)```\nprints\n\n```text\n(.*?)```", text, re.S
    )
    assert found, "README.md: the '## In ten lines' example and its output block"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(found.group(1), "README.md", "exec"), {})
    assert out.getvalue() == found.group(2)
