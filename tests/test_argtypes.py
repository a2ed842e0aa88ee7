"""lcmla.argtypes: the numeric flag types shared by the CLIs (their ranges, messages and help)."""

from __future__ import annotations

import argparse

import pytest

from lcmla.argtypes import Number, add_flag


@pytest.mark.parametrize(("kind", "text", "value"), [
    (Number(float, 0, 1), "0", 0.0), (Number(float, 0, 1), "1", 1.0), (Number(int, 1), "3", 3),
    (Number(int, 64, 2048, multiple=8), "72", 72), (Number(float, -1, 1), "-1", -1.0),
])
def test_values_in_range_pass(kind, text, value):
    assert kind(text) == value and type(kind(text)) is type(value)


@pytest.mark.parametrize(("kind", "text", "said"), [
    (Number(float, 0, open_low=True), "0", "must be a finite number > 0 (got 0.0)"),
    (Number(float, 0, 1, open_high=True), "1", "must be a finite number in [0, 1) (got 1.0)"),
    (Number(float, 0), "nan", "(got nan)"), (Number(float, 0), "-inf", "(got -inf)"),
    (Number(int, 1), "1.5", "must be a whole number ≥ 1 (got '1.5')"),
    (Number(int, 64, 2048, multiple=8), "100", "a whole number, a multiple of 8, in [64, 2048] (got 100)"),
    (Number(int, 0, 2**63 - 1), "-1", "in [0, 9223372036854775807] (got -1)"),  # whole numbers print whole
])
def test_values_out_of_range_are_refused_with_the_range(kind, text, said):
    with pytest.raises(argparse.ArgumentTypeError) as exc:
        kind(text)
    assert said in str(exc.value)


def test_the_parser_names_the_flag_and_the_help_shows_the_range(capsys):
    p = argparse.ArgumentParser(prog="x")
    add_flag(p, "--rate", type=Number(float, 0, open_low=True), default=0.1, help="learning rate")
    add_flag(p, "--n", type=Number(int, 1), default=2)
    assert p.parse_args(["--rate", "0.5"]).rate == 0.5
    with pytest.raises(SystemExit) as exc:
        p.parse_args(["--rate", "0"])
    assert exc.value.code == 2 and "argument --rate: must be a finite number > 0 (got 0.0)" in capsys.readouterr().err
    shown = " ".join(p.format_help().split())
    assert "--rate RATE learning rate; a finite number > 0" in shown and "--n N A whole number ≥ 1" in shown


def test_help_shows_a_default_once_and_never_none():
    import argparse

    from lcmla.argtypes import DefaultsHelp

    p = argparse.ArgumentParser(formatter_class=DefaultsHelp)
    p.add_argument("--steps", type=int, default=5, help="sampling steps")
    p.add_argument("--names", default=None, help="a file of names")
    p.add_argument("--styles", default="all", help="styles (default: all)")
    p.add_argument("--count", type=int, required=True, help="how many")
    text = " ".join(p.format_help().split())
    assert "sampling steps (default: 5)" in text and "(default: None)" not in text
    assert text.count("(default: all)") == 1 and "how many (default" not in text


@pytest.mark.parametrize(("build", "argv", "said"), [
    ("training.train", ["--resolution", "x"], "python -m training train: error: argument --resolution: must be"),
    ("training.datagen.cli", ["generate", "--identities", "0"], "python -m training datagen generate: error: argument --identities"),
    ("training.datagen.cli", ["bogus"], "python -m training datagen: error: argument command: invalid choice: 'bogus'"),
    ("lcmla.cli", ["generate", "--steps"], "python -m lcmla generate: error: argument --guidance-steps/--steps"),
])
def test_every_command_line_says_a_usage_error_in_one_line(build, argv, said, capsys):
    """argparse's own errors (a bad or missing flag) are one line naming the flag and --help, exit 2,
    in lcmla's, the trainer's and datagen's parsers alike: not the usage block of forty flags."""
    import importlib

    with pytest.raises(SystemExit) as exc:
        importlib.import_module(build).build_parser().parse_args(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith(said) and err.endswith("(see --help)\n") and err.count("\n") == 1, err


def test_the_app_refuses_a_port_out_of_range_in_one_line(capsys, monkeypatch):
    from lcmla.ui.cli import parse_args

    monkeypatch.delenv("GRADIO_SERVER_PORT", raising=False)
    with pytest.raises(SystemExit) as exc:
        parse_args(["--port", "70000"])
    assert exc.value.code == 2
    assert capsys.readouterr().err == "app.py: error: argument --port: must be a whole number in [1, 65535] (got 70000) (see --help)\n"
    assert parse_args([]).port == 7860 and parse_args(["--port", "8080"]).port == 8080
