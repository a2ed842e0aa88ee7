"""argparse helpers shared by lcmla's and the training package's command lines (light: no torch)."""

from __future__ import annotations

import argparse

__all__ = ["Number", "OneLineParser", "add_flag"]

EXIT_USER_ERROR = 2


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line ("prog: error: … (see --help)") and exit
    2, like every other user mistake, instead of argparse's usage block of every flag."""

    def error(self, message: str) -> None:
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see --help)\n")


class Number:
    """An argparse ``type`` for a numeric flag and its range: ``Number(float, 0, 1)`` is [0, 1],
    ``Number(float, 0, open_low=True)`` is > 0, ``Number(int, 1)`` is ≥ 1; ``multiple`` adds
    "a multiple of". Not-a-number, infinite and out-of-range values are refused while the command
    line is parsed, with the flag's name and range (argparse's "argument --x: ..."), and the range
    is written into the flag's ``--help``."""

    def __init__(self, kind: type = float, low: float | None = None, high: float | None = None, *,
                 open_low: bool = False, open_high: bool = False, multiple: int | None = None):
        self.kind, self.low, self.high = kind, low, high
        self.open_low, self.open_high, self.multiple = open_low, open_high, multiple
        self.__name__ = kind.__name__  # what argparse calls the type

    def describe(self) -> str:
        what = ("a whole number" if self.kind is int else "a finite number") + (
            f", a multiple of {self.multiple}," if self.multiple else "")
        lo, hi = (None if v is None else (str(int(v)) if self.kind is int else f"{v:g}") for v in (self.low, self.high))
        if lo is not None and hi is not None:
            return f"{what} in {'(' if self.open_low else '['}{lo}, {hi}{')' if self.open_high else ']'}"
        if lo is not None:
            return f"{what} {'>' if self.open_low else '≥'} {lo}"
        if hi is not None:
            return f"{what} {'<' if self.open_high else '≤'} {hi}"
        return what

    def __call__(self, text: str):
        import math

        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {self.describe()} (got {text!r})") from None
        lo, hi = self.low, self.high
        bad = (not math.isfinite(value) or (lo is not None and (value < lo or (self.open_low and value == lo)))
               or (hi is not None and (value > hi or (self.open_high and value == hi)))
               or (self.multiple is not None and value % self.multiple))
        if bad:
            raise argparse.ArgumentTypeError(f"must be {self.describe()} (got {value})")
        return value


def add_flag(parser, *names: str, **kwargs) -> None:
    """``parser.add_argument`` that writes a :class:`Number` type's range into the flag's help."""
    kind = kwargs.get("type")
    if isinstance(kind, Number):
        text, described = kwargs.get("help"), kind.describe()
        kwargs["help"] = f"{text}; {described}" if text else described[0].upper() + described[1:]
    parser.add_argument(*names, **kwargs)


class DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's "(default: X)" after each help text, except where it says nothing or says it
    twice: no default (None, a required flag) or a help text that already names its default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default is None or action.required or "default" in text or action.default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


#: a TCP port: the app's --port, and $GRADIO_SERVER_PORT (its default)
PORT = Number(int, 1, 65535)


def server_port_env_problem(environ) -> str | None:
    """What is wrong with ``$GRADIO_SERVER_PORT`` (None when unset or a :data:`PORT`). gradio reads
    it with ``int()`` when it is imported, so a bad value was a ValueError traceback from inside
    gradio before the app could say anything; the app checks it first."""
    value = environ.get("GRADIO_SERVER_PORT")
    if value is None:
        return None
    try:
        PORT(value)
    except argparse.ArgumentTypeError:
        return (f"GRADIO_SERVER_PORT={value!r} is not a port number ({PORT.low} to {PORT.high}): set it to one, "
                "or unset it and pass --port")
    return None
