"""Fenced code blocks of a Markdown page, with the section they appear in (for doc tests)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"
_FENCE = re.compile(r"^```(?P<info>[^\n`]*)\n(?P<code>.*?)^```\s*$", re.M | re.S)


@dataclass(frozen=True)
class Block:
    section: str  # the nearest "## " heading above the block
    language: str
    code: str


def code_blocks(page: str) -> list[Block]:
    text = (DOCS / page).read_text("utf-8")
    blocks = []
    for match in _FENCE.finditer(text):
        headings = re.findall(r"^## (.+)$", text[: match.start()], re.M)
        blocks.append(
            Block(
                section=headings[-1] if headings else "",
                language=match["info"].strip(),
                code=match["code"],
            )
        )
    return blocks
