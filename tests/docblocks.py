"""Fenced code blocks of a Markdown page, with the section they appear in (for doc tests),
and the commands of its shell blocks."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

from tests.paths import ROOT

DOCS = ROOT / "docs"
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


def shell_commands(code: str) -> list[list[str]]:
    """The simple commands of a shell block, as words: continuation lines joined,
    comments dropped, split at ``|``, ``&&``, ``||`` and ``;``."""
    commands: list[list[str]] = []
    for line in code.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars="|&;")
        lexer.whitespace_split = True
        commands.append([])
        for token in lexer:
            if set(token) <= set("|&;"):
                commands.append([])
            else:
                commands[-1].append(token)
    return [c for c in commands if c]


def outbox_argv(command: list[str], image: str = "outbox-relay") -> list[str] | None:
    """The arguments a shell command gives `outbox`: directly (`outbox status`,
    `docker compose exec relay outbox status`) or through the relay image, whose
    entrypoint is `outbox` and command `relay` (`docker run ... outbox-relay migrate`)."""
    if "outbox" in command:
        return command[command.index("outbox") + 1 :]
    if command[:2] == ["docker", "run"] and image in command:
        return command[command.index(image) + 1 :] or ["relay"]
    return None
