"""The LCM-Lookahead authors' generated-data folders → our shards.

Their generator (``scripts/faces_generation.py``) writes ``<root>/<name>/vanilla/*.jpg`` (plain
photos) and ``<root>/<name>/stylized/*.jpg``, each file named after its prompt with the subject as
``conceptname`` and the seed last (``A_pencil_drawing_of_conceptname_123456.jpg``), and
``<root>/metadata.json`` mapping each relative path to its subject's name. The importer reads
those (or, without the metadata, the folder layout), analyses the faces and filters exactly as our
generator does, and writes shards of whole identities.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

from PIL import Image

from .generate import Candidate, GenConfig, filter_identity, write_shards
from .identities import Identity, Template, slugify

PLACEHOLDER = "conceptname"


def prompt_of(path: Path) -> tuple[str, int]:
    """(prompt with the {subject} placeholder, seed) from one of their file names: the prompt's
    spaces as underscores, then ``_<seed>``; only that last part is the seed (a prompt may end in a
    number of its own: "a_photo_of_conceptname_in_1920_4711")."""
    parts = path.stem.split("_")
    seed = int(parts.pop()) if len(parts) > 1 and parts[-1].isdigit() else 0
    text = " ".join(parts)
    return text.replace(PLACEHOLDER, "{subject}"), seed


def read_authors_folder(root: str | Path) -> dict[str, list[Path]]:
    """subject name → its image files (sorted), from ``metadata.json`` or the folder layout."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is {'a file' if root.exists() else 'not there'}: pass the authors' data "
                                "folder (the one that holds metadata.json or <name>/vanilla|stylized/*.jpg)")
    groups: dict[str, list[Path]] = defaultdict(list)
    meta = root / "metadata.json"
    if meta.is_file():
        try:
            mapping = json.loads(meta.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{meta} is not valid JSON ({exc}); it should map each image's relative path to its "
                             "subject's name") from None
        if not isinstance(mapping, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()):
            raise ValueError(f"{meta} should map each image's relative path to its subject's name "
                             f'({{"<name>/vanilla/<file>.jpg": "<name>", ...}}); it holds a {type(mapping).__name__}'
                             + (" of other values" if isinstance(mapping, dict) else ""))
        for rel, name in mapping.items():
            if (root / rel).is_file():
                groups[name].append(root / rel)
    else:
        for path in sorted(root.glob("*/*/*")):
            if path.suffix.lower() in (".jpg", ".jpeg", ".png") and path.parent.name in ("vanilla", "stylized"):
                groups[path.parent.parent.name].append(path)
    if not groups:
        raise FileNotFoundError(f"{root} holds no LCM-Lookahead data (metadata.json or <name>/vanilla|stylized/*.jpg)")
    return {name: sorted(paths) for name, paths in groups.items()}


def candidates_of(name: str, paths: list[Path]) -> list[Candidate]:
    out, counts = [], defaultdict(int)
    for path in paths:
        text, seed = prompt_of(path)
        stylized = path.parent.name != "vanilla"
        if "{subject}" not in text:
            text = f"{text} {{subject}}".strip()  # a file name without conceptname: the subject last
        template = Template(slugify(text.replace("{subject}", "")) or "photo", text, stylized)
        k = counts[template.slug]
        counts[template.slug] += 1
        try:
            image = Image.open(path)
            image.load()
            image = image.convert("RGB")
        except (OSError, SyntaxError):
            image = None
        out.append(Candidate(template, k, seed, template.prompt(name), image))
    return out


def import_authors(root: str | Path, out: str | Path, analyze: Callable, cfg_kwargs: dict[str, Any],
                   rank: int = 0, world: int = 1, log: Callable[[str], None] = print,
                   groups: dict[str, list[Path]] | None = None) -> dict[str, Any]:
    """Write shards of the authors' folder ``root`` into ``out`` (identities in name order);
    ``groups``: what :func:`read_authors_folder` gave for ``root``, when already read."""
    groups = read_authors_folder(root) if groups is None else groups
    names = sorted(groups)
    cfg = GenConfig(identities=len(names), images_per_identity=0, plain=(), stylized=(), names=tuple(names),
                    settings={"imported_from": str(root), **cfg_kwargs.pop("settings", {})}, **cfg_kwargs)

    def make(i: int):
        identity = Identity(i, names[i], {"name": names[i]})
        return filter_identity(identity, candidates_of(names[i], groups[names[i]]), cfg, analyze)

    return write_shards(cfg, Path(out), make, rank, world, log)
