"""Check the command lines of the README and the manual (docs/) against the programs they name, and
run the CPU-runnable ones.

Every `mdt ...`, `torchrun ... -m mdt.cli ...`, `python tools/*.py ...` and `make TARGET ...` line
of the README's shell blocks is parsed by the program it names: the `mdt` CLI's own parser (flags,
values, subcommands), each tool's argparse parser, torchrun's parser, and a make target through
`make -n -B`, whose printed commands are checked the same way. Inline `code` spans naming a command
are checked for unknown flags only (they are often fragments). Then the benchmarks the README names
and `mdt models` run on the CPU at the tiny size T. Exit status 1, naming each rejected line.

    python tools/check_readme_commands.py [--readme README.md docs/x.md ...] [--no-run]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import runpy
import shlex
import string
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import typer

REPO = Path(__file__).resolve().parents[1]
# typer vendors its own click: the usage errors its parser raises derive from this class, not click's.
USAGE_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
# The benchmarks run at the tiny size: flags given last override the README's (argparse keeps the last).
RUNNABLE = ("tools/benchmarks/bench_model.py", "tools/benchmarks/bench_train.py")
SMALL = ["--sizes", "T", "--device", "cpu", "--batch", "2", "--warmup", "0", "--repeats", "1"]


@dataclass(frozen=True)
class Command:
    text: str  # as written in the README (continuations joined)
    argv: tuple[str, ...]
    fragment: bool  # an inline span: check flag names only


def readme_commands(readme: str) -> list[Command]:
    """Shell lines of ```bash / ``` blocks (with their `NAME=value` assignments substituted) and
    inline code spans that start with a command."""
    variables: dict[str, str] = {}
    commands = []
    for block in shell_blocks(readme):
        for line in block.replace("\\\n", " ").splitlines():
            for tokens in split_commands(string.Template(line).safe_substitute(variables)):
                if len(tokens) == 1 and re.fullmatch(r"[A-Z_]+=\S+", tokens[0]):
                    name, value = tokens[0].split("=", 1)
                    variables[name] = value
                else:  # "..." stands for arguments left out: check the flags that are there
                    elided = "..." in tokens
                    tokens = [t for t in tokens if t != "..."]
                    commands.append(Command(line.strip(), tuple(tokens), fragment=elided))
    for span in re.findall(r"(?<!`)`([^`\n]+)`(?!`)", readme):
        try:
            tokens = shlex.split(string.Template(span).safe_substitute(variables))
        except ValueError:  # an unbalanced quote: prose, not a command
            continue
        if tokens and program(tokens) is not None:
            commands.append(Command(span, tuple(tokens), fragment=True))
    return [c for c in commands if program(c.argv) is not None]


def split_commands(line: str) -> list[list[str]]:
    """The simple commands of a shell line, split at &&, || and ; outside quotes; comments dropped."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in ("&&", "||", ";", "|"):
            commands.append([])
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


def shell_blocks(readme: str) -> list[str]:
    """The bodies of the fenced blocks tagged bash or sh, or untagged."""
    blocks, body, language = [], None, None
    for line in readme.splitlines():
        if line.startswith("```"):
            if body is None:
                body, language = [], line[3:].strip()
            else:
                if language in ("", "bash", "sh"):
                    blocks.append("\n".join(body) + "\n")
                body = None
        elif body is not None:
            body.append(line)
    return blocks


def program(argv: tuple[str, ...] | list[str]) -> str | None:
    """'mdt', 'torchrun', 'tool' or 'make' for a command this script checks, else None."""
    first = Path(argv[0]).name
    if first == "mdt" or list(argv[1:3]) == ["-m", "mdt.cli"]:
        return "mdt"
    if first == "torchrun" or list(argv[1:3]) == ["-m", "torch.distributed.run"]:
        return "torchrun"
    if first.startswith("python") and len(argv) > 1 and argv[1].startswith("tools/"):
        return "tool"
    if first == "make" and len(argv) > 1:
        return "make"
    return None


def flags_unknown(tokens: list[str], known: set[str]) -> list[str]:
    """The flags of `tokens` not in `known`; prose's `--a/--b` (either flag) names two."""
    flags = [flag for t in tokens if t.startswith("--") for flag in t.split("=")[0].split("/")]
    return [flag for flag in flags if flag not in known]


def check_mdt(argv: list[str], fragment: bool) -> str | None:
    from mdt.cli import app

    command = typer.main.get_command(app)
    names = ["mdt"]
    while hasattr(command, "commands") and argv and not argv[0].startswith("-"):
        if argv[0] not in command.commands:
            return f"mdt has no command {' '.join([*names[1:], argv[0]])!r}"
        names.append(argv[0])
        command, argv = command.commands[argv[0]], argv[1:]
    if fragment:
        known = {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)} | {"--help"}
        unknown = flags_unknown(argv, known)
        return f"{' '.join(names)} has no option(s) {', '.join(unknown)}" if unknown else None
    try:
        command.make_context(" ".join(names), list(argv))
    except USAGE_ERROR as err:
        return f"{' '.join(names)}: {err.format_message()}"
    return None


class _Parsed(Exception):
    pass


