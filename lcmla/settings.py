"""The one settings object that flows from the UI (or CLI) to the engine.

``GenerationSettings`` is a frozen dataclass made of frozen groups: identity, guidance, attention,
lookahead, FreeU and output. Every field is validated when the object is built, so an engine never
sees a bad value; the error names the field (dotted path), the allowed range and the value given.

This module imports no torch: the UI builds settings without touching the engine's dependencies.
Settings round-trip through plain dicts and JSON (``to_dict``/``from_dict``), which is how they are
embedded in PNG files and restored by ``lcmla.settings_from_png``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from .errors import SettingsError

SETTINGS_VERSION = 1

DCG_VARIANTS = ("id-first", "text-first", "independent")
SCHEDULE_KINDS = ("list", "constant", "linear", "cosine")
AM_MODES = ("none", "am1", "am2")
AM_TARGETS = ("down", "mid", "up")
AM_NORM_SCOPES = ("sample", "image-branches")
REFERENCE_FRAMINGS = ("photo", "face")
#: diffusers scheduler classes a request may pick instead of its preset's (None: the preset's)
SCHEDULERS = ("DDIMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "LCMScheduler",
              "DPMSolverMultistepScheduler")


# --------------------------------------------------------------------------------------------
# validation helpers: each raises SettingsError naming the field and what is allowed


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_float(obj: Any, name: str, lo: float, hi: float) -> None:
    value = getattr(obj, name)
    path = f"{obj._prefix}{name}"
    if not _is_number(value):
        raise SettingsError(f"{path} must be a number in [{lo}, {hi}] (got {value!r} of type {type(value).__name__})")
    if not math.isfinite(value) or not lo <= value <= hi:
        raise SettingsError(f"{path} must be a finite number in [{lo}, {hi}] (got {value!r})")
    object.__setattr__(obj, name, float(value))


def _nearest_multiples(value: int, multiple_of: int, lo: int, hi: int) -> str:
    """The multiples of ``multiple_of`` within [lo, hi] on either side of ``value``: '64 or 72'."""
    below = value // multiple_of * multiple_of
    found = [m for m in (below, below + multiple_of) if lo <= m <= hi]
    return " or ".join(map(str, found)) or str(multiple_of)


def _check_int(obj: Any, name: str, lo: int, hi: int, *, optional: bool = False, multiple_of: int = 1) -> None:
    value = getattr(obj, name)
    path = f"{obj._prefix}{name}"
    if value is None and optional:
        return
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        allowed = f"an integer in [{lo}, {hi}]" + (" or None (preset default)" if optional else "")
        raise SettingsError(f"{path} must be {allowed} (got {value!r} of type {type(value).__name__})")
    if not lo <= value <= hi:
        raise SettingsError(f"{path} must be in [{lo}, {hi}] (got {value})")
    if value % multiple_of:
        raise SettingsError(f"{path} must be a multiple of {multiple_of} (got {value}; try {_nearest_multiples(value, multiple_of, lo, hi)})")
    object.__setattr__(obj, name, value)


def _check_bool(obj: Any, name: str) -> None:
    value = getattr(obj, name)
    if not isinstance(value, bool):
        raise SettingsError(f"{obj._prefix}{name} must be true or false (got {value!r})")


def _check_choice(obj: Any, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(obj, name)
    if value not in choices:
        raise SettingsError(f"{obj._prefix}{name} must be one of {', '.join(choices)} (got {value!r})")


def _check_str(obj: Any, name: str, max_len: int = 2000) -> None:
    value = getattr(obj, name)
    if not isinstance(value, str):
        raise SettingsError(f"{obj._prefix}{name} must be text (got {value!r} of type {type(value).__name__})")
    if len(value) > max_len:
        raise SettingsError(f"{obj._prefix}{name} is {len(value)} characters long; at most {max_len} are allowed")


def _check_float_list(obj: Any, name: str, lo: float, hi: float, *, min_len: int = 1, max_len: int = 1000) -> None:
    value = getattr(obj, name)
    path = f"{obj._prefix}{name}"
    if _is_number(value):
        value = (value,)
    if isinstance(value, str) or not hasattr(value, "__iter__"):
        raise SettingsError(f"{path} must be a list of numbers in [{lo}, {hi}] (got {value!r})")
    value = tuple(value)
    if not min_len <= len(value) <= max_len:
        raise SettingsError(f"{path} must hold between {min_len} and {max_len} values (got {len(value)})")
    for i, item in enumerate(value):
        if not _is_number(item) or not math.isfinite(item) or not lo <= item <= hi:
            raise SettingsError(f"{path}[{i}] must be a finite number in [{lo}, {hi}] (got {item!r})")
    object.__setattr__(obj, name, tuple(float(v) for v in value))


def _check_int_list(obj: Any, name: str, lo: int, hi: int, *, optional: bool = False) -> None:
    value = getattr(obj, name)
    path = f"{obj._prefix}{name}"
    if value is None and optional:
        return
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    if isinstance(value, str) or not hasattr(value, "__iter__"):
        raise SettingsError(f"{path} must be a list of integers in [{lo}, {hi}] (got {value!r})")
    value = tuple(value)
    for i, item in enumerate(value):
        if not isinstance(item, int) or isinstance(item, bool) or not lo <= item <= hi:
            raise SettingsError(f"{path}[{i}] must be an integer in [{lo}, {hi}] (got {item!r})")
    if len(set(value)) != len(value):
        raise SettingsError(f"{path} must not repeat a value (got {list(value)})")
    object.__setattr__(obj, name, tuple(sorted(value)))


class _Group:
    """Mixin: the dotted prefix used in error messages."""

    _prefix = ""


# --------------------------------------------------------------------------------------------
# groups


@dataclass(frozen=True)
class IdentitySettings(_Group):
    """FaceID-Plus-v2 conditioning (SPEC §1)."""

    ip_adapter_scale: float = 0.8  # λ of the decoupled cross-attention, FastFace Eq. 3
    lora_scale: float = 1.0  # scale of the FaceID LoRA adapter
    shortcut: bool = True  # FaceID-Plus-v2 "shortcut" mode
    shortcut_scale: float = 1.0  # weight of the CLIP branch in shortcut mode
    face_index: int | None = None  # which detected face to use; None = the largest

    _prefix = "identity."

    def __post_init__(self) -> None:
        _check_float(self, "ip_adapter_scale", 0.0, 2.0)
        _check_float(self, "lora_scale", 0.0, 2.0)
        _check_bool(self, "shortcut")
        _check_float(self, "shortcut_scale", 0.0, 4.0)
        _check_int(self, "face_index", 0, 63, optional=True)


@dataclass(frozen=True)
class GuidanceSettings(_Group):
    """Sampling and guidance: steps, classic CFG and FastFace's decoupled CFG (SPEC §2)."""

    steps: int | None = None  # None: the preset's default
    # a diffusers scheduler class (one of SCHEDULERS) built from the preset's noise schedule with
    # its timestep spacing; None: the preset's own scheduler
    scheduler: str | None = None
    guidance_scale: float | None = None  # classic CFG; None: the preset's default; 1 = no CFG
    dcg: bool = False  # decoupled classifier-free guidance instead of classic CFG
    dcg_variant: str = "id-first"
    dcg_schedule: str = "list"  # how a and b vary over the steps
    dcg_a: tuple[float, ...] = (1.0, 1.5, 1.5, 1.0)
    dcg_b: tuple[float, ...] = (1.0, 3.0, 3.0, 1.0)
    rescale_phi: float = 0.75  # FastFace Eq. 6; 0 disables the rescale
    # the scale of a backbone that is a LoRA kept as a named adapter (the LCM-LoRA of the
    # sdxl-lcm-lora preset); presets whose backbone is fused or a full UNet ignore it
    backbone_lora_scale: float = 1.0

    _prefix = "guidance."

    def __post_init__(self) -> None:
        _check_int(self, "steps", 1, 200, optional=True)
        if self.scheduler is not None:
            _check_choice(self, "scheduler", SCHEDULERS)
        if self.guidance_scale is not None:
            _check_float(self, "guidance_scale", 0.0, 30.0)
        _check_bool(self, "dcg")
        _check_choice(self, "dcg_variant", DCG_VARIANTS)
        _check_choice(self, "dcg_schedule", SCHEDULE_KINDS)
        _check_float_list(self, "dcg_a", 0.0, 30.0)
        _check_float_list(self, "dcg_b", 0.0, 30.0)
        if self.dcg_schedule in ("constant",) and (len(self.dcg_a) != 1 or len(self.dcg_b) != 1):
            raise SettingsError("guidance.dcg_a and guidance.dcg_b must hold one value each for a constant schedule")
        if self.dcg_schedule in ("linear", "cosine") and (len(self.dcg_a) != 2 or len(self.dcg_b) != 2):
            raise SettingsError(
                f"guidance.dcg_a and guidance.dcg_b must hold two values (start, end) for a {self.dcg_schedule} schedule"
            )
        _check_float(self, "rescale_phi", 0.0, 1.0)
        _check_float(self, "backbone_lora_scale", 0.0, 2.0)


