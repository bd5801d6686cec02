"""The command line explains itself: every option has help, the description names every subcommand."""

from __future__ import annotations

import argparse

import pytest

from captioners.cli import build_parser


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_the_description_lists_every_subcommand_without_markup():
    parser = build_parser()
    names = set(subparsers(parser))
    assert names == {"caption", "batch", "models", "download", "convert", "ui"}
    text = parser.format_help()
    description = parser.description or ""
    assert all(name in description for name in names), description
    assert "`" not in text


@pytest.mark.parametrize("command", ["caption", "batch", "models", "download", "convert", "ui"])
def test_every_option_has_help_text(command):
    parser = subparsers(build_parser())[command]
    undocumented = [action.option_strings or [action.dest] for action in parser._actions
                    if not action.help and not isinstance(action, argparse._HelpAction)]
    assert undocumented == []
    assert parser.description, f"{command} has no description"
    assert "`" not in parser.format_help()


def test_messages_name_the_real_flags(tmp_path, capsys):
    from captioners import cli

    (tmp_path / "sub").mkdir()
    assert cli.main(["batch", str(tmp_path)]) == 2
    assert "-r/--recursive" in capsys.readouterr().err
    assert cli.main(["caption", str(tmp_path)]) == 2
    assert "-r/--recursive" in capsys.readouterr().err
    assert cli.main(["batch", str(tmp_path), "-r", "--trigger", "sks", "--trigger-mode", "replace"]) == 2
    assert "--class-word" in capsys.readouterr().err


def test_only_the_command_line_imports_the_command_line():
    """Layers point one way: the engines, the service, the UIs and the WebUI adapter stand without it."""
    import subprocess
    import sys

    modules = ["captioners.batch.runner", "captioners.batch.steps", "captioners.service", "captioners.api",
               "captioners.app", "captioners.ui", "captioners.webui.settings", "captioners.judging.judge"]
    code = ("import sys\n" + "".join(f"import {name}\n" for name in modules) +
            "print(sorted(m for m in sys.modules if m == 'captioners.cli' or m.startswith('captioners.cli.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_command_line_modules_do_not_import_each_other_in_a_circle():
    import ast
    from pathlib import Path

    package = Path(__file__).resolve().parents[1] / "captioners" / "cli"
    for path in package.glob("*.py"):
        if path.name == "__init__.py":
            continue
        tree = ast.parse(path.read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        siblings = {name for name in imported if name.startswith("captioners.cli")} - {"captioners.cli.options"}
        assert not siblings, f"{path.name} imports {siblings}: shared options belong in captioners.cli.options"
