"""The preset registry: every backbone the engine can run, in one place (SPEC §1).

A preset names the repositories and files it needs, the scheduler and its options, the default
step count, resolution and guidance scale, and the face backend. Nothing here imports torch or
touches the disk; ``lcmla.weights`` resolves the files and ``lcmla.loading`` builds the pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from .errors import SettingsError

if TYPE_CHECKING:
    from .settings import GenerationSettings

# ---- repositories and the files each one must provide ---------------------------------------

SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
SDXL_TURBO = "stabilityai/sdxl-turbo"
FACEID_REPO = "h94/IP-Adapter-FaceID"
FACEID_WEIGHTS = "ip-adapter-faceid-plusv2_sdxl.bin"
FACEID_LORA = "ip-adapter-faceid-plusv2_sdxl_lora.safetensors"
CLIP_VISION_REPO = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
HYPER_REPO = "ByteDance/Hyper-SD"
LIGHTNING_REPO = "ByteDance/SDXL-Lightning"
LCM_LORA_REPO = "latent-consistency/lcm-lora-sdxl"
TAESDXL_REPO = "madebyollin/taesdxl"
VAE_FP16_FIX_REPO = "madebyollin/sdxl-vae-fp16-fix"  # optional: SDXL's VAE fine-tuned to run in float16

_TOKENIZER_FILES = ("merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json")


def sdxl_pipeline_files(variant: str | None) -> tuple[str, ...]:
    """The files of a diffusers SDXL pipeline folder, for a weight variant ("fp16") or None."""
    dot = f".{variant}" if variant else ""
    files = ["model_index.json", "scheduler/scheduler_config.json"]
    for sub, weight in (
        ("text_encoder", f"model{dot}.safetensors"),
        ("text_encoder_2", f"model{dot}.safetensors"),
        ("unet", f"diffusion_pytorch_model{dot}.safetensors"),
        ("vae", f"diffusion_pytorch_model{dot}.safetensors"),
    ):
        files += [f"{sub}/config.json", f"{sub}/{weight}"]
    for sub in ("tokenizer", "tokenizer_2"):
        files += [f"{sub}/{name}" for name in _TOKENIZER_FILES]
    return tuple(files)


CLIP_VISION_FILES = ("config.json", "model.safetensors")
TAESD_FILES = ("config.json", "diffusion_pytorch_model.safetensors")


@dataclass(frozen=True)
class Preset:
    """One backbone configuration. ``files`` maps a role to (repo, files in that repo)."""

    name: str
    title: str
    base_repo: str
    scheduler: str  # diffusers scheduler class name
    scheduler_kwargs: tuple[tuple[str, object], ...]
    steps: int
    width: int
    height: int
    guidance_scale: float
    face_backend: str = "insightface"  # the default face backend: insightface (buffalo_l) | haar (offline stand-in)
    unet_repo: str | None = None  # a replacement UNet (SDXL-Lightning)
    unet_file: str | None = None
    fuse_lora: tuple[str, str, float] | None = None  # (repo, file, scale) fused once at load
    lcm_lora: tuple[str, str] | None = None  # kept as a named, scalable adapter
    random_weights: bool = False  # True only for the offline tiny preset
    notes: str = ""  # one line shown by `python -m lcmla presets` and the app

    def scheduler_options(self) -> dict[str, object]:
        return dict(self.scheduler_kwargs)

    def required_files(self, variant: str | None) -> dict[str, tuple[str, tuple[str, ...]]]:
        """role -> (repo, files). ``variant`` is the weight variant of the SDXL folders."""
        base_files = list(sdxl_pipeline_files(variant))
        if self.unet_repo:  # a replacement UNet: the base folder's own UNet weights are not read
            base_files = [f for f in base_files if not f.startswith("unet/diffusion_pytorch_model")]
        out: dict[str, tuple[str, tuple[str, ...]]] = {
            "base": (self.base_repo, tuple(base_files)),
            "faceid": (FACEID_REPO, (FACEID_WEIGHTS, FACEID_LORA)),
            "image_encoder": (CLIP_VISION_REPO, CLIP_VISION_FILES),
        }
        if self.unet_repo and self.unet_file:
            out["unet"] = (self.unet_repo, (self.unet_file,))
        if self.fuse_lora:
            out["fused_lora"] = (self.fuse_lora[0], (self.fuse_lora[1],))
        if self.lcm_lora:
            out["lcm_lora"] = (self.lcm_lora[0], (self.lcm_lora[1],))
        return out


_TRAILING = (("timestep_spacing", "trailing"),)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="tiny",
            title="Tiny (offline, random weights)",
            base_repo="lcmla/tiny-sdxl",
            scheduler="DDIMScheduler",
            scheduler_kwargs=_TRAILING,
            steps=4,
            width=256,
            height=256,
            guidance_scale=1.0,
            face_backend="haar",
            random_weights=True,
            notes="A seeded SDXL-architecture pipeline with random weights, built on this machine: "
            "it exercises the whole product offline, but its images are noise-like patterns, not photos.",
        ),
        Preset(
            name="hyper-sdxl-4step",
            title="Hyper-SD SDXL, 4 steps (DDIM trailing)",
            base_repo=SDXL_BASE,
            scheduler="DDIMScheduler",
            scheduler_kwargs=_TRAILING,
            steps=4,
            width=1024,
            height=1024,
            guidance_scale=1.0,
            fuse_lora=(HYPER_REPO, "Hyper-SDXL-4steps-lora.safetensors", 1.0),
        ),
        Preset(
            name="sdxl-lightning-4step",
            title="SDXL-Lightning, 4 steps (Euler trailing)",
            base_repo=SDXL_BASE,
            scheduler="EulerDiscreteScheduler",
            scheduler_kwargs=_TRAILING,
            steps=4,
            width=1024,
            height=1024,
            guidance_scale=1.0,
            unet_repo=LIGHTNING_REPO,
            unet_file="sdxl_lightning_4step_unet.safetensors",
        ),
        Preset(
            name="sdxl-lcm-lora",
            title="SDXL + LCM-LoRA, 4 steps (LCM scheduler)",
            base_repo=SDXL_BASE,
            scheduler="LCMScheduler",
            scheduler_kwargs=_TRAILING,
            steps=4,
            width=1024,
            height=1024,
            guidance_scale=1.0,
            lcm_lora=(LCM_LORA_REPO, "pytorch_lora_weights.safetensors"),
        ),
        Preset(
            name="sdxl-turbo",
            title="SDXL-Turbo, 4 steps (Euler ancestral, 512²)",
            base_repo=SDXL_TURBO,
            scheduler="EulerAncestralDiscreteScheduler",
            scheduler_kwargs=_TRAILING,
            steps=4,
            width=512,
            height=512,
            guidance_scale=1.0,
        ),
        Preset(
            name="sdxl-base",
            title="SDXL base, 30 steps (Euler)",
            base_repo=SDXL_BASE,
            scheduler="EulerDiscreteScheduler",
            scheduler_kwargs=(),
            steps=30,
            width=1024,
            height=1024,
            guidance_scale=5.0,
        ),
    )
}

DEFAULT_PRESET = "tiny"


def get_preset(name: str) -> Preset:
    """The preset called ``name``; a clear error listing the choices otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise SettingsError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None


