"""The README's Python blocks run as written: each in a fresh namespace and a fresh working directory.

A block that needs a download is marked by an HTML comment on the line before it,
``<!-- no-test: REASON -->``, and is skipped with that reason; every other block runs.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
NO_TEST = re.compile(r"<!-- no-test: (?P<reason>.+?) -->")
# The README's runnable blocks: the API, converting in memory, and checkpoint files.
MIN_RUNNABLE = 3


@dataclasses.dataclass(frozen=True)
class Block:
    line: int  # 1-based line of the opening fence
    code: str
    skip_reason: str | None  # why it does not run here, from its no-test comment


def python_blocks(text: str) -> list[Block]:
    """Every ```python block of ``text``, with the no-test reason of the line just before it."""
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        if lines[i].strip() != "```python":
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        if end is None:
            raise ValueError(f"README.md:{i + 1}: a ```python block is never closed")
        mark = NO_TEST.fullmatch(lines[i - 1].strip()) if i > 0 else None
        blocks.append(Block(i + 1, "\n".join(lines[i + 1 : end]) + "\n", mark["reason"] if mark else None))
        i = end + 1
    return blocks


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def test_python_blocks_found() -> None:
    runnable = [b for b in BLOCKS if b.skip_reason is None]
    assert len(runnable) >= MIN_RUNNABLE, f"only {len(runnable)} runnable ```python blocks in README.md"


def test_block_parser_reads_marks_and_fences() -> None:
    text = "x\n```python\na = 1\n```\n<!-- no-test: downloads weights -->\n```python\nb = 2\n```\n"
    assert python_blocks(text) == [Block(2, "a = 1\n", None), Block(6, "b = 2\n", "downloads weights")]
    with pytest.raises(ValueError, match="never closed"):
        python_blocks("```python\na = 1\n")


@pytest.mark.parametrize("block", BLOCKS, ids=[f"README.md:{b.line}" for b in BLOCKS])
def test_readme_block_runs(block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if block.skip_reason is not None:
        pytest.skip(block.skip_reason)
    monkeypatch.chdir(tmp_path)  # files a block writes land in a fresh directory
    exec(compile(block.code, f"README.md:{block.line}", "exec"), {"__name__": "readme_block"})
