"""The benchmark scripts write their own sections of ``docs/benchmarks.md``.

Every figure on that page comes from a script run: with ``--write-docs`` a script replaces
its block, the text between

    <!-- stefx-bench: KEY -->
    ...
    <!-- /stefx-bench: KEY -->

with what it measured (its markdown tables and computed lines), under a header naming the
command as it ran, the date, how long it took and the machine. The prose around the blocks
is written by hand and reads the tables; the blocks are never edited by hand
(``tests/test_benchmarks_page.py`` checks that every table on the page lies in one).

    out = docpage.Output(args.write_docs, "bench_ste")
    out.print("| a | b |\\n|---|---|\\n| 1 | 2 |")   # printed, and kept for the page
    out.write()                                       # replaces the block (if --write-docs)
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import re
import shlex
import sys
import time
from datetime import date
from pathlib import Path

PAGE = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
_FLAG = "--write-docs"


def add_argument(parser) -> None:
    """``--write-docs [PAGE]``: write this run's block into PAGE (default docs/benchmarks.md)."""
    parser.add_argument(
        _FLAG,
        nargs="?",
        const=str(PAGE),
        default=None,
        metavar="PAGE",
        help="replace this run's block in the benchmarks page (default docs/benchmarks.md)",
    )


def _markers(key: str) -> tuple[str, str]:
    return f"<!-- stefx-bench: {key} -->", f"<!-- /stefx-bench: {key} -->"


BLOCK = re.compile(r"<!-- stefx-bench: (.+?) -->\n(.*?)<!-- /stefx-bench: \1 -->", re.S)


def blocks(text: str) -> dict[str, str]:
    """Every generated block of a page: key -> its text (between the markers)."""
    found = {}
    for m in BLOCK.finditer(text):
        if m.group(1) in found:
            raise ValueError(f"block {m.group(1)!r} appears twice in the page")
        found[m.group(1)] = m.group(2)
    return found


def command_line(argv: list[str] | None = None) -> str:
    """The command as the user typed it, without ``--write-docs [PAGE]``."""
    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0])
    with contextlib.suppress(ValueError):
        script = script.resolve().relative_to(PAGE.parents[1])
    rest, skip = [], False
    for arg in argv[1:]:
        if skip:
            skip = False
            if not arg.startswith("-"):
                continue
        if arg == _FLAG:
            skip = True
            continue
        if arg.startswith(_FLAG + "="):
            continue
        rest.append(arg)
    return " ".join(["python", shlex.quote(str(script)), *map(shlex.quote, rest)])


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60} min"


def machine(versions: dict[str, str] | None = None) -> str:
    """One line: torch (and the given packages') versions, threads, CPUs."""
    import torch

    parts = [f"torch {torch.__version__}"]
    parts += [f"{name} {version}" for name, version in (versions or {}).items()]
    parts.append(f"{torch.get_num_threads()} torch threads on {os.cpu_count()} CPUs ({_cpu()})")
    return ", ".join(parts)


def table(headers: list[str], rows: list[list]) -> str:
    """A compact markdown table (cells as given; ``|`` inside a cell escaped)."""

    def line(cells) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(headers), "|" + "---|" * len(headers), *map(line, rows)])


class Output:
    """Prints a script's results and, with ``--write-docs``, writes them as its block.

    ``key`` names the block; a script that writes several (one per invocation kind) passes
    a different key for each, e.g. ``"bench_runtime 30m"``.
    """

    def __init__(self, page: str | os.PathLike | None, key: str, argv: list[str] | None = None):
        self.page = None if page is None else Path(page)
        self.key = key
        self.command = command_line(argv)
        self.versions: dict[str, str] = {}
        self.parts: list[str] = []
        self._start = time.perf_counter()
        if self.page is not None:
            # fail before the run, not after an hour of it
            self._check()

    def _check(self) -> str:
        if not self.page.is_file():
            raise SystemExit(f"--write-docs: {self.page} does not exist")
        text = self.page.read_text()
        begin, end = _markers(self.key)
        if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
            raise SystemExit(
                f"--write-docs: {self.page} has no block {self.key!r}; add the two lines\n"
                f"  {begin}\n  {end}\nwhere its section should go, then run again"
            )
        return text

    def record(self, *packages: str) -> None:
        """Name these packages' installed versions in the header (missing ones are skipped)."""
        for name in packages:
            with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                self.versions[name] = importlib.metadata.version(name)

    def print(self, text: str = "") -> None:
        print(text, flush=True)
        self.parts.append(text)

    def image(self, path: str | os.PathLike, alt: str) -> None:
        """A PNG the script wrote, linked relative to the page."""
        link = os.path.relpath(Path(path).resolve(), (self.page or PAGE).parent)
        self.print(f"\n![{alt}]({link})")

    def render(self) -> str:
        head = (
            f"`{self.command}` · {date.today().isoformat()} · "
            f"{_duration(time.perf_counter() - self._start)} · {machine(self.versions)}"
        )
        body = "\n".join(self.parts).strip("\n")
        return f"{head}\n\n{body}\n"

    def write(self) -> None:
        if self.page is None:
            return
        text = self._check()
        begin, end = _markers(self.key)
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        new = f"{head}{begin}\n{self.render()}{end}{tail}"
        tmp = self.page.with_name(self.page.name + ".tmp")
        tmp.write_text(new)
        tmp.replace(self.page)
        print(f"wrote block {self.key!r} of {self.page}", file=sys.stderr)