def resolve_settings(settings: "GenerationSettings", preset: Preset) -> "GenerationSettings":
    """Fill the preset's defaults into the fields the user left open (None)."""
    g, o = settings.guidance, settings.output
    changes: dict[str, Any] = {}
    if settings.preset != preset.name:
        changes["preset"] = preset.name
    if g.steps is None:
        changes["guidance.steps"] = preset.steps
    if g.guidance_scale is None:
        changes["guidance.guidance_scale"] = preset.guidance_scale
    if o.width is None:
        changes["output.width"] = preset.width
    if o.height is None:
        changes["output.height"] = preset.height
    return settings.replace_dotted(changes) if changes else settings


RANDOM_ARCHITECTURES = ("tiny", "full")


def random_weights_preset(preset: Preset, arch: str) -> Preset:
    """``preset``'s scheduler, steps, size and guidance over a random-weights build of the ``arch``
    architecture ("full": SDXL's real sizes; "tiny"): for speed and memory figures, never a real
    model (``random_weights`` is set, so every image and page says so). A replacement or fused
    UNet is not built (it would only change weight values), the LCM-LoRA kept; faces: the OpenCV
    stand-in."""
    if arch not in RANDOM_ARCHITECTURES:
        raise SettingsError(f"random weights: architecture must be one of {', '.join(RANDOM_ARCHITECTURES)} (got {arch!r})")
    if preset.random_weights and arch == "tiny":
        return preset
    return replace(
        preset,
        title=f"{preset.title} — RANDOM WEIGHTS ({arch} architecture)",
        unet_repo=None,
        unet_file=None,
        fuse_lora=None,
        face_backend="haar",
        random_weights=True,
        notes=f"{preset.name}'s scheduler, steps and size on SDXL's {arch} architecture with random weights built on "
        "this machine: for speed and memory measurements; its images are patterns, not photos.",
    )
