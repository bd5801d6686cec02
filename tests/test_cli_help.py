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
