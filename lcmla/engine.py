"""The inference engine: load a preset once, then generate per request.

    engine = Engine.load("tiny")
    result = engine.generate(GenerationSettings(prompt="a pencil drawing of a face"), ["me.jpg"])
    result.images[0].save("out.png")

Reading order of ``generate`` (numbered like diffusers' pipelines):
 1. resolve the settings against the preset (steps, size, guidance);
 2. faces → identity (embedding + aligned crops);
 3. text and identity conditions for every guidance branch the request needs;
 4. per image: seeded noise, the denoising loop (one batched UNet call per step), decode.

Per-request knobs travel in arguments: λ, the AM plan, the step index, the captured maps and the
KV cache ride in an ``AttentionContext`` passed through ``cross_attention_kwargs`` to processors
installed once at load. Diffusers keeps a few per-call values on modules (LoRA scales on the peft
layers, FreeU factors on the up blocks, the CLIP features on the FaceID-Plus projection); the
engine sets all of them at the start of every request while holding its lock, so one request never
sees another's values and every request fully states its own.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .errors import LcmlaError
from .faces import FaceAnalyzer, FaceIdentity
from .attention.context import AMPlan, AttentionContext, KVCache, MapStore
from .guidance import (
    BRANCH_CONDITIONS,
    LOOKAHEAD_BRANCH_CONDITIONS,
    classic_cfg,
    classic_cfg_branches,
    dcg_branches,
    dcg_conditional_branches,
    decoupled_cfg,
    dcg_is_plain,
    lookahead_branches,
    lookahead_cfg,
    rescale_guidance,
    schedule,
)
from .preview import PreviewFrame, PreviewResult, ddpm_noise, ddpm_x0, lcm_x0
from .presets import Preset, get_preset
from .settings import AttentionSettings, GenerationSettings

__all__ = ["Engine", "Result", "StepInfo"]


@dataclass(frozen=True)
class StepInfo:
    """What the step callback receives after each denoising step."""

    image_index: int  # which image of the request (0-based)
    step: int  # 0-based step index
    num_steps: int
    timestep: int
    latents: torch.Tensor  # (1, 4, h, w) after the step
    x0: torch.Tensor  # (1, 4, h, w) the scheduler's prediction of the clean latent


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

    def image_settings(self, index: int) -> GenerationSettings:
        """Settings that reproduce image ``index`` alone (its own seed, one image)."""
        return self.settings.replace(output__seed=self.seeds[index], output__num_images=1)

    def save(self, outdir: str | Path, stem: str = "lcmla") -> list[Path]:
        """Write each image as PNG with its reproducing settings embedded; returns the paths."""
        from .pngmeta import save_png

        out = Path(outdir)
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, image in enumerate(self.images):
            path = out / f"{stem}-{self.seeds[i]}.png"
            save_png(image, path, self.image_settings(i), random_weights=self.random_weights)
            paths.append(path)
        return paths


def resolve_settings(settings: GenerationSettings, preset: Preset) -> GenerationSettings:
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


class Engine:
    """One loaded preset: pipeline, image encoder, face analyzer. Safe to share between threads."""

    def __init__(self, preset: Preset, components: Any, faces: FaceAnalyzer, *, device: str, dtype: torch.dtype):
        self.preset = preset
        self.components = components
        self.pipe = components.pipe
        self.faces = faces
        self.device = torch.device(device)
        self.dtype = dtype
        self._lock = threading.RLock()
        self._lora_disabled = False  # peft's disable flag, tracked so it is always undone (under the lock)
        self._id_proj = self.pipe.unet.encoder_hid_proj.image_projection_layers[0]
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
    ) -> "Engine":
        """Load a preset. ``device`` defaults to CUDA when present; ``dtype`` to float16 on CUDA.

        Real presets read weights from ``weights_dir`` (``<org>/<name>`` folders) or the Hugging
        Face cache; missing files raise ``MissingWeightsError`` listing each file and the command
        that fetches it. The ``tiny`` preset builds its random weights on this machine.
        The LCM-LoRA (previews) and TAESD are loaded when their files are present.
        ``kv_encoder_lora``: a KV-encoder LoRA checkpoint (see ``lcmla.kv_lora``) for the KV path.
        """
        from .loading import load_components

        p = get_preset(preset)
        if kv_encoder_lora is not None:  # a bad file is reported before anything heavy loads
            from .kv_lora import read_kv_lora_metadata

            read_kv_lora_metadata(kv_encoder_lora)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = _parse_dtype(dtype, device)
        if p.random_weights:
            from .tiny import ensure_tiny_weights, tiny_paths

            paths = tiny_paths(ensure_tiny_weights())
            variant = None
            faces = FaceAnalyzer.haar() if face_models is None else FaceAnalyzer.insightface(name=str(face_models))
        else:
            from .weights import resolve_preset

            variant = "fp16" if dtype in (torch.float16, torch.bfloat16) else None
            # Face models first: they are the cheapest to check and a common miss.
            faces = FaceAnalyzer.insightface(name=str(face_models) if face_models else "buffalo_l")
            paths = resolve_preset(p, variant=variant, weights_dir=weights_dir, allow_download=allow_download)
            paths.update(_optional_paths(p, weights_dir))
        components = load_components(p, paths, device=device, dtype=dtype, variant=variant,
                                     lcm_lora=bool(p.lcm_lora) or "lcm_lora" in paths)
        engine = cls(p, components, faces, device=device, dtype=dtype)
        if kv_encoder_lora is not None:
            from .kv_lora import load_kv_encoder_lora

            load_kv_encoder_lora(engine.pipe, kv_encoder_lora)
        return engine

    @property
    def adapters(self) -> tuple[str, ...]:
        """The peft adapters on the UNet (read live: a KV-encoder LoRA may be added after load)."""
        return tuple(getattr(self.pipe.unet, "peft_config", {}).keys())

    # ---- faces --------------------------------------------------------------------------------

    def analyze_faces(self, faces: Sequence[Any] | FaceIdentity, face_index: int | None = None) -> FaceIdentity:
        """Reference photos (paths, bytes, PIL images, arrays) → identity; a FaceIdentity passes through."""
        if isinstance(faces, FaceIdentity):
            return faces
        return self.faces.identity(_as_sources(faces), face_index=face_index)

    # ---- conditions ---------------------------------------------------------------------------

    @torch.no_grad()
    def _text_conditions(self, settings: GenerationSettings) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{"text": (embeds, pooled), "null": (embeds, pooled)}; (1, 77, D) and (1, D_pooled)."""
        prompt_embeds, negative, pooled, negative_pooled = self.pipe.encode_prompt(
            prompt=settings.prompt,
            device=self.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
            negative_prompt=settings.negative_prompt or None,
        )
        return {"text": (prompt_embeds, pooled), "null": (negative, negative_pooled)}

    @torch.no_grad()
    def _identity_conditions(self, identity: FaceIdentity) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{"id": (id_embeds, clip_embeds), "null": (zeros, clip of a black image)}.

        id_embeds: (1, 1, 512); clip_embeds: (1, 1, T, H), the CLIP vision encoder's penultimate
        hidden states, averaged over the reference photos (FaceID-Plus-v2 reads them).
        """
        c = self.components
        pixels = c.clip_processor(images=list(identity.crops), return_tensors="pt").pixel_values
        pixels = pixels.to(self.device, dtype=c.image_encoder.dtype)  # (n, 3, 224, 224)
        hidden = c.image_encoder(pixels, output_hidden_states=True).hidden_states[-2]  # (n, T, H)
        null_hidden = c.image_encoder(torch.zeros_like(pixels[:1]), output_hidden_states=True).hidden_states[-2]
        clip = hidden.mean(dim=0, keepdim=True)[:, None]  # (1, 1, T, H)
        null_clip = null_hidden[:, None]  # (1, 1, T, H)
        emb = torch.as_tensor(identity.embedding, dtype=self.dtype, device=self.device).reshape(1, 1, -1)
        return {"id": (emb, clip.to(self.dtype)), "null": (torch.zeros_like(emb), null_clip.to(self.dtype))}

    def _time_ids(self, settings: GenerationSettings) -> torch.Tensor:
        """SDXL's micro-conditioning (original size, crop top-left, target size): (1, 6)."""
        h, w = settings.output.height, settings.output.width
        return torch.tensor([[h, w, 0, 0, h, w]], dtype=self.dtype, device=self.device)

    def _branch_batch(
        self,
        branches: Sequence[str],
        text: dict[str, tuple[torch.Tensor, torch.Tensor]],
        ident: dict[str, tuple[torch.Tensor, torch.Tensor]],
        time_ids: torch.Tensor,
        kv_mode: bool = False,
    ) -> dict[str, Any]:
        """Concatenate the conditions of ``branches`` into one UNet batch (branch order kept).
        In KV mode the KV branches come last; ``kv_from`` is the index of the first of them."""
        table = LOOKAHEAD_BRANCH_CONDITIONS if kv_mode else BRANCH_CONDITIONS
        parts = {"prompt": [], "pooled": [], "id": [], "clip": []}
        kv_flags = []
        for name in branches:
            use_text, use_id, use_kv = table[name]
            t_key = "text" if use_text else "null"
            i_key = "id" if use_id else "null"
            kv_flags.append(use_kv)
            parts["prompt"].append(text[t_key][0])
            parts["pooled"].append(text[t_key][1])
            parts["id"].append(ident[i_key][0])
            parts["clip"].append(ident[i_key][1])
        n = len(branches)
        return {
            "encoder_hidden_states": torch.cat(parts["prompt"]),  # (n, 77, D)
            "added_cond_kwargs": {
                "text_embeds": torch.cat(parts["pooled"]),  # (n, D_pooled)
                "time_ids": time_ids.repeat(n, 1),  # (n, 6)
                "image_embeds": [torch.cat(parts["id"])],  # [(n, 1, 512)]
            },
            "clip_embeds": torch.cat(parts["clip"]),  # (n, 1, T, H)
            "kv_from": kv_flags.index(True) if True in kv_flags else n,
            "_full_index": list(branches).index("full") if "full" in branches else n - 1,
        }

    # ---- per-request module state (under the lock) ---------------------------------------------

    def _denoiser_adapters(self, settings: GenerationSettings) -> dict[str, float]:
        """Adapter → scale for denoising. The LCM-LoRA joins only when it is the preset's backbone;
        a KV-encoder LoRA never does (it is active on the encoder pass alone)."""
        out = {"faceid": settings.identity.lora_scale}
        if self.preset.lcm_lora and "lcm" in self.adapters:
            out["lcm"] = settings.lookahead.lcm_lora_scale
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

    def _apply_module_state(self, settings: GenerationSettings) -> None:
        """Set every per-call value diffusers keeps on modules; each request states all of them."""
        ident, fu = settings.identity, settings.freeu
        self._set_adapters(self._denoiser_adapters(settings))
        self._id_proj.shortcut = ident.shortcut
        self._id_proj.shortcut_scale = ident.shortcut_scale
        if fu.enabled:
            self.pipe.unet.enable_freeu(s1=fu.s1, s2=fu.s2, b1=fu.b1, b2=fu.b2)
        else:
            self.pipe.unet.disable_freeu()

    # ---- generation -----------------------------------------------------------------------------

    def generate(
        self,
        settings: GenerationSettings,
        faces: Sequence[Any] | FaceIdentity,
        *,
        callback: StepCallback | None = None,
    ) -> Result:
        """Generate ``settings.output.num_images`` images of the identity in ``faces``."""
        return self._run(settings, faces, callback=callback)

    def previews(
        self,
        settings: GenerationSettings,
        faces: Sequence[Any] | FaceIdentity,
        steps: Sequence[int] | None = None,
        callback: Callable[[PreviewFrame], None] | None = None,
    ) -> PreviewResult:
        """LCM-Lookahead previews (SPEC §4) along the first image of a generation.

        At each chosen step index (None: every step): the DDPM x̂0 of the generation's own guided
        prediction, and the LCM one-step preview from the same UNet with the LCM-LoRA active at
        ``settings.lookahead.lcm_lora_scale`` (one extra UNet call, full condition, no guidance);
        both decoded with TAESD. ``callback`` receives each frame as soon as it is ready.
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

        def on_eps(k, t, z_vp, noise_pred, batch, ctx, resolved):
            if wanted is not None and k not in wanted:
                return
            acp = self._alphas_cumprod()
            x0 = ddpm_x0(z_vp, noise_pred, acp, t)
            eps_lcm = self._lcm_prediction(resolved, z_vp, t, batch, ctx)
            frame = PreviewFrame(k, int(t), self._decode_tiny(x0), self._decode_tiny(lcm_x0(z_vp, eps_lcm, acp, t)))
            frames.append(frame)
            if callback is not None:
                callback(frame)

        result = self._run(settings, faces, on_eps=on_eps)
        return PreviewResult(frames=frames, image=result.images[0], settings=result.settings, timings=result.timings)

    # ---- the shared request path ---------------------------------------------------------------

    def _run(self, settings, faces, callback: StepCallback | None = None, on_eps=None) -> Result:
        if not isinstance(settings, GenerationSettings):
            raise LcmlaError(f"settings must be a GenerationSettings (got {type(settings).__name__})")
        timings: dict[str, float] = {}
        t_start = time.perf_counter()
        settings = resolve_settings(settings, self.preset)
        identity = self.analyze_faces(faces, settings.identity.face_index)
        references = None
        if settings.lookahead.kv:
            references = self._kv_reference_images(faces, identity, settings)
        timings["faces"] = time.perf_counter() - t_start
        with self._lock, torch.no_grad():
            t0 = time.perf_counter()
            self._apply_module_state(settings)
            text = self._text_conditions(settings)
            ident = self._identity_conditions(identity)
            kv_inputs = self._kv_inputs(settings, references, ident) if references is not None else None
            timings["conditions"] = time.perf_counter() - t0
            images, seeds, maps, calls = [], [], [], []
            timings["denoise"] = timings["decode"] = 0.0
            for i in range(settings.output.num_images):
                seed = settings.output.seed + i
                t1 = time.perf_counter()
                latents, store, image_calls = self._denoise(settings, text, ident, seed, i, callback, kv_inputs, on_eps)
                if store is not None:
                    maps.append(store)
                if i == 0:
                    calls = image_calls
                t2 = time.perf_counter()
                images.append(self._decode(latents))
                timings["denoise"] += t2 - t1
                timings["decode"] += time.perf_counter() - t2
                seeds.append(seed)
        timings["total"] = time.perf_counter() - t_start
        return Result(
            images=images,
            seeds=seeds,
            settings=settings,
            timings=timings,
            face_boxes=list(identity.boxes),
            identity=identity,
            preset=self.preset.name,
            random_weights=self.preset.random_weights,
            attention_maps=maps,
            branch_calls=calls,
        )

    def _scheduler(self, steps: int):
        """A fresh scheduler per image: schedulers keep step counters, so none is shared."""
        sched = self.pipe.scheduler.__class__.from_config(self.pipe.scheduler.config)
        sched.set_timesteps(steps, device=self.device)
        return sched

    def _alphas_cumprod(self) -> torch.Tensor:
        return self.pipe.scheduler.alphas_cumprod

    def _is_lcm(self) -> bool:
        return type(self.pipe.scheduler).__name__ == "LCMScheduler"

    def _guidance_plan(self, settings: GenerationSettings, num_steps: int) -> list[tuple[tuple[str, ...], float, float]]:
        """Per step: (branches to run, a, b). Classic CFG uses a = guidance scale, b unused."""
        g, lh = settings.guidance, settings.lookahead
        if lh.kv:
            branches = lookahead_branches(lh.s_nokv, lh.s_full, lh.s_kv, lcm_scheduler=self._is_lcm())
            return [(branches, 0.0, 0.0)] * num_steps
        if not g.dcg:
            return [(classic_cfg_branches(g.guidance_scale), g.guidance_scale, 1.0)] * num_steps
        a_s = schedule(g.dcg_schedule, g.dcg_a, num_steps)
        b_s = schedule(g.dcg_schedule, g.dcg_b, num_steps)
        return [(dcg_branches(a, b, g.dcg_variant), a, b) for a, b in zip(a_s, b_s)]

    def _combine(self, settings: GenerationSettings, preds: dict[str, torch.Tensor], a: float, b: float) -> torch.Tensor:
        """One guided noise prediction from the branch predictions of a step."""
        g, lh = settings.guidance, settings.lookahead
        if lh.kv:
            if self._is_lcm():
                return preds["full"]
            return lookahead_cfg(preds, lh.s_nokv, lh.s_full, lh.s_kv)
        if not g.dcg:
            return classic_cfg(preds, a)
        if dcg_is_plain(a, b, g.dcg_variant):
            return preds["full"]
        eps = decoupled_cfg(preds, a, b, g.dcg_variant)
        if g.rescale_phi > 0:
            eps = rescale_guidance(eps, [preds[k] for k in dcg_conditional_branches(g.dcg_variant)], g.rescale_phi)
        return eps

    def _unet(self, z, t, batch, ctx):
        self._id_proj.clip_embeds = batch["clip_embeds"]
        return self.pipe.unet(
            z,
            t,
            encoder_hidden_states=batch["encoder_hidden_states"],
            added_cond_kwargs=batch["added_cond_kwargs"],
            cross_attention_kwargs={"lcmla": ctx},
            return_dict=False,
        )[0]

    def _denoise(self, settings, text, ident, seed: int, image_index: int, callback: StepCallback | None,
                 kv_inputs=None, on_eps=None):
        g = settings.guidance
        width, height = settings.output.width, settings.output.height
        pipe = self.pipe
        sched = self._scheduler(g.steps)
        generator = torch.Generator("cpu").manual_seed(seed)
        lh, lw = height // pipe.vae_scale_factor, width // pipe.vae_scale_factor
        noise = torch.randn((1, pipe.unet.config.in_channels, lh, lw), generator=generator, dtype=torch.float32)
        noise = noise.to(self.device, self.dtype)
        latents = noise * sched.init_noise_sigma
        time_ids = self._time_ids(settings)
        timesteps = sched.timesteps
        plan = self._guidance_plan(settings, len(timesteps))
        kv_mode = settings.lookahead.kv
        batches: dict[tuple[str, ...], dict[str, Any]] = {}
        ctx = AttentionContext(
            ip_scale=settings.identity.ip_adapter_scale,
            am=AMPlan.from_settings(settings.attention, len(timesteps)),
            capture=MapStore((lh, lw)) if settings.attention.capture_maps else None,
            kv=KVCache() if kv_mode else None,
        )
        calls = []
        for k, t in enumerate(timesteps):
            branches, a, b = plan[k]
            if branches not in batches:
                batches[branches] = self._branch_batch(branches, text, ident, time_ids, kv_mode=kv_mode)
            batch = batches[branches]
            if kv_mode and batch["kv_from"] < len(branches):
                self._encode_reference(kv_inputs, noise, t, ctx.kv, settings)
            ctx.step = k
            ctx.capture_index = branches.index("full") if "full" in branches else len(branches) - 1
            ctx.kv_from = batch["kv_from"]
            z_vp = sched.scale_model_input(latents, t)
            eps = self._unet(z_vp.expand(len(branches), -1, -1, -1), t, batch, ctx)
            calls.append(branches)  # (n_branches, 4, h, w) above: all branches in ONE UNet call
            noise_pred = self._combine(settings, dict(zip(branches, eps.chunk(len(branches)))), a, b)
            if on_eps is not None:
                on_eps(k, t, z_vp, noise_pred, batch, ctx, settings)
            out = sched.step(noise_pred, t, latents, generator=generator, return_dict=True)
            latents = out.prev_sample
            if callback is not None:
                x0 = getattr(out, "pred_original_sample", None)
                if x0 is None:
                    x0 = getattr(out, "denoised", latents)
                callback(StepInfo(image_index, k, len(timesteps), int(t), latents, x0))
        return latents, ctx.capture, calls

    # ---- LCM-Lookahead: KV encoder pass and previews ----------------------------------------------

    def _kv_reference_images(self, faces, identity: FaceIdentity, settings: GenerationSettings) -> list:
        """The reference face images for the KV encoder, at the output size: a square crop around
        each photo's chosen face (twice the box), or the aligned crops when only an identity is given."""
        from PIL import Image

        from .images import load_image

        size = (settings.output.width or self.preset.width, settings.output.height or self.preset.height)
        sources = [] if isinstance(faces, FaceIdentity) else _as_sources(faces)
        if not sources:
            return [crop.resize(size, Image.BICUBIC) for crop in identity.crops]
        out = []
        for src, box in zip(sources, identity.boxes):
            img = load_image(src)
            x1, y1, x2, y2 = box
            cx, cy, half = (x1 + x2) / 2, (y1 + y2) / 2, max(x2 - x1, y2 - y1)
            crop = img.crop((int(cx - half), int(cy - half), int(cx + half), int(cy + half)))
            out.append(crop.resize(size, Image.BICUBIC))
        return out

    @torch.no_grad()
    def _kv_inputs(self, settings: GenerationSettings, references: list, ident) -> dict[str, Any]:
        """VAE latents of the reference images and the encoder's conditions ("a photo of a face")."""
        vae = self.pipe.vae
        pixels = self.pipe.image_processor.preprocess(references).to(self.device, vae.dtype)  # (n, 3, H, W)
        latents = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=settings.lookahead.kv_prompt, device=self.device, num_images_per_prompt=1,
            do_classifier_free_guidance=False,
        )
        n = latents.shape[0]
        time_ids = self._time_ids(settings)
        return {
            "latents": latents.to(self.dtype),
            "batch": {
                "encoder_hidden_states": embeds.repeat(n, 1, 1),
                "added_cond_kwargs": {
                    "text_embeds": pooled.repeat(n, 1),
                    "time_ids": time_ids.repeat(n, 1),
                    "image_embeds": [ident["null"][0].repeat(n, 1, 1)],
                },
                "clip_embeds": ident["null"][1].repeat(n, 1, 1, 1),
            },
        }

    def _encode_reference(self, kv_inputs, noise: torch.Tensor, t, cache: KVCache, settings: GenerationSettings) -> None:
        """The KV encoder pass at timestep t: the reference latents noised to t with the
        generation's own noise, through the same UNet (no second copy; the KV-encoder LoRA is
        switched on for this pass only, when one is loaded) under the prompt "a photo of a face"
        and the null identity, recording every self-attention layer's K and V into ``cache``."""
        z_ref = ddpm_noise(kv_inputs["latents"], noise.expand_as(kv_inputs["latents"]), self._alphas_cumprod(), t)
        enc_ctx = AttentionContext(ip_scale=0.0, am=AMPlan.from_settings(AttentionSettings(), 1), kv=cache)
        cache.store.clear()
        cache.recording = True
        has_kv_lora = "kv_encoder" in self.adapters
        if has_kv_lora:  # the denoiser's adapters plus the KV-encoder LoRA, for this pass only
            self._set_adapters({**self._denoiser_adapters(settings), "kv_encoder": settings.lookahead.kv_lora_scale})
        try:
            self._unet(z_ref, t, kv_inputs["batch"], enc_ctx)
        finally:
            cache.recording = False
            if has_kv_lora:
                self._set_adapters(self._denoiser_adapters(settings))

    def _lcm_prediction(self, settings, z_vp, t, batch, ctx) -> torch.Tensor:
        """ε from the same UNet with the LCM-LoRA at the chosen scale, full condition only
        (with the reference K/V on the KV path). Captures nothing: the maps stay the denoiser's."""
        one = self._single_branch(batch, batch["_full_index"])
        lcm_ctx = dataclasses.replace(ctx, capture=None, capture_index=0, kv_from=0 if settings.lookahead.kv else 1)
        scales = dict(self._denoiser_adapters(settings))
        scales["lcm"] = settings.lookahead.lcm_lora_scale
        self._set_adapters(scales)
        try:
            return self._unet(z_vp, t, one, lcm_ctx)
        finally:
            self._set_adapters(self._denoiser_adapters(settings))

    @staticmethod
    def _single_branch(batch: dict[str, Any], index: int) -> dict[str, Any]:
        """The conditions of one sample of a branch batch."""
        sl = slice(index, index + 1)
        a = batch["added_cond_kwargs"]
        return {
            "encoder_hidden_states": batch["encoder_hidden_states"][sl],
            "added_cond_kwargs": {"text_embeds": a["text_embeds"][sl], "time_ids": a["time_ids"][sl],
                                  "image_embeds": [a["image_embeds"][0][sl]]},
            "clip_embeds": batch["clip_embeds"][sl],
        }

    def _decode(self, latents: torch.Tensor):
        vae = self.pipe.vae
        z = latents.to(vae.dtype) / vae.config.scaling_factor
        image = vae.decode(z, return_dict=False)[0]
        return self.pipe.image_processor.postprocess(image.float(), output_type="pil")[0]

    def _decode_tiny(self, latents: torch.Tensor):
        """TAESD decode for previews (latents as the UNet sees them; TAESD's scaling factor is 1)."""
        taesd = self.components.taesd
        image = taesd.decode(latents.to(taesd.dtype), return_dict=False)[0]
        return self.pipe.image_processor.postprocess(image.float().clamp(-1, 1), output_type="pil")[0]


def _as_sources(faces: Any) -> list:
    """One reference photo (path, bytes, PIL image, array) or a sequence of them → a list."""
    if isinstance(faces, (str, Path, bytes)) or hasattr(faces, "size") and not isinstance(faces, (list, tuple)):
        return [faces]
    return list(faces)


def _optional_paths(preset: Preset, weights_dir) -> dict[str, Path]:
    """LCM-LoRA and TAESD folders when they are on this machine (previews need them); no error otherwise."""
    from .errors import MissingWeightsError
    from .presets import LCM_LORA_REPO, TAESDXL_REPO, TAESD_FILES
    from .weights import resolve_files

    out: dict[str, Path] = {}
    for role, spec in (("lcm_lora", (LCM_LORA_REPO, ("pytorch_lora_weights.safetensors",))), ("taesd", (TAESDXL_REPO, TAESD_FILES))):
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