def tool_parser(script: str) -> argparse.ArgumentParser:
    """The argparse parser `script` builds in main(), captured before it parses anything."""
    captured = []
    original = argparse.ArgumentParser.parse_args

    def capture(self, *args, **kwargs):
        captured.append(self)
        raise _Parsed

    argparse.ArgumentParser.parse_args = capture
    sys.path.insert(0, str((REPO / script).parent))
    try:
        runpy.run_path(str(REPO / script), run_name="__main__")
    except _Parsed:
        pass
    finally:
        argparse.ArgumentParser.parse_args = original
        sys.path.remove(str((REPO / script).parent))
    if not captured:
        raise RuntimeError(f"{script} parsed no arguments")
    return captured[0]


def check_tool(script: str, argv: list[str], fragment: bool) -> str | None:
    if not (REPO / script).is_file():
        return f"{script} does not exist"
    if script.endswith(".sh"):  # a shell script: its syntax (it parses its arguments by position)
        result = subprocess.run(["bash", "-n", str(REPO / script)], capture_output=True, text=True)
        return f"{script}: {result.stderr.strip()}" if result.returncode else None
    parser = tool_parser(script)
    if fragment:
        unknown = flags_unknown(argv, set(parser._option_string_actions))
        return f"{script} has no option(s) {', '.join(unknown)}" if unknown else None
    return parse_quietly(parser, argv, script)


def parse_quietly(parser: argparse.ArgumentParser, argv: list[str], name: str) -> str | None:
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            parser.parse_args(argv)
        except SystemExit:
            return f"{name}: {stderr.getvalue().strip().splitlines()[-1]}"
    return None


def check_torchrun(argv: list[str], fragment: bool) -> str | None:
    from torch.distributed.run import get_args_parser

    if "mdt.cli" not in argv:
        return None
    split = argv.index("mdt.cli")
    problem = parse_quietly(get_args_parser(), argv[:split + 1], "torchrun")
    return problem or check_mdt(argv[split + 1:], fragment)


def check_make(argv: list[str], fragment: bool) -> str | None:
    """`make -n -B` prints what the target would run; each mdt, torchrun or tool line of it is checked."""
    try:
        printed = make_commands(argv)
    except RuntimeError as err:
        return str(err)
    for tokens in printed:
        problem = check(tokens, fragment) if program(tokens) != "make" else None
        if problem:
            return f"make {' '.join(argv)} runs `{shlex.join(tokens)}`: {problem}"
    return None


def make_commands(argv: list[str]) -> list[list[str]]:
    """The commands `make ARGV` would run, as `make -n -B` prints them."""
    result = subprocess.run(["make", "-n", "-B", *argv], capture_output=True, text=True, cwd=REPO, timeout=60)
    if result.returncode != 0:
        raise RuntimeError(f"make {' '.join(argv)}: {result.stderr.strip().splitlines()[-1]}")
    return [tokens for line in result.stdout.replace("\\\n", " ").splitlines() for tokens in split_commands(line)]


def check(argv: list[str] | tuple[str, ...], fragment: bool) -> str | None:
    """None when the program named by `argv` accepts it, else why not."""
    argv = list(argv)
    kind = program(argv)
    if kind == "mdt":
        return check_mdt(argv[3:] if argv[1:3] == ["-m", "mdt.cli"] else argv[1:], fragment)
    if kind == "torchrun":
        return check_torchrun(argv[3:] if argv[1:3] == ["-m", "torch.distributed.run"] else argv[1:], fragment)
    if kind == "tool":
        return check_tool(argv[1], argv[2:], fragment)
    if kind == "make":
        return check_make(argv[1:], fragment)
    return None


def run_small(commands: list[Command]) -> list[str]:
    """Run `mdt models` and each benchmark the README names once, at the tiny size; the failures."""
    runs = {"mdt models": [sys.executable, "-m", "mdt.cli", "models"]}
    for command in commands:
        argv = list(command.argv)
        if program(argv) == "tool" and argv[1] in RUNNABLE and not command.fragment:
            runs.setdefault(argv[1], [sys.executable, *argv[1:], *SMALL])
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    failures = []
    for name, argv in runs.items():
        result = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
        print(f"ran  {shlex.join(argv[1:])}: exit {result.returncode}", flush=True)
        if result.returncode != 0:
            failures.append(f"{name} failed at the tiny size: {result.stderr.strip()[-500:]}")
    return failures


def default_pages() -> list[Path]:
    """README.md and docs/*.md, less the CLI reference (generated from the CLI itself)."""
    return [REPO / "README.md", *sorted(p for p in (REPO / "docs").glob("*.md") if p.name != "cli.md")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--readme", type=Path, nargs="+", default=default_pages(),
                        help="Markdown files to check (default: README.md and the manual's pages)")
    parser.add_argument("--no-run", action="store_true", help="only parse the commands, run nothing")
    args = parser.parse_args()
    # Each page on its own: a NAME=value line sets a variable for the page it is on.
    commands = [c for page in args.readme for c in readme_commands(page.read_text())]
    problems = []
    for command in commands:
        problem = check(command.argv, command.fragment)
        print(f"{'BAD ' if problem else 'ok  '} {command.text}" + (f"\n     {problem}" if problem else ""), flush=True)
        if problem:
            problems.append(problem)
    if not args.no_run:
        for command in [c for c in commands if program(c.argv) == "make" and c.argv[1].startswith("bench-")]:
            commands += [Command(shlex.join(t), tuple(t), fragment=False) for t in make_commands(list(command.argv[1:]))]
        problems += run_small(commands)
    print(f"{len(commands)} commands checked, {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
