"""Find a preset's model files: a local folder, the Hugging Face cache, or (when allowed) a download.

Order for each repository:
1. ``weights_dir/<org>/<name>/`` when the user gave a folder (``--weights-dir`` or ``LCMLA_WEIGHTS``);
2. the Hugging Face cache (``HF_HOME`` / ``HF_HUB_CACHE``), without touching the network;
3. a download, only when ``allow_download`` is true and ``HF_HUB_OFFLINE`` is not set (of every
   file of the repository's role, so that they share one snapshot folder).

If anything is still missing, one ``MissingWeightsError`` lists every missing file and the exact
command that fetches it. Nothing happens at import time.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import MissingWeightsError
from .presets import TAESDXL_REPO, TAESD_FILES, Preset

WEIGHTS_ENV = "LCMLA_WEIGHTS"


def hub_offline() -> bool:
    """True when the user asked huggingface_hub to stay offline."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def default_weights_dir() -> Path | None:
    value = os.environ.get(WEIGHTS_ENV, "").strip()
    return Path(value).expanduser() if value else None


def _from_local_folder(folder: Path, files: tuple[str, ...]) -> tuple[Path, list[str]]:
    missing = [f for f in files if not (folder / f).is_file()]
    return folder, missing


def _from_hf_cache(repo: str, files: tuple[str, ...]) -> tuple[Path | None, list[str]]:
    from huggingface_hub import try_to_load_from_cache

    root: Path | None = None
    missing = []
    for name in files:
        found = try_to_load_from_cache(repo, name)
        if isinstance(found, str) and os.path.isfile(found):
            # snapshots/<revision>/<name>: the repo root is the snapshot folder
            root = Path(found).parents[len(Path(name).parts) - 1]
        else:
            missing.append(name)
    return root, missing


def _download(repo: str, files: list[str]) -> tuple[Path | None, list[str]]:
    from huggingface_hub import hf_hub_download

    root: Path | None = None
    missing = []
    for name in files:
        try:
            path = hf_hub_download(repo, name)
        except Exception:  # no network, gated repo, missing file: report it below
            missing.append(name)
            continue
        root = Path(path).parents[len(Path(name).parts) - 1]
    return root, missing


def fetch_command(repo: str, files: list[str], weights_dir: Path | None) -> str:
    """The shell command that puts ``files`` of ``repo`` where lcmla looks for them."""
    target = f" --local-dir {weights_dir / repo}" if weights_dir else ""
    return f"hf download {repo} {' '.join(files)}{target}"


def resolve_files(
    required: dict[str, tuple[str, tuple[str, ...]]],
    *,
    weights_dir: str | Path | None = None,
    allow_download: bool = False,
    what: str = "this preset",
) -> dict[str, Path]:
    """role -> local folder of the repository holding that role's files.

    ``required`` maps role -> (repo, files), as ``Preset.required_files`` returns it.
    """
    wdir = Path(weights_dir).expanduser() if weights_dir else default_weights_dir()
    download = allow_download and not hub_offline()
    paths: dict[str, Path] = {}
    problems: list[tuple[str, list[str]]] = []
    for role, (repo, files) in required.items():
        if wdir is not None and (wdir / repo).is_dir():
            root, missing = _from_local_folder(wdir / repo, files)
        else:
            root, missing = _from_hf_cache(repo, files)
            if missing and download:
                # every file of the role, not only the missing ones: they must share one snapshot
                # folder, and a cached older revision would otherwise hold some and the new one the
                # rest (hf_hub_download fetches only what the current revision lacks)
                root, missing = _download(repo, list(files))
        if missing:
            problems.append((repo, missing))
        else:
            assert root is not None
            paths[role] = root
    if problems:
        lines = [f"{what} needs model files that are not on this machine:"]
        for repo, missing in problems:
            lines += [f"  {repo}: {', '.join(missing)}"]
        lines.append("Fetch them with:")
        lines += [f"  {fetch_command(repo, missing, wdir)}" for repo, missing in problems]
        where = f"the folder {wdir} (<org>/<name> per repository)" if wdir else "the Hugging Face cache"
        lines.append(
            f"lcmla looks in {where}; pass --weights-dir DIR (or set {WEIGHTS_ENV}) to use your own folder"
            + ("" if download else ", or let `python -m lcmla generate` or `python app.py` download them "
               "(unset HF_HUB_OFFLINE and pass --download)")
            + "."
        )
        missing_all = [f"{repo}/{name}" for repo, names in problems for name in names]
        raise MissingWeightsError("\n".join(lines), missing_all)
    return paths


def resolve_preset(
    preset: Preset,
    *,
    variant: str | None = None,
    weights_dir: str | Path | None = None,
    allow_download: bool = False,
    with_taesd: bool = False,
    exclude: tuple[str, ...] = (),
) -> dict[str, Path]:
    """The local folders of every repository a (non-tiny) preset needs (less the roles in
    ``exclude``, e.g. "faceid" when another identity adapter is given)."""
    required = {role: spec for role, spec in preset.required_files(variant).items() if role not in exclude}
    if with_taesd:
        required["taesd"] = (TAESDXL_REPO, TAESD_FILES)
    return resolve_files(
        required, weights_dir=weights_dir, allow_download=allow_download, what=f"preset {preset.name!r}"
    )
