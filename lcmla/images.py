"""Reading user photos into plain RGB images.

Everything the face code and the generator get from the outside world goes through
:func:`load_image`, which accepts a path, raw bytes, a file-like object, a PIL image or a numpy
array, and always returns an 8-bit ``RGB`` :class:`PIL.Image.Image` that:

* is turned upright according to its EXIF orientation tag (phone photos),
* has transparency composited over white and every other mode (palette, grey, CMYK, 16-bit,
  float) converted to RGB, 16-bit and float images being stretched over their own value range,
* is at most :data:`MAX_SIDE` pixels on its longest side (bigger photos are shrunk, keeping the
  aspect ratio, before any face detection runs), and at least :data:`MIN_SIDE` on its shortest.

Every problem (missing file, a folder, an empty/corrupt/truncated file, a file that is not an
image, an image that is too small or absurdly large) raises :class:`lcmla.errors.ImageError` with a
message naming the photo, the problem and the fix.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import IO, Any, Union

import numpy as np
from PIL import Image, ImageOps

from .errors import ImageError

__all__ = [
    "MAX_SIDE",
    "MIN_SIDE",
    "ImageSource",
    "describe_source",
    "load_image",
    "to_rgb",
    "fit_max_side",
]

#: Longest side, in pixels, an input photo is shrunk to before anything else looks at it.
MAX_SIDE = 2048
#: Shortest side, in pixels, an input photo may have.
MIN_SIDE = 32

#: Anything :func:`load_image` accepts.
ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, IO[bytes], Image.Image, np.ndarray]

_FORMATS_HINT = "JPEG, PNG, WebP, …"
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def as_photo_list(photos: Any) -> list:
    """One photo or several → a list of photos, by one rule for every caller.

    A path, bytes-like object, open file (anything with ``read``), PIL image or numpy array is ONE
    photo; any other iterable (list, tuple, generator…) is a collection of photos, materialised
    once (a generator is consumed exactly once).
    """
    if isinstance(photos, (str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray)) or hasattr(photos, "read"):
        return [photos]
    try:
        return list(photos)
    except TypeError:
        raise ImageError(f"expected a photo or a list of photos (got {type(photos).__name__})") from None


def describe_source(source: Any, index: int | None = None) -> str:
    """Return a short human name for an image source, for use in messages.

    Paths give their file name (``'a.jpg'``); file-like objects and PIL images opened from a file
    give that file's name; anything else is ``'uploaded image N'`` (1-based ``index + 1``) or
    ``'uploaded image'`` when no index is known.
    """
    if isinstance(source, (str, os.PathLike)):
        name = Path(os.fspath(source)).name
        return name or os.fspath(source)
    for attribute in ("filename", "name"):
        value = getattr(source, attribute, None)
        if isinstance(value, (str, os.PathLike)) and os.fspath(value):
            name = Path(os.fspath(value)).name
            if name and not name.startswith("<"):
                return name
    return "uploaded image" if index is None else f"uploaded image {index + 1}"


def _problem(name: str, what: str, fix: str) -> ImageError:
    """Build the standard ``face photo 'NAME' <problem>; <fix>`` error."""
    return ImageError(f"face photo {name!r} {what}; {fix}")


def _read_bytes_from_path(path: Path, name: str) -> bytes:
    """Read a file's bytes, turning file-system problems into :class:`ImageError`."""
    if not path.exists():
        raise _problem(name, f"does not exist (looked for {str(path)!r})", "check the path and the file name")
    if path.is_dir():
        raise _problem(name, f"is a folder, not an image file ({str(path)!r})", "pass the path of a photo inside it")
    try:
        return path.read_bytes()
    except OSError as error:
        raise _problem(name, f"cannot be read: {error.strerror or error}", "check the file's permissions") from error


def _read_bytes(source: Any, name: str) -> bytes:
    """Return the encoded bytes of a path / bytes / file-like source."""
    if isinstance(source, (str, os.PathLike)):
        return _read_bytes_from_path(Path(os.fspath(source)).expanduser(), name)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    read = getattr(source, "read", None)
    if callable(read):
        try:
            data = read()
        except OSError as error:
            raise _problem(name, f"cannot be read: {error}", "upload the photo again") from error
        if isinstance(data, str):
            raise _problem(name, "was opened in text mode", "open the file in binary mode ('rb')")
        return bytes(data)
    raise _problem(
        name,
        f"has an unsupported type {type(source).__name__}",
        "pass a file path, bytes, a binary file object, a PIL image or an HxWx3 uint8 numpy array",
    )


def _decode(data: bytes, name: str) -> Image.Image:
    """Decode encoded image bytes fully (so truncation shows up here, not later)."""
    if not data:
        raise _problem(name, "is empty (0 bytes)", "upload the photo again or pick another file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise _problem(
            name,
            f"claims an absurd size and was refused as a possible decompression bomb ({error})",
            f"resize the photo to at most {MAX_SIDE} pixels per side and try again",
        ) from error
    except Image.UnidentifiedImageError as error:
        raise _problem(
            name,
            f"is not an image PIL can read ({_FORMATS_HINT}): cannot identify image file",
            "upload a photo of a face",
        ) from error
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise _problem(
            name,
            f"is corrupt or truncated ({error})",
            "re-export or re-download the photo, or pick another one",
        ) from error
    return image


