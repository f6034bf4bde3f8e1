"""`--help` of every command: answered without importing torch, DeepSpeed, spaCy, faiss or transformers (so it
takes a fraction of a second, not the seconds those imports cost), listing every option with a help text, each
default shown once and no "(default: None)".

The speed is asserted through the imports (what makes help slow), not through wall time (flaky on a loaded
machine): each command runs as `python -m CMD --help` would, and the modules loaded are read afterwards."""
from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from usercli import DefaultsHelpFormatter, OneLineParser, exit_if_help

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "deepspeed", "spacy", "faiss", "transformers", "webdataset")

# command (as typed after `python -m`), the light module that builds its parser
COMMANDS = {
    "trainer.train": "trainer.config.cli_args",
    "trainer.train_args": "trainer.config.cli_args",
    "trainer.evaluate": "trainer.eval.evaluate_args",
    "trainer.export": "trainer.tools.export_args",
    "trainer.plan": "trainer.tools.plan_args",
    "trainer.extract_features": "trainer.tools.extract_features_args",
    "trainer.universal": "trainer.engine.universal_args",
    "trainer.retrieve": "trainer.retrieval.retrieve_args",
    "shards": "shards.__main__",
}
SUBCOMMANDS = {"trainer.retrieve": ("export", "query", "serve"), "shards": ("build", "check", "stats")}
CASES = [(cmd, ()) for cmd in COMMANDS] + [(cmd, (sub,)) for cmd, subs in SUBCOMMANDS.items() for sub in subs]

# Runs a command module as `python -m` does, then reports which heavy packages got imported.
PROBE = """
import json, runpy, sys
sys.argv = [sys.argv[1], *sys.argv[2:]]
try:
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
except SystemExit as e:
    code = e.code
else:
    code = None
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {heavy})
print(json.dumps({{"code": code, "heavy": heavy}}), file=sys.stderr)
"""


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "120"}


def _parser(cmd: str, sub: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    parser = importlib.import_module(COMMANDS[cmd]).build_parser()
    for name in sub:
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    return parser


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The options and positionals a user sees (not -h, not the subcommand list, not a suppressed option)."""
    return [a for a in parser._actions if a.help is not argparse.SUPPRESS
            and not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]


@pytest.mark.parametrize(("cmd", "sub"), CASES, ids=[" ".join((c, *s)) for c, s in CASES])
def test_help_answers_without_heavy_imports_and_lists_every_option(cmd, sub):
    done = subprocess.run([sys.executable, "-c", PROBE.format(heavy=set(HEAVY)), cmd, *sub, "--help"],
                          env=_env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    report = json.loads(done.stderr.strip().splitlines()[-1])
    assert report == {"code": 0, "heavy": []}, done.stderr[-2000:]
    assert done.stdout.startswith("usage:"), done.stdout[:500]
    assert "(default: None)" not in done.stdout
    for action in _options(_parser(cmd, sub)):
        shown = action.option_strings[-1] if action.option_strings else (action.metavar or action.dest)
        assert shown in done.stdout, f"{cmd} {' '.join(sub)} --help does not list {shown}"


def test_python_m_help_exits_0_and_prints_the_same_help(monkeypatch):
    """The real command line, end to end (one command: the probe above runs them all the same way)."""
    monkeypatch.setenv("COLUMNS", "120")  # argparse wraps to the terminal's width: the same in both
    done = subprocess.run([sys.executable, "-m", "trainer.evaluate", "--help"], env=_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == _parser("trainer.evaluate").format_help()


@pytest.mark.parametrize(("cmd", "sub"), CASES, ids=[" ".join((c, *s)) for c, s in CASES])
def test_every_option_has_a_help_text_with_its_default_once(cmd, sub):
    parser = _parser(cmd, sub)
    options = _options(parser)
    if sub or cmd not in SUBCOMMANDS:
        assert options, f"{cmd} {' '.join(sub)}: no options found"
    else:  # a command of commands: each of them is listed with a help text
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        assert sorted(c.dest for c in commands._choices_actions if c.help) == sorted(SUBCOMMANDS[cmd])
    for action in options:
        formatter = parser._get_formatter()
        text = formatter._expand_help(action) if action.help else ""
        name = "/".join(action.option_strings) or action.dest
        assert text.strip(), f"{cmd} {' '.join(sub)} {name} has no help text"
        assert "(default: None)" not in text, f"{name}: {text}"
        assert text.count("default") <= 1, f"{name} names its default more than once: {text}"


def test_light_modules_build_their_parsers_without_heavy_imports():
    code = ("import importlib, sys\n"
            f"for name in {sorted(set(COMMANDS.values()))!r}:\n"
            "    importlib.import_module(name).build_parser()\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {set(HEAVY)!r}))")
    done = subprocess.run([sys.executable, "-c", code], env=_env(), cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def _formatted(**kwargs) -> str:
    parser = OneLineParser(prog="p", formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--x", **kwargs)
    return parser.format_help()


def test_defaults_help_formatter_shows_a_default_once_and_none_never():
    assert "(default: 5)" in _formatted(type=int, default=5, help="how many")
    assert "default" not in _formatted(default=None, help="a file")
    assert "default" not in _formatted(action="store_true", help="a flag")
    assert _formatted(default=5, help="how many (default 5)").count("default") == 1
    assert "(default: NOUN,ADJ)" in _formatted(default=["NOUN", "ADJ"], help="tags")
    assert "(default: 50%)" in _formatted(default="50%", help="share")


def test_exit_if_help_answers_help_and_nothing_else(capsys):
    def build():
        parser = OneLineParser(prog="p")
        parser.add_argument("--x", help="an option")
        return parser

    exit_if_help(build, ["--x", "1"])  # no help asked: returns, the command goes on
    exit_if_help(build, ["--", "--help"])  # after `--`, --help is an argument, not the option
    with pytest.raises(SystemExit) as stop:
        exit_if_help(build, ["--x", "1", "-h"])
    assert stop.value.code == 0
    assert "--x X" in capsys.readouterr().out
