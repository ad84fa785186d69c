"""Every command in the README stays true: `dopd` commands parse with the real CLI parser (and
their recipes load), `accelerate launch` lines name existing configs (and, like `torchrun` lines,
run a `dopd train` that parses), `make` targets exist and
example scripts answer --help. The commands' behaviour is tested where they are run for real:
test_demo (demo, eval, plot, inspect --routing), test_trainer (train, --resume), test_grounding
and test_hints (build), test_cli (inspect, --version)."""

import re
import shlex
import subprocess
import sys

import pytest

from dopd_vl.cli import build_parser
from dopd_vl.training.config import load_config

from conftest import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")


def readme_commands() -> list[list[str]]:
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                commands.append(shlex.split(line))
    return commands


COMMANDS = readme_commands()


def test_the_readme_has_the_two_setup_commands_and_ci_calls_make_test():
    assert ["make", "demo"] in COMMANDS and ["make", "test"] in COMMANDS
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test" in ci
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(c)[:60] for c in COMMANDS])
def test_readme_command_is_valid(argv):
    program = argv[0]
    if program == "make":
        assert re.search(rf"^{re.escape(argv[1])}:", (REPO / "Makefile").read_text(), re.M)
    elif program == "dopd":
        args = build_parser().parse_args(argv[1:])
        if args.command == "train":
            load_config(REPO / args.config, args.overrides)
    elif program in ("accelerate", "torchrun"):
        if program == "accelerate":
            config_file = REPO / argv[argv.index("--config_file") + 1]
            assert config_file.is_file(), config_file
        rest = argv[argv.index("dopd_vl.cli") + 1 :]
        args = build_parser().parse_args(rest)
        load_config(REPO / args.config, args.overrides)
    elif program == "python" and argv[1] == "-m":
        _module_answers_help(argv[2:])
    elif program == "python":
        script = REPO / argv[1]
        assert script.is_file(), script
        done = subprocess.run(
            [sys.executable, str(script), "--help"], capture_output=True, text=True, cwd=REPO, timeout=120
        )
        assert done.returncode == 0, done.stderr[-2000:]
    else:
        pytest.fail(f"README command with an unknown program: {argv}")


def test_cli_reference_lists_every_subcommand():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # argparse keeps them here
    for name in commands:
        assert f"dopd {name}" in README, name


def _module_answers_help(argv: list[str]) -> None:
    """`python -m MODULE ARGS`: run from the repository root with ARGS then --help, so argparse checks
    every argument before it (choices, types) and exits 0."""
    done = subprocess.run(
        [sys.executable, "-m", *argv, "--help"], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]


def _example_commands() -> list[list[str]]:
    """Every `python -m examples...` command in the docs' bash blocks (README, CONTRIBUTING, RESULTS)."""
    found = []
    docs = [REPO / "README.md", REPO / "CONTRIBUTING.md", *sorted((REPO / "examples").glob("*/RESULTS.md"))]
    for doc in docs:
        for block in re.findall(r"```bash\n(.*?)```", doc.read_text(encoding="utf-8"), flags=re.S):
            for line in block.splitlines():
                command = line.split("  #")[0].strip()
                if re.match(r"\S*python -m examples\.", command):  # other lines are other tests' business
                    found.append(shlex.split(command)[2:])
    return [list(a) for a in dict.fromkeys(map(tuple, found))]


EXAMPLE_COMMANDS = _example_commands()


@pytest.mark.parametrize("argv", EXAMPLE_COMMANDS, ids=[" ".join(c)[:60] for c in EXAMPLE_COMMANDS])
def test_the_studies_commands_in_the_docs_parse(argv):
    """Each parses with the study's own parser, imported as `python -m` imports it (the repository root
    on the path, no path hack in the module)."""
    import importlib

    importlib.import_module(argv[0]).build_parser().parse_args(argv[1:])


def test_the_docs_run_the_studies_as_modules():
    """The studies are a package run with `python -m` (no path hacks): no doc runs their scripts by path."""
    assert len(EXAMPLE_COMMANDS) >= 5
    for doc in [REPO / "README.md", REPO / "CONTRIBUTING.md", *(REPO / "examples").glob("*/RESULTS.md")]:
        assert "privilege/run.py" not in doc.read_text(encoding="utf-8"), doc


def test_every_in_page_link_names_a_heading():
    """`[text](#anchor)` links lead somewhere: GitHub's anchor of some heading (lower case, punctuation
    dropped, spaces as hyphens)."""
    anchors = {
        re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        for heading in re.findall(r"^#+ (.*)$", README, flags=re.M)
    }
    dead = [link for link in re.findall(r"\]\(#([^)]+)\)", README) if link not in anchors]
    assert dead == []
