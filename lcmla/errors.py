"""User-facing errors.

Every mistake a user can make (a bad setting, a broken image, a missing weight file) raises one of
these with a message that names the problem and the fix. The CLI prints the message on one line and
exits non-zero; the app shows it as a toast. Both are ``ValueError`` subclasses so that callers who
only know the standard library can still catch them.
"""

from __future__ import annotations


class LcmlaError(ValueError):
    """Base class: a problem the user can fix, with a message that says how."""


class SettingsError(LcmlaError):
    """A generation setting is missing, of the wrong type or out of range."""


class ImageError(LcmlaError):
    """An input image cannot be read, or holds no usable face."""


class NoFaceError(ImageError):
    """No face was found in an input image (or the face is too small)."""


class MissingWeightsError(LcmlaError):
    """Model files needed by a preset are not on this machine."""

    def __init__(self, message: str, missing: list[str] | None = None):
        super().__init__(message)
        self.missing = list(missing or [])


def check_output_dir(path, flag: str) -> None:
    """Refuse, before any work, an output folder that cannot be made or written: a file in its
    place, or a nearest existing folder above it that is not writable. Leaves nothing behind (the
    write test is a temporary file, deleted at once: permission bits do not tell for root, a
    read-only file system or /proc)."""
    import os
    import tempfile
    from pathlib import Path

    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise LcmlaError(f"{flag} {p} is a file, not a folder: pass a folder (it is created if missing)")
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise LcmlaError(f"{flag} {p} cannot be created: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise LcmlaError(f"{flag} {p} cannot be written: no write permission in {probe}; pass another folder")
    try:
        with tempfile.TemporaryFile(dir=probe, prefix=".lcmla-write-test-"):
            pass
    except OSError as exc:
        raise LcmlaError(f"{flag} {p} cannot be written: {probe} refuses new files ({exc.strerror or exc}); "
                         "pass another folder") from None


def refuse_folder(path, what: str, suffixes: tuple[str, ...]) -> None:
    """Refuse a folder where one file is wanted (``what``: e.g. "the IP-Adapter checkpoint"), naming
    the files of ``suffixes`` in it that could be meant (a trainer's output folder holds several)."""
    from pathlib import Path

    p = Path(path).expanduser()
    if not p.is_dir():
        return
    found = sorted(f.name for f in p.iterdir() if f.is_file() and f.name.endswith(suffixes))
    if found:
        shown = ", ".join(found[:6]) + (f" and {len(found) - 6} more" if len(found) > 6 else "")
        raise LcmlaError(f"{what} {p} is a folder, not a file: pass one file in it ({shown})")
    raise LcmlaError(f"{what} {p} is a folder, not a file, and holds no {'/'.join(suffixes)} file: pass the file itself")
