"""The per-call attention context: what one request asks of the attention processors.

An ``AttentionContext`` is made by the engine for one image of one request and handed to every
processor through ``cross_attention_kwargs={"lcmla": ctx}``. It is never stored on a module, so two
requests with different knobs cannot see each other's values. The engine advances ``ctx.step``
before each UNet call; the map store (when capture is on) is an explicit object returned in the
``Result``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..guidance import stretch
from ..settings import AttentionSettings


@dataclass(frozen=True)
class AMPlan:
    """FastFace AM settings resolved for a given number of steps."""

    mode: str  # none | am1 | am2
    targets: frozenset[str]  # block kinds: down / mid / up
    tokens: tuple[int, ...]
    steps: frozenset[int] | None  # None = every step
    am1_power: float
    am1_scale_down: float
    am1_scale_up: float
    am2_sharpness: tuple[float, ...]  # one per step
    am2_scale: tuple[float, ...]  # one per step
    am2_quantile: float
    am2_adain: bool
    adain_weight: float
    cap: float

    @classmethod
    def from_settings(cls, s: AttentionSettings, num_steps: int) -> "AMPlan":
        return cls(
            mode=s.mode,
            targets=frozenset(s.targets),
            tokens=tuple(s.tokens),
            steps=None if s.steps is None else frozenset(s.steps),
            am1_power=s.am1_power,
            am1_scale_down=s.am1_scale_down,
            am1_scale_up=s.am1_scale_up,
            am2_sharpness=tuple(stretch(s.am2_sharpness, num_steps)),
            am2_scale=tuple(stretch(s.am2_scale, num_steps)),
            am2_quantile=s.am2_quantile,
            am2_adain=s.am2_adain,
            adain_weight=s.adain_weight,
            cap=s.cap,
        )

    def active(self, block: str, step: int) -> bool:
        """Is the transform applied in a block of this kind at this step?"""
        return self.mode != "none" and block in self.targets and (self.steps is None or step in self.steps)


@dataclass
class MapStore:
    """Captured identity-attention maps: (block name, step) → (2, tokens, h, w) float32 on CPU,
    index 0 the maps before the transform, 1 after (equal where AM is off)."""

    latent_hw: tuple[int, int]
    maps: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)

    def record(self, block: str, step: int, before: torch.Tensor, after: torch.Tensor) -> None:
        """before/after: (heads, Q, T) probabilities of one sample; stored head-averaged on the grid."""
        grid = attention_grid(self.latent_hw, before.shape[-2])
        pair = torch.stack([before.mean(0), after.mean(0)])  # (2, Q, T)
        self.maps[(block, step)] = pair.permute(0, 2, 1).reshape(2, -1, *grid).float().cpu()

    def blocks(self) -> list[str]:
        return sorted({b for b, _ in self.maps})

    def steps(self) -> list[int]:
        return sorted({s for _, s in self.maps})

    def get(self, block: str, step: int, token: int, after: bool = True) -> torch.Tensor:
        """One (h, w) map."""
        return self.maps[(block, step)][int(after), token]

    def mean_over(self, kind: str, step: int, token: int, after: bool = True, size: tuple[int, int] | None = None) -> torch.Tensor:
        """The average map of all blocks of a kind ("down", "mid", "up" or "all") at a step,
        each resized to ``size`` (default: the largest grid)."""
        import torch.nn.functional as F

        picked = [m[int(after), token] for (b, s), m in self.maps.items() if s == step and (kind == "all" or block_kind(b) == kind)]
        if not picked:
            raise KeyError(f"no captured maps for {kind!r} blocks at step {step}")
        size = size or max((m.shape for m in picked), key=lambda s: s[0] * s[1])
        resized = [F.interpolate(m[None, None], size=size, mode="bilinear", align_corners=False)[0, 0] for m in picked]
        return torch.stack(resized).mean(0)


def attention_grid(latent_hw: tuple[int, int], queries: int) -> tuple[int, int]:
    """The (h, w) grid of an attention layer with ``queries`` positions in a UNet whose input
    latent is ``latent_hw``. Each SDXL downsampler is a 3×3 convolution with stride 2 and padding 1,
    which maps a side n to ⌈n/2⌉ (so 125 → 63 → 32), and the up path restores the same sizes."""
    h, w = latent_hw
    while h * w > queries and (h > 1 or w > 1):
        h, w = (h + 1) // 2, (w + 1) // 2
    if h * w != queries:
        raise ValueError(f"no UNet level of a {latent_hw[0]}x{latent_hw[1]} latent has {queries} positions")
    return h, w


def block_kind(name: str) -> str:
    """'down_blocks.1.attentions.0…' → 'down'; mid_block → 'mid'; up_blocks → 'up'."""
    if name.startswith("down_blocks"):
        return "down"
    if name.startswith("mid_block"):
        return "mid"
    return "up"


class HostParking:
    """Tensors parked in CPU memory between their recording and their use on ``device``.

    The low-VRAM mode's KV path: the KV-encoder pass's keys and values (0.8 GiB for SDXL's two
    encoder rows at 1024² in float16) would otherwise sit on the device beside the denoiser's
    activations. :meth:`park` copies a tensor into pinned host memory and lets the device copy go;
    :meth:`unpark` copies it back when its layer reads it. Both copies are asynchronous on the
    current stream, so they keep their order with the kernels around them (the device block a park
    frees is reused only by work queued after the copy) and the host never waits. On a device that
    is not CUDA there is nothing to save: both return the tensor as it is.
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)

    def park(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type != "cuda" or t.device.type != "cuda":
            return t
        host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
        return host.copy_(t, non_blocking=True)

    def unpark(self, t: torch.Tensor) -> torch.Tensor:
        return t if t.device == self.device else t.to(self.device, non_blocking=True)


@dataclass
class KVCache:
    """LCM-Lookahead's extended self-attention cache (SPEC §4): one KV-encoder pass's keys and values.

    The encoder pass runs ``rows`` conditioning rows (inference: the null-text row and the "a photo
    of a face" row; training: one row per sample, its own reference) times ``photos`` reference
    photos, row-major. Each self-attention layer records its K and V, stored per row as
    (rows, photos·N, C): the tokens of all reference photos of a row side by side. Denoiser samples
    then attend to K = [K_gen ; K_ref[row]], V = [V_gen ; V_ref[row]] (the row each sample reads is
    in ``AttentionContext.kv_index``). ``drop_rate`` (training: 0.05) drops that fraction of the
    reference tokens; the mask of a layer is drawn once per cache, so a pass (and its
    gradient-checkpointing recomputation) always sees the same tokens. It is 0 at inference.
    ``release_on_read`` (inference, when nothing reads the cache after the denoiser's UNet call)
    hands each layer's K/V back once that layer has read them, so the cache shrinks as the call
    goes down and up the UNet instead of sitting whole beside the up blocks' activations.
    ``parking`` (a :class:`HostParking`; the low-VRAM mode) keeps the recorded K/V in CPU memory,
    each layer's coming back to the device when that layer reads them.
    """

    rows: int = 1
    drop_rate: float = 0.0
    generator: torch.Generator | None = None
    store: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    release_on_read: bool = False
    released: set[str] = field(default_factory=set)
    parking: HostParking | None = None

    def record(self, name: str, key: torch.Tensor, value: torch.Tensor) -> None:
        """key/value: (rows·photos, N, C) → stored as (rows, photos·N', C), N' the kept tokens."""
        c = key.shape[-1]
        k, v = key.reshape(self.rows, -1, c), value.reshape(self.rows, -1, c)
        if self.drop_rate > 0:
            keep = self.masks.get(name)
            if keep is None:
                draw = torch.rand(k.shape[1], generator=self.generator, device="cpu")
                keep = self.masks[name] = (draw >= self.drop_rate).nonzero().flatten()
            idx = keep.to(k.device)
            k, v = k.index_select(1, idx), v.index_select(1, idx)
        if self.parking is not None:
            k, v = self.parking.park(k), self.parking.park(v)
        self.store[name] = (k, v)

    def read(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(rows, N_ref, C) keys and values of layer ``name``, or None when it recorded nothing
        (with ``release_on_read``, a second read of a layer is an error: its K/V are gone)."""
        if not self.release_on_read:
            kv = self.store.get(name)
        elif name in self.released:
            raise RuntimeError(f"KV cache: layer {name} read twice, but its K/V were released after the first read")
        else:
            self.released.add(name)
            kv = self.store.pop(name, None)
        if kv is None or self.parking is None:
            return kv
        return self.parking.unpark(kv[0]), self.parking.unpark(kv[1])

    def __len__(self) -> int:
        return len(self.store)


@dataclass
class AttentionContext:
    """Everything the processors need for one UNet call of one request. The engine hands each call
    its own copy (``dataclasses.replace``), so nothing a later call changes reaches an earlier one
    (gradient checkpointing recomputes blocks with the context of their own pass)."""

    ip_scale: float  # λ, FastFace Eq. 3
    am: AMPlan
    step: int = 0
    capture: MapStore | None = None
    capture_index: int = 0  # which sample of the UNet batch to record (the display branch)
    kv: KVCache | None = None  # LCM-Lookahead reference keys/values
    kv_record: bool = False  # this call is the KV-encoder pass: self-attention layers record into kv
    kv_copy_scale: float = 1.0  # scale of the KV-copy LoRA on the encoder pass (authors' design)
    # per batch sample: the KV-encoder row whose reference K/V it attends to, −1 for none
    kv_index: tuple[int, ...] | None = None
    # AM2's min–max pools over groups of this many consecutive samples (the guidance branches of
    # one image) when attention.am_norm_scope is "image-branches"; 1 = per sample
    am_group: int = 1
