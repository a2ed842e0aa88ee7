"""Peak device memory of a request, predicted on a machine without the device.

``torch.cuda.max_memory_allocated`` is the sum of the live tensors' storages at the worst moment
(rounded to the allocator's 512-byte blocks). That sum depends only on which tensors exist when,
not on their values, so it can be followed on the CPU: :class:`LiveBytes`, a dispatch mode, adds
every storage an operator creates and takes it off when its last tensor dies. The weights on the
device are counted apart: the models that never move in the engine's memory mode (every model in
``full``; the UNet, VAE and TAESD in ``balanced``; none in ``low``), and the offloaded ones while
accelerate's hooks would hold them there (:func:`follow_offload`); the low-VRAM mode's KV K/V
parked in host memory are not counted while they are there (:func:`follow_parking`).

A full-size request is far too slow to compute on two CPU cores, and the values do not matter, so
with ``allocate_only`` every operator whose outputs are large (over :data:`COMPUTE_BELOW` bytes)
runs on the meta device for its output shapes and gets fresh zero-filled tensors of those shapes
instead of its results; small operators (timesteps, scalars, the scheduler's bookkeeping, the
quantiles' positions) and views compute for real. The allocation pattern is the same
(``tests/test_predict_memory.py`` checks that against a computed run), so the peak is too. At the
tiny architecture every operator computes for real (``--allocate-only auto``): there, running an
operator costs less than finding its output shapes on the meta device (about 3.5× less per request).

What it cannot see: memory a kernel takes for itself inside one operator (cuDNN's convolution
workspaces, cuBLAS's workspace) and the CUDA context, which ``max_memory_allocated`` does not count
either except for the workspaces. The prediction is a lower bound by those workspaces;
``tests/test_cuda.py`` compares it with the allocator on a lent GPU.

    python benchmarks/predict_memory.py --arch full --size 1024 --dtype float16 --configs plain,am2+dcg,kv
    python benchmarks/predict_memory.py --arch full --memory balanced,low
    python benchmarks/predict_memory.py --arch tiny --size 128           # seconds, what CI runs
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
import weakref
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_gpu

import torch  # noqa: E402
from torch.utils import _pytree as pytree  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from lcmla import Engine, GenerationSettings  # noqa: E402

GIB = 2**30
#: operators whose outputs are smaller than this compute for real under ``allocate_only``
COMPUTE_BELOW = 1 << 20
#: views that the schema does not mark as aliasing: running them for real keeps them views
_VIEWS = {torch.ops.aten._unsafe_view.default, torch.ops.aten._reshape_alias.default}


def _aliases(func) -> bool:
    """True when an output of ``func`` may share its input's storage (a view or an in-place op)."""
    return func in _VIEWS or any(r.alias_info is not None for r in func._schema.returns)


def _data_dependent(func) -> bool:
    """True for operators whose output shape or Python value depends on the input values."""
    tags = getattr(func, "tags", ())
    return torch.Tag.data_dependent_output in tags or torch.Tag.dynamic_output_shape in tags


