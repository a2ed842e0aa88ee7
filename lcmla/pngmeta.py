"""PNG files that remember how they were made.

Each image is written with PNG text chunks:
    lcmla:settings   the full settings JSON that reproduces this image (its own seed, one image)
    lcmla:version    the lcmla package version
    lcmla:preset     the preset name
    parameters       a one-paragraph human-readable summary (what other tools show)
``settings_from_png`` reads them back.
"""

from __future__ import annotations

from pathlib import Path

from .errors import ImageError, SettingsError
from .settings import GenerationSettings

KEY_SETTINGS = "lcmla:settings"
KEY_VERSION = "lcmla:version"
KEY_PRESET = "lcmla:preset"
KEY_SUMMARY = "parameters"


def summary(settings: GenerationSettings) -> str:
    """A short human-readable line for image viewers. A field left open (None) shows the number
    its preset fills in, marked "(default)"; for a preset this lcmla version does not know, "default"."""
    from .presets import PRESETS, resolve_settings

    g, i, o = settings.guidance, settings.identity, settings.output
    known = PRESETS.get(settings.preset)
    filled = resolve_settings(settings, known) if known is not None else settings

    def shown(value, resolved):  # noqa: ANN001
        if value is not None:
            return value
        return "default" if resolved is None else f"{resolved} (default)"

    fg, fo = filled.guidance, filled.output
    if o.width is not None and o.height is not None:
        size = f"{o.width}x{o.height}"
    else:
        size = "default" if known is None else f"{fo.width}x{fo.height} (default)"
    parts = [
        settings.prompt,
        f"Negative prompt: {settings.negative_prompt}" if settings.negative_prompt else "",
        f"Preset: {settings.preset}, Steps: {shown(g.steps, fg.steps)}, "
        f"CFG: {shown(g.guidance_scale, fg.guidance_scale)}, Seed: {o.seed}, "
        f"Size: {size}, IP-Adapter scale: {i.ip_adapter_scale}, FaceID LoRA: {i.lora_scale}",
    ]
    return "\n".join(p for p in parts if p)


def save_png(image, path: str | Path, settings: GenerationSettings, *, random_weights: bool = False) -> Path:
    """Save ``image`` (PIL) as PNG with ``settings`` embedded."""
    from PIL import PngImagePlugin

    from . import __version__

    info = PngImagePlugin.PngInfo()
    info.add_itxt(KEY_SETTINGS, settings.to_json())
    info.add_text(KEY_VERSION, __version__)
    info.add_text(KEY_PRESET, settings.preset)
    text = summary(settings)
    if random_weights:
        text += "\n(made by the tiny preset: random weights, not a real model)"
    info.add_itxt(KEY_SUMMARY, text)
    path = Path(path)
    image.save(path, format="PNG", pnginfo=info)
    return path


def read_png_text(path_or_image, name: str | None = None) -> dict[str, str]:
    """All text chunks of a PNG (path, bytes or PIL image; messages call the file ``name``, by
    default its path)."""
    from PIL import Image, UnidentifiedImageError

    if hasattr(path_or_image, "text") or hasattr(path_or_image, "info"):
        img = path_or_image
        return dict(getattr(img, "text", None) or img.info)
    shown = str(name or path_or_image)
    fix = "pass a PNG that lcmla saved"
    if isinstance(path_or_image, (str, Path)) and Path(path_or_image).is_dir():
        raise ImageError(f"settings file {shown!r} is a folder, not a file; {fix}")
    try:
        with Image.open(path_or_image) as img:
            img.load()
            return {k: v for k, v in (getattr(img, "text", None) or img.info).items() if isinstance(v, str)}
    except FileNotFoundError:
        raise ImageError(f"settings file {shown!r} does not exist") from None
    except UnidentifiedImageError:
        raise ImageError(f"{shown!r} is not an image at all (empty, or another kind of file); {fix}") from None
    except OSError as exc:
        why = str(exc).replace(repr(str(path_or_image)), "it").replace(str(path_or_image), "it")  # PIL names the path
        raise ImageError(f"{shown!r} is not a PNG image lcmla can read ({why}); {fix}") from None


def settings_from_png(path_or_image, name: str | None = None) -> GenerationSettings:
    """The settings that reproduce a PNG made by lcmla (raises ``SettingsError`` for other PNGs;
    its message calls the file ``name``, by default its path)."""
    text = read_png_text(path_or_image, name)
    if name is None:
        name = str(path_or_image) if isinstance(path_or_image, (str, Path)) else "this image"
    if KEY_SETTINGS not in text:
        raise SettingsError(
            f"{name!r} holds no lcmla settings (it was not saved by lcmla, or its metadata was stripped); "
            "use a PNG downloaded from lcmla as it was written"
        )
    try:
        return GenerationSettings.from_json(text[KEY_SETTINGS])
    except SettingsError as exc:  # settings of another lcmla version, or edited by hand
        raise SettingsError(f"the settings in {name!r} cannot be used: {exc}") from None