def _from_array(array: np.ndarray, name: str) -> Image.Image:
    """Wrap a numpy image (HxW, HxWx3 or HxWx4, uint8) in a PIL image."""
    if array.dtype != np.uint8:
        raise _problem(name, f"is a numpy array of dtype {array.dtype}", "pass an HxWx3 uint8 RGB array (values 0-255)")
    if array.ndim == 2:
        return Image.fromarray(np.ascontiguousarray(array))
    if array.ndim == 3 and array.shape[2] in (3, 4):
        return Image.fromarray(np.ascontiguousarray(array))
    if array.ndim == 3 and array.shape[2] == 1:
        return Image.fromarray(np.ascontiguousarray(array[:, :, 0]))
    raise _problem(name, f"is a numpy array of shape {tuple(array.shape)}", "pass an HxWx3 uint8 RGB array")


def _stretch_to_uint8(values: np.ndarray, full_range: float | None) -> np.ndarray:
    """Map an array linearly from its own min..max range onto 0..255.

    A constant image has no range; it is then scaled by ``full_range`` (the type's maximum, e.g.
    65535 for 16-bit) when known, else clipped.
    """
    values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = float(values.min()), float(values.max())
    if high > low:
        scaled = (values - low) * (255.0 / (high - low))
    elif full_range:
        scaled = values * (255.0 / full_range)
    else:
        scaled = values
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _composite_on_white(image: Image.Image) -> Image.Image:
    """Flatten an image with transparency onto a white background."""
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL image mode to 8-bit ``RGB`` (see the module docstring for the rules)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode in ("P", "L", "RGB") and "transparency" in image.info):
        return _composite_on_white(image)
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        values = np.asarray(image.convert("I") if mode != "I" else image)
        full = 65535.0 if mode in _SIXTEEN_BIT_MODES or values.max() <= 65535 else None
        return Image.fromarray(_stretch_to_uint8(values, full)).convert("RGB")
    if mode == "F":
        values = np.asarray(image)
        return Image.fromarray(_stretch_to_uint8(values, None)).convert("RGB")
    return image.convert("RGB")


def fit_max_side(image: Image.Image, max_side: int = MAX_SIDE) -> Image.Image:
    """Shrink ``image`` (LANCZOS, aspect kept) so its longest side is at most ``max_side``."""
    width, height = image.size
    longest = max(width, height)
    if longest <= max_side:
        return image
    scale = max_side / longest
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def _open(source: Any, name: str) -> Image.Image:
    """Turn any supported source into a (not yet normalised) PIL image."""
    if isinstance(source, Image.Image):
        try:
            source.load()
        except (OSError, ValueError) as error:
            raise _problem(name, f"is corrupt or truncated ({error})", "pick another photo") from error
        return source
    if isinstance(source, np.ndarray):
        return _from_array(source, name)
    return _decode(_read_bytes(source, name), name)


def load_image(source: ImageSource, name: str | None = None) -> Image.Image:
    """Load a photo as an upright 8-bit RGB PIL image no larger than :data:`MAX_SIDE`.

    Args:
        source: a path (``str``/``Path``), encoded bytes, a binary file-like object, a PIL image
            or a numpy ``HxWx3`` ``uint8`` RGB array (``HxW`` grey and ``HxWx4`` RGBA also work).
        name: how to call the photo in error messages; defaults to :func:`describe_source`.

    Raises:
        ImageError: the photo is missing, unreadable, not an image, too small or too large.
    """
    name = name or describe_source(source)
    image = _open(source, name)
    try:
        image = ImageOps.exif_transpose(image)
    except (OSError, ValueError, SyntaxError, KeyError, TypeError):
        pass  # a broken EXIF block only loses the orientation, the pixels are fine
    if image is None:  # pragma: no cover - exif_transpose(in_place=False) always returns an image
        raise _problem(name, "could not be rotated upright", "pick another photo")
    original = image.size
    if min(original) < MIN_SIDE:
        raise _problem(
            name,
            f"is only {original[0]}x{original[1]} pixels (at least {MIN_SIDE} per side needed)",
            "use a larger photo in which the face is clearly visible",
        )
    image = fit_max_side(to_rgb(image))
    if min(image.size) < MIN_SIDE:
        raise _problem(
            name,
            f"is {original[0]}x{original[1]} pixels, which becomes {image.size[0]}x{image.size[1]} after shrinking "
            f"to at most {MAX_SIDE} per side (at least {MIN_SIDE} per side needed)",
            "crop the photo to a less extreme aspect ratio",
        )
    if image is source:
        image = image.copy()  # never hand back (and let callers mutate) the caller's own object
    return image
