"""Build the pipeline of a preset from local files: the one loading path for every preset.

Real presets and the offline ``tiny`` preset go through exactly the same calls
(``StableDiffusionXLPipeline.from_pretrained``, ``load_ip_adapter``, ``load_lora_weights``...);
only the folders differ. Nothing is downloaded: every call passes ``local_files_only=True`` and
``paths`` must already point at complete local folders (``lcmla.weights`` resolves them, and
``lcmla.tiny.tiny_paths`` for the tiny preset).

Safety: the FaceID checkpoint is a pickle (``.bin``). It is read here with
``torch.load(..., weights_only=True)`` (tensors and plain containers only; anything else is refused
before any code from the file can run) and handed to ``load_ip_adapter`` as a state dict.
(diffusers 0.42's own ``.bin`` reader also passes ``weights_only=True``; reading it here keeps that
guarantee independent of the diffusers version and lets us drop the in-file LoRA, see below.)

The FaceID LoRA: h94's ``ip-adapter-faceid-plusv2_sdxl.bin`` carries the FaceID LoRA inside its
``ip_adapter`` dict (``{id}.to_q_lora.down.weight`` ...), and diffusers' ``load_ip_adapter`` turns
those keys into a peft adapter "faceid_0" fixed at weight 1.0. The same LoRA ships separately as
``ip-adapter-faceid-plusv2_sdxl_lora.safetensors``, which we load as the named, scalable adapter
"faceid" (``lora_scale``). Loading both would apply the LoRA twice, so the in-file LoRA keys are
dropped before ``load_ip_adapter``; only ``to_k_ip`` / ``to_v_ip`` and the image projection remain.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import MissingWeightsError
from .presets import FACEID_LORA, FACEID_WEIGHTS, Preset

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from diffusers import AutoencoderTiny, StableDiffusionXLPipeline
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

__all__ = [
    "Components",
    "FACEID_ADAPTER",
    "LCM_ADAPTER",
    "CLIP_MEAN",
    "CLIP_STD",
    "load_components",
    "ADAPTER_KINDS",
    "adapter_kind",
    "load_adapter_state_dict",
    "load_faceid_state_dict",
    "load_image_encoder",
    "make_clip_processor",
]

FACEID_ADAPTER = "faceid"
LCM_ADAPTER = "lcm"
FUSED_ADAPTER = "fused"
DEFAULT_LCM_LORA_FILE = "pytorch_lora_weights.safetensors"

# OpenAI CLIP's normalisation (the laion ViT-H/14 uses the same statistics).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_SIZE = 224


@dataclass
class Components:
    """Everything a generation needs, loaded, on one device, in eval mode, without gradients."""

    pipe: "StableDiffusionXLPipeline"  # IP-Adapter loaded; FaceID LoRA as adapter "faceid" (+ "lcm")
    image_encoder: "CLIPVisionModelWithProjection"
    clip_processor: "CLIPImageProcessor"  # 224 px, CLIP mean/std, built in code
    taesd: "AutoencoderTiny | None"
    adapter_kind: str = "faceid-plus-v2"  # one of ADAPTER_KINDS
    paths: dict = None  # role → the local folder it was loaded from (evaluation reads CLIP's text tower there)


def make_clip_processor() -> "CLIPImageProcessor":
    """CLIP's image preprocessing (resize shortest edge to 224, center crop, CLIP mean/std)."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": CLIP_SIZE},
        resample=3,  # bicubic
        do_center_crop=True,
        crop_size={"height": CLIP_SIZE, "width": CLIP_SIZE},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        do_convert_rgb=True,
    )