class LiveBytes(TorchDispatchMode):
    """The bytes of every storage created under this mode and still alive, and their peak.

    ``resident`` (bytes, e.g. the weights on the device) is added to the live bytes; change it
    with :meth:`set_resident`, which also counts towards the peak. ``phase`` (a label, e.g. the
    model running) is recorded with the peak: ``peak_phase``. With ``allocate_only``, large
    operators allocate their outputs without computing them (module docstring)."""

    def __init__(self, *, allocate_only: bool = False, compute_below: int = COMPUTE_BELOW, resident: int = 0,
                 device: str | None = None):
        super().__init__()
        self.allocate_only, self.compute_below, self.device = allocate_only, compute_below, device
        self.live, self.resident, self.peak, self.peak_phase = 0, resident, resident, None
        self.phase: str | None = None
        self.phase_peaks: dict[str, int] = {}
        self._sizes: dict[int, int] = {}  # storage data_ptr → bytes, for the live ones
        self.allocated_only = 0  # operators that allocated instead of computing (a sanity figure)
        self._untracked = False

    # ---- counting ---------------------------------------------------------------------------------

    def _note_peak(self) -> None:
        now = self.live + self.resident
        if self.phase is not None:
            self.phase_peaks[self.phase] = max(self.phase_peaks.get(self.phase, 0), now)
        if now > self.peak:
            self.peak, self.peak_phase = now, self.phase

    def _freed(self, ptr: int) -> None:
        self.live -= self._sizes.pop(ptr, 0)

    def _track(self, t: torch.Tensor) -> None:
        if t.device.type == "meta" or (self.device is not None and t.device.type != self.device):
            return
        storage = t.untyped_storage()
        ptr, size = storage.data_ptr(), storage.nbytes()
        if ptr == 0 or ptr in self._sizes:
            return
        self._sizes[ptr] = size
        self.live += size
        weakref.finalize(storage, self._freed, ptr)
        self._note_peak()

    def set_resident(self, nbytes: int) -> None:
        self.resident = nbytes
        self._note_peak()

    def set_phase(self, phase: str | None) -> None:
        self.phase = phase
        self._note_peak()

    @contextlib.contextmanager
    def untracked(self):
        """Operators run here compute for real and their outputs are not counted (what the device
        would keep elsewhere, e.g. a copy in host memory)."""
        self._untracked = True
        try:
            yield
        finally:
            self._untracked = False

    # ---- dispatch ---------------------------------------------------------------------------------

    def _allocate(self, func, args, kwargs, force: bool = False):
        """``func``'s outputs as zero-filled tensors of its meta outputs' shapes (None: compute it;
        ``force``: whatever their size, for an operator the device has no kernel for in this dtype)."""
        devices = {a.device for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
        if len(devices) != 1:
            return None
        (device,) = devices
        meta_args, meta_kwargs = pytree.tree_map_only(torch.Tensor, lambda a: a.to("meta"), (args, kwargs))
        try:
            out = func(*meta_args, **meta_kwargs)
        except (NotImplementedError, RuntimeError, TypeError):  # no meta kernel: compute it for real
            return None
        leaves = [o for o in pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
        if not force and sum(o.untyped_storage().nbytes() for o in leaves) < self.compute_below:
            return None
        self.allocated_only += 1
        # zeros, not garbage: an integer output may be used as indices, a float one in a test
        return pytree.tree_map_only(
            torch.Tensor, lambda m: torch.empty_strided(m.shape, m.stride(), dtype=m.dtype, device=device).zero_(), out)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._untracked:
            return func(*args, **kwargs)
        out, aliasing = None, _aliases(func)
        if self.allocate_only and not aliasing and not _data_dependent(func):
            out = self._allocate(func, args, kwargs)
        if out is None:
            try:
                out = func(*args, **kwargs)
            except (NotImplementedError, RuntimeError):  # e.g. no float16 kernel on the CPU
                out = self._allocate(func, args, kwargs, force=True) if self.allocate_only else None
                if out is None:
                    raise
        if aliasing:  # a view or an in-place result: an input's storage (ours, or a weight's), not a new one
            return out
        for leaf in pytree.tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._track(leaf)
        return out


def module_bytes(*modules) -> int:
    """Bytes of the parameters and buffers of ``modules`` (each storage once)."""
    seen: dict[int, int] = {}
    for module in modules:
        if module is None:
            continue
        for t in list(module.parameters()) + list(module.buffers()):
            st = t.untyped_storage()
            seen.setdefault(st.data_ptr(), st.nbytes())
    return sum(seen.values())


def engine_models(engine: Engine) -> dict[str, torch.nn.Module]:
    """The engine's models by name (the FaceID projection and IP-Adapter layers are the UNet's)."""
    pipe, c = engine.pipe, engine.components
    models = {"text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2,
              "image_encoder": c.image_encoder, "unet": pipe.unet, "vae": pipe.vae, "taesd": c.taesd}
    return {k: v for k, v in models.items() if v is not None}


@contextlib.contextmanager
def follow_phases(tracker: LiveBytes, engine: Engine):
    """Label the tracker's phase with the model that runs (the autoencoders by their encoder and
    decoder, whose ``forward`` is what ``encode``/``decode`` call)."""
    handles = []
    for name, model in engine_models(engine).items():
        parts = [getattr(model, p) for p in ("encoder", "decoder") if hasattr(model, p)] if name in ("vae", "taesd") \
            else [model]
        for part in parts:
            handles.append(part.register_forward_pre_hook(lambda *_, n=name: tracker.set_phase(n)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def follow_offload(tracker: LiveBytes, engine: Engine):
    """In the offloading modes, count as resident the weights of the models that accelerate's hooks
    (``lcmla.memory``) would have moved to a CUDA device and not yet back: a
    model's ``pre_forward`` offloads the previous model of the chain, then moves it; ``offload``
    moves it back. On the CPU the hooks themselves move nothing (their device is the CPU), so the
    moves are followed here, by wrapping each hook's two methods for the duration."""
    on_device: dict[int, int] = {}
    base = tracker.resident  # the models that never move
    saved = []
    for user_hook in engine._offload_hooks:
        model, hook = user_hook.model, user_hook.hook
        pre, off, size = hook.pre_forward, user_hook.offload, module_bytes(model)

        def pre_forward(module, *args, _pre=pre, _hook=hook, _model=model, _size=size, **kwargs):
            previous = getattr(_hook.prev_module_hook, "model", None)
            if previous is not None:
                on_device.pop(id(previous), None)
            on_device[id(_model)] = _size
            tracker.set_resident(base + sum(on_device.values()))
            return _pre(module, *args, **kwargs)

        def offload(_off=off, _model=model):
            on_device.pop(id(_model), None)
            tracker.set_resident(base + sum(on_device.values()))
            _off()

        hook.pre_forward, user_hook.offload = pre_forward, offload
        saved.append((hook, user_hook))
    try:
        yield
    finally:
        for hook, user_hook in saved:
            del hook.pre_forward, user_hook.offload


class _FollowedParking:
    """The engine's :class:`~lcmla.attention.context.HostParking` as it acts on CUDA, followed on
    the CPU: a parked tensor is a host copy the tracker does not count (its device original goes
    when nothing else holds it), an unparked one a new device tensor."""

    def __init__(self, tracker: LiveBytes):
        self.tracker = tracker

    def park(self, t: torch.Tensor) -> torch.Tensor:
        with self.tracker.untracked():
            return t.clone()

    def unpark(self, t: torch.Tensor) -> torch.Tensor:
        return t.clone()


@contextlib.contextmanager
def follow_parking(tracker: LiveBytes, engine: Engine):
    """In the low-VRAM mode, count the KV cache's parked K/V as off the device (``_FollowedParking``)."""
    saved = engine.kv_parking
    if saved is not None:
        engine.kv_parking = _FollowedParking(tracker)
    try:
        yield
    finally:
        engine.kv_parking = saved


def predict_request(engine: Engine, settings: GenerationSettings, identity, *, allocate_only: bool = True,
                    compute_below: int = COMPUTE_BELOW, previews: bool = False) -> dict:
    """Run one request under :class:`LiveBytes` (``allocate_only``, ``compute_below``: its
    arguments); returns the predicted peak and its parts (bytes):
    ``resident`` (the weights that never leave the device in this memory mode), ``phase_peaks``
    (the peak while each model ran), ``peak_phase``."""
    import gc

    gc.collect()
    hooked = {id(h.model) for h in engine._offload_hooks}
    resident = module_bytes(*(m for m in engine_models(engine).values() if id(m) not in hooked))
    tracker = LiveBytes(allocate_only=allocate_only, compute_below=compute_below, resident=resident,
                        device=engine.device.type)
    t0 = time.perf_counter()
    with follow_phases(tracker, engine), follow_offload(tracker, engine), follow_parking(tracker, engine), tracker:
        if previews:
            engine.previews(settings, identity)
        else:
            engine.generate(settings, identity)
    return {"peak": tracker.peak, "peak_phase": tracker.peak_phase, "resident": resident,
            "phase_peaks": dict(tracker.phase_peaks), "seconds": time.perf_counter() - t0,
            "allocated_only": tracker.allocated_only}


def main(argv=None) -> int:
    from bench_gpu import CONFIGS, config_settings

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=("full", "tiny"), default="full")
    ap.add_argument("--preset", default="hyper-sdxl-4step", help="scheduler, steps and guidance of this preset")
    ap.add_argument("--size", type=int, default=None, help="square output size (default: 1024 full, 128 tiny)")
    ap.add_argument("--dtype", default="float16", help="the device dtype to predict for (float16, bfloat16)")
    ap.add_argument("--memory", default="full,balanced,low", help="memory modes, comma-separated (full, balanced, low)")
    ap.add_argument("--configs", default="plain,dcg,am2+dcg,kv,previews",
                    help="bench_gpu's configurations but the authors' way (its host-memory bias would count here)")
    ap.add_argument("--images", default="1", help="images per request, comma-separated (batched as on CUDA)")
    ap.add_argument("--fp16-fix-vae", action="store_true",
                    help="as with madebyollin/sdxl-vae-fp16-fix on disk (the engine's float16 VAE: same "
                         "architecture, decoding in float16 instead of float32)")
    ap.add_argument("--allocate-only", choices=("auto", "yes", "no"), default="auto",
                    help="large operators allocate their outputs without computing them (auto: at the full "
                         "architecture only; the peak is the same either way)")
    ap.add_argument("--face", default=str(ROOT / "assets" / "face.png"))
    args = ap.parse_args(argv)
    allocate_only = args.allocate_only == "yes" or (args.allocate_only == "auto" and args.arch == "full")
    if args.fp16_fix_vae and args.dtype not in ("float16", "fp16"):
        ap.error("--fp16-fix-vae is the float16 engine's VAE: use it with --dtype float16")
    size = args.size or (1024 if args.arch == "full" else 128)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    known = [c for c in CONFIGS if not c.startswith("authors")]
    if set(configs) - set(known):
        ap.error(f"unknown configs {sorted(set(configs) - set(known))}; choose from {', '.join(known)}")
    counts = [int(n) for n in args.images.split(",") if n]
    print(f"predicted peak device memory (torch.cuda.max_memory_allocated without kernel workspaces), "
          f"SDXL {args.arch} architecture, {size}×{size}, {args.dtype}, VAE in "
          f"{'float16 (the fp16-fix VAE)' if args.fp16_fix_vae else 'float32' if args.dtype in ('float16', 'fp16') else args.dtype}, "
          f"torch {torch.__version__}; {'allocating' if allocate_only else 'computing'} operators' outputs")
    unit, scale = ("GiB", GIB) if args.arch == "full" else ("MiB", 2**20)
    print(f"{'memory':8s} {'config':16s} {'images':>6s} {'resident':>8s} {'peak ' + unit:>8s}  {'at':14s} "
          f"peak while each model ran ({unit})")
    modes = [m.strip() for m in args.memory.split(",") if m.strip()]
    for mode in modes:
        # CUDA's defaults (images batched into one UNet call; channels-last does not change sizes)
        engine = Engine.load(args.preset, device="cpu", dtype=args.dtype, memory=mode, random_weights=args.arch,
                             batch_images=True, channels_last=False)
        if args.fp16_fix_vae:
            engine.pipe.vae.to(torch.float16)  # what lcmla.loading loads in its place when present
        identity = engine.analyze_faces([args.face])
        base = GenerationSettings(prompt="a pencil drawing of a face", preset=args.preset).replace(
            output__width=size, output__height=size)
        if mode == modes[0]:
            print(f"weights ({unit}): " + ", ".join(f"{k} {module_bytes(m) / scale:.2f}"
                                                 for k, m in engine_models(engine).items()))
        for name in configs:
            for n in counts:
                if name == "previews" and n > 1:
                    continue
                s = config_settings(name, base, args.preset).replace(output__num_images=n)
                r = predict_request(engine, s, identity, allocate_only=allocate_only, previews=name == "previews")
                parts = " ".join(f"{k} {v / scale:.2f}" for k, v in r["phase_peaks"].items())
                print(f"{mode:8s} {name:16s} {n:6d} {r['resident'] / scale:8.2f} {r['peak'] / scale:8.2f}  "
                      f"{r['peak_phase']!s:14s} {parts}   ({r['seconds']:.0f} s)", flush=True)
        del engine
    print("resident: the weights that never leave the device in that mode; goals (1024², fp16): AM2+DCG ≤ 10 GB, "
          "the low-VRAM mode ≤ 8 GB")
    return 0


if __name__ == "__main__":
    from lcmla.loading import quiet_console

    quiet_console()
    raise SystemExit(main())
