"""Identities, templates, prompts and seeds of the consistent-identity data (LCM-Lookahead §4.4).

Everything here is a pure function of the run's seed and indices: identity i is drawn from the
attribute banks by (seed, i); image k of template τ of identity i has the seed
``image_seed(seed, i, τ, k)``. A resumed or re-split run therefore renders exactly the same images.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np

DATA = Path(__file__).resolve().parent / "data"
COMPRESSED_SUBJECT = "a face"


@dataclass(frozen=True)
class Template:
    slug: str
    text: str  # with a {subject} placeholder
    stylized: bool

    def prompt(self, subject: str) -> str:
        return self.text.format(subject=subject)

    def compressed(self) -> str:
        """The prompt with the subject replaced by "a face" ("a photo of a face in a forest")."""
        return self.text.format(subject=COMPRESSED_SUBJECT)


@dataclass(frozen=True)
class Identity:
    index: int
    description: str  # the subject of every prompt of this identity
    attributes: dict

    @property
    def key(self) -> str:
        return f"id{self.index:06d}"


@lru_cache(maxsize=None)
def _attributes() -> dict:
    """attributes.json as read (once)."""
    return json.loads((DATA / "attributes.json").read_text())


def _banks() -> dict[str, list[str]]:
    """The attribute banks, in drawing order (the keys starting with "_" are notes and rules)."""
    return {k: v for k, v in _attributes().items() if not k.startswith("_")}


def _requires() -> dict[str, dict[str, list[str]]]:
    """value → {earlier bank: the values of it the value goes with} ("a thick beard": gender "man")."""
    return _attributes().get("_requires", {})


def fits(value: str, drawn: dict[str, str], requires: dict[str, dict[str, list[str]]]) -> bool:
    """Whether ``value`` goes with the attributes ``drawn`` before it, by ``requires``; a rule naming
    a bank not drawn yet does not hold."""
    return all(drawn.get(bank) in allowed for bank, allowed in requires.get(value, {}).items())


def prompt_sources_digest(with_banks: bool) -> str:
    """A short sha256 of what the prompts are made from: the templates, and the attribute banks
    (``with_banks``: the descriptions are drawn, not read from a names file)."""
    h = hashlib.sha256((DATA / "templates.json").read_bytes())
    if with_banks:
        h.update((DATA / "attributes.json").read_bytes())
    return h.hexdigest()[:16]


@lru_cache(maxsize=None)
def templates() -> tuple[Template, ...]:
    raw = json.loads((DATA / "templates.json").read_text())
    return tuple(Template(t["slug"], t["text"], kind == "stylized") for kind in ("plain", "stylized") for t in raw[kind])


def style_names() -> list[str]:
    return [t.slug for t in templates() if t.stylized]


def select_templates(styles: Sequence[str] | None) -> tuple[list[Template], list[Template]]:
    """(plain templates, stylized templates); ``styles`` picks stylized slugs (None: all). Unknown
    slugs raise ValueError naming the valid ones."""
    plain = [t for t in templates() if not t.stylized]
    stylized = [t for t in templates() if t.stylized]
    if styles is not None:
        known = {t.slug: t for t in stylized}
        bad = [s for s in styles if s not in known]
        if bad:
            raise ValueError(f"unknown style(s) {', '.join(bad)}; choose from {', '.join(known)}")
        stylized = [known[s] for s in styles]
    return plain, stylized


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def draw_identity(seed: int, index: int, names: Sequence[str] | None = None) -> Identity:
    """Identity ``index`` of a run: a detailed description drawn from the banks by (seed, index) —
    "an old Slavic woman with tan skin, curly brown hair and green eyes, bags under the eyes", each
    value among those that go with the ones drawn before it (``_requires``: no bearded women) — or,
    with ``names`` (the authors' released generator renders celebrity names), the name itself."""
    if names:
        if not 0 <= index < len(names):
            raise ValueError(f"identity {index} has no name: the names list holds {len(names)}")
        return Identity(index, names[index], {"name": names[index]})
    rng = np.random.default_rng([seed, index])
    pick: dict[str, str] = {}
    requires = _requires()
    for bank, values in _banks().items():  # one draw per bank, among the values that fit the earlier ones
        allowed = [v for v in values if fits(v, pick, requires)]
        pick[bank] = allowed[int(rng.integers(len(allowed)))]
    text = f"{pick['age']} {pick['ethnicity']} {pick['gender']} with {pick['skin']}, {pick['hair']} and {pick['eyes']}"
    if pick["feature"]:
        text += f", {pick['feature']}"
    return Identity(index, f"{_article(text)} {text}", pick)


def image_seed(seed: int, identity: int, template: str, k: int) -> int:
    """A stable 63-bit seed for image k of ``template`` of ``identity`` in the run ``seed``."""
    digest = hashlib.sha256(f"{seed}/{identity}/{template}/{k}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def plan_images(identity: Identity, plain: Sequence[Template], stylized: Sequence[Template], per_identity: int,
                seed: int) -> list[tuple[Template, int, int]]:
    """The (template, k, seed) of every image of an identity: at least two plain photos (the
    references; half of the images, rounded up), the rest spread round-robin over the styles."""
    n_plain = max(2, (per_identity + 1) // 2) if stylized else per_identity
    n_style = max(0, per_identity - n_plain)
    out = []
    for j in range(n_plain):
        t = plain[j % len(plain)]
        k = j // len(plain)
        out.append((t, k, image_seed(seed, identity.index, t.slug, k)))
    for j in range(n_style):
        t = stylized[j % len(stylized)]
        k = j // len(stylized)
        out.append((t, k, image_seed(seed, identity.index, t.slug, k)))
    return out


def read_names(path: str | Path) -> list[str]:
    """One subject name per line (blank lines and # comments skipped)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ValueError(f"cannot read the names file {path}: {exc.strerror or exc}") from None
    names = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not names:
        raise ValueError(f"the names file {path} holds no names")
    return names


def slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