# Messages diffusers / peft emit on every load of this exact setup, all expected and harmless:
# the FaceID and LCM LoRAs have no text-encoder keys; the CLIP image encoder is deliberately kept
# out of the pipeline (FaceID-Plus gets its CLIP features from us, not from ``ip_adapter_image``);
# a second peft adapter on the same UNet is what we want; load_ip_adapter's own ``unet.to(dtype)``
# reports an empty list of float32-only modules.
_BENIGN_LOG_PREFIXES = (
    "No LoRA keys associated to CLIPTextModel",
    "image_encoder is not loaded since `image_encoder_folder=None`",
    "There are modules in UNet2DConditionModel that should be kept in float32: [].",
    # the VAE's deliberate float32 upcast at load (no module of it is kept apart in float32)
    "There are modules in AutoencoderKL that should be kept in float32: [].",
)
_BENIGN_LOGGERS = (
    "diffusers.loaders.lora_base",
    "diffusers.loaders.peft",
    "diffusers.loaders.ip_adapter",
    "diffusers.models.modeling_utils",
)


class _DropPrefixes(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.prefixes)


@contextlib.contextmanager
def quiet_messages(logger_names: tuple[str, ...], prefixes: tuple[str, ...]) -> Iterator[None]:
    """Drop the log records of ``logger_names`` that start with one of ``prefixes`` while the block
    runs (for messages lcmla reports itself, in its own words); every other record still shows."""
    flt = _DropPrefixes(prefixes)
    loggers = [logging.getLogger(name) for name in logger_names]
    for logger in loggers:
        logger.addFilter(flt)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(flt)


# transformers 5 names its torchvision-backed image processors CLIPImageProcessor and so on and,
# without torchvision, falls back to the PIL ones (the processors of transformers 4, which lcmla
# uses) with a warning at diffusers' import that suggests installing torchvision: not needed here.
_TORCHVISION_NOTICE = _DropPrefixes(("`CLIPImageProcessor` requires torchvision (not installed)",
                                     "`SiglipImageProcessor` requires torchvision (not installed)"))


def quiet_torchvision_notice() -> None:
    """For lcmla's own entry points (CLI, app, trainer), called at their start, never at import:
    drop transformers' "requires torchvision" fallback warning, the one message it logs at every
    start that asks for a package lcmla does not need. Calling it again adds nothing (a logger holds
    a filter once)."""
    logging.getLogger("transformers.utils.import_utils").addFilter(_TORCHVISION_NOTICE)


def disable_progress_bars() -> None:
    """For entry points that print their own output (``generate --quiet``, the benchmarks' tables):
    turn off diffusers' and transformers' loading bars in this process."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def quiet_console() -> None:
    """For scripts whose printed tables are their output (the benchmarks): neither loading bars
    nor transformers' torchvision notice in between."""
    quiet_torchvision_notice()
    disable_progress_bars()


@contextlib.contextmanager
def _quiet_known_messages() -> Iterator[None]:
    """Silence only the known-benign load messages above; every other warning still shows."""
    with quiet_messages(_BENIGN_LOGGERS, _BENIGN_LOG_PREFIXES), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        yield


def _require(paths: dict[str, Path], role: str, files: tuple[str, ...]) -> Path:
    """The folder of ``role``, checking that ``files`` are in it (a clear error otherwise)."""
    if role not in paths:
        raise MissingWeightsError(f"no local folder given for the {role!r} weights", missing=[role])
    folder = Path(paths[role])
    missing = [str(folder / f) for f in files if not (folder / f).is_file()]
    if missing:
        raise MissingWeightsError(
            f"{len(missing)} model file(s) for {role!r} are missing, e.g. {missing[0]}; "
            "download the preset's weights first",
            missing=missing,
        )
    return folder


ADAPTER_KINDS = ("faceid-plus-v2", "plus")


