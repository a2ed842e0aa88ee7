"""The inference engine: load a preset once, then generate per request.

    engine = Engine.load("tiny")
    result = engine.generate(GenerationSettings(prompt="a pencil drawing of a face"), ["me.jpg"])
    result.images[0].save("out.png")

Reading order of ``generate`` (numbered like diffusers' pipelines):
 1. resolve the settings against the preset (steps, size, guidance);
 2. faces → identity (embedding + aligned crops); no faces: text only;
 3. text and identity conditions, in their conditioned and null forms (a ``ConditionSet``);
 4. per image: seeded noise, then the sampler loop (:func:`lcmla.sampling.sample`) over the
    request's model function (:class:`lcmla.denoiser.GuidedDenoiser`: the guidance mode's branches
    in one batched UNet call per step, the LCM-Lookahead KV-encoder pass before it), decode.

Per-request knobs travel in arguments: λ, the AM plan, the step index, the captured maps and the
KV cache ride in an ``AttentionContext`` passed through ``cross_attention_kwargs`` to processors
installed once at load. Diffusers keeps a few per-call values on modules (LoRA scales on the peft
layers, FreeU factors on the up blocks, the CLIP features on the FaceID-Plus projection); the
engine sets all of them at the start of every request while holding its lock, so one request never
sees another's values and every request fully states its own.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from .acceleration import apply_channels_last, apply_compile, check_compile_mode
from .attention.context import AMPlan, AttentionContext, HostParking, KVCache, MapStore
from .denoiser import ConditionSet, GuidedDenoiser, GuidedStep, UNetBatch
from .errors import LcmlaError, MissingWeightsError
from .faces import EMBEDDING_DIM, FaceAnalyzer, FaceIdentity
from .guidance import BRANCH_CONDITIONS, DecoupledGuidance, Guidance, guidance_for
from .images import as_photo_list
from .lookahead import (decode_tiny, encode_reference, encoder_rows, framing_used, kv_reference_images,
                        preview_latents, reference_latents)
from .memory import (OFFLOAD_MODES, choose_memory_mode, enable_balanced, enable_low_vram, free_device_memory,
                     out_of_memory_error, release_cached_memory)
from .preview import PreviewFrame, PreviewResult
from .presets import Preset, get_preset, resolve_settings
from .sampling import StepInfo, sample
from .settings import GenerationSettings, check_preview_steps

__all__ = ["Engine", "Result", "StepInfo"]


StepCallback = Callable[[StepInfo], None]


@dataclass
class Result:
    """The output of one request."""

    images: list  # list[PIL.Image.Image]
    seeds: list[int]
    settings: GenerationSettings  # resolved: no preset defaults left open
    timings: dict[str, float]  # seconds per stage
    face_boxes: list[tuple[float, float, float, float]]  # the chosen face of each reference photo
    identity: FaceIdentity | None = None
    preset: str = ""
    random_weights: bool = False
    attention_maps: list[MapStore] = field(default_factory=list)  # one per image, when capture was asked
    branch_calls: list[tuple[str, ...]] = field(default_factory=list)  # branches run at each step of image 0
    notes: list[str] = field(default_factory=list)  # what the request did that a user may not expect

    def image_settings(self, index: int) -> GenerationSettings:
        """Settings that reproduce image ``index`` alone (its own seed, one image)."""
        return self.settings.replace(output__seed=self.seeds[index], output__num_images=1)

    def save(self, outdir: str | Path, stem: str = "lcmla", overwrite: bool = False,
             keep: Sequence[str | Path] = ()) -> list[Path]:
        """Write each image as PNG with its reproducing settings embedded, named by its seed
        (``lcmla-7.png``); returns the paths. A name already taken gets the next free suffix
        (``lcmla-7-1.png``), so nothing earlier is lost (a ``--settings-from`` PNG included),
        unless ``overwrite``; the files of ``keep`` (the request's own inputs: its face photos, the
        PNG its settings came from) are never written over, ``overwrite`` or not."""
        from .pngmeta import save_png

        out = Path(outdir)
        out.mkdir(parents=True, exist_ok=True)
        kept = set()
        for p in keep:
            try:
                kept.add(Path(p).expanduser().resolve())
            except (OSError, RuntimeError, TypeError):
                pass
        paths = []
        for i, image in enumerate(self.images):
            path = out / f"{stem}-{self.seeds[i]}.png"
            n = 0
            while (not overwrite and path.exists()) or path.resolve() in kept:
                n += 1
                path = out / f"{stem}-{self.seeds[i]}-{n}.png"
            save_png(image, path, self.image_settings(i), random_weights=self.random_weights)
            paths.append(path)
        return paths


def check_device(device: "str | torch.device") -> str:
    """``device`` as torch names it, or a clear error: an unknown name, or CUDA on a machine (or a
    torch build) without it, or a CUDA index it does not have."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise LcmlaError(f"unknown device {device!r}: pass cpu, cuda or cuda:N (or another torch device type)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise LcmlaError(f"device {device!r}: CUDA is not available here (torch {torch.__version__}"
                             f"{', a CPU-only build' if torch.version.cuda is None else ''}); pass --device cpu "
                             "or install a CUDA build of torch")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise LcmlaError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"numbered from 0")
    return str(dev)


