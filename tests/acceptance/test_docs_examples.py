"""The examples of the pages about running the relay, checked as far as they can be
without a cluster: every YAML block loads, every Python block compiles, every
shell block passes ``bash -n``, and every ``outbox`` command line in a shell
block (also through ``docker run`` of the image or ``docker compose exec``) is
accepted by the ``outbox`` command's own parser.

The quickstart's blocks are run for real (tests/acceptance/test_quickstart.py); the
manifests and the deployment page are checked further in tests/acceptance/test_deploy.py.
"""

from __future__ import annotations

import subprocess

import pytest
import yaml

from outbox.cli.main import build_parser
from tests.docblocks import code_blocks, outbox_argv, shell_commands

PAGES = ("deployment.md", "kubernetes.md", "operations.md")
SHELL = ("bash", "sh", "shell")
NOT_CODE = ("text",)  # output shown, nothing to run


def outbox_refusal(argv: list[str]) -> str:
    """Why `outbox ARGV` would stop at its argument parser ("" when it accepts them)."""
    try:
        build_parser().parse_args(argv)
    except SystemExit as exc:
        return f"exit status {exc.code}"
    return ""


@pytest.mark.parametrize("page", PAGES)
def test_every_example_block_parses(page: str, capsys: pytest.CaptureFixture[str]) -> None:
    blocks = code_blocks(page)
    assert blocks, f"{page} has no code block"
    problems = []
    for number, block in enumerate(blocks, 1):
        where = f"{page} block {number} ({block.language}, section {block.section!r})"
        if block.language == "yaml":
            try:
                list(yaml.safe_load_all(block.code))
            except yaml.YAMLError as exc:
                problems.append(f"{where}: {exc}")
        elif block.language == "python":
            try:
                compile(block.code, where, "exec", dont_inherit=True)
            except SyntaxError as exc:
                problems.append(f"{where}: {exc}")
        elif block.language in SHELL:
            syntax = subprocess.run(
                ["bash", "-n"], input=block.code, capture_output=True, text=True
            )
            if syntax.returncode:
                problems.append(f"{where}: {syntax.stderr.strip()}")
            for command in shell_commands(block.code):
                argv = outbox_argv(command)
                if argv is not None and (refusal := outbox_refusal(argv)):
                    usage = capsys.readouterr().err.strip().splitlines()[-1:]
                    problems.append(f"{where}: `outbox {' '.join(argv)}`: {refusal} {usage}")
        elif block.language not in NOT_CODE:
            problems.append(f"{where}: a language this test does not check")
    assert problems == []


def test_the_parser_check_refuses_what_outbox_refuses() -> None:
    assert outbox_refusal(["status", "--json"]) == ""
    assert outbox_refusal(["status", "--no-such-flag"]) == "exit status 2"
    assert outbox_refusal(["no-such-command"]) == "exit status 2"
    assert outbox_argv(["docker", "run", "--rm", "outbox-relay", "migrate"]) == ["migrate"]
    assert outbox_argv(["docker", "run", "-p", "9464:9464", "outbox-relay"]) == ["relay"]
    assert shell_commands("a \\\n  b # c\nd | e && f\n") == [["a", "b"], ["d"], ["e"], ["f"]]