def adapter_kind(state: dict[str, dict[str, Any]]) -> str:
    """The identity adapter a checkpoint holds, from its ``image_proj`` keys: FaceID-Plus(-v2)
    (an ID-embedding MLP plus a perceiver over CLIP features) or IP-Adapter Plus / Plus-Face
    (a resampler with learned latents over CLIP features; LCM-Lookahead's adapter)."""
    proj = state["image_proj"]
    if "proj.0.weight" in proj and any(k.startswith("perceiver_resampler.") for k in proj):
        return "faceid-plus-v2"
    if "latents" in proj and "proj_in.weight" in proj:
        return "plus"
    raise MissingWeightsError(
        "the IP-Adapter checkpoint is neither FaceID-Plus-v2 nor IP-Adapter Plus (image_proj keys "
        f"{sorted(proj)[:4]}…); lcmla runs those two kinds", missing=[])


#: The first bytes of files that are often passed where a checkpoint is wanted.
_SIGNATURES = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
               (b"RIFF", "a WebP image (or another RIFF file)"), (b"%PDF", "a PDF document"),
               (b"<!DOCTYPE html", "an HTML page (a download that saved a web page?)"), (b"<html", "an HTML page"),
               (b"version https://git-lfs", "a Git LFS pointer, not the file itself (run `git lfs pull`)"))


