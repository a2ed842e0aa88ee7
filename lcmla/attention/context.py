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
        q = before.shape[-2]
        h, w = self.latent_hw
        factor = max(1, round((h * w / q) ** 0.5))
        grid = (h // factor, w // factor)
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


def block_kind(name: str) -> str:
    """'down_blocks.1.attentions.0…' → 'down'; mid_block → 'mid'; up_blocks → 'up'."""
    if name.startswith("down_blocks"):
        return "down"
    if name.startswith("mid_block"):
        return "mid"
    return "up"


@dataclass
class KVCache:
    """LCM-Lookahead's extended self-attention cache (SPEC §4), owned by the engine per call.

    While ``recording``, every self-attention layer stores the keys and values it computes (the KV
    encoder pass over the reference face); otherwise layers that find an entry append it:
    K = [K_gen ; K_ref], V = [V_gen ; V_ref]. Entries are (1, N_ref, C), the tokens of all
    reference photos laid side by side. ``drop_rate`` (training: 0.05) drops that fraction of the
    cached tokens at random each time they are read; it is 0 at inference.
    """

    store: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    recording: bool = False
    drop_rate: float = 0.0
    generator: torch.Generator | None = None

    def record(self, name: str, key: torch.Tensor, value: torch.Tensor) -> None:
        """key/value: (n_ref, N, C) → stored as (1, n_ref·N, C)."""
        c = key.shape[-1]
        self.store[name] = (key.reshape(1, -1, c), value.reshape(1, -1, c))

    def read(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        entry = self.store.get(name)
        if entry is None or self.drop_rate <= 0:
            return entry
        k, v = entry
        keep = torch.rand(k.shape[1], generator=self.generator, device="cpu") >= self.drop_rate
        idx = keep.nonzero().flatten().to(k.device)
        return k.index_select(1, idx), v.index_select(1, idx)

    def __len__(self) -> int:
        return len(self.store)


@dataclass
class AttentionContext:
    """Everything the processors need for one UNet call of one request."""

    ip_scale: float  # λ, FastFace Eq. 3
    am: AMPlan
    step: int = 0
    capture: MapStore | None = None
    capture_index: int = 0  # which sample of the UNet batch to record (the full-condition branch)
    kv: KVCache | None = None  # LCM-Lookahead reference keys/values
    kv_from: int = 0  # batch samples [kv_from:] attend to the cached K/V; earlier ones do not
    extra: dict = field(default_factory=dict)  # room for later mechanisms (e.g. the KV cache)
