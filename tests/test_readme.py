"""Every command the README shows is checked: its module or tool exists, its recipe loads with the
overrides written next to it, and `accelerate launch` accepts its flags. The commands that need no
downloaded data run end to end elsewhere: the quickstart chain under two processes
(test_distributed.py), the three 'Your own data' commands as written (test_own_data.py)."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from quest import recipe as recipes

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def commands() -> list[str]:
    """The README's shell command lines (continuations joined) that run quest or its tools."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        # a loop variable takes its first value (for k in 10 25 50 80; do ... $k ...)
        loops = dict(re.findall(r"for (\w+) in (\S+)", block))
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            for var, value in loops.items():
                line = re.sub(rf"\$\{{?{var}\}}?", value, line)
            if re.search(r"-m quest\.|python tools/|bash tools/", line) and not line.startswith(
                "#"
            ):
                out.append(line)
    return out


COMMANDS = commands()


def test_the_readme_shows_commands_and_the_second_is_ci():
    assert len(COMMANDS) >= 15
    first_block = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    tests_command = first_block.strip().splitlines()[-1]
    ci = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci == tests_command, "the README's test command and .ci/run must be the same"


def _tokens(line: str) -> list[str]:
    line = re.sub(r"\$\{?(\w+)\}?", "0", line)  # shell variables of the examples (seed=$s, ...)
    return shlex.split(line.split("&&")[-1] if "&& python -m quest" in line else line)


@pytest.mark.parametrize("line", COMMANDS, ids=range(len(COMMANDS)))
def test_readme_command_is_runnable_as_written(line):
    tokens = _tokens(line)
    for tool in re.findall(r"(?:python|bash) (tools/\S+)", line):
        assert (REPO / tool).is_file(), tool
    if "-m" not in tokens:
        return
    module = tokens[tokens.index("-m") + 1]
    assert importlib.util.find_spec(module) is not None, module
    if "accelerate" in tokens and "launch" in tokens:
        from accelerate.commands.launch import launch_command_parser

        flags = tokens[tokens.index("launch") + 1 : tokens.index("-m")]
        launch_command_parser().parse_args([*flags, "script.py"])  # exits on an unknown flag
    args = tokens[tokens.index("-m") + 2 :]
    recipe = next((a for a in args if a.endswith(".toml")), None)
    if recipe is None or module == "quest.shards":
        return
    assert (REPO / recipe).is_file(), recipe
    overrides = [a for a in args if re.fullmatch(r"[a-z_]+(\.[a-z_]+)?=\S*", a)]
    loaded = recipes.load(REPO / recipe, overrides)
    assert loaded.name