@dataclass(frozen=True)
class AttentionSettings(_Group):
    """FastFace attention manipulation in the identity branch (SPEC §3) and map capture."""

    mode: str = "none"  # none | am1 | am2
    targets: tuple[str, ...] = ("down", "up")
    tokens: tuple[int, ...] = (0, 1, 2, 3)  # identity tokens the transform touches
    steps: tuple[int, ...] | None = None  # step indices; None = every step
    am1_power: float = 1.3
    am1_scale_down: float = 1.55  # also in the mid block when "mid" is a target (the authors leave mid untouched)
    am1_scale_up: float = 1.45
    am2_sharpness: tuple[float, ...] = (7.5, 5.0, 5.0, 5.0)
    am2_scale: tuple[float, ...] = (1.0, 1.55, 1.55, 1.55)
    am2_quantile: float = 0.65
    am2_adain: bool = True  # AM2's AdaIN blend (Eq. 10) on the probabilities and the branch output
    adain_weight: float = 0.7
    cap: float = 10.0
    # where AM2's min–max normalisation takes its statistics: "sample" (each image and guidance
    # branch on its own; batch-invariant, the default) or "image-branches" (pooled over the
    # guidance branches of the same image, with the authors' three DCG branches at every step:
    # reproduces the FastFace authors' code exactly; SPEC §3)
    am_norm_scope: str = "sample"
    capture_maps: bool = False  # record identity-attention maps for display

    _prefix = "attention."

    def __post_init__(self) -> None:
        _check_choice(self, "mode", AM_MODES)
        targets = self.targets
        if isinstance(targets, str):
            targets = (targets,)
        if not isinstance(targets, (tuple, list)) or any(t not in AM_TARGETS for t in targets) or len(set(targets)) != len(targets):
            raise SettingsError(f"attention.targets must be distinct values among {', '.join(AM_TARGETS)} (got {self.targets!r})")
        object.__setattr__(self, "targets", tuple(t for t in AM_TARGETS if t in targets))
        _check_int_list(self, "tokens", 0, 63)
        _check_int_list(self, "steps", 0, 199, optional=True)
        _check_float(self, "am1_power", 0.1, 5.0)
        _check_float(self, "am1_scale_down", 0.0, 10.0)
        _check_float(self, "am1_scale_up", 0.0, 10.0)
        _check_float_list(self, "am2_sharpness", 0.0, 100.0)
        _check_float_list(self, "am2_scale", 0.0, 10.0)
        _check_float(self, "am2_quantile", 0.0, 1.0)
        _check_bool(self, "am2_adain")
        _check_float(self, "adain_weight", 0.0, 1.0)
        _check_choice(self, "am_norm_scope", AM_NORM_SCOPES)
        _check_float(self, "cap", 0.1, 1000.0)
        _check_bool(self, "capture_maps")


