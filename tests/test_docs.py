"""README.md and docs/ against the code: every shell command they show names an existing
subcommand, flags that subcommand has, a script or benchmark module that exists; every local
link and #anchor resolves; the front page stays short."""
from __future__ import annotations

import argparse
import glob
import os
import re
import shlex

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def _rel(path: str) -> str:
    return os.path.relpath(path, ROOT)


def shell_commands(text: str) -> list[str]:
    """The commands of the ```bash / ```sh / ``` blocks, continuation lines joined, comments
    and prompts dropped."""
    out = []
    for block in re.findall(r"```(?:bash|sh|shell|console)?\n(.*?)```", text, re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = re.sub(r"^\s*\$\s+", "", line).split(" #")[0].strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


def _subcommand_options() -> dict[str, set[str]]:
    from titok_jax.cli.main import build_parser
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: {opt for action in p._actions for opt in action.option_strings}
            for name, p in sub.choices.items()}


def check_command(command: str, options: dict[str, set[str]]) -> list[str]:
    """Problems with one shell command of the docs (empty: fine)."""
    problems = []
    for part in re.split(r"\s*(?:&&|;|\|)\s*", command):
        try:
            words = shlex.split(part)
        except ValueError:
            continue
        while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VAR=value prefixes
            words = words[1:]
        if not words:
            continue
        if words[0] in ("titok-jax", ".venv/bin/titok-jax"):
            if len(words) < 2 or words[1].startswith("-"):
                continue
            name = words[1]
            if name not in options:
                problems.append(f"unknown subcommand {name!r}")
                continue
            for word in words[2:]:
                flag = word.split("=")[0]
                if not flag.startswith("--") or flag == "--":
                    continue
                if flag.startswith("--config.") and name in ("train", "eval"):
                    continue
                if flag not in options[name] and not flag.startswith("--no-"):
                    problems.append(f"titok-jax {name} has no flag {flag}")
        elif words[0] in ("bash", "source"):
            script = next((w for w in words[1:] if w.endswith(".sh")), None)
            if script and script.startswith("launch/") and not os.path.isfile(
                    os.path.join(ROOT, script)):
                problems.append(f"no script {script}")
        elif "-m" in words and words[0].endswith("python"):
            module = words[words.index("-m") + 1]
            if module.startswith(("benchmarks", "titok_jax")):
                path = os.path.join(ROOT, *module.split("."))
                if not (os.path.isfile(path + ".py")
                        or os.path.isfile(os.path.join(path, "__main__.py"))):
                    problems.append(f"no module {module}")
    return problems


def test_every_documented_command_and_flag_exists():
    options = _subcommand_options()
    problems, seen = [], 0
    for page in PAGES:
        for command in shell_commands(open(page).read()):
            seen += 1
            problems += [f"{_rel(page)}: `{command[:80]}`: {p}"
                         for p in check_command(command, options)]
    assert seen > 20, f"only {seen} commands found: is the block parser broken?"
    assert not problems, "\n".join(problems)


def _anchors(path: str) -> set[str]:
    anchors = set()
    for line in open(path):
        m = re.match(r"#+\s+(.*)", line)
        if m:
            text = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower().replace("`", ""))
            anchors.add(text.replace(" ", "-"))
    return anchors


def test_every_local_link_and_anchor_resolves():
    problems = []
    for page in PAGES:
        text = re.sub(r"```.*?```", "", open(page).read(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
                continue
            file, _, anchor = target.partition("#")
            dest = os.path.normpath(os.path.join(os.path.dirname(page), file)) if file else page
            if not os.path.exists(dest):
                problems.append(f"{_rel(page)}: link to missing {target}")
            elif anchor and dest.endswith(".md") and anchor not in _anchors(dest):
                problems.append(f"{_rel(page)}: no heading #{anchor} in {_rel(dest)}")
    assert not problems, "\n".join(problems)


def test_readme_is_a_short_front_page_with_the_two_commands():
    text = open(os.path.join(ROOT, "README.md")).read()
    assert len(text.splitlines()) <= 300
    commands = shell_commands(text)
    assert "bash launch/quickstart.sh" in commands[:4] and "bash launch/test.sh" in commands[:4]
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        assert "bash launch/test.sh" in f.read()


@pytest.mark.parametrize("command,problem", [
    ("titok-jax reconstruct --weights w --imagez x", "has no flag --imagez"),
    ("titok-jax recontruct --weights w", "unknown subcommand"),
    ("python -m benchmarks.nothing --x", "no module"),
    ("bash launch/nothing.sh", "no script"),
])
def test_the_command_check_can_fail(command, problem):
    assert any(problem in p for p in check_command(command, _subcommand_options()))
