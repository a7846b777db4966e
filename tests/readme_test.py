"""Every command the README shows runs as written on a fresh machine after the setup command:
one convention (`.venv/bin/...`), each command parses, what it names exists, and the cheap ones
run. `pytest -s tests/readme_test.py` prints the list: parsed / ran / skipped, and why."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys

from conftest import ROOT

README = os.path.join(ROOT, "README.md")
VENV = os.path.dirname(sys.executable)  # the tests run in the setup's .venv
# Commands that need what a test machine has not: a TPU pod, a cluster, ImageNet, hours.
ELSEWHERE = ("gcloud ", "srun ", "--coordinator_address", "imagenet_amap.py")
# Cheap enough to run here: they print help or a report and exit.
CHEAP = {"train.py --help", "-m bench.compare --report_only --grid quick --root /tmp/readme_cmd"}


def shell_commands(text: str) -> list[str]:
    """The commands of the README's ```sh blocks (continuation lines joined, comments and
    output lines dropped) and of its inline code spans that start like a command."""
    out = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                out.append(line)
    for span in re.findall(r"`([^`\n]+)`", text):
        if re.match(r"(\.venv/bin/|python |bash scripts/|tensorboard )", span):
            out.append(span)
    return out


def parts(command: str) -> list[list[str]]:
    """The simple commands of a command line (split at && and |)."""
    return [shlex.split(p) for p in re.split(r"&&|\|", command) if p.strip()]


def check(argv: list[str]) -> str:
    """Why `argv` runs as written: what it names exists (raises AssertionError if not)."""
    prog = argv[0]
    assert prog not in ("python", "python3", "tensorboard", "pip", "pytest"), (
        f"{' '.join(argv)}: run it from the setup's .venv/bin/ (the README's convention)"
    )
    if prog == "bash":
        assert os.path.exists(os.path.join(ROOT, argv[1])), argv
        return "script exists"
    if prog.startswith(".venv/bin/"):
        tool = os.path.join(VENV, prog.rsplit("/", 1)[1])
        assert os.path.exists(tool), f"{prog} is not installed by scripts/setup.sh"
        if prog.endswith("python") and argv[1] == "-m":
            if re.search(r"\b[A-Z][A-Z_]*\b", argv[2]):  # bench.NAME: a placeholder
                assert importlib.util.find_spec(argv[2].rsplit(".", 1)[0]), argv
                return f"package of {argv[2]} found (NAME is a placeholder)"
            assert importlib.util.find_spec(argv[2]) is not None, f"no module {argv[2]}"
            return f"module {argv[2]} found"
        if prog.endswith("python"):
            assert os.path.exists(os.path.join(ROOT, argv[1])), f"no file {argv[1]}"
            return f"{argv[1]} exists"
        return "installed"
    return "not a command of this project"


def test_every_readme_command_runs_as_written():
    with open(README) as f:
        commands = shell_commands(f.read())
    assert len(commands) > 10
    report = []
    for command in commands:
        subprocess.run(["bash", "-n", "-c", command], check=True)  # parses
        if any(x in command for x in ELSEWHERE):
            report.append(("parsed, skipped (needs a pod, cluster or ImageNet)", command))
            continue
        why = "; ".join(check(argv) for argv in parts(command))
        tail = command.split(".venv/bin/python ", 1)[-1]
        if tail in CHEAP:
            r = subprocess.run(
                [sys.executable, *shlex.split(tail)],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert r.returncode == 0, (command, r.stderr[-2000:])
            report.append((f"ran, exit 0 ({why})", command))
        else:
            report.append((f"parsed ({why})", command))
    for status, command in report:
        print(f"{status}: {command}")


def test_layout_names_every_module():
    """The README's layout block names every module of the package, under its folder's line."""
    with open(os.path.join(ROOT, "README.md")) as f:
        block = f.read().split("## Layout", 1)[1].split("```")[1]
    lines: dict[str, str] = {}
    folder = None
    for line in block.splitlines():
        if line.startswith("amap_jax/"):
            folder, _, line = line.partition(" ")
        elif not line.startswith(" "):
            folder = None
        if folder:
            lines[folder] = lines.get(folder, "") + " " + line
    missing = []
    for d, _, files in os.walk(os.path.join(ROOT, "amap_jax")):
        folder = os.path.relpath(d, ROOT) + "/"
        for name in files:
            if name.endswith(".py") and name != "__init__.py":
                if not re.search(rf"\b{name[:-3]}\b", lines.get(folder, "")):
                    missing.append(folder + name)
    assert not missing, f"README layout lacks {missing}"