@dataclass(frozen=True)
class LookaheadSettings(_Group):
    """LCM-Lookahead inference: KV path with 3-way guidance and the LCM-LoRA scale (SPEC §4)."""

    kv: bool = False
    s_nokv: float = 3.0
    s_full: float = 2.0
    s_kv: float = 2.0
    kv_prompt: str = "a photo of a face"
    # the KV encoder's reference image: "photo" = the whole reference photo fitted to the output size
    # (the authors' released inference), "face" = a crop of twice the face box; both keep the aspect
    # ratio and pad with the photo's own border
    reference_framing: str = "photo"
    kv_lora_scale: float = 1.0  # the KV-encoder LoRA (and the authors' KV-copy LoRA) scale
    lcm_lora_scale: float = 1.0  # the LCM-LoRA scale of the one-step previews (LCM-Lookahead Eq. 3)

    _prefix = "lookahead."

    def __post_init__(self) -> None:
        _check_bool(self, "kv")
        _check_float(self, "s_nokv", 0.0, 30.0)
        _check_float(self, "s_full", 0.0, 30.0)
        _check_float(self, "s_kv", 0.0, 30.0)
        _check_str(self, "kv_prompt", 500)
        _check_choice(self, "reference_framing", REFERENCE_FRAMINGS)
        _check_float(self, "kv_lora_scale", 0.0, 2.0)
        _check_float(self, "lcm_lora_scale", 0.0, 1.0)


