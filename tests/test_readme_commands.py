"""Every `mirror-train` command line in the README parses with that command's real parser.

Optional parts written as ``[--flag value]`` are parsed too (brackets removed); ``...``
placeholders are dropped. A README that documents a flag the command does not have (or a
positional argument as a flag) fails here.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from mirror_model.cli import COMMANDS, build_parser

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_commands() -> list[str]:
    text = README.read_text(encoding="utf-8")
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", text, flags=re.S)
    lines: list[str] = []
    for block in blocks:
        joined = re.sub(r"\\\n\s*", " ", block)  # continuation lines
        for line in joined.splitlines():
            line = line.split(" #", 1)[0].strip()
            m = re.search(r"(?:^|\s|/)mirror-train\s+(.*)$", line)
            if m and not line.startswith("torchrun"):
                lines.append(m.group(1))
    return lines


def test_the_readme_documents_commands():
    cmds = readme_commands()
    assert len(cmds) >= 10
    assert {c.split()[0] for c in cmds} >= {"synth", "extract", "pretrain", "evaluate", "export", "predict"}


@pytest.mark.parametrize("line", readme_commands())
def test_readme_command_parses(line):
    argv = [t for t in shlex.split(line.replace("[", " ").replace("]", " ")) if "..." not in t]
    command = argv[0]
    assert command in COMMANDS, f"README uses an unknown command: {command}"
    parser = build_parser(command)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse's way of refusing
        pytest.fail(f"README line does not parse ({exc}): mirror-train {line}")
    assert args.command == command