# what diffusers and transformers log for a prompt over 77 tokens; the request's note says it instead
_TRUNCATION_LOGGERS = ("diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl",
                       "transformers.tokenization_utils_base", "transformers.tokenization_utils_tokenizers")
_TRUNCATION_PREFIXES = ("The following part of your input was truncated because CLIP",
                        "Token indices sequence length is longer than the specified maximum",
                        "Ignoring clean_up_tokenization_spaces=True for BPE")  # diffusers' decode of the cut part


def words_past(text: str, room: int, count: Callable[[str], int]) -> str:
    """The end of ``text`` a text encoder that reads ``room`` tokens does not see, quoted as the
    user wrote it: from the first word whose tokens do not all fit (``count``: the tokens of a
    piece of text). Decoding the cut tokens instead spells them as the tokenizer does ("1 7" for
    "17", lower case)."""
    words = list(re.finditer(r"\S+", text))
    lo, hi = 0, len(words)  # the longest prefix of whole words that fits: words[:lo]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(text[: words[mid - 1].end()]) <= room:
            lo = mid
        else:
            hi = mid - 1
    return text[words[lo].start():].strip() if lo < len(words) else ""


def _clip_text(text: str, limit: int = 80) -> str:
    """``text`` cut to ``limit`` characters with an ellipsis (for quoting in a note)."""
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def request_notes(settings: GenerationSettings, guidance: Guidance, num_steps: int,
                  identity_tokens: int | None = None) -> list[str]:
    """Plain-language notes on what a resolved request will do that its settings may not show."""
    notes = []
    if isinstance(guidance, DecoupledGuidance) and settings.guidance.dcg:
        active = [k for k in range(num_steps) if guidance.a[k] != 1.0 or guidance.b[k] != 1.0]
        if not active and guidance.variant != "independent":
            notes.append(
                f"DCG: the a/b schedule stretched to {num_steps} step(s) is a = {list(guidance.a)}, "
                f"b = {list(guidance.b)}: a = b = 1 at every step, so no decoupled guidance is applied "
                "(only the rescale); use more steps or a constant schedule"
            )
    am = settings.attention
    if am.mode != "none" and not am.targets:
        notes.append(f"attention {am.mode}: no blocks are chosen (attention.targets is empty), so no attention "
                     "manipulation is applied; tick down, mid or up (the authors target down and up)")
    if am.mode != "none" and not am.tokens:
        notes.append(f"attention {am.mode}: no identity tokens are chosen (attention.tokens is empty), so no "
                     "attention manipulation is applied; tick the tokens to change (the authors change all of them)")
    past = [k for k in am.steps or () if k >= num_steps]
    if am.mode != "none" and past and len(past) < len(am.steps or ()):
        notes.append(f"attention {am.mode}: attention.steps {', '.join(map(str, past))} "
                     f"{'is' if len(past) == 1 else 'are'} past the last of the {num_steps} step(s) (numbered from 0) "
                     f"and ignored; AM runs at steps {', '.join(str(k) for k in am.steps if k < num_steps)}")
    if am.mode != "none" and am.steps is not None and not any(k < num_steps for k in am.steps):
        notes.append(f"attention {am.mode}: attention.steps {list(am.steps)} are all past the last of the "
                     f"{num_steps} step(s) (numbered from 0), so no attention manipulation is applied")
    if am.mode != "none" and am.tokens and identity_tokens is not None and not any(t < identity_tokens for t in am.tokens):
        notes.append(f"attention {am.mode}: attention.tokens {list(am.tokens)} are all past the adapter's "
                     f"{identity_tokens} identity tokens (numbered from 0), so no attention manipulation is applied")
    return notes


