"""Module state per pass (which LoRAs at which scale), kept right under gradient checkpointing.

peft keeps LoRA scales on modules. A training step runs several passes with different states (the
KV-encoder pass: the KV-encoder LoRA alone; the denoiser pass: the FaceID LoRA; the lookahead
pass: FaceID LoRA + LCM-LoRA at α), and gradient checkpointing recomputes blocks during backward,
when the module state is the LAST pass's. No pass of training uses FreeU (an inference knob, SPEC
§4): the switcher switches it off once, when it is made. Two fixes, both here:

- :meth:`PassSwitcher.set` applies a :class:`PassState` and then sets ``requires_grad`` to what the
  run trains, on every LoRA parameter: peft's ``set_adapters``/``enable_lora`` switch it OFF on the
  adapters they deactivate (a trainable adapter switched off for one pass would stop receiving
  gradients) and ON on every adapter they activate (the frozen LCM-LoRA and FaceID LoRA would
  get gradients, costing backward time and memory for nothing);
- :meth:`PassSwitcher.checkpoint_function` is a ``gradient_checkpointing_func`` for diffusers that
  records the pass state at forward time and applies it when the block is recomputed (and leaves
  it applied: the next recomputed block is usually of the same pass, and every pass sets its own
  state before it runs).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch


@dataclass(frozen=True)
class PassState:
    """The module state of one pass: adapter → scale (adapters left out are off)."""

    adapters: tuple[tuple[str, float], ...] = ()

    @classmethod
    def of(cls, adapters: dict[str, float] | None = None) -> "PassState":
        return cls(tuple(sorted((k, float(v)) for k, v in (adapters or {}).items() if v != 0)))


@dataclass
class PassSwitcher:
    """Applies pass states to a pipeline's UNet (see the module docstring)."""

    pipe: Any
    trainable: list[torch.nn.Parameter] = field(default_factory=list)
    current: PassState | None = None
    _lora_disabled: bool = False
    _frozen: tuple[tuple[str, ...], list[torch.nn.Parameter]] | None = None

    def __post_init__(self) -> None:
        self.pipe.unet.disable_freeu()  # a pipeline that had FreeU switched on trains without it

    def _adapter_names(self) -> tuple[str, ...]:
        return tuple(getattr(self.pipe.unet, "peft_config", {}).keys())

    def frozen_lora_parameters(self) -> list[torch.nn.Parameter]:
        """The UNet's peft adapter parameters that are not trained (cached per set of adapters)."""
        names = self._adapter_names()
        if self._frozen is None or self._frozen[0] != names:
            from peft.tuners.tuners_utils import BaseTunerLayer

            trainable = {id(p) for p in self.trainable}
            seen: set[int] = set()
            frozen: list[torch.nn.Parameter] = []
            for module in self.pipe.unet.modules():
                if not isinstance(module, BaseTunerLayer):
                    continue
                for layer_name in module.adapter_layer_names:
                    for p in getattr(module, layer_name).parameters():
                        if id(p) not in trainable and id(p) not in seen:
                            seen.add(id(p))
                            frozen.append(p)
            self._frozen = (names, frozen)
        return self._frozen[1]

    def set(self, state: PassState) -> None:
        if state == self.current:
            return
        names = self._adapter_names()
        active = {n: s for n, s in state.adapters if n in names}
        if not active:
            if names and not self._lora_disabled:
                self.pipe.disable_lora()
                self._lora_disabled = True
        else:
            if self._lora_disabled:
                self.pipe.enable_lora()
                self._lora_disabled = False
            self.pipe.set_adapters(list(active), list(active.values()))
        # peft's set_adapters switches requires_grad off on inactive adapters and on on active ones:
        # put back what the run trains
        for p in self.trainable:
            p.requires_grad_(True)
        for p in self.frozen_lora_parameters():
            if p.requires_grad:
                p.requires_grad_(False)
        self.current = state

    @contextlib.contextmanager
    def _recomputing(self, state: PassState) -> Iterator[None]:
        """``state`` for a block recomputed in backward, left applied afterwards: backward recomputes
        the blocks of one pass one after another, so only the first of them pays for peft's
        ``set_adapters`` (a walk over every UNet module). Safe because every forward pass calls
        :meth:`set` before it runs, and nothing between backward and the next pass reads the state."""
        self.set(state)
        yield

    def checkpoint_function(self) -> Callable:
        """A ``gradient_checkpointing_func`` that recomputes each block under its own pass state."""
        from torch.utils.checkpoint import checkpoint

        def run(module, *args):
            state = self.current
            ctx = lambda: (contextlib.nullcontext(), self._recomputing(state))  # noqa: E731 - forward, recompute
            return checkpoint(module.__call__, *args, use_reentrant=False, context_fn=ctx)

        return run