@dataclass(frozen=True)
class FreeUSettings(_Group):
    """FreeU backbone/skip re-weighting (Si et al.), defaults of LCM-Lookahead's inference."""

    enabled: bool = False
    b1: float = 1.1
    b2: float = 1.1
    s1: float = 0.9
    s2: float = 0.2

    _prefix = "freeu."

    def __post_init__(self) -> None:
        _check_bool(self, "enabled")
        for name in ("b1", "b2", "s1", "s2"):
            _check_float(self, name, 0.0, 3.0)


@dataclass(frozen=True)
class OutputSettings(_Group):
    """What comes out: size, count and the seed of the first image."""

    width: int | None = None  # None: the preset's default resolution
    height: int | None = None
    num_images: int = 1
    seed: int = 0  # image i uses seed + i

    _prefix = "output."

    def __post_init__(self) -> None:
        _check_int(self, "width", 64, 2048, optional=True, multiple_of=8)
        _check_int(self, "height", 64, 2048, optional=True, multiple_of=8)
        _check_int(self, "num_images", 1, 16)
        _check_int(self, "seed", 0, 2**63 - 1)
        last = int(self.seed) + int(self.num_images) - 1  # image i uses seed + i: every one must be a valid seed
        if last > 2**63 - 1:
            raise SettingsError(f"output.seed {int(self.seed)} with {int(self.num_images)} images: image i uses seed + i, "
                                f"and the last would be {last}, above 2**63 - 1; use a seed of at most "
                                f"{2**63 - int(self.num_images)}")


_GROUPS: dict[str, type] = {
    "identity": IdentitySettings,
    "guidance": GuidanceSettings,
    "attention": AttentionSettings,
    "lookahead": LookaheadSettings,
    "freeu": FreeUSettings,
    "output": OutputSettings,
}