class Engine:
    """One loaded preset: pipeline, image encoder, face analyzer. Safe to share between threads."""

    def __init__(self, preset: Preset, components: Any, faces: FaceAnalyzer, *, device: str, dtype: torch.dtype,
                 memory_mode: str = "full"):
        self.preset = preset
        self.memory_mode = memory_mode  # "full" | "balanced" | "low" (lcmla.memory)
        #: whether the images of a request share UNet calls with their guidance branches (images ×
        #: branches, see ``images_per_call``): on by default on CUDA, where it raises throughput;
        #: image i then equals seed + i run alone to within float rounding (≤ 1 grey level) instead of
        #: bit for bit, because the kernels differ with the batch size. Off elsewhere (the CPU gains
        #: little), so there every image is bit-identical to its seed alone.
        self.batch_images = torch.device(device).type == "cuda"
        #: samples (images × guidance branches) one UNet call may hold when batching images
        self.max_unet_batch = 12
        self._offload_hooks: list[Any] = []
        #: the low-VRAM mode parks the KV path's reference K/V in CPU memory between the encoder
        #: pass and the layer that reads them (``KVCache.parking``)
        self.kv_parking = HostParking(device) if memory_mode == "low" else None
        self.compiled: tuple[str, ...] = ()  # what lcmla.acceleration compiled at load ("AM identity branch", "UNet")
        self.channels_last = False
        self.components = components
        self.pipe = components.pipe
        self.faces = faces
        self.device = torch.device(device)
        self.dtype = dtype
        self._lock = threading.RLock()
        self._lora_disabled = False  # peft's disable flag, tracked so it is always undone (under the lock)
        self._id_proj = self.pipe.unet.encoder_hid_proj.image_projection_layers[0]  # FaceID-Plus: shortcut knobs
        # lcmla's processors take over the loaded IP-Adapter weights once; knobs then travel per call
        from .attention.processors import install_processors

        install_processors(self.pipe.unet)

    # ---- loading ----------------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        preset: str = "tiny",
        *,
        device: str | None = None,
        dtype: torch.dtype | str | None = None,
        weights_dir: str | Path | None = None,
        allow_download: bool = False,
        face_models: str | Path | None = None,
        kv_encoder_lora: str | Path | None = None,
        adapter: str | Path | None = None,
        memory: str = "auto",
        random_weights: str | None = None,
        batch_images: bool | None = None,
        compile: str = "none",
        channels_last: bool | None = None,
    ) -> "Engine":
        """Load a preset. ``device`` defaults to CUDA when present; ``dtype`` to float16 on CUDA.

        Real presets read weights from ``weights_dir`` (``<org>/<name>`` folders) or the Hugging
        Face cache; missing files raise ``MissingWeightsError`` listing each file and the command
        that fetches it. The ``tiny`` preset builds its random weights on this machine.
        The LCM-LoRA (previews) and TAESD are loaded when their files are present.
        ``face_models``: an insightface pack folder (default: the preset's face backend, buffalo_l
        for the real presets); on CUDA, insightface runs on onnxruntime's CUDA provider when the
        installed onnxruntime has it. ``kv_encoder_lora``: a KV-encoder LoRA checkpoint
        (see ``lcmla.kv_lora``) for the KV path. ``adapter``: an IP-Adapter checkpoint instead of the
        preset's FaceID-Plus-v2 — a trained one (``training/``) or IP-Adapter Plus-Face (e.g.
        converted from the LCM-Lookahead authors' checkpoint by ``lcmla.convert``). ``memory``: "full"
        (every model on the device), "balanced" (the encoders offloaded, for 12–16 GB cards), "low"
        (every model offloaded + VAE tiling, for 8–12 GB cards) or "auto" (by the CUDA device's free
        memory, ``lcmla.memory.choose_memory_mode``).
        ``random_weights``: "full" or "tiny" runs the preset's scheduler, steps and size on a
        random-weights build of that architecture (``lcmla.tiny``, written once per machine and
        loaded through this same path): speed and memory figures without any real weights; the
        result says random_weights, as the tiny preset's does. ``batch_images``: the images of a
        request share UNet calls (default: on CUDA only; see ``Engine.batch_images``).
        ``compile``: "none", "am" (the FastFace identity branch compiled) or "unet" (that and the
        UNet's transformer and resnet blocks; the first request compiles), see
        ``lcmla.acceleration``. ``channels_last``: the UNet's and VAE's convolutions in NHWC
        (default: on CUDA only).
        """
        from .loading import adapter_kind, load_adapter_state_dict, load_components, quiet_torchvision_notice
        from .presets import random_weights_preset

        quiet_torchvision_notice()  # Python API users too: lcmla needs no torchvision

        p = get_preset(preset)
        if random_weights is not None:
            p = random_weights_preset(p, random_weights)
        # bad files are reported before anything heavy loads
        if kv_encoder_lora is not None:
            from .kv_lora import read_kv_lora_metadata

            read_kv_lora_metadata(kv_encoder_lora)
        exclude: tuple[str, ...] = ()
        if adapter is not None:
            kind = adapter_kind(load_adapter_state_dict(adapter))
            sibling_lora = Path(adapter).with_name(Path(adapter).stem + "_lora.safetensors").is_file()
            if kind == "plus" or sibling_lora:
                exclude = ("faceid",)
        device = check_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = _parse_dtype(dtype, device)
        check_compile_mode(compile)
        memory_mode = choose_memory_mode(memory, device, free_device_memory(device))
        # what is missing, the face models and the model files together, is reported in one message
        faces_missing: MissingWeightsError | None = None
        try:
            faces = FaceAnalyzer.chosen(face_models, p.face_backend, device=device)
        except MissingWeightsError as exc:
            faces_missing = exc
        if p.random_weights:
            from .tiny import random_weights_paths

            paths = random_weights_paths(random_weights or "tiny")
            variant = None
        else:
            from .weights import resolve_preset

            variant = "fp16" if dtype in (torch.float16, torch.bfloat16) else None
            try:
                paths = resolve_preset(p, variant=variant, weights_dir=weights_dir, allow_download=allow_download,
                                       exclude=exclude)
            except MissingWeightsError as exc:
                if faces_missing is None:
                    raise
                raise MissingWeightsError(f"{exc}\nAnd the face models: {faces_missing}",
                                          exc.missing + faces_missing.missing) from None
            paths.update(_optional_paths(p, weights_dir))
        if faces_missing is not None:
            raise faces_missing
        components = load_components(p, paths, device="cpu" if memory_mode in OFFLOAD_MODES else device, dtype=dtype,
                                     variant=variant, lcm_lora=bool(p.lcm_lora) or "lcm_lora" in paths, adapter=adapter)
        engine = cls(p, components, faces, device=device, dtype=dtype, memory_mode=memory_mode)
        if kv_encoder_lora is not None:
            from .kv_lora import load_kv_encoder_lora

            load_kv_encoder_lora(engine.pipe, kv_encoder_lora)
        if batch_images is not None:
            engine.batch_images = bool(batch_images)
        if channels_last if channels_last is not None else torch.device(device).type == "cuda":
            apply_channels_last(engine.pipe.unet, engine.pipe.vae, components.taesd)
            engine.channels_last = True
        engine.compiled = tuple(apply_compile(engine.pipe.unet, compile))
        if memory_mode == "low":
            pipe = engine.pipe
            engine._offload_hooks = enable_low_vram(
                [pipe.text_encoder, pipe.text_encoder_2, components.image_encoder, pipe.unet, pipe.vae, components.taesd],
                pipe.vae, device)
        elif memory_mode == "balanced":
            pipe = engine.pipe
            engine._offload_hooks = enable_balanced([pipe.text_encoder, pipe.text_encoder_2, components.image_encoder],
                                                    [pipe.unet, pipe.vae, components.taesd], device)
        return engine

    def _offload_all(self) -> None:
        """Offloading modes: every offloaded model back in CPU memory (once a request's conditions
        are computed, and at its end)."""
        for hook in self._offload_hooks:
            hook.offload()

    @property
    def adapters(self) -> tuple[str, ...]:
        """The peft adapters on the UNet (read live: a KV-encoder LoRA may be added after load)."""
        return tuple(getattr(self.pipe.unet, "peft_config", {}).keys())

    # ---- faces --------------------------------------------------------------------------------

    def analyze_faces(self, faces: Any, face_index: int | None = None) -> FaceIdentity:
        """Reference photos (one, or a sequence of paths, bytes, files, PIL images, arrays) →
        identity; a FaceIdentity passes through."""
        if isinstance(faces, FaceIdentity):
            return faces
        return self.faces.identity(as_photo_list(faces), face_index=face_index)

    # ---- conditions ---------------------------------------------------------------------------

    @torch.no_grad()
    def _text_conditions(self, prompt: str, negative_prompt: str = "") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{"text": (embeds, pooled), "null": (embeds, pooled)}; (1, 77, D) and (1, D_pooled).
        An empty negative prompt gives SDXL's zero embeddings (``force_zeros_for_empty_prompt``)."""
        from .loading import quiet_messages

        with quiet_messages(_TRUNCATION_LOGGERS, _TRUNCATION_PREFIXES):  # a request note says it (_prompt_notes)
            prompt_embeds, negative, pooled, negative_pooled = self.pipe.encode_prompt(
                prompt=prompt,
                device=self.device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=True,
                negative_prompt=negative_prompt or None,
            )
        return {"text": (prompt_embeds, pooled), "null": (negative, negative_pooled)}

    @torch.no_grad()
    def _clip_hidden(self, images: list) -> torch.Tensor:
        """CLIP vision encoder's penultimate hidden states of ``images`` (PIL) or, for None, of an
        all-zero input (IP-Adapter's unconditional image): (n, T, H)."""
        c = self.components
        if images is None:
            size = c.clip_processor.crop_size["height"]
            pixels = torch.zeros(1, 3, size, size)
        else:
            pixels = c.clip_processor(images=list(images), return_tensors="pt").pixel_values
        pixels = pixels.to(self.device, dtype=c.image_encoder.dtype)
        return c.image_encoder(pixels, output_hidden_states=True).hidden_states[-2]

    @torch.no_grad()
    def _identity_conditions(self, identity: FaceIdentity | None, framing: str = "photo") -> dict[str, tuple]:
        """{"id": (image_embeds, clip_embeds), "null": (...)} for the loaded identity adapter.

        FaceID-Plus-v2: image_embeds = the identity embedding (1, 1, 512), clip_embeds = CLIP hidden
        states of the aligned face crops averaged over the reference photos (1, 1, T, H); null =
        zeros and CLIP of an all-zero input. IP-Adapter Plus (-Face): image_embeds = CLIP hidden
        states (1, 1, T, H) of the reference photos framed as the KV reference is (``framing``;
        LCM-Lookahead's authors feed the whole photo), averaged; null = CLIP of an all-zero input.
        Without an identity (text only) both are the null identity.
        """
        null_clip = self._clip_hidden(None)[:, None].to(self.dtype)  # (1, 1, T, H)
        if self.components.adapter_kind == "plus":
            null = (null_clip, None)
            if identity is None:
                return {"id": null, "null": null}
            size = (self.components.clip_processor.crop_size["width"], self.components.clip_processor.crop_size["height"])
            # the photos framed as the KV reference is ("face" for all photos or none); crops as they are
            images = kv_reference_images(identity, size, framing) if identity.images else list(identity.crops)
            hidden = self._clip_hidden(images).mean(dim=0, keepdim=True)[:, None]  # (1, 1, T, H)
            return {"id": (hidden.to(self.dtype), None), "null": null}
        null = (torch.zeros(1, 1, EMBEDDING_DIM, dtype=self.dtype, device=self.device), null_clip)
        if identity is None:
            return {"id": null, "null": null}
        clip = self._clip_hidden(identity.crops).mean(dim=0, keepdim=True)[:, None]  # (1, 1, T, H)
        emb = torch.as_tensor(identity.embedding, dtype=self.dtype, device=self.device).reshape(1, 1, -1)
        return {"id": (emb, clip.to(self.dtype)), "null": null}

    def _time_ids(self, settings: GenerationSettings) -> torch.Tensor:
        """SDXL's micro-conditioning (original size, crop top-left, target size): (1, 6)."""
        h, w = settings.output.height, settings.output.width
        return torch.tensor([[h, w, 0, 0, h, w]], dtype=self.dtype, device=self.device)

    # ---- per-request module state (under the lock) ---------------------------------------------

    def _denoiser_adapters(self, settings: GenerationSettings) -> dict[str, float]:
        """Adapter → scale for denoising. The LCM-LoRA joins only when it is the preset's backbone
        (at ``guidance.backbone_lora_scale``); a KV-encoder LoRA never does (encoder pass only)."""
        out = {"faceid": settings.identity.lora_scale}
        if self.preset.lcm_lora and "lcm" in self.adapters:
            out["lcm"] = settings.guidance.backbone_lora_scale
        return out

    def _set_adapters(self, scales: dict[str, float]) -> None:
        """Activate exactly the adapters with a non-zero scale. Adapters left out are not computed
        at all (an active adapter at scale 0 would still cost its two matmuls in every layer);
        with none active, LoRA is disabled, and re-enabled by the next call that needs it."""
        active = {n: float(v) for n, v in scales.items() if v != 0 and n in self.adapters}
        if not active:
            if not self._lora_disabled:
                self.pipe.disable_lora()
                self._lora_disabled = True
            return
        if self._lora_disabled:
            self.pipe.enable_lora()
            self._lora_disabled = False
        self.pipe.set_adapters(list(active), list(active.values()))

    @contextlib.contextmanager
    def _adapters(self, scales: dict[str, float], settings: GenerationSettings) -> Iterator[None]:
        """Adapter scales for one pass, the denoiser's restored afterwards."""
        self._set_adapters(scales)
        try:
            yield
        finally:
            self._set_adapters(self._denoiser_adapters(settings))

    def _apply_module_state(self, settings: GenerationSettings) -> None:
        """Set every per-call value diffusers keeps on modules; each request states all of them."""
        ident, fu = settings.identity, settings.freeu
        self._set_adapters(self._denoiser_adapters(settings))
        if self.components.adapter_kind == "faceid-plus-v2":
            self._id_proj.shortcut = ident.shortcut
            self._id_proj.shortcut_scale = ident.shortcut_scale
        self._apply_freeu(fu)

    def _apply_freeu(self, fu) -> None:
        """FreeU on the UNet as ``fu`` (``FreeUSettings``) says: on at its four factors, or off."""
        if fu.enabled:
            self.pipe.unet.enable_freeu(s1=fu.s1, s2=fu.s2, b1=fu.b1, b2=fu.b2)
        else:
            self.pipe.unet.disable_freeu()

    # ---- generation -----------------------------------------------------------------------------

    def generate(
        self,
        settings: GenerationSettings,
        faces: Any = None,
        *,
        callback: StepCallback | None = None,
    ) -> Result:
        """Generate ``settings.output.num_images`` images of the identity in ``faces`` (one photo,
        several, or a ``FaceIdentity``). ``faces=None`` generates from the text alone (no identity
        conditioning: λ, DCG, AM and the KV path need a face and are refused)."""
        return self._run(settings, faces, callback=callback)

    def previews(
        self,
        settings: GenerationSettings,
        faces: Any,
        steps: Sequence[int] | None = None,
        callback: Callable[[PreviewFrame], None] | None = None,
        on_step: StepCallback | None = None,
    ) -> PreviewResult:
        """LCM-Lookahead previews (SPEC §4) along the first image of a generation.

        At each chosen step index (None: every step): the DDPM x̂0 of the generation's own guided
        prediction, and the LCM one-step preview from the same UNet with the LCM-LoRA active at
        ``settings.lookahead.lcm_lora_scale`` (one extra UNet call, full condition, no guidance; on
        the KV path it reads the step's reference K/V); both decoded with TAESD. ``callback``
        receives each frame as soon as it is ready; ``on_step`` follows every denoising step (a
        ``StepInfo``, as ``generate``'s callback: progress, or cancelling by raising). The generation
        itself is unchanged.
        """
        if "lcm" not in self.adapters:
            raise LcmlaError(
                "previews need the LCM-LoRA: fetch it with `hf download latent-consistency/lcm-lora-sdxl "
                "pytorch_lora_weights.safetensors` and reload the engine"
            )
        if self.components.taesd is None:
            raise LcmlaError("previews need TAESD: fetch it with `hf download madebyollin/taesdxl` and reload the engine")
        settings = settings.replace(output__num_images=1)
        frames: list[PreviewFrame] = []
        wanted = None if steps is None else set(int(k) for k in steps)
        check_preview_steps(wanted, settings.guidance.steps or self.preset.steps)
        lcm_scaling = self._lcm_boundary()
        spent = [0.0]

        def on_guided(step: GuidedStep, denoiser: GuidedDenoiser, resolved: GenerationSettings) -> None:
            if wanted is not None and step.step not in wanted:
                return
            t0 = time.perf_counter()
            full = denoiser.guidance.conditions.get("full", BRANCH_CONDITIONS["full"])
            # the preview reads the K/V row the guidance gives its full branch (on the KV path: the
            # encoder-prompt row), when the step encoded it
            kv_row = step.kv_rows.index(full.kv_row) if full.kv_row in step.kv_rows else None
            scales = {**self._denoiser_adapters(resolved), "lcm": resolved.lookahead.lcm_lora_scale}
            x0, z_lcm = preview_latents(self.pipe.unet, step, denoiser.conditions.row(full), kv_row,
                                        self._alphas_cumprod(), lcm_scaling, lambda: self._adapters(scales, resolved))
            frame = PreviewFrame(step.step, int(step.timestep), self._decode_tiny(x0), self._decode_tiny(z_lcm))
            frames.append(frame)
            spent[0] += time.perf_counter() - t0
            if callback is not None:
                callback(frame)

        result = self._run(settings, faces, callback=on_step, on_guided=on_guided)
        timings = dict(result.timings, previews=spent[0])
        return PreviewResult(frames=frames, image=result.images[0], settings=result.settings, timings=timings,
                             notes=list(result.notes))

    # ---- the shared request path ---------------------------------------------------------------

    def _check_request(self, settings: GenerationSettings, faces: Any) -> None:
        if not isinstance(settings, GenerationSettings):
            raise LcmlaError(f"settings must be a GenerationSettings (got {type(settings).__name__})")
        if faces is None:
            asked = [name for name, on in (("guidance.dcg", settings.guidance.dcg),
                                           ("attention.mode", settings.attention.mode != "none"),
                                           ("lookahead.kv", settings.lookahead.kv)) if on]
            if asked:
                raise LcmlaError(f"{', '.join(asked)} need(s) a face photo; give one or switch them off for text-only generation")

    def _run(self, settings, faces, callback: StepCallback | None = None, on_guided=None) -> Result:
        self._check_request(settings, faces)
        timings: dict[str, float] = {}
        t_start = time.perf_counter()
        settings = resolve_settings(settings, self.preset)
        identity = None if faces is None else self.analyze_faces(faces, settings.identity.face_index)
        references = self._kv_references(identity, settings) if settings.lookahead.kv else None
        guidance = guidance_for(settings, settings.guidance.steps, lcm_scheduler=self._is_lcm(settings))
        timings["faces"] = time.perf_counter() - t_start
        oom = None
        with self._lock, torch.no_grad():
            try:
                images, seeds, maps, calls = self._generate_locked(settings, identity, references, guidance, timings,
                                                                   callback, on_guided)
            except Exception as exc:
                oom = out_of_memory_error(exc, str(self.device), width=settings.output.width,
                                          height=settings.output.height, images=settings.output.num_images,
                                          mode=self.memory_mode)
                if oom is None:
                    raise
            finally:
                self._offload_all()
        if oom is not None:  # raised here, outside the except block: the request's tensors are freed first
            release_cached_memory(str(self.device))
            raise oom
        timings["total"] = time.perf_counter() - t_start
        return Result(
            images=images,
            seeds=seeds,
            settings=settings,
            timings=timings,
            face_boxes=list(identity.boxes) if identity is not None else [],
            identity=identity,
            preset=self.preset.name,
            random_weights=self.preset.random_weights,
            attention_maps=maps,
            branch_calls=calls,
            notes=request_notes(settings, guidance, settings.guidance.steps, self._identity_tokens())
            + self._framing_notes(identity, settings) + self._kv_lora_notes(settings) + self._prompt_notes(settings),
        )

    def _generate_locked(self, settings, identity, references, guidance, timings, callback, on_guided):
        """The body of a request, under the lock: module state, conditions, then every image's
        latents, then their decodes (after all denoising, so that in the low-VRAM mode the UNet
        moves to the device once per request, not once per image)."""
        t0 = time.perf_counter()
        self._apply_module_state(settings)
        conditions = ConditionSet(self._text_conditions(settings.prompt, settings.negative_prompt),
                                  self._identity_conditions(identity, settings.lookahead.reference_framing),
                                  self._time_ids(settings))
        kv_setup = self._kv_setup(settings, references) if references is not None else None
        self._offload_all()  # the encoders are done: in the offloading modes they leave the device now
        timings["conditions"] = time.perf_counter() - t0
        all_latents, seeds, maps, calls = [], [], [], []
        t1 = time.perf_counter()
        n, group = settings.output.num_images, self.images_per_call(settings, guidance)
        for first in range(0, n, group):
            chunk = [settings.output.seed + i for i in range(first, min(n, first + group))]
            latents, denoiser = self._denoise(settings, conditions, guidance, identity is not None, chunk, first,
                                              callback, kv_setup, on_guided)
            if denoiser.context.capture is not None:
                maps.append(denoiser.context.capture)
            if first == 0:
                calls = list(denoiser.calls)
            all_latents.extend(latents.split(1))
            seeds.extend(chunk)
        t2 = time.perf_counter()
        images = [self._decode(latents) for latents in all_latents]
        timings["denoise"] = t2 - t1
        timings["decode"] = time.perf_counter() - t2
        return images, seeds, maps, calls

    def _scheduler_class(self, settings: GenerationSettings) -> type:
        import diffusers

        name = settings.guidance.scheduler
        return type(self.pipe.scheduler) if name is None else getattr(diffusers, name)

    def _scheduler(self, settings: GenerationSettings):
        """A fresh scheduler per image (schedulers keep step counters, so none is shared): the
        request's class (``guidance.scheduler``) or the preset's, over the preset's noise schedule
        and timestep spacing. DPM-Solver is diffusers' default DPM-Solver++ (2nd order)."""
        sched = self._scheduler_class(settings).from_config(self.pipe.scheduler.config)
        sched.set_timesteps(settings.guidance.steps, device=self.device)
        return sched

    def _alphas_cumprod(self) -> torch.Tensor:
        return self.pipe.scheduler.alphas_cumprod

    def _is_lcm(self, settings: GenerationSettings | None = None) -> bool:
        cls = type(self.pipe.scheduler) if settings is None else self._scheduler_class(settings)
        return cls.__name__ == "LCMScheduler"

    def _lcm_boundary(self) -> tuple[float, float]:
        """(timestep_scaling, sigma_data) of the LCM boundary condition: the pipeline's LCM
        scheduler's own, else those of an LCMScheduler built from the pipeline's noise schedule."""
        from diffusers import LCMScheduler

        sched = self.pipe.scheduler if self._is_lcm() else LCMScheduler.from_config(self.pipe.scheduler.config)
        return float(sched.config.timestep_scaling), float(getattr(sched, "sigma_data", 0.5))

    def _denoise(self, settings, conditions: ConditionSet, guidance: Guidance, has_identity: bool,
                 seeds: Sequence[int], first_index: int, callback: StepCallback | None, kv_setup=None, on_guided=None):
        """A group of images of one request, batched: each image's seeded noise (image i of the
        request: seed + i, its own generator, so it equals that seed alone), then ONE sampler loop
        whose UNet calls hold images × branches (image-major: an image's branches are consecutive,
        which AM2's authors-exact pooling relies on)."""
        width, height = settings.output.width, settings.output.height
        pipe = self.pipe
        sched = self._scheduler(settings)
        num_steps = len(sched.timesteps)
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        lh, lw = height // pipe.vae_scale_factor, width // pipe.vae_scale_factor
        noise = torch.cat([torch.randn((1, pipe.unet.config.in_channels, lh, lw), generator=g, dtype=torch.float32)
                           for g in generators]).to(self.device, self.dtype)  # (N, 4, h, w)
        capture = settings.attention.capture_maps and has_identity
        if capture and len(seeds) > 1:
            raise ValueError("map capture records one image per sampler loop")  # _generate_locked groups by 1
        context = AttentionContext(
            ip_scale=settings.identity.ip_adapter_scale if has_identity else 0.0,
            am=AMPlan.from_settings(settings.attention, num_steps),
            capture=MapStore((lh, lw)) if capture else None,
        )
        denoiser = GuidedDenoiser(
            unet=pipe.unet,
            conditions=conditions,
            guidance=guidance,
            context=context,
            pool_branches=settings.attention.am_norm_scope == "image-branches",
        )
        if kv_setup is not None:
            denoiser.kv_encoder = lambda t, rows: self._encode_reference(kv_setup, rows, noise, t, settings)
        if on_guided is not None:
            denoiser.on_guided = lambda step: on_guided(step, denoiser, settings)
        report = None
        if callback is not None:
            def report(k, t, latents, x0):
                for j in range(latents.shape[0]):
                    callback(StepInfo(first_index + j, k, num_steps, int(t), latents[j:j + 1], x0[j:j + 1]))
        # one image keeps its single generator (the call diffusers' pipeline makes); several: one each
        generator = generators[0] if len(generators) == 1 else generators
        latents = sample(denoiser, sched, noise * sched.init_noise_sigma, generator=generator, callback=report)
        return latents, denoiser

    def images_per_call(self, settings: GenerationSettings, guidance: Guidance) -> int:
        """How many images of a request share one sampler loop (and so each UNet call): as many as
        keep images × (the most branches a step runs) within ``max_unet_batch``; one when attention
        maps are captured (a map store per image), in the low-VRAM mode, or with ``batch_images`` off."""
        if (not self.batch_images or settings.attention.capture_maps or self.memory_mode == "low"
                or settings.output.num_images == 1):
            return 1
        widest = max(len(guidance.branches(k)) for k in range(settings.guidance.steps))
        return max(1, min(settings.output.num_images, self.max_unet_batch // max(1, widest)))

    # ---- LCM-Lookahead: the KV encoder's reference and pass ----------------------------------------

    def _identity_tokens(self) -> int | None:
        """How many identity tokens the loaded adapter's projection makes (FaceID-Plus-v2: 4; the
        authors' Plus-Face: 16); None when the layer does not say."""
        proj = self._id_proj
        n = getattr(proj, "num_tokens", None)
        if n is None and getattr(proj, "latents", None) is not None:
            n = proj.latents.shape[1]  # a Resampler's learned queries
        return None if n is None else int(n)

    @staticmethod
    def _framing_notes(identity: FaceIdentity | None, settings: GenerationSettings) -> list[str]:
        """A note when the KV reference could not be framed as asked."""
        if identity is None or not settings.lookahead.kv:
            return []
        asked = settings.lookahead.reference_framing
        used = framing_used(identity, asked)
        if used == asked:
            return []
        if identity.images:
            missing = ", ".join(str(i + 1) for i, box in enumerate(identity.boxes) if box is None)
            why = f"photo {missing} has no face box, so every photo was used whole"
        else:
            why = "this identity holds only aligned face crops, so they were used whole"
        return [f"KV reference: framing {asked!r} needs the photos and their face boxes; {why} ({used!r})"]

    def _prompt_notes(self, settings: GenerationSettings) -> list[str]:
        """A note for each prompt longer than the text encoders read (CLIP: 77 tokens with the start
        and end tokens, so 75 of the prompt's), naming the words that were left out."""
        tokenizer = self.pipe.tokenizer
        room = tokenizer.model_max_length - 2
        prompts = [("prompt", settings.prompt), ("negative_prompt", settings.negative_prompt)]
        if settings.lookahead.kv:
            prompts.append(("lookahead.kv_prompt", settings.lookahead.kv_prompt))
        notes = []
        for name, text in prompts:
            tokens = tokenizer.tokenize(text or "")
            if len(tokens) > room:
                dropped = words_past(text, room, lambda part: len(tokenizer.tokenize(part)))
                notes.append(f"{name} is {len(tokens)} tokens and the text encoders read the first {room}, so "
                             f"{_clip_text(dropped)!r} was left out; shorten it or move what matters to the front")
        return notes

    def _kv_lora_notes(self, settings: GenerationSettings) -> list[str]:
        """A note when a KV-encoder LoRA is loaded but the request does not take the KV path,
        which is the only place it acts."""
        from .kv_lora import ADAPTER_NAME

        if settings.lookahead.kv or ADAPTER_NAME not in self.adapters:
            return []
        return ["the loaded KV-encoder LoRA acts only on the KV path, and lookahead.kv is off, so it was not used; "
                "run the lookahead-kv (or lookahead-released) method, or switch lookahead.kv on, to use it"]

    def _kv_references(self, identity: FaceIdentity, settings: GenerationSettings) -> list:
        """The KV encoder's reference images (``lookahead.kv_reference_images``) for a request."""
        return kv_reference_images(identity, (settings.output.width, settings.output.height),
                                   settings.lookahead.reference_framing)

    @torch.no_grad()
    def _kv_setup(self, settings: GenerationSettings, references: list) -> dict[str, Any]:
        """The reference latents and the encoder rows' conditions (``lookahead.encoder_rows``)."""
        null = self._identity_conditions(None)["null"]  # the image encoder is still there from the request's
        self._offload_all()  # offloading modes: it leaves before the text encoders come back for the KV prompt
        rows = encoder_rows(self._text_conditions(settings.lookahead.kv_prompt),  # "null": SDXL's empty-prompt zeros
                            null, self._time_ids(settings))
        self._offload_all()  # and no encoder stays beside the VAE's encode of the reference
        return {"latents": reference_latents(self.pipe, references, self.dtype, self.device), "rows": rows}

    @contextlib.contextmanager
    def _encoder_pass_state(self, settings: GenerationSettings) -> Iterator[None]:
        """Module state of the KV-encoder pass, the denoiser's restored after it: the KV-encoder
        LoRA alone (no FaceID or LCM LoRA, as in the authors' encoder) and no FreeU (it would change
        the up blocks' reference K/V; the authors apply FreeU to the denoiser only)."""
        scales = {"kv_encoder": settings.lookahead.kv_lora_scale} if "kv_encoder" in self.adapters else {}
        freeu = settings.freeu.enabled
        if freeu:
            self.pipe.unet.disable_freeu()
        try:
            with self._adapters(scales, settings):
                yield
        finally:
            if freeu:
                self._apply_freeu(settings.freeu)

    def _encode_reference(self, kv_setup, rows: tuple[str, ...], noise: torch.Tensor, t,
                          settings: GenerationSettings) -> KVCache:
        """The KV encoder pass at t over ``rows`` on the same UNet (see ``_encoder_pass_state``)."""
        batch = UNetBatch.cat([kv_setup["rows"][r] for r in rows])
        with self._encoder_pass_state(settings):
            return encode_reference(self.pipe.unet, kv_setup["latents"], batch, t, noise, self._alphas_cumprod(),
                                    KVCache(parking=self.kv_parking), kv_copy_scale=settings.lookahead.kv_lora_scale)

    # ---- decoding ----------------------------------------------------------------------------------

    def _decode(self, latents: torch.Tensor):
        vae = self.pipe.vae
        z = latents.to(vae.dtype) / vae.config.scaling_factor
        image = vae.decode(z, return_dict=False)[0]
        return self.pipe.image_processor.postprocess(image.float(), output_type="pil")[0]

    def _decode_tiny(self, latents: torch.Tensor):
        return decode_tiny(self.components.taesd, self.pipe.image_processor, latents)


def _optional_paths(preset: Preset, weights_dir) -> dict[str, Path]:
    """LCM-LoRA and TAESD folders (previews need them) and the float16-fix VAE when they are on this
    machine; no error otherwise."""
    from .errors import MissingWeightsError
    from .presets import LCM_LORA_REPO, TAESDXL_REPO, TAESD_FILES, VAE_FP16_FIX_REPO
    from .weights import resolve_files

    out: dict[str, Path] = {}
    for role, spec in (("lcm_lora", (LCM_LORA_REPO, ("pytorch_lora_weights.safetensors",))),
                       ("taesd", (TAESDXL_REPO, TAESD_FILES)),
                       ("vae_fp16_fix", (VAE_FP16_FIX_REPO, TAESD_FILES))):
        try:
            out.update(resolve_files({role: spec}, weights_dir=weights_dir))
        except MissingWeightsError:
            pass
    return out


def _parse_dtype(dtype: torch.dtype | str | None, device: str) -> torch.dtype:
    if dtype is None:
        return torch.float16 if str(device).startswith("cuda") else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    try:
        return table[str(dtype).lower()]
    except KeyError:
        raise LcmlaError(f"dtype {dtype!r} is not supported; choose one of {', '.join(table)}") from None
