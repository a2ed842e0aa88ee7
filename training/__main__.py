"""``python -m training train …`` | ``python -m training datagen …`` (and under ``accelerate launch -m training``)."""

from __future__ import annotations

import sys

USAGE = """usage: python -m training {train,datagen} ...

  train     train the identity adapter and the KV-encoder LoRA with the LCM-Lookahead identity loss
  datagen   generate, inspect or import consistent-identity training shards

  python -m training train --help
  python -m training datagen --help
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    from lcmla.loading import quiet_torchvision_notice

    quiet_torchvision_notice()
    if command == "train":
        from .train import cli

        return cli(rest)
    if command == "datagen":
        from .datagen.cli import main as datagen

        return datagen(rest)
    print(f"python -m training: error: unknown command {command!r}; the commands are train and datagen "
          f"(see python -m training --help)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