@dataclass(frozen=True)
class GenerationSettings(_Group):
    """Everything one request asks for. Frozen and validated; change it with ``.replace``."""

    prompt: str = "a photo of a face"
    negative_prompt: str = ""
    preset: str = "tiny"
    identity: IdentitySettings = field(default_factory=IdentitySettings)
    guidance: GuidanceSettings = field(default_factory=GuidanceSettings)
    attention: AttentionSettings = field(default_factory=AttentionSettings)
    lookahead: LookaheadSettings = field(default_factory=LookaheadSettings)
    freeu: FreeUSettings = field(default_factory=FreeUSettings)
    output: OutputSettings = field(default_factory=OutputSettings)

    def __post_init__(self) -> None:
        _check_str(self, "prompt")
        if not self.prompt.strip():
            raise SettingsError("prompt must not be empty: describe the picture, e.g. 'a pencil drawing of a face'")
        _check_str(self, "negative_prompt")
        _check_str(self, "preset", 100)
        for name, cls in _GROUPS.items():
            value = getattr(self, name)
            if isinstance(value, Mapping):
                object.__setattr__(self, name, _group_from_dict(cls, value, name))
            elif not isinstance(value, cls):
                raise SettingsError(f"{name} must be a {cls.__name__} (got {type(value).__name__})")
        if self.guidance.dcg and self.lookahead.kv:
            raise SettingsError(
                "guidance.dcg and lookahead.kv cannot both be on: DCG and the LCM-Lookahead KV guidance are two "
                "different ways to combine branches; switch one of them off"
            )
        if self.attention.am_norm_scope == "image-branches" and self.lookahead.kv:
            raise SettingsError(
                "attention.am_norm_scope=image-branches reproduces the FastFace authors' three-branch batch and "
                "cannot be combined with lookahead.kv; set attention.am_norm_scope=sample or switch lookahead.kv off"
            )

    # ---- convenience -----------------------------------------------------------------------

    def replace(self, **changes: Any) -> "GenerationSettings":
        """A copy with some fields changed. Group fields take dotted names: ``identity__lora_scale``
        or ``{"identity.lora_scale": 0.5}`` through ``replace_dotted``."""
        top: dict[str, Any] = {}
        nested: dict[str, dict[str, Any]] = {}
        for key, value in changes.items():
            if "__" in key:
                group, name = key.split("__", 1)
                nested.setdefault(group, {})[name] = value
            else:
                top[key] = value
        return self.replace_dotted({**top, **{f"{g}.{n}": v for g, d in nested.items() for n, v in d.items()}})

    def replace_dotted(self, changes: Mapping[str, Any]) -> "GenerationSettings":
        """A copy with fields changed by dotted name (``"guidance.steps": 8``)."""
        data = self.to_dict()
        data.pop("version", None)
        for key, value in changes.items():
            parts = key.split(".")
            if len(parts) == 1:
                if parts[0] not in data:
                    raise SettingsError(f"unknown setting {key!r}; known: {', '.join(sorted(data))}")
                data[parts[0]] = value
            elif len(parts) == 2 and parts[0] in _GROUPS:
                if parts[1] not in data[parts[0]]:
                    raise SettingsError(f"unknown setting {key!r}; known in {parts[0]}: {', '.join(data[parts[0]])}")
                data[parts[0]][parts[1]] = value
            else:
                raise SettingsError(f"unknown setting {key!r}")
        return GenerationSettings.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-ready dict (tuples become lists), with the schema version."""
        out: dict[str, Any] = {"version": SETTINGS_VERSION}
        for f in fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                out[f.name] = {g.name: _plain(getattr(value, g.name)) for g in fields(value)}
            else:
                out[f.name] = _plain(value)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "GenerationSettings":
        """Build from a dict made by ``to_dict`` (or by hand); unknown keys are an error."""
        if not isinstance(data, Mapping):
            raise SettingsError(f"settings must be a mapping (got {type(data).__name__})")
        data = dict(data)
        version = data.pop("version", SETTINGS_VERSION)
        if version != SETTINGS_VERSION:
            raise SettingsError(f"settings version {version!r} is not supported (this lcmla reads version {SETTINGS_VERSION})")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SettingsError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "GenerationSettings":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SettingsError(f"settings are not valid JSON: {exc}") from None
        return cls.from_dict(data)


def _group_from_dict(cls: type, data: Mapping[str, Any], name: str) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise SettingsError(f"unknown setting(s) {', '.join(name + '.' + u for u in unknown)}; known in {name}: {', '.join(sorted(known))}")
    return cls(**data)  # each group's checks turn lists into tuples


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def check_preview_steps(wanted: "set[int] | None", num_steps: int) -> None:
    """Refuse preview step indices outside the run's steps (0 … num_steps − 1), naming them."""
    if wanted is None:
        return
    if not wanted:
        raise SettingsError(f"no steps to preview were given; name step indices 0–{num_steps - 1} "
                            f"(e.g. '0, {num_steps - 1}') or leave it empty for every step")
    outside = sorted(k for k in wanted if not 0 <= k < num_steps)
    if outside:
        raise SettingsError(
            f"steps to preview {', '.join(map(str, outside))} {'is' if len(outside) == 1 else 'are'} outside this "
            f"run's {num_steps} steps: step indices count from 0, so choose among 0–{num_steps - 1} "
            f"(e.g. '0, {num_steps - 1}'), or run more steps"
        )
