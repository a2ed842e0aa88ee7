"""A small real-photo training set from the two public-domain portraits on every machine
(``python -m training datagen sample``): the way to try the trainer on a CPU, where the tiny
preset's random weights draw patterns that no face filter keeps.

Each identity is one portrait: scikit-image's ``astronaut`` (Eileen Collins, NASA) and
matplotlib's ``grace_hopper.jpg`` (US Navy). Image k of a template is that portrait varied by its
seed (a crop around the centre, a mirror half the time, a slight turn, brightness and contrast);
a stylized template also passes the photo through an image filter named after its style (a pencil
sketch from the edges, an oil painting from a mode filter, a watercolour from a blur, a comic
from posterised flats with dark edges). The images go through the same filtering, shards and
manifest as ``datagen generate`` (:func:`training.datagen.generate.generate`), so the trainer,
``datagen inspect`` and a rerun's resume treat both alike; the manifest records
``"source": "sample"``. Two identities of filtered photos train nothing useful: the set is for
exercising the training package end to end, as the tiny preset is for the engine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

#: The identities: the name every prompt of the identity carries, and where its portrait is.
PORTRAITS: tuple[tuple[str, str], ...] = (
    ("Eileen Collins", "skimage.data.astronaut"),
    ("Grace Hopper", "matplotlib sample_data/grace_hopper.jpg"),
)


def portrait(name: str) -> Image.Image:
    """The public-domain portrait of identity ``name`` (RGB), cut to a square around the face."""
    if name == "Eileen Collins":
        import skimage.data

        img = Image.fromarray(skimage.data.astronaut())  # 512², the face in the upper left third
        return img.crop((96, 0, 352, 256))
    if name == "Grace Hopper":
        import os

        import matplotlib

        path = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")
        with Image.open(path) as img:  # 512 × 600, the face in the upper middle
            return img.convert("RGB").crop((106, 40, 406, 340))
    raise ValueError(f"no sample portrait of {name!r}; the sample identities are {', '.join(n for n, _ in PORTRAITS)}")


@dataclass(frozen=True)
class Variation:
    """How one sample image differs from its portrait (see :func:`variation`)."""

    side: float  # the crop's side, a fraction of the portrait's shorter side
    shift: tuple[float, float]  # the crop's centre offset, fractions of the width and height
    mirror: bool
    angle: float  # degrees, counter-clockwise
    brightness: float  # enhance factors
    contrast: float


def variation(seed: int) -> Variation:
    """The variation of ``seed``: a crop of 86–100 % of the side around the centre (shifted up to
    4 %), a mirror half the time, a turn of up to ±6°, brightness and contrast × 0.85–1.15."""
    rng = np.random.default_rng(seed)
    side = float(rng.uniform(0.86, 1.0))
    shift = (float(rng.uniform(-0.04, 0.04)), float(rng.uniform(-0.04, 0.04)))
    mirror = bool(rng.random() < 0.5)
    return Variation(side, shift, mirror, float(rng.uniform(-6, 6)), float(rng.uniform(0.85, 1.15)),
                     float(rng.uniform(0.85, 1.15)))


def apply_variation(photo: Image.Image, v: Variation, size: int) -> Image.Image:
    """``photo`` cropped, mirrored, turned (grey corners), lit and resized to ``size``² as ``v`` says."""
    w, h = photo.size
    side = min(w, h) * v.side
    cx, cy = w / 2 + v.shift[0] * w, h / 2 + v.shift[1] * h
    img = photo.crop((round(cx - side / 2), round(cy - side / 2), round(cx + side / 2), round(cy + side / 2)))
    if v.mirror:
        img = ImageOps.mirror(img)
    img = img.rotate(v.angle, resample=Image.BICUBIC, fillcolor=(128, 128, 128))
    img = ImageEnhance.Brightness(img).enhance(v.brightness)
    img = ImageEnhance.Contrast(img).enhance(v.contrast)
    return img.resize((size, size), Image.LANCZOS)


def vary(photo: Image.Image, seed: int, size: int) -> Image.Image:
    """``photo`` varied by ``seed`` (:func:`variation`), ``size``²."""
    return apply_variation(photo, variation(seed), size)


def _pencil(img: Image.Image) -> Image.Image:
    grey = ImageOps.grayscale(img)
    edges = ImageOps.invert(grey.filter(ImageFilter.FIND_EDGES))
    return Image.blend(ImageOps.autocontrast(edges), grey.filter(ImageFilter.SMOOTH_MORE), 0.35).convert("RGB")


def _oil(img: Image.Image) -> Image.Image:
    return ImageEnhance.Color(ImageOps.posterize(img.filter(ImageFilter.ModeFilter(5)), 4)).enhance(1.3)


def _watercolor(img: Image.Image) -> Image.Image:
    soft = img.filter(ImageFilter.GaussianBlur(2)).filter(ImageFilter.SMOOTH_MORE)
    return ImageEnhance.Color(ImageOps.posterize(soft, 5)).enhance(1.4)


def _comic(img: Image.Image) -> Image.Image:
    flat = ImageOps.posterize(img.filter(ImageFilter.SMOOTH_MORE), 3)
    edges = ImageOps.grayscale(img).filter(ImageFilter.FIND_EDGES).point(lambda v: 0 if v > 40 else 255)
    return Image.composite(flat, Image.new("RGB", img.size), edges)


#: A style's filter, by a word of its template: the first group holding a word of the prompt wins,
#: so the specific words come before the generic "drawing" and "painting" ("a drawing of X in a
#: comic book" is a comic, "a watercolor painting" a watercolour); others are posterised.
STYLE_FILTERS: tuple[tuple[tuple[str, ...], Callable[[Image.Image], Image.Image]], ...] = (
    (("watercolor", "watercolour", "pastel"), _watercolor),
    (("comic", "cartoon", "anime", "graffiti", "poster", "pop art"), _comic),
    (("pencil", "charcoal", "sketch"), _pencil),
    (("oil", "impressionist"), _oil),
    (("drawing",), _pencil),
    (("painting",), _oil),
)


def stylize(img: Image.Image, prompt: str) -> Image.Image:
    """``img`` through the filter of the style ``prompt`` names."""
    text = prompt.lower()
    for words, fn in STYLE_FILTERS:
        if any(w in text for w in words):
            return fn(img)
    return ImageOps.posterize(img, 4)


def sample_renderer(stylized_prompts: frozenset[str], size: int) -> Callable[[str, int], Image.Image]:
    """render(prompt, seed) for :func:`training.datagen.generate.generate`: the portrait of the name
    in ``prompt``, varied by ``seed``, through its style's filter when the prompt is stylized."""
    photos = {name: portrait(name) for name, _ in PORTRAITS}

    def render(prompt: str, seed: int) -> Image.Image:
        name = next((n for n in photos if n in prompt), None)
        if name is None:
            raise ValueError(f"the prompt {prompt!r} names no sample identity")
        img = vary(photos[name], seed, size)
        return stylize(img, prompt) if prompt in stylized_prompts else img

    return render