def file_kind(path: str | Path) -> str | None:
    """What a file that is no checkpoint is, by its first bytes ("a PNG image"), or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(32)
    except OSError:
        return None
    return next((kind for sig, kind in _SIGNATURES if head.startswith(sig)), None)


def unreadable_reason(exc: BaseException, path: str | Path | None = None) -> str:
    """Why the safe loader refused a checkpoint, in one line. torch's own text for a refused
    pickle suggests ``weights_only=False``, which would run the file's code: never repeat it.
    With ``path``, a file that is neither torch.save's zip archive nor a pickle (whose first byte is
    0x80 from protocol 2 on) is said to be so: the loader's own error for it is noise ("101",
    "pop from empty list")."""
    import pickle
    import zipfile

    if path is not None:
        try:
            with open(path, "rb") as f:
                head = f.read(1)
            if not head:
                return "the file is empty"
            if head != b"\x80" and not zipfile.is_zipfile(path):
                return "it is neither a torch.save zip archive nor a pickle"
        except OSError:
            pass
    if isinstance(exc, pickle.UnpicklingError):
        return "it holds Python objects besides tensors, or is not a checkpoint at all"
    return (str(exc).splitlines() or [type(exc).__name__])[0][:200]


def load_adapter_state_dict(path: str | Path, *, keep_lora: bool = False) -> dict[str, dict[str, Any]]:
    """Read an IP-Adapter checkpoint safely and check its layout.

    ``.bin``/``.pt``: read with ``torch.load(..., weights_only=True)`` (tensors and plain containers
    only; anything else is refused before any code from the file runs); ``.safetensors``: keys
    prefixed ``image_proj.`` / ``ip_adapter.`` (diffusers' convention). Returns
    ``{"image_proj": {...}, "ip_adapter": {...}}`` as ``load_ip_adapter`` accepts it. FaceID
    checkpoints carry their LoRA inside (``*_lora.*`` keys); it is dropped unless ``keep_lora``
    (see the module docstring). Raises ``MissingWeightsError`` for a file of another layout.
    """
    import torch

    from .errors import refuse_folder

    path = Path(path)
    refuse_folder(path, "the IP-Adapter checkpoint", (".safetensors", ".bin", ".pt"))
    if not path.is_file():
        raise MissingWeightsError(
            f"the IP-Adapter file {path} does not exist; check the path (a trained adapter is in the --output-dir of "
            "`python -m training train`; the LCM-Lookahead authors' one is written by `python -m lcmla "
            "convert-lookahead`), or leave --adapter out for the preset's own", missing=[str(path)])
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            try:
                flat = load_file(str(path))
            except Exception as exc:  # noqa: BLE001 - safetensors' SafetensorError is no OSError/ValueError
                raise ValueError(f"not a readable safetensors file ({exc})") from exc
            state: Any = {"image_proj": {}, "ip_adapter": {}}
            for key, value in flat.items():
                part, _, rest = key.partition(".")
                if part in state:
                    state[part][rest] = value
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure of the safe loader (a garbled pickle raises struct.error)
        kind = file_kind(path)
        if kind is not None:
            raise MissingWeightsError(f"{path} is {kind}, not an IP-Adapter checkpoint; pass the adapter's "
                                      ".safetensors or .bin file", missing=[str(path)]) from exc
        reason = unreadable_reason(exc, None if path.suffix == ".safetensors" else path)
        raise MissingWeightsError(
            f"{path} is not a plain tensor checkpoint (refused by the safe loader: {reason}); "
            "pass the adapter's file again: download it again if it came from a hub, or use the trainer's "
            "last saved checkpoint if you trained it",
            missing=[str(path)],
        ) from exc
    ok = (
        isinstance(state, dict)
        and isinstance(state.get("image_proj"), dict)
        and isinstance(state.get("ip_adapter"), dict)
        and bool(state["image_proj"]) and bool(state["ip_adapter"])
        and all(
            isinstance(v, torch.Tensor)
            for part in ("image_proj", "ip_adapter")
            for v in state[part].values()
        )
    )
    if not ok:
        fix = "pass an IP-Adapter file (the hub's ip-adapter-faceid-plusv2_sdxl.bin, or the trainer's .safetensors)"
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            from .kv_lora import FORMAT as KV_LORA_FORMAT

            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("format") == KV_LORA_FORMAT:
                    fix = "it is an lcmla KV-encoder LoRA: pass it with --kv-lora"
        raise MissingWeightsError(
            f"{path} does not hold an IP-Adapter checkpoint ({{'image_proj', 'ip_adapter'}} of tensors); {fix}",
            missing=[str(path)],
        )
    ip_adapter = state["ip_adapter"]
    if not keep_lora:
        ip_adapter = {k: v for k, v in ip_adapter.items() if "_lora." not in k}
    return {"image_proj": dict(state["image_proj"]), "ip_adapter": ip_adapter}


def load_faceid_state_dict(path: str | Path, *, keep_lora: bool = False) -> dict[str, dict[str, Any]]:
    """A FaceID-Plus-v2 checkpoint (see :func:`load_adapter_state_dict`); another kind is an error."""
    state = load_adapter_state_dict(path, keep_lora=keep_lora)
    if adapter_kind(state) != "faceid-plus-v2":
        raise MissingWeightsError(f"{path} is not a FaceID-Plus-v2 checkpoint", missing=[str(path)])
    return state


def check_state_shapes(
    shapes: dict[str, tuple[int, ...]],
    state: dict[str, Any],
    *,
    what: str,
    noun: str,
    fix: str,
    file: Path,
    against: str = "its config.json",
) -> None:
    """Raise a :class:`MissingWeightsError` unless ``state`` has exactly the tensors ``shapes`` names.

    ``shapes`` comes from a model built on the meta device from its config, ``state`` from the
    weights file (a caller that reads only the model's tensors has no unknown ones). The message
    gives the counts and one example, where a strict ``load_state_dict`` gives a wall of names.
    """
    missing = sorted(set(shapes) - set(state))
    wrong = sorted(k for k, v in state.items() if k in shapes and tuple(v.shape) != shapes[k])
    unknown = [k for k in state if k not in shapes]  # tensors the model has no place for
    if not (missing or wrong or unknown):
        return
    if missing:
        first = missing[0]
    elif wrong:
        first = f"{wrong[0]} is {list(state[wrong[0]].shape)}, not {list(shapes[wrong[0]])}"
    else:
        first = unknown[0]
    extra = f", {len(unknown)} the model has no place for" if unknown else ""
    raise MissingWeightsError(
        f"{what} does not match {against}: {len(missing)} {noun} missing and {len(wrong)} of another "
        f"shape{extra} (e.g. {first}); {fix}", missing=[str(file)])


def load_image_encoder(folder: str | Path, dtype: "torch.dtype | None" = None) -> "CLIPVisionModelWithProjection":
    """The CLIP vision tower with its projection, from a full CLIPModel repo or a vision-only one.

    laion's CLIP repos (``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``) hold a whole ``CLIPModel``
    whose config keeps the shared ``projection_dim`` at the top level only; the nested
    ``vision_config`` has the default 512, so ``CLIPVisionModelWithProjection.from_pretrained``
    builds a 512-wide ``visual_projection`` and stops on a size mismatch (transformers #25622).
    Here the vision config is read by transformers itself, the top-level ``projection_dim`` is
    applied, and only the vision tensors (``vision_model.*``, ``visual_projection.*``) are read from
    ``model.safetensors`` (the text tower is never loaded) into a model built on the meta device,
    strictly: a missing or mis-shaped tensor is an error.
    """
    import json

    import torch
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    folder = Path(folder)
    raw = json.loads((folder / "config.json").read_text())
    config = CLIPVisionConfig.from_pretrained(str(folder), local_files_only=True)
    if "vision_config" in raw and raw.get("projection_dim"):  # a whole CLIPModel (laion's layout)
        config.projection_dim = int(raw["projection_dim"])
    with init_empty_weights():
        model = CLIPVisionModelWithProjection(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    with safe_open(str(folder / "model.safetensors"), framework="pt", device="cpu") as f:
        state = {k: f.get_tensor(k) for k in f.keys() if k in shapes}
    check_state_shapes(shapes, state, what=f"the CLIP image encoder in {folder}", noun="vision tensor(s)",
                       fix="download the image encoder again", file=folder / "model.safetensors")
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(dtype=torch.float32 if dtype is None else dtype).eval()


def _load_replacement_unet(base: Path, unet_file: Path, dtype: "torch.dtype") -> Any:
    """A UNet built from the base folder's config with weights from a single safetensors file."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    config = UNet2DConditionModel.load_config(base / "unet", local_files_only=True)
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(config)
    state = load_file(str(unet_file))
    shapes = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    check_state_shapes(shapes, state, what=f"the UNet {unet_file}", noun="tensor(s)", file=unet_file,
                       against=str(base / "unet" / "config.json"),
                       fix="it must be a diffusers UNet state dict for this base model, not a single-file "
                           "checkpoint: download it again")
    unet.load_state_dict(state, strict=True, assign=True)
    return unet.to(dtype=dtype)


def load_components(
    preset: Preset,
    paths: dict[str, Path],
    *,
    device: str = "cpu",
    dtype: "torch.dtype | None" = None,
    variant: str | None = None,
    lcm_lora: bool | None = None,
    adapter: str | Path | None = None,
) -> Components:
    """Load the preset's pipeline, adapters and encoders from the local folders in ``paths``.

    ``adapter``: an IP-Adapter checkpoint to use instead of the preset's FaceID-Plus-v2 (a trained
    one from ``training/``, or an IP-Adapter Plus-Face one such as ``lcmla.convert`` writes from the
    LCM-Lookahead authors' checkpoint). A FaceID adapter keeps the FaceID LoRA: the sibling file
    ``<stem>_lora.safetensors`` when present, else the preset's.

    ``paths`` maps the roles of ``preset.required_files(variant)`` ("base", "faceid",
    "image_encoder", and "unet", "fused_lora", "lcm_lora" when the preset has them) and optionally
    "taesd" to local repo folders. ``lcm_lora``: None loads the LCM-LoRA as adapter "lcm" when the
    preset has one; True loads it from ``paths["lcm_lora"]`` for any preset (the LCM-Lookahead
    preview); False never loads it. All adapters end active at weight 1.0.
    """
    import torch

    dtype = torch.float32 if dtype is None else dtype
    with _quiet_known_messages():
        return _load(preset, paths, device=device, dtype=dtype, variant=variant, lcm_lora=lcm_lora, adapter=adapter)


def cross_attention_shapes(unet: Any) -> list[tuple[int, int]]:
    """(width, context width) of each cross-attention layer of ``unet``, in ``attn_processors``
    order: the shapes that diffusers' ``load_ip_adapter`` gives the adapter's ``{2i+1}.to_k_ip`` /
    ``to_v_ip`` weights (``[width, context width]``), read from each layer's own ``to_k``."""
    shapes = []
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            to_k = unet.get_submodule(name[: -len(".processor")]).to_k
            shapes.append((to_k.out_features, to_k.in_features))
    return shapes


def adapter_fit_problem(ip_adapter: dict[str, Any], shapes: list[tuple[int, int]]) -> str | None:
    """Why an adapter's identity K/V do not fit a UNet whose cross-attention layers have ``shapes``
    (see :func:`cross_attention_shapes`), in one line; None when they fit.

    diffusers numbers the adapter's layers 1, 3, 5, … over the UNet's cross-attention layers
    (``_convert_ip_adapter_attn_to_diffusers``), each ``to_k_ip``/``to_v_ip`` weight being
    ``[width, context width]``. Pure: shapes only."""
    ids = sorted({int(k.split(".", 1)[0]) for k in ip_adapter if k.split(".", 1)[0].isdigit() and "_ip." in k})
    if len(ids) != len(shapes):
        return (f"it holds identity K/V for {len(ids)} cross-attention layers and this UNet has {len(shapes)}: it was "
                "made for another UNet (an SDXL adapter on the tiny preset, say)")
    if ids != [2 * i + 1 for i in range(len(shapes))]:
        shown = ", ".join(map(str, ids[:4])) + (", …" if len(ids) > 4 else "")
        return (f"its layers are numbered {shown} where this UNet's are 1, 3, 5, … (diffusers' numbering): it was "
                "made or converted for another UNet")
    for i, (width, context) in enumerate(shapes):
        for proj in ("to_k_ip", "to_v_ip"):
            weight = ip_adapter.get(f"{2 * i + 1}.{proj}.weight")
            if weight is None:
                return f"its layer {2 * i + 1} has no {proj}.weight"
            if tuple(weight.shape) != (width, context):
                return (f"its layer {2 * i + 1} {proj} is {list(weight.shape)} where this UNet's layer needs "
                        f"[{width}, {context}]: it was made for another UNet")
    return None


def _load(
    preset: Preset,
    paths: dict[str, Path],
    *,
    device: str,
    dtype: "torch.dtype",
    variant: str | None,
    lcm_lora: bool | None,
    adapter: str | Path | None = None,
) -> Components:
    """The body of :func:`load_components` (see there)."""
    import diffusers
    import torch
    from diffusers import AutoencoderTiny, StableDiffusionXLPipeline

    from .presets import CLIP_VISION_FILES, TAESD_FILES

    required = preset.required_files(variant)
    base = _require(paths, "base", required["base"][1])
    if adapter is None:
        faceid = _require(paths, "faceid", required["faceid"][1])
        state, adapter_file, lora_file = load_faceid_state_dict(faceid / FACEID_WEIGHTS), FACEID_WEIGHTS, faceid / FACEID_LORA
    else:
        adapter = Path(adapter)
        state, adapter_file = load_adapter_state_dict(adapter), adapter.name
        lora_file = None
        if adapter_kind(state) == "faceid-plus-v2":
            sibling = adapter.with_name(adapter.stem + "_lora.safetensors")
            lora_file = sibling if sibling.is_file() else _require(paths, "faceid", (FACEID_LORA,)) / FACEID_LORA
    kind = adapter_kind(state)
    image_encoder_dir = _require(paths, "image_encoder", CLIP_VISION_FILES)

    extra: dict[str, Any] = {}
    if "unet" in required:
        unet_dir = _require(paths, "unet", required["unet"][1])
        extra["unet"] = _load_replacement_unet(base, unet_dir / required["unet"][1][0], dtype)
    pipe = StableDiffusionXLPipeline.from_pretrained(
        str(base), dtype=dtype, variant=variant, local_files_only=True, **extra
    )
    scheduler_cls = getattr(diffusers, preset.scheduler)
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config, **preset.scheduler_options())

    if preset.fuse_lora:
        _repo, fused_file, fused_scale = preset.fuse_lora
        fused_dir = _require(paths, "fused_lora", (fused_file,))
        pipe.load_lora_weights(str(fused_dir), weight_name=fused_file, adapter_name=FUSED_ADAPTER)
        pipe.fuse_lora(adapter_names=[FUSED_ADAPTER], lora_scale=float(fused_scale))
        pipe.unload_lora_weights()  # the fused weights stay in the base layers

    problem = adapter_fit_problem(state["ip_adapter"], cross_attention_shapes(pipe.unet))
    where = adapter if adapter is not None else faceid / FACEID_WEIGHTS
    if problem is not None:
        raise MissingWeightsError(f"the IP-Adapter {where} does not fit the {preset.name} preset's UNet: {problem}; "
                                  f"pass an adapter trained for {preset.name}", missing=[str(where)])
    try:
        pipe.load_ip_adapter(state, subfolder="", weight_name=adapter_file, image_encoder_folder=None)
    except (KeyError, RuntimeError, ValueError) as exc:  # the image projection's shapes (load_state_dict)
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
        raise MissingWeightsError(f"the IP-Adapter {where} does not fit the {preset.name} preset ({reason}); "
                                  f"pass an adapter trained for {preset.name}", missing=[str(where)]) from None
    adapters = []
    if lora_file is not None:
        pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name, adapter_name=FACEID_ADAPTER)
        adapters.append(FACEID_ADAPTER)

    want_lcm = bool(preset.lcm_lora) if lcm_lora is None else lcm_lora
    if want_lcm:
        lcm_file = preset.lcm_lora[1] if preset.lcm_lora else DEFAULT_LCM_LORA_FILE
        lcm_dir = _require(paths, "lcm_lora", (lcm_file,))
        pipe.load_lora_weights(str(lcm_dir), weight_name=lcm_file, adapter_name=LCM_ADAPTER)
        adapters.append(LCM_ADAPTER)
    if adapters:
        pipe.set_adapters(adapters, [1.0] * len(adapters))

    image_encoder = load_image_encoder(image_encoder_dir, dtype)
    taesd = None
    if "taesd" in paths:
        taesd_dir = _require(paths, "taesd", TAESD_FILES)
        taesd = AutoencoderTiny.from_pretrained(str(taesd_dir), dtype=dtype, local_files_only=True)

    # float16 runs on CPU in torch (slowly): diffusers' warning that it "will fail" is not true here
    pipe.to(device, silence_dtype_warnings=True)
    modules = [pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, image_encoder, taesd]
    for module in modules:
        if module is not None:
            module.to(device)
            module.eval()
            module.requires_grad_(False)

    if dtype == torch.float16 and "vae_fp16_fix" in paths:
        # madebyollin/sdxl-vae-fp16-fix: SDXL's VAE fine-tuned so that its activations stay in
        # float16's range; it replaces the upcast (same latent space, ~1 grey level apart)
        from diffusers import AutoencoderKL

        vae_dir = _require(paths, "vae_fp16_fix", TAESD_FILES)
        pipe.vae = AutoencoderKL.from_pretrained(str(vae_dir), dtype=dtype, local_files_only=True).to(device).eval()
        pipe.vae.requires_grad_(False)
    elif dtype == torch.float16 and getattr(pipe.vae.config, "force_upcast", False):
        # SDXL's VAE overflows in float16 (NaN images): keep it in float32, as diffusers' pipeline
        # does per call, but once, at load, instead of casting back and forth per request.
        pipe.vae.to(torch.float32)

    return Components(
        pipe=pipe,
        image_encoder=image_encoder,
        clip_processor=make_clip_processor(),
        taesd=taesd,
        adapter_kind=kind,
        paths=dict(paths),
    )
