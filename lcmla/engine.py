"""The inference engine: load a preset once, then generate per request.

    engine = Engine.load("tiny")
    result = engine.generate(GenerationSettings(prompt="a pencil drawing of a face"), ["me.jpg"])
    result.images[0].save("out.png")

Reading order of ``generate`` (numbered like diffusers' pipelines):
 1. resolve the settings against the preset (steps, size, guidance);
 2. faces → identity (embedding + aligned crops);
 3. text and identity conditions for every guidance branch the request needs;
 4. per image: seeded noise, the denoising loop (one batched UNet call per step), decode.

Per-request knobs travel in arguments. Diffusers keeps a few per-call values on modules (the
IP-Adapter scale on the attention processors, LoRA scales on the peft layers, the CLIP features on
the FaceID-Plus projection); the engine sets all of them at the start of every request while holding
its lock, so one request never sees another's values and every request fully states its own.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .errors import LcmlaError
from .faces import FaceAnalyzer, FaceIdentity
from .attention.context import AMPlan, AttentionContext, MapStore
from .guidance import (
    classic_cfg,
    classic_cfg_branches,
    dcg_branches,
    dcg_conditional_branches,
    decoupled_cfg,
    dcg_is_plain,
    rescale_guidance,
    schedule,
)
from .presets import Preset, get_preset
from .settings import GenerationSettings

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
    extras: dict[str, Any] = field(default_factory=dict)

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
    ) -> "Engine":
        """Load a preset. ``device`` defaults to CUDA when present; ``dtype`` to float16 on CUDA.

        Real presets read weights from ``weights_dir`` (``<org>/<name>`` folders) or the Hugging
        Face cache; missing files raise ``MissingWeightsError`` listing each file and the command
        that fetches it. The ``tiny`` preset builds its random weights on this machine.
        """
        from .loading import load_components

        p = get_preset(preset)
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
        components = load_components(p, paths, device=device, dtype=dtype, variant=variant)
        return cls(p, components, faces, device=device, dtype=dtype)

    # ---- faces --------------------------------------------------------------------------------

    def analyze_faces(self, faces: Sequence[Any] | FaceIdentity, face_index: int | None = None) -> FaceIdentity:
        """Reference photos (paths, bytes, PIL images, arrays) → identity; a FaceIdentity passes through."""
        if isinstance(faces, FaceIdentity):
            return faces
        if isinstance(faces, (str, Path, bytes)) or hasattr(faces, "size") and not isinstance(faces, (list, tuple)):
            faces = [faces]
        return self.faces.identity(list(faces), face_index=face_index)

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

    def _branch_batch(
        self,
        branches: Sequence[str],
        text: dict[str, tuple[torch.Tensor, torch.Tensor]],
        ident: dict[str, tuple[torch.Tensor, torch.Tensor]],
        time_ids: torch.Tensor,
    ) -> dict[str, Any]:
        """Concatenate the conditions of ``branches`` into one UNet batch (branch order kept)."""
        parts = {"prompt": [], "pooled": [], "id": [], "clip": []}
        for name in branches:
            t_key = "text" if name in ("text", "full") else "null"
            i_key = "id" if name in ("id", "full") else "null"
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
        }

    # ---- per-request module state (under the lock) ---------------------------------------------

    def _apply_module_state(self, settings: GenerationSettings) -> None:
        """Set every per-call value diffusers keeps on modules; each request states all of them."""
        ident = settings.identity
        names = list(self.components.adapters)
        scales = [ident.lora_scale if n == "faceid" else settings.lookahead.lcm_lora_scale for n in names]
        if names:
            self.pipe.set_adapters(names, scales)
        self._id_proj.shortcut = ident.shortcut
        self._id_proj.shortcut_scale = ident.shortcut_scale

    # ---- generation -----------------------------------------------------------------------------

    def generate(
        self,
        settings: GenerationSettings,
        faces: Sequence[Any] | FaceIdentity,
        *,
        callback: StepCallback | None = None,
    ) -> Result:
        """Generate ``settings.output.num_images`` images of the identity in ``faces``."""
        if not isinstance(settings, GenerationSettings):
            raise LcmlaError(f"settings must be a GenerationSettings (got {type(settings).__name__})")
        timings: dict[str, float] = {}
        t_start = time.perf_counter()
        settings = resolve_settings(settings, self.preset)
        identity = self.analyze_faces(faces, settings.identity.face_index)
        timings["faces"] = time.perf_counter() - t_start
        with self._lock, torch.no_grad():
            t0 = time.perf_counter()
            self._apply_module_state(settings)
            text = self._text_conditions(settings)
            ident = self._identity_conditions(identity)
            timings["conditions"] = time.perf_counter() - t0
            images, seeds, maps, calls = [], [], [], []
            timings["denoise"] = timings["decode"] = 0.0
            for i in range(settings.output.num_images):
                seed = settings.output.seed + i
                t1 = time.perf_counter()
                latents, store, image_calls = self._denoise(settings, text, ident, seed, i, callback)
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

    def _guidance_plan(self, settings: GenerationSettings, num_steps: int) -> list[tuple[tuple[str, ...], float, float]]:
        """Per step: (branches to run, a, b). Classic CFG uses a = guidance scale, b unused."""
        g = settings.guidance
        if not g.dcg:
            return [(classic_cfg_branches(g.guidance_scale), g.guidance_scale, 1.0)] * num_steps
        a_s = schedule(g.dcg_schedule, g.dcg_a, num_steps)
        b_s = schedule(g.dcg_schedule, g.dcg_b, num_steps)
        return [(dcg_branches(a, b, g.dcg_variant), a, b) for a, b in zip(a_s, b_s)]

    @staticmethod
    def _combine(settings: GenerationSettings, preds: dict[str, torch.Tensor], a: float, b: float) -> torch.Tensor:
        """One guided noise prediction from the branch predictions of a step."""
        g = settings.guidance
        if not g.dcg:
            return classic_cfg(preds, a)
        if dcg_is_plain(a, b, g.dcg_variant):
            return preds["full"]
        eps = decoupled_cfg(preds, a, b, g.dcg_variant)
        if g.rescale_phi > 0:
            eps = rescale_guidance(eps, [preds[k] for k in dcg_conditional_branches(g.dcg_variant)], g.rescale_phi)
        return eps

    def _denoise(self, settings, text, ident, seed: int, image_index: int, callback: StepCallback | None):
        g = settings.guidance
        width, height = settings.output.width, settings.output.height
        pipe = self.pipe
        sched = self._scheduler(g.steps)
        generator = torch.Generator("cpu").manual_seed(seed)
        lh, lw = height // pipe.vae_scale_factor, width // pipe.vae_scale_factor
        latents = torch.randn((1, pipe.unet.config.in_channels, lh, lw), generator=generator, dtype=torch.float32)
        latents = latents.to(self.device, self.dtype) * sched.init_noise_sigma
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=self.dtype, device=self.device)
        timesteps = sched.timesteps
        plan = self._guidance_plan(settings, len(timesteps))
        batches: dict[tuple[str, ...], dict[str, Any]] = {}
        ctx = AttentionContext(
            ip_scale=settings.identity.ip_adapter_scale,
            am=AMPlan.from_settings(settings.attention, len(timesteps)),
            capture=MapStore((lh, lw)) if settings.attention.capture_maps else None,
        )
        calls = []
        for k, t in enumerate(timesteps):
            branches, a, b = plan[k]
            if branches not in batches:
                batches[branches] = self._branch_batch(branches, text, ident, time_ids)
            batch = batches[branches]
            self._id_proj.clip_embeds = batch["clip_embeds"]
            ctx.step = k
            ctx.capture_index = branches.index("full") if "full" in branches else len(branches) - 1
            model_in = sched.scale_model_input(latents, t).expand(len(branches), -1, -1, -1)
            eps = pipe.unet(
                model_in,
                t,
                encoder_hidden_states=batch["encoder_hidden_states"],
                added_cond_kwargs=batch["added_cond_kwargs"],
                cross_attention_kwargs={"lcmla": ctx},
                return_dict=False,
            )[0]  # (n_branches, 4, h, w): all branches in ONE UNet call
            calls.append(branches)
            noise_pred = self._combine(settings, dict(zip(branches, eps.chunk(len(branches)))), a, b)
            out = sched.step(noise_pred, t, latents, generator=generator, return_dict=True)
            latents = out.prev_sample
            if callback is not None:
                x0 = getattr(out, "pred_original_sample", None)
                if x0 is None:
                    x0 = getattr(out, "denoised", latents)
                callback(StepInfo(image_index, k, len(timesteps), int(t), latents, x0))
        return latents, ctx.capture, calls

    def _decode(self, latents: torch.Tensor):
        vae = self.pipe.vae
        z = latents.to(vae.dtype) / vae.config.scaling_factor
        image = vae.decode(z, return_dict=False)[0]
        return self.pipe.image_processor.postprocess(image.float(), output_type="pil")[0]


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
