"""The README's recipes, as the tests run them.

A test that runs a recipe takes its commands from README.md (the first
``sh`` block under a heading), so the recipe a new user copies is the one
that was tested; a test substitutes only paths and the flags this machine
needs, and says which.
"""

from __future__ import annotations

import os

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def readme_text() -> str:
    with open(README, encoding="utf-8") as f:
        return f.read()


def section(heading: str) -> str:
    """The README text from the line ``heading`` to the next heading (outside code blocks)."""
    lines = readme_text().splitlines()
    start = lines.index(heading)
    fenced = False
    for i in range(start + 1, len(lines)):
        if lines[i].startswith("```"):
            fenced = not fenced
        elif not fenced and lines[i].startswith("#"):
            return "\n".join(lines[start:i]) + "\n"
    return "\n".join(lines[start:]) + "\n"


def sh_block(heading: str, index: int = 0) -> list[str]:
    """The command lines of the ``index``-th ```` ```sh ```` block under ``heading``
    (comment-only lines dropped, trailing comments kept: sh ignores them)."""
    body = section(heading)
    blocks = body.split("```sh\n")[1:]
    block = blocks[index].split("```", 1)[0]
    return [ln for ln in block.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
