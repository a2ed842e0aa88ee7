"""The training package on the tiny preset (CPU, minutes): samplers, identity loss, passes and
gradients, per-sample KV, dropout, export."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from util import tiny_components

from training.data import Collate, PairSample, batch_order
from training.identity_loss import IdentityLoss, fixed_landmarks
from training.objective import Objective, ObjectiveConfig
from training.passes import PassSwitcher
from training.sampling import drop_mask, sample_lora_scale, sample_timesteps, timestep_probabilities

RES = 64  # training resolution of the tests: latent 8x8


# ---- pure samplers ------------------------------------------------------------------------------


def test_timestep_sampler_matches_its_distribution():
    from scipy.stats import chisquare

    probs = timestep_probabilities(1000, 0.5)
    assert probs.sum().item() == pytest.approx(1.0) and probs[-1] > probs[0]  # favours noisy steps
    assert probs[999] / probs[0] == pytest.approx((1 - 0.5 * math.cos(math.pi * 999 / 1000)) / 0.5)
    draws = sample_timesteps(probs, 40000, torch.Generator().manual_seed(0))
    observed = torch.bincount(draws // 50, minlength=20).double()
    expected = probs.reshape(20, 50).sum(1) * 40000
    assert chisquare(observed.numpy(), expected.numpy()).pvalue > 1e-3
    capped = timestep_probabilities(500, 0.2)  # the lookahead's own range: the whole cosine over it
    assert len(capped) == 500 and sample_timesteps(capped, 1000, torch.Generator().manual_seed(1)).max() < 500
    assert capped[499] / capped[0] == pytest.approx((1 - 0.2 * math.cos(math.pi * 499 / 500)) / 0.8)


def test_lora_scale_sampler_matches_its_distribution():
    from scipy.stats import kstest

    g = torch.Generator().manual_seed(0)
    draws = np.array([sample_lora_scale(g) for _ in range(4000)])
    full = draws == 1.0
    assert abs(full.mean() - 0.5) < 3 * math.sqrt(0.25 / 4000)
    rest = draws[~full]
    assert rest.min() >= 0.1 and kstest(rest, "uniform", args=(0.1, 0.9)).pvalue > 1e-3


def test_drop_masks_and_batch_order():
    g = torch.Generator().manual_seed(0)
    assert drop_mask(5, 1.0, g).all() and not drop_mask(5, 0.0, g).any()
    assert abs(drop_mask(20000, 0.1, g).float().mean().item() - 0.1) < 0.01
    a = batch_order(10, 3, epoch=0, seed=1)
    assert a == batch_order(10, 3, epoch=0, seed=1) and a != batch_order(10, 3, epoch=1, seed=1)
    assert len(a) == 3 and len({i for b in a for i in b}) == 9
    r0, r1 = batch_order(10, 2, 0, 1, rank=0, world=2), batch_order(10, 2, 0, 1, rank=1, world=2)
    assert not {i for b in r0 for i in b} & {i for b in r1 for i in b}  # ranks draw disjoint shards


# ---- a tiny recognizer and the identity loss --------------------------------------------------------


class TinyRecognizer(torch.nn.Module):
    """A fixed random conv net honouring the Recognizer interface (the real ones: test_dlib_recognizer)."""

    name, input_size, embedding_dim, scheme = "tiny", 32, 16, "insightface5"

    def __init__(self):
        super().__init__()
        from insightface.utils.face_align import arcface_dst

        torch.manual_seed(3)
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, 2, 1), torch.nn.Tanh(), torch.nn.Conv2d(8, 16, 3, 2, 1),
                                       torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(64, 16))
        self.register_buffer("template", torch.tensor(arcface_dst, dtype=torch.float32) * (32 / 112))
        self.requires_grad_(False)

    def forward(self, crops):
        return torch.nn.functional.normalize(self.net(crops * 2 - 1), dim=-1)


def _canonical_landmarks(size=RES):
    from insightface.utils.face_align import arcface_dst

    return np.asarray(arcface_dst) * (size / 112)


def test_alignment_matches_norm_crop_and_has_gradients(face_path):
    from insightface.utils import face_align

    from lcmla.faces import FaceAnalyzer
    from lcmla.recognizers.base import similarity_transform, warp_affine

    img = np.asarray(Image.open(face_path).convert("RGB"))
    kps = FaceAnalyzer.haar().detect(img)[0].kps
    ref = face_align.norm_crop(img, kps, 112).astype(np.float32)
    x = torch.tensor(img).permute(2, 0, 1)[None].float().requires_grad_(True)
    m = similarity_transform(torch.tensor(kps), torch.tensor(face_align.arcface_dst))
    out = warp_affine(x, m, 112)
    diff = np.abs(out[0].detach().permute(1, 2, 0).numpy() - ref)
    assert diff.mean() < 0.5 and diff.max() < 2.0  # cv2's fixed-point bilinear vs exact bilinear
    out.sum().backward()
    assert x.grad.abs().sum() > 0



def test_the_loss_embeds_what_the_recognizer_sees_on_insightfaces_crop(face_path):
    """IdentityLoss.embed of a [-1, 1] image on landmarks = the recognizer on insightface's
    alignment (estimate_norm + cv2.warpAffine) of the same uint8 pixels, scaled to [0, 1] (its input)."""
    import cv2
    from insightface.utils import face_align

    from lcmla.faces import FaceAnalyzer

    recognizer = TinyRecognizer()
    loss_fn = IdentityLoss(recognizer, fixed_landmarks(_canonical_landmarks()))
    rgb = np.asarray(Image.open(face_path).convert("RGB"))
    kps = FaceAnalyzer.haar().detect(rgb)[0].kps
    size = recognizer.input_size  # 32: insightface's 112-px similarity, scaled to the recognizer's template
    crop = cv2.warpAffine(rgb, face_align.estimate_norm(np.asarray(kps, np.float32), 112) * (size / 112), (size, size))
    theirs = recognizer(torch.from_numpy(crop.copy()).permute(2, 0, 1)[None].float() / 255)[0]
    image = torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        ours = loss_fn.embed(image, torch.as_tensor(np.asarray(kps), dtype=torch.float32)[None])[0]
    assert float(ours @ theirs) > 0.999

def test_identity_loss_is_zero_for_identical_images(face_path, other_face):
    loss_fn = IdentityLoss(TinyRecognizer(), fixed_landmarks(_canonical_landmarks()))
    a = _pixels(Image.open(face_path))
    b = _pixels(Image.open(other_face))
    ref, found = loss_fn.reference(torch.cat([a, a]))
    same, _ = loss_fn(torch.cat([a, a]).requires_grad_(True), ref, found)
    assert same.item() == pytest.approx(0.0, abs=1e-6)
    x = torch.cat([b, a]).requires_grad_(True)
    diff, found2 = loss_fn(x, ref, found)
    assert diff.item() > 1e-3 and found2.all()
    diff.backward()
    assert x.grad[0].abs().sum() > 0 and x.grad[1].abs().sum() < x.grad[0].abs().sum()


def test_the_loss_is_the_mean_over_the_previews_with_a_face(face_path, other_face):
    """A preview without a face is skipped: the loss of [a, b] with b faceless is a's loss alone."""
    canonical = _canonical_landmarks()
    calls = iter([canonical, None])  # preview 0: a face; preview 1: none
    loss_fn = IdentityLoss(TinyRecognizer(), lambda image: next(calls))
    x = torch.cat([_pixels(Image.open(face_path)), _pixels(Image.open(other_face))])
    ref = torch.nn.functional.normalize(torch.randn(2, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    both, found = loss_fn(x, ref)
    alone, _ = IdentityLoss(TinyRecognizer(), fixed_landmarks(canonical))(x[:1], ref[:1])
    assert found.tolist() == [True, False] and alone.item() > 0.1
    assert both.item() == pytest.approx(alone.item(), rel=1e-5)



def test_a_sample_whose_reference_has_no_face_is_skipped(face_path, other_face):
    """Both previews hold a face, but reference 1 had none (its embedding is the stand-in's): the
    loss of [a, b] is a's loss alone, and b is reported not found."""
    loss_fn = IdentityLoss(TinyRecognizer(), fixed_landmarks(_canonical_landmarks()))
    x = torch.cat([_pixels(Image.open(face_path)), _pixels(Image.open(other_face))])
    ref = torch.nn.functional.normalize(torch.randn(2, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    both, found = loss_fn(x, ref, torch.tensor([True, False]))
    alone, _ = loss_fn(x[:1], ref[:1], torch.tensor([True]))
    unmasked, _ = loss_fn(x, ref, torch.tensor([True, True]))
    assert found.tolist() == [True, False] and alone.item() > 0.1
    assert both.item() == pytest.approx(alone.item(), rel=1e-5) and unmasked.item() != pytest.approx(alone.item(), rel=1e-3)

def test_samples_without_a_face_contribute_zero_and_keep_the_graph(face_path):
    loss_fn = IdentityLoss(TinyRecognizer(), lambda image: None)
    a = _pixels(Image.open(face_path)).requires_grad_(True)
    ref = torch.nn.functional.normalize(torch.randn(1, 16), dim=-1)
    loss, found = loss_fn(a, ref)
    assert loss.item() == 0.0 and not found.any() and loss.requires_grad
    loss.backward()  # no error: the graph is kept


def _pixels(img: Image.Image, size: int = RES) -> torch.Tensor:
    arr = np.asarray(img.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1)[None] / 127.5 - 1


# ---- the objective on the tiny model ---------------------------------------------------------------


def _pairs(face_path, other_face, n=2):
    from lcmla.faces import FaceAnalyzer

    haar = FaceAnalyzer.haar()
    out = []
    for i, path in enumerate([face_path, other_face][:n]):
        photo = Image.open(path).convert("RGB")
        face = haar.identity([photo])
        target = ImageOps.posterize(photo, 4) if i % 2 == 0 else ImageOps.mirror(photo)
        out.append(PairSample(photo, face.boxes[0], face.crops[0], face.embedding, target, "a pencil drawing of a face", f"k{i}"))
    return out


def _kit(parts=("proj", "ip-kv", "kv-lora"), checkpointing=False, **cfg):
    from training.model import setup_trainables

    comps = tiny_components(lcm_lora=True)
    pipe = comps.pipe
    pipe.unet.encoder_hid_proj.image_projection_layers[0].shortcut = True
    torch.manual_seed(0)  # the new LoRAs' A matrices are random: every kit gets the same
    trainables = setup_trainables(pipe, parts)
    switcher = PassSwitcher(pipe, trainable=trainables.params())
    if checkpointing:
        pipe.unet.enable_gradient_checkpointing(gradient_checkpointing_func=switcher.checkpoint_function())
    pipe.unet.train()
    loss_fn = IdentityLoss(TinyRecognizer(), fixed_landmarks(_canonical_landmarks()))
    objective = Objective(pipe, comps.image_encoder, comps.taesd, switcher, ObjectiveConfig(**cfg), loss_fn)
    collate = Collate(RES, comps.clip_processor)
    return comps, trainables, objective, collate


def _batch(objective, collate, pairs):
    batch = collate(pairs)
    batch.reference_id, batch.reference_found = objective.identity_loss.reference(batch.reference)
    return batch


def _grads(trainables):
    return {n: (None if p.grad is None else p.grad.detach().clone()) for n, p in trainables.named()}


def _eps_at_fixed_input(objective, cond, cache=None):
    """The denoiser's ε for the two samples of ``cond`` on one fixed noisy latent and timesteps."""
    z = torch.randn(2, 4, RES // 8, RES // 8, generator=torch.Generator().manual_seed(1))
    return objective.predict(z, torch.tensor([400, 700]), cond, cache, objective.denoiser_state())


def test_a_pass_with_no_lora_then_one_with_a_lora_runs_the_lora_again():
    """The KV pass of a kit without FaceID LoRA can switch every adapter off (disable_lora); the
    next pass that names a LoRA must switch them back on, at its own scale, or it runs the base
    weights. Checked on one LCM-LoRA layer, called directly."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from training.passes import PassState

    comps, trainables, objective, collate = _kit()
    layer = next(m for m in comps.pipe.unet.modules() if isinstance(m, BaseTunerLayer) and list(m.lora_A) == ["lcm"])
    x = torch.randn(1, layer.base_layer.in_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    switcher = objective.switcher
    with torch.no_grad():
        switcher.set(PassState.of({"lcm": 1.0}))
        full = layer(x)
        switcher.set(PassState.of({}))
        base = layer(x)
        switcher.set(PassState.of({"lcm": 1.0}))
        again = layer(x)
        switcher.set(PassState.of({"lcm": 0.5}))
        half = layer(x)
    assert not torch.allclose(full, base) and torch.allclose(again, full)
    assert torch.allclose(half, base + 0.5 * (full - base), atol=1e-5)


def test_training_runs_without_freeu_even_on_a_pipeline_that_had_it_on(face_path, other_face):
    """FreeU is an inference knob (SPEC §4): the switcher a training run makes switches it off, so
    the denoiser predicts what a UNet that never had it predicts."""
    comps, trainables, objective, collate = _kit()
    batch = collate(_pairs(face_path, other_face))
    with torch.no_grad():
        cond, _ = objective.conditions(batch, torch.Generator().manual_seed(0), dropout=False)
        plain = _eps_at_fixed_input(objective, cond)
        comps.pipe.unet.enable_freeu(s1=0.9, s2=0.2, b1=1.5, b2=1.6)
        with_freeu = _eps_at_fixed_input(objective, cond)  # the same pass state: the switcher leaves it on
        objective.switcher = PassSwitcher(comps.pipe, trainable=trainables.params())
        again = _eps_at_fixed_input(objective, cond)
    assert not torch.allclose(with_freeu, plain, atol=1e-4)
    torch.testing.assert_close(again, plain)


def test_gradients_with_checkpointing_equal_without(face_path, other_face):
    pairs = _pairs(face_path, other_face)
    results = []
    for ckpt in (False, True):
        comps, trainables, objective, collate = _kit(checkpointing=ckpt, lookahead_batch=2)
        loss, logs = objective(_batch(objective, collate, pairs), torch.Generator().manual_seed(0))
        loss.backward()
        results.append((loss.detach(), _grads(trainables)))
    (l0, g0), (l1, g1) = results
    assert torch.equal(l0, l1)
    assert g0.keys() == g1.keys()
    for name in g0:
        assert (g0[name] is None) == (g1[name] is None), name
        if g0[name] is not None:
            assert torch.allclose(g0[name], g1[name], atol=1e-7, rtol=1e-5), name


def test_the_objective_is_the_spec_equation_replayed_from_its_passes(face_path, other_face):
    """SPEC §4, checked from what the passes actually received (spies, no re-run of the code):
    z_t = √ᾱ·z0 + √(1−ᾱ)·ε; the KV encoder reads the reference latent noised to the same t with the
    same ε; L_diffusion = MSE(ε̂, ε); the lookahead pass runs at t < M with its own ε, the clean
    (never dropped) conditions and the LCM-LoRA at α; TAESD decodes ẑ0 = c_skip·z_t + c_out·x̂0
    (Eq. 3, written out here); the identity loss scores that decode; L = L_diff + λ·α·L_LH."""
    lam, cap = 0.3, 120
    comps, trainables, objective, collate = _kit(text_drop=1.0, identity_drop=1.0, lambda_lookahead=lam,
                                                 lookahead_max_t=cap, faceid_lora_scale=0.6)
    acp = comps.pipe.scheduler.alphas_cumprod.double()
    # the two timestep distributions: p(t) ∝ 1 − 0.5·cos(πt/T) over T, 1 − 0.2·cos(πt/M) over M
    for probs, alpha, span in ((objective.p_t, 0.5, len(acp)), (objective.p_t_lookahead, 0.2, cap)):
        w = 1 - alpha * torch.cos(math.pi * torch.arange(span, dtype=torch.float64) / span)
        torch.testing.assert_close(probs, w / w.sum())
    # SDXL's LCM boundary (s = 10, σ_d = 0.5) gives c_skip < 0.003 at every t ≥ 1, so ẑ0 ≈ x̂0 there:
    # a small s makes the c_skip term large enough that a preview without it cannot pass
    objective.lcm_boundary = (0.004, 0.5)
    batch = _batch(objective, collate, _pairs(face_path, other_face))
    latents, kv_inputs, kv_states, predicts, decoded, scored = [], [], [], [], [], []
    real_latents, real_kv, real_predict, real_decode = objective._latents, objective._kv, objective.predict, comps.taesd.decode
    real_loss = objective.identity_loss

    def spy_latents(pixels, generator):
        latents.append(real_latents(pixels, generator))
        return latents[-1]

    def spy_kv(z_ref_t, rows, t, generator):
        kv_inputs.append((z_ref_t.detach().clone(), t.clone()))
        cache = real_kv(z_ref_t, rows, t, generator)
        kv_states.append(dict(objective.switcher.current.adapters))  # the state the encoder pass ran in
        return cache

    def spy_predict(z_t, t, cond, cache, state):
        eps = real_predict(z_t, t, cond, cache, state)
        predicts.append((z_t.detach().clone(), t.clone(), cond, dict(state.adapters), eps.detach().clone()))
        return eps

    def spy_decode(z, return_dict=False):
        out = real_decode(z, return_dict=return_dict)
        decoded.append((z.detach().clone(), out[0].detach().clone()))
        return out

    def spy_loss(preview, reference, found):
        scored.append(preview.detach().clone())
        return real_loss(preview, reference, found)

    objective._latents, objective._kv, objective.predict = spy_latents, spy_kv, spy_predict
    comps.taesd.decode, objective.identity_loss = spy_decode, spy_loss
    for seed in range(2):
        latents.clear(), kv_inputs.clear(), kv_states.clear(), predicts.clear(), decoded.clear(), scored.clear()
        with torch.no_grad():
            loss, logs = objective(batch, torch.Generator().manual_seed(seed))
        (z0, z_ref), ((kv1, kt1), (kv2, kt2)) = latents, kv_inputs
        (zt1, t1, cond1, lora1, eps1), (zt2, t2, cond2, lora2, eps2) = predicts

        def a(t):
            return acp[t].reshape(-1, 1, 1, 1)

        noise1 = (zt1.double() - a(t1).sqrt() * z0.double()) / (1 - a(t1)).sqrt()
        noise2 = (zt2.double() - a(t2).sqrt() * z0.double()) / (1 - a(t2)).sqrt()
        # the KV encoder: the reference noised at the same t with the same noise, in each pass
        assert torch.equal(kt1, t1) and torch.equal(kt2, t2)
        torch.testing.assert_close(kv1.double(), a(t1).sqrt() * z_ref.double() + (1 - a(t1)).sqrt() * noise1,
                                   atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(kv2.double(), a(t2).sqrt() * z_ref.double() + (1 - a(t2)).sqrt() * noise2,
                                   atol=1e-4, rtol=1e-4)
        # the diffusion term is the ε-MSE against the noise that made z_t
        assert logs["diffusion"] == pytest.approx(((eps1.double() - noise1) ** 2).mean().item(), rel=1e-4)
        assert not torch.allclose(noise1, noise2)  # the lookahead draws its own noise ...
        assert (t2 < cap).all() and t2.shape == (2,)  # ... and its t from its own range
        # the diffusion pass's conditions are dropped (rate 1 here), the lookahead's never
        assert not cond1.prompt_embeds.any() and not cond1.image_embeds.any()
        assert cond2.prompt_embeds.any() and cond2.image_embeds.any()
        # the KV encoder pass: its own LoRA alone, at 1; the FaceID LoRA at its scale in both
        # denoiser passes, the LCM-LoRA at α in the lookahead pass only
        assert kv_states == [{"kv_encoder": 1.0}] * 2
        assert lora1 == {"faceid": 0.6} and lora2 == {"faceid": 0.6, "lcm": pytest.approx(logs["alpha"])}
        # TAESD decodes the LCM preview of Eq. 3
        s, sigma = objective.lcm_boundary
        st = t2.double().reshape(-1, 1, 1, 1) * s
        c_skip, c_out = sigma**2 / (st**2 + sigma**2), st / (st**2 + sigma**2).sqrt()
        x0 = (zt2.double() - (1 - a(t2)).sqrt() * eps2.double()) / a(t2).sqrt()
        (z_hat, image), = decoded
        torch.testing.assert_close(z_hat.double(), c_skip * zt2.double() + c_out * x0, atol=1e-4, rtol=1e-4)
        (preview,) = scored
        assert torch.equal(preview, image.clamp(-1, 1))
        # L = L_diffusion + λ·α·L_LH
        assert logs["lookahead"] > 0
        assert loss.item() == pytest.approx(logs["diffusion"] + lam * logs["alpha"] * logs["lookahead"], rel=1e-5)


def test_lookahead_loss_alone_reaches_every_trainable_part(face_path, other_face):
    """With the diffusion term removed, the identity loss on the TAESD-decoded LCM preview sends a
    gradient into every trainable tensor (LoRA B matrices made non-zero so A's gradient is too)."""
    comps, trainables, objective, collate = _kit(parts=("proj", "ip-kv", "kv-lora", "faceid-lora"))
    torch.manual_seed(0)
    for name, p in trainables.named():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    objective.config = ObjectiveConfig(lambda_lookahead=1.0, lookahead_batch=2, diffusion_weight=0.0)
    loss, logs = objective(_batch(objective, collate, _pairs(face_path, other_face)), torch.Generator().manual_seed(1))
    assert "diffusion" not in logs and logs["lookahead"] > 0
    loss.backward()
    missing = [n for n, p in trainables.named() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing[:5]


def test_lookahead_covers_the_whole_batch_by_default(face_path, other_face):
    """As in the authors' command (--lcm_batch_size = --train_batch_size), every sample of the
    batch gets a preview unless ``lookahead_batch`` keeps it to the first N."""
    comps, trainables, objective, collate = _kit()
    assert objective.config.lookahead_batch is None
    seen = []
    loss_fn = objective.identity_loss

    def spy(preview, *args):
        seen.append(preview.shape[0])
        return loss_fn(preview, *args)

    objective.identity_loss = spy
    spy.reference = loss_fn.reference
    batch = _batch(objective, collate, _pairs(face_path, other_face))
    with torch.no_grad():
        objective(batch, torch.Generator().manual_seed(0))
        objective.config = ObjectiveConfig(lookahead_batch=1)
        objective(batch, torch.Generator().manual_seed(0))
    assert seen == [2, 1]


def test_one_step_changes_exactly_the_trainable_parameters(face_path, other_face):
    comps, trainables, objective, collate = _kit(lookahead_batch=1)
    pipe = comps.pipe
    modules = {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder,
               "text_encoder_2": pipe.text_encoder_2, "image_encoder": comps.image_encoder, "taesd": comps.taesd}
    before = {f"{m}.{n}": p.detach().clone() for m, mod in modules.items() for n, p in mod.named_parameters()}
    trainable_ids = {id(p) for p in trainables.params()}
    opt = torch.optim.AdamW(trainables.groups(1e-3, 1e-3))
    loss, _ = objective(_batch(objective, collate, _pairs(face_path, other_face)), torch.Generator().manual_seed(0))
    loss.backward()
    # peft's set_adapters switches requires_grad on for every adapter it activates: the frozen
    # LCM-LoRA and FaceID LoRA (both active in the lookahead pass) must still get no gradient
    assert {"lcm", "faceid"} <= set(pipe.unet.peft_config)
    with_grad = [f"{m}.{n}" for m, mod in modules.items() for n, p in mod.named_parameters()
                 if id(p) not in trainable_ids and (p.grad is not None or p.requires_grad)]
    assert not with_grad, with_grad[:5]
    assert all(p.grad is not None for p in trainables.params())
    opt.step()
    changed, frozen_changed = 0, []
    for m, mod in modules.items():
        for n, p in mod.named_parameters():
            moved = not torch.equal(before[f"{m}.{n}"], p.detach())
            if id(p) in trainable_ids:
                changed += moved
            elif moved:
                frozen_changed.append(f"{m}.{n}")
    assert not frozen_changed, frozen_changed[:5]
    assert changed == len(trainable_ids)


def test_each_sample_attends_to_its_own_reference(face_path, other_face):
    comps, trainables, objective, collate = _kit()
    pairs = _pairs(face_path, other_face)
    swapped = [pairs[0], PairSample(pairs[0].reference, pairs[0].reference_box, pairs[1].reference_crop,
                                    pairs[1].reference_embedding, pairs[1].target, pairs[1].prompt)]
    outs = []
    for ps in (pairs, swapped):  # only sample 1's KV reference differs (its own target etc. kept)
        batch = collate(ps)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            cond, rows = objective.conditions(batch, g, dropout=False)
            z = objective._latents(batch.reference, torch.Generator().manual_seed(5))
            t = torch.tensor([500, 500])
            noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(6))
            z_t = torch.randn(z.shape, generator=torch.Generator().manual_seed(7))
            cache = objective._kv(z * 0.5 + noise * 0.5, rows, t, torch.Generator().manual_seed(8))
            outs.append(objective.predict(z_t, t, cond, cache, objective.denoiser_state()))
    assert torch.equal(outs[0][0], outs[1][0])  # sample 0 is untouched by sample 1's reference
    assert not torch.allclose(outs[0][1], outs[1][1], atol=1e-5)


def test_dropout_one_gives_the_null_conditions(face_path, other_face, engine):
    comps, trainables, objective, collate = _kit(text_drop=1.0, identity_drop=1.0)
    batch = collate(_pairs(face_path, other_face))
    cond, rows = objective.conditions(batch, torch.Generator().manual_seed(0))
    assert not cond.prompt_embeds.any() and not cond.text_embeds.any() and not cond.image_embeds.any()
    assert not rows.prompt_embeds.any() and not rows.text_embeds.any()  # the encoder's text goes with it
    null = engine._identity_conditions(None)["null"]
    assert torch.allclose(cond.clip_embeds, null[1].expand_as(cond.clip_embeds), atol=1e-6)
    text = engine._text_conditions("a pencil drawing of a face")["null"]  # SDXL's empty prompt: zeros
    assert torch.equal(cond.prompt_embeds[:1], text[0]) and torch.equal(cond.text_embeds[:1], text[1])
    keep = ObjectiveConfig(text_drop=0.0, identity_drop=0.0)
    objective.config = keep
    cond2, _ = objective.conditions(batch, torch.Generator().manual_seed(0))
    assert cond2.prompt_embeds.any() and cond2.image_embeds.any()


def test_without_dropout_the_conditions_are_the_engines_at_inference(face_path, other_face, engine):
    """What the trained parts learn to read is what they get at inference: SDXL's micro-conditioning
    for a square image of the training resolution (original size, crop (0, 0), target size), and
    an encoder row with the null identity (zero ID embedding, CLIP of the all-zero input), whatever
    the sample's own identity."""
    from lcmla import GenerationSettings

    comps, trainables, objective, collate = _kit()
    batch = collate(_pairs(face_path, other_face))
    with torch.no_grad():
        cond, rows = objective.conditions(batch, torch.Generator().manual_seed(0), dropout=False)
    settings = GenerationSettings(prompt="a face").replace_dotted({"output.width": RES, "output.height": RES})
    expected = engine._time_ids(settings).expand(2, -1)
    assert torch.equal(cond.time_ids, expected) and torch.equal(rows.time_ids, expected)
    null_ids, null_clip = engine._identity_conditions(None)["null"]
    assert not rows.image_embeds.any() and rows.image_embeds.shape == cond.image_embeds.shape
    torch.testing.assert_close(rows.clip_embeds, null_clip.expand_as(rows.clip_embeds), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(cond.clip_embeds, rows.clip_embeds, atol=1e-3)  # the samples' own identity


def test_the_training_ip_scale_weighs_the_identity_tokens(face_path, other_face):
    """ObjectiveConfig.ip_scale is λ of the decoupled cross-attention in the training passes: at 0
    the identity tokens have no effect (ε equals that of a batch with other identity conditions)."""
    import dataclasses

    comps, trainables, objective, collate = _kit(ip_scale=0.0)
    batch = collate(_pairs(face_path, other_face))
    with torch.no_grad():
        cond, _ = objective.conditions(batch, torch.Generator().manual_seed(0), dropout=False)
        other = dataclasses.replace(cond, image_embeds=cond.image_embeds.flip(0), clip_embeds=cond.clip_embeds.flip(0))
        eps = [_eps_at_fixed_input(objective, c) for c in (cond, other)]
        torch.testing.assert_close(eps[0], eps[1])
        objective.config = dataclasses.replace(objective.config, ip_scale=1.0)
        eps1 = [_eps_at_fixed_input(objective, c) for c in (cond, other)]
    assert not torch.allclose(eps1[0], eps1[1], atol=1e-5)


def test_the_kv_encoder_drops_reference_tokens_at_the_configured_rate(face_path, other_face):
    """ObjectiveConfig.kv_drop (5 % by default) of the reference tokens are dropped in each layer,
    drawn from the run's generator: at 0 the drop generator changes nothing, above 0 it does."""
    import dataclasses

    comps, trainables, objective, collate = _kit(kv_drop=0.0)
    batch = collate(_pairs(face_path, other_face))
    with torch.no_grad():
        cond, rows = objective.conditions(batch, torch.Generator().manual_seed(0), dropout=False)
        z_ref = objective._latents(batch.reference, torch.Generator().manual_seed(5))
        z = torch.randn(z_ref.shape, generator=torch.Generator().manual_seed(7))
        t = torch.tensor([300, 600])

        def eps(seed):
            cache = objective._kv(z_ref, rows, t, torch.Generator().manual_seed(seed))
            return objective.predict(z, t, cond, cache, objective.denoiser_state())

        torch.testing.assert_close(eps(1), eps(2))
        objective.config = dataclasses.replace(objective.config, kv_drop=0.3)
        a, b = eps(1), eps(2)
    assert not torch.allclose(a, b, atol=1e-6)
    assert objective.config.kv_drop == 0.3 and ObjectiveConfig().kv_drop == 0.05


def test_latents_are_a_posterior_sample_of_the_vae(face_path, other_face):
    """z0 = (μ + σ·ε)·scaling_factor with ε from the run's generator (diffusers' ``latent_dist.sample``),
    not the posterior mean."""
    comps, trainables, objective, collate = _kit()
    pixels = collate(_pairs(face_path, other_face)).target
    vae = comps.pipe.vae
    with torch.no_grad():
        z = objective._latents(pixels, torch.Generator().manual_seed(3))
        dist = vae.encode(pixels).latent_dist
    eps = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(3))
    sf = vae.config.scaling_factor
    torch.testing.assert_close(z, (dist.mean + dist.std * eps) * sf)
    assert (z - dist.mean * sf).abs().mean() > 0.5 * (dist.std * sf).mean()  # E|ε| = 0.8: far from the mean


def test_the_kv_encoder_reads_each_references_own_prompt(face_path, other_face):
    """LCM-Lookahead §4.5: in training the encoder is conditioned on the prompt that made its
    reference (compressed to "a face"), the denoiser on the target's; --kv-prompt fixes one."""
    import dataclasses

    comps, trainables, objective, collate = _kit()
    own = ["a photo of a face in a forest", "a close-up photo of a face"]
    pairs = [dataclasses.replace(p, reference_prompt=q) for p, q in zip(_pairs(face_path, other_face), own)]
    batch = collate(pairs)
    with torch.no_grad():
        cond, rows = objective.conditions(batch, torch.Generator().manual_seed(0), dropout=False)
        embeds, pooled = objective._text(own)
        target_embeds, _ = objective._text([p.prompt for p in pairs])
        assert torch.equal(rows.prompt_embeds, embeds) and torch.equal(rows.text_embeds, pooled)
        assert torch.equal(cond.prompt_embeds, target_embeds)
        assert not torch.equal(rows.prompt_embeds[0], rows.prompt_embeds[1])
        # both passes of a step (diffusion, lookahead) give the encoder the references' own prompts
        seen, real_kv = [], objective._kv

        def spy_kv(z_ref_t, rows, t, generator):
            seen.append(rows.prompt_embeds.clone())
            return real_kv(z_ref_t, rows, t, generator)

        objective._kv = spy_kv
        objective.config = dataclasses.replace(objective.config, text_drop=0.0)
        batch.reference_id, batch.reference_found = objective.identity_loss.reference(batch.reference)
        objective(batch, torch.Generator().manual_seed(0))
        assert len(seen) == 2 and all(torch.equal(p, embeds) for p in seen)
        objective._kv = real_kv
        objective.config = dataclasses.replace(objective.config, kv_prompt="a photo of a face")
        _, fixed = objective.conditions(batch, torch.Generator().manual_seed(0), dropout=False)
        assert torch.equal(fixed.prompt_embeds, objective._text(["a photo of a face"] * 2)[0])


def test_exported_adapter_round_trips_and_changes_the_engine(face_path, other_face, tmp_path, engine):
    from lcmla import Engine, GenerationSettings
    from lcmla.loading import load_faceid_state_dict
    from lcmla.presets import FACEID_WEIGHTS
    from lcmla.tiny import tiny_paths
    from safetensors.torch import load_file
    from training.model import export_weights

    comps, trainables, objective, collate = _kit()
    untouched = export_weights(comps.pipe, ("proj", "ip-kv"), tmp_path / "before")
    orig = load_faceid_state_dict(tiny_paths()["faceid"] / FACEID_WEIGHTS)
    saved = load_file(str(untouched["adapter"]))
    for part in ("image_proj", "ip_adapter"):
        for k, v in orig[part].items():
            assert torch.equal(saved[f"{part}.{k}"], v.float()), k  # h94's layout, key for key
    opt = torch.optim.AdamW(trainables.groups(5e-2, 5e-2))
    for seed in range(2):
        loss, _ = objective(_batch(objective, collate, _pairs(face_path, other_face)), torch.Generator().manual_seed(seed))
        loss.backward()
        opt.step()
        opt.zero_grad()
    files = export_weights(comps.pipe, ("proj", "ip-kv", "kv-lora"), tmp_path / "after")
    trained = Engine.load("tiny", adapter=files["adapter"], kv_encoder_lora=files["kv_lora"])
    s = GenerationSettings(prompt="a pencil drawing of a face").replace(lookahead__kv=True)
    a = np.asarray(trained.generate(s, [face_path]).images[0], np.int16)
    b = np.asarray(engine.generate(s, [face_path]).images[0], np.int16)
    assert np.abs(a - b).mean() > 0.5


def test_diffusers_load_ip_adapter_reads_the_exported_file_directly(tmp_path):
    """The exported adapter in h94's layout goes into diffusers' own ``load_ip_adapter`` (folder +
    weight name, no conversion of ours) and lands tensor for tensor where training had it."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    from lcmla.tiny import tiny_paths
    from training.model import ADAPTER_FILE, export_weights

    comps, trainables, _, _ = _kit(parts=("proj", "ip-kv"))
    torch.manual_seed(4)
    with torch.no_grad():  # "trained" weights: every tensor differs from the tiny adapter's
        for _, p in trainables.named():
            p.add_(torch.randn_like(p) * 0.01)
    files = export_weights(comps.pipe, ("proj", "ip-kv"), tmp_path)
    assert files["adapter"].name == ADAPTER_FILE
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_paths()["base"]), local_files_only=True)
    pipe.load_ip_adapter(str(tmp_path), subfolder="", weight_name=ADAPTER_FILE, image_encoder_folder=None)
    theirs = pipe.unet.encoder_hid_proj.image_projection_layers[0].state_dict()
    ours = comps.pipe.unet.encoder_hid_proj.image_projection_layers[0].state_dict()
    assert theirs.keys() == ours.keys()
    for k in ours:
        assert torch.equal(theirs[k].float(), ours[k].float()), k
    procs = pipe.unet.attn_processors
    ip_layers = [n for n, proc in procs.items() if isinstance(proc, IPAdapterAttnProcessor2_0)]
    assert ip_layers
    for name in ip_layers:
        proc, mine = procs[name], comps.pipe.unet.attn_processors[name]
        assert torch.equal(proc.to_k_ip[0].weight.float(), mine.to_k_ip[0].weight.float()), name
        assert torch.equal(proc.to_v_ip[0].weight.float(), mine.to_v_ip[0].weight.float()), name


class _FlakyPairs:
    """Pairs whose every fifth read is corrupt (skipped, counted, the next one taken), as PairDataset."""

    def __init__(self, n):
        from collections import Counter

        self.n, self.skipped = n, Counter()

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i % 5 == 4:
            self.skipped["corrupt"] += 1
            i = (i + 1) % self.n
        return f"pair-{i}"


def test_dataloader_workers_read_the_same_batches_in_the_same_order():
    """--dataloader-num-workers reads ahead in worker processes: the same batches, in order, from a
    resumed cursor too, and the samples the workers skipped are counted in the main process."""
    from training.data import iterate_batches, load_batches

    def take(workers, start_batch, n=7):
        pairs = _FlakyPairs(23)
        order = iterate_batches(len(pairs), 3, 5, 0, start_batch)
        it = load_batches(pairs, list, order, workers)
        got = [next(it) for _ in range(n)]
        it.close()
        return got, dict(pairs.skipped)

    main, skipped = take(0, 2)
    assert [(e, i) for e, i, _ in main] == [(0, 2), (0, 3), (0, 4), (0, 5), (0, 6), (1, 0), (1, 1)]
    order = iterate_batches(23, 3, 5, 0, 2)
    indices = [next(order)[2] for _ in range(7)]
    assert [b for _, _, b in main] == [[f"pair-{(i + 1) % 23 if i % 5 == 4 else i}" for i in idx] for idx in indices]
    assert skipped["corrupt"] == sum(i % 5 == 4 for idx in indices for i in idx) > 0
    ahead, skipped2 = take(2, 2)
    assert ahead == main
    # every batch a worker handed out is counted; the ones it read ahead and were never used are not
    assert skipped2 == skipped


# ---- the batch, the trainable parts and the checkpoints' order, by hand -----------------------------


def test_collate_gives_pixels_in_minus_one_to_one_the_face_crop_to_clip_and_the_chosen_framing():
    """Targets and references reach the VAE in [-1, 1] (a flat colour by hand); CLIP reads each
    sample's aligned face crop (not the photo); --reference-framing face frames on the face box."""
    from lcmla.lookahead import frame_reference

    seen = []

    def clip_processor(images, return_tensors):
        seen.extend(images)
        return type("Out", (), {"pixel_values": torch.zeros(len(images), 3, 224, 224)})()

    photo = Image.new("RGB", (200, 100), (255, 0, 51))
    photo.paste((0, 255, 0), (80, 30, 120, 70))  # the "face"
    crop = Image.new("RGB", (224, 224), (1, 2, 3))
    sample = PairSample(photo, (80, 30, 120, 70), crop, np.ones(512, np.float32), Image.new("RGB", (90, 60), (255, 0, 51)),
                        "a face")
    photo_batch = Collate(32, clip_processor)([sample])
    assert torch.allclose(photo_batch.target[0], torch.tensor([1.0, -1.0, -0.6]).reshape(3, 1, 1).expand(3, 32, 32))
    assert len(seen) == 1 and seen[0].size == crop.size and np.array_equal(np.asarray(seen[0]), np.asarray(crop))
    face_batch = Collate(32, clip_processor, framing="face")([sample])
    expected = torch.from_numpy(np.asarray(frame_reference(photo, sample.reference_box, (32, 32), "face"), np.float32))
    assert torch.allclose(face_batch.reference[0], expected.permute(2, 0, 1) / 127.5 - 1)
    # the face framing spans twice the green face (a quarter of its area), the photo framing the whole photo
    assert face_batch.reference[0, 1].mean() == pytest.approx(-0.5, abs=0.05) and photo_batch.reference[0, 1].mean() < -0.8


def test_targets_keep_their_aspect_the_shorter_side_fitted_and_the_centre_cut():
    """A 3:1 target of three vertical colour bands becomes its middle band: the shorter side is
    resized to the resolution and the square is cut from the centre (diffusers' training default),
    never squashed, whichever side is longer."""
    def clip_processor(images, return_tensors):
        return type("Out", (), {"pixel_values": torch.zeros(len(images), 3, 224, 224)})()

    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    wide = Image.new("RGB", (96, 32))
    for i, c in enumerate(colours):
        wide.paste(c, (32 * i, 0, 32 * (i + 1), 32))
    tall = wide.rotate(90, expand=True)
    crop = Image.new("RGB", (224, 224))
    for target in (wide, tall):
        sample = PairSample(target, None, crop, np.ones(512, np.float32), target, "a face")
        out = Collate(16, clip_processor)([sample]).target[0]
        assert out.shape == (3, 16, 16)
        centre = out[:, 3:13, 3:13]  # away from the bicubic blend at the band edges
        assert torch.allclose(centre, torch.tensor([-1.0, 1.0, -1.0]).reshape(3, 1, 1).expand_as(centre), atol=0.02)


def test_lora_scale_sampler_honours_p_full():
    g = torch.Generator().manual_seed(0)
    draws = np.array([sample_lora_scale(g, p_full=0.9) for _ in range(2000)])
    assert abs((draws == 1.0).mean() - 0.9) < 4 * math.sqrt(0.09 / 2000)
    assert all(sample_lora_scale(g, p_full=1.0) == 1.0 for _ in range(50))
    assert not any(sample_lora_scale(g, p_full=0.0) == 1.0 for _ in range(50))


def test_train_parts_expand_aliases_once_in_order():
    from training.model import parse_parts

    assert parse_parts("adapter,proj, kv-lora,adapter") == ("proj", "ip-kv", "kv-lora")
    assert parse_parts("kv-lora,faceid-lora") == ("kv-lora", "faceid-lora")
    with pytest.raises(ValueError, match="unknown trainable part 'lora'; choose from adapter, proj"):
        parse_parts("adapter,lora")
    with pytest.raises(ValueError, match="--train names nothing to train"):
        parse_parts(" , ")


def test_setup_freezes_everything_else_trains_every_kv_lora_tensor_in_float32():
    """Whatever the pipeline arrived with (here: all of it trainable, the UNet in bfloat16), only
    the chosen parts train afterwards, in float32; kv-lora holds the encoder LoRA's A and B of
    every module it targets, and the KV copies."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from lcmla.attention.kv_copy import kv_copies
    from lcmla.kv_lora import ADAPTER_NAME, encoder_lora_targets
    from training.model import setup_trainables

    pipe = tiny_components().pipe
    pipe.unet.to(torch.bfloat16)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        module.requires_grad_(True)
    trainables = setup_trainables(pipe, ("proj", "kv-lora"))
    chosen = {id(p) for p in trainables.params()}
    for module in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        assert all(p.requires_grad == (id(p) in chosen) for p in module.parameters())
    assert all(p.dtype == torch.float32 for p in trainables.params())
    lora = {n for n, _ in trainables.parts["kv-lora"]}
    targets = encoder_lora_targets(pipe.unet, "kv-copy")
    for name in targets:
        layer = pipe.unet.get_submodule(name)
        assert isinstance(layer, BaseTunerLayer)
        for ab in ("lora_A", "lora_B"):
            assert f"{name}.{ab}.{ADAPTER_NAME}.weight" in lora, (name, ab)
    copies = [n for n in lora if ".kv_copy." in n]
    assert len(lora) == 2 * len(targets) + len(copies) and len(copies) == 4 * len(kv_copies(pipe.unet))


def test_training_the_faceid_lora_alone_exports_it_beside_its_adapter(tmp_path):
    """The engine finds a FaceID LoRA as the ``_lora`` sibling of its adapter file: --train
    faceid-lora alone still writes the adapter (unchanged), or the LoRA would have nothing to
    sit beside."""
    from safetensors.torch import load_file

    from training.model import ADAPTER_FILE, FACEID_LORA_FILE, adapter_state_dict, export_weights

    comps, trainables, objective, collate = _kit(parts=("faceid-lora",))
    out = export_weights(comps.pipe, ("faceid-lora",), tmp_path)
    assert out == {"adapter": tmp_path / ADAPTER_FILE, "faceid_lora": tmp_path / FACEID_LORA_FILE}
    saved, now = load_file(str(out["adapter"])), adapter_state_dict(comps.pipe.unet)
    assert saved.keys() == now.keys() and all(torch.equal(saved[k], now[k]) for k in now)
    assert sorted(load_file(str(out["faceid_lora"]))) == sorted(f"unet.{n.replace('.faceid', '')}"
                                                                for n, _ in trainables.parts["faceid-lora"])


def test_each_part_trains_its_own_tensors_at_its_own_learning_rate():
    """--train ip-kv: every identity to_k_ip AND to_v_ip; the AdamW groups give proj/ip-kv the
    adapter's rate and the LoRAs the LoRA rate (distinct rates, so a swap shows)."""
    comps, trainables, objective, collate = _kit(parts=("proj", "ip-kv", "kv-lora"))
    names = [n for n, _ in trainables.parts["ip-kv"]]
    k, v = [n for n in names if ".to_k_ip." in n], [n for n in names if ".to_v_ip." in n]
    assert k and len(k) == len(v) == len(names) // 2
    groups = {g["name"]: g for g in trainables.groups(1e-5, 5e-6)}
    assert groups["adapter"]["lr"] == 1e-5 and groups["lora"]["lr"] == 5e-6
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(groups["adapter"]["params"]) == ids(p for part in ("proj", "ip-kv") for _, p in trainables.parts[part])
    assert ids(groups["lora"]["params"]) == ids(p for _, p in trainables.parts["kv-lora"])


def test_resume_refuses_a_folder_that_is_not_a_checkpoint_and_another_train_and_reads_the_checkpoints_own_args(tmp_path):
    import json

    from training.checkpoints import checkpoint_args, resolve_resume, resume_differences

    half = tmp_path / "checkpoint-4"
    half.mkdir()
    with pytest.raises(ValueError, match="is not a complete checkpoint folder"):
        resolve_resume(tmp_path, str(half))
    (half / "trainable.safetensors").write_bytes(b"")
    assert resolve_resume(tmp_path, "checkpoint-4") == half
    refused, changed = resume_differences({"parts": ["proj", "ip-kv"], "seed": 1}, {"parts": ["proj"], "seed": 2})
    assert refused == ['parts was ["proj", "ip-kv"], now ["proj"]'] and changed == ["seed was 1, now 2"]
    # the checkpoint's own copy wins over the run folder's (which a later resumed run rewrote)
    (tmp_path / "training_args.json").write_text(json.dumps({"seed": 9}))
    (half / "training_args.json").write_text(json.dumps({"seed": 1}))
    assert checkpoint_args(half) == {"seed": 1}
    (half / "training_args.json").unlink()
    assert checkpoint_args(half) == {"seed": 9}


class _StubIdLoss:
    """Embeds an image as its first pixels in [-1, 1]; finds a face unless the image is black."""

    def reference(self, x):
        return x.flatten(1)[:, :48], x.flatten(1).mean(1) > -0.99


def _validator(identities, prompts, seeds):
    from types import SimpleNamespace

    from training.validate import Validator

    def generate(settings, identity):
        colour = (40 + 150 * prompts.index(settings.prompt), 200 * [n for n, i in identities].index(identity.name), 90)
        return SimpleNamespace(images=[Image.new("RGB", (32, 32), colour)], settings=settings)

    engine = SimpleNamespace(device="cpu", preset=SimpleNamespace(name="tiny"), generate=generate)
    return Validator(engine, identities, prompts, seeds, _StubIdLoss())


def test_validation_scores_the_image_against_the_reference_and_says_no_face_when_either_has_none():
    from types import SimpleNamespace

    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    other = Image.fromarray(np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    black = Image.new("RGB", (16, 16))
    v = _validator([], [], [])
    pixels = lambda im: torch.from_numpy(np.asarray(im, np.float32)).permute(2, 0, 1).flatten()[:48] / 127.5 - 1  # noqa: E731
    by_hand = float(torch.nn.functional.cosine_similarity(pixels(photo), pixels(other), dim=0))
    assert v._score(SimpleNamespace(images=[photo]), other) == pytest.approx(by_hand, abs=1e-6)
    assert abs(by_hand) < 0.9  # not the reference against itself
    assert v._score(SimpleNamespace(images=[photo]), black) is None
    assert v._score(SimpleNamespace(images=[black]), photo) is None


def test_the_validation_grid_has_a_row_per_face_and_a_column_per_prompt_and_seed(tmp_path, monkeypatch):
    """Each cell of the saved grid shows its own image: two faces × two prompts, each image a flat
    colour, sampled at the centre of its axes."""
    from types import SimpleNamespace

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    faces = [(n, SimpleNamespace(name=n, images=[Image.new("RGB", (8, 8), (200, 200, 200))])) for n in ("ada", "bo")]
    prompts = ["a drawing of a face", "a painting of a face"]
    v = _validator(faces, prompts, [0])
    boxes = []
    real_subplots = plt.subplots

    def subplots(*a, **k):
        fig, axes = real_subplots(*a, **k)
        boxes.append((fig, axes))
        return fig, axes

    monkeypatch.setattr(plt, "subplots", subplots)
    path = v.run(3, tmp_path)
    fig, axes = boxes[0]
    grid = np.asarray(Image.open(path).convert("RGB"))
    height = grid.shape[0]
    for r, (name, _) in enumerate(faces):
        for c, prompt in enumerate(prompts):
            box = axes[r][c].get_position()  # figure fractions, as saved
            x, y = int((box.x0 + box.x1) / 2 * grid.shape[1]), int(height - (box.y0 + box.y1) / 2 * height)
            assert tuple(grid[y, x]) == (40 + 150 * c, 200 * r, 90), (name, prompt)
    assert [s["face"] for s in v.history[0]["scores"]] == ["ada", "ada", "bo", "bo"]


def test_gradients_are_averaged_over_the_processes():
    """Two processes with the same gradients average to those gradients (a sum would double them);
    a parameter without a gradient takes part as zeros."""
    from types import SimpleNamespace

    from training.train import average_gradients

    def reduce(flat, reduction):  # two processes, this one's gradients and the other's doubled
        return {"mean": (flat + 2 * flat) / 2, "sum": flat + 2 * flat}[reduction]

    a, b = torch.nn.Parameter(torch.ones(2, 3)), torch.nn.Parameter(torch.ones(4))
    a.grad = torch.arange(6.0).reshape(2, 3)
    average_gradients(SimpleNamespace(num_processes=2, reduce=reduce), [a, b])
    assert torch.equal(a.grad, 1.5 * torch.arange(6.0).reshape(2, 3)) and torch.equal(b.grad, torch.zeros(4))


def test_a_checkpoint_without_some_trained_tensor_is_refused_by_name(tmp_path):
    from types import SimpleNamespace

    from safetensors.torch import save_file

    from training.checkpoints import load_checkpoint

    save_file({"proj.w": torch.ones(2)}, str(tmp_path / "trainable.safetensors"))
    params = [("proj.w", torch.nn.Parameter(torch.zeros(2))), ("kv.a", torch.nn.Parameter(torch.zeros(2))),
              ("kv.b", torch.nn.Parameter(torch.zeros(2)))]
    accelerator = SimpleNamespace(load_state=lambda folder: None, process_index=0)
    with pytest.raises(ValueError, match=r"does not hold kv\.a \(and 1 more\): it was written for other --train parts"):
        load_checkpoint(accelerator, tmp_path, torch.Generator(), params)


def test_setup_continues_a_loaded_kv_lora_and_refuses_a_faceid_lora_that_is_not_there():
    from lcmla.kv_lora import ADAPTER_NAME, add_kv_encoder_lora
    from training.model import setup_trainables

    pipe = tiny_components().pipe
    add_kv_encoder_lora(pipe.unet, rank=4, design="kv-copy")  # as --kv-lora FILE loads it
    with torch.no_grad():
        for n, p in pipe.unet.named_parameters():
            if f"lora_B.{ADAPTER_NAME}." in n:
                p.fill_(0.125)
    trainables = setup_trainables(pipe, ("kv-lora",))
    b = [p for n, p in trainables.parts["kv-lora"] if f"lora_B.{ADAPTER_NAME}." in n]
    assert b and all(torch.all(p == 0.125) for p in b)  # the loaded LoRA trains on, not a fresh one
    if "faceid" in pipe.unet.peft_config:
        pipe.delete_adapters("faceid")
    with pytest.raises(ValueError, match="--train faceid-lora: the loaded adapter has no FaceID LoRA"):
        setup_trainables(pipe, ("faceid-lora",))


def test_the_detector_sees_rgb_uint8_of_the_previews_and_the_largest_face():
    from types import SimpleNamespace

    from training.identity_loss import landmark_fn_from_analyzer, to_uint8

    x = torch.tensor([-1.0, -0.5, 0.0, 1.0, 3.0]).reshape(1, 1, 1, 5).repeat(1, 3, 1, 1)
    x[0, 1] = 0.0
    (arr,) = to_uint8(x)
    assert arr.dtype == np.uint8 and arr.shape == (1, 5, 3)
    assert arr[0, :, 0].tolist() == [0, 64, 128, 255, 255] and arr[0, :, 1].tolist() == [128] * 5
    big, small = SimpleNamespace(kps=np.ones((5, 2))), SimpleNamespace(kps=np.zeros((5, 2)))
    analyzer = SimpleNamespace(detect=lambda image: [big, small])  # FaceAnalyzer.detect: largest first
    assert landmark_fn_from_analyzer(analyzer)(arr) is big.kps
    assert landmark_fn_from_analyzer(SimpleNamespace(detect=lambda image: []))(arr) is None


def test_skipped_sample_counts_add_what_reading_met_to_what_opening_found():
    from types import SimpleNamespace

    from training.train import _skipped_totals

    one = SimpleNamespace(num_processes=1)
    assert _skipped_totals(one, {"corrupt": 2}, {"corrupt": 5, "no_reference": 1}) == {"corrupt": 5, "no_reference": 1}
    assert _skipped_totals(one, {"corrupt": 2}, {"corrupt": 2}) == {"corrupt": 2}


def test_the_validator_follows_no_kv_and_the_training_framing_and_resolution():
    """A --no-kv run is validated without the KV path (it trained none), at the run's framing and
    resolution."""
    from types import SimpleNamespace

    from lcmla.loading import load_components
    from lcmla.presets import PRESETS
    from lcmla.tiny import tiny_paths
    from training.validate import Validator

    comps = load_components(PRESETS["tiny"], tiny_paths())
    for no_kv in (True, False):
        args = SimpleNamespace(face_models=None, validation_faces=None, validation_prompts=None, validation_seeds=[0],
                               no_kv=no_kv, reference_framing="face", resolution=64)
        v = Validator.build(args, PRESETS["tiny"], comps, None)
        assert v.kv is (not no_kv) and [n for n, _ in v.identities] == ["face"]
        assert v.overrides == {"lookahead__reference_framing": "face", "output__width": 64, "output__height": 64}


def test_drop_masks_come_from_the_runs_generator_not_the_global_one():
    torch.manual_seed(1)
    a = drop_mask(64, 0.5, torch.Generator().manual_seed(5))
    torch.manual_seed(2)
    assert torch.equal(a, drop_mask(64, 0.5, torch.Generator().manual_seed(5)))


def test_reference_embeddings_carry_no_graph():
    loss_fn = IdentityLoss(TinyRecognizer(), fixed_landmarks(_canonical_landmarks()))
    images = torch.rand(2, 3, 64, 64, requires_grad=True) * 2 - 1
    embedding, found = loss_fn.reference(images)
    assert not embedding.requires_grad and embedding.grad_fn is None


def test_checkpoints_are_ordered_by_step_number_and_latest_is_the_newest(tmp_path):
    from training.checkpoints import list_checkpoints, resolve_resume

    for step in (2, 500, 1000, 90):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "checkpoint-3000.tmp").mkdir()  # a save that died: never a checkpoint
    (tmp_path / "checkpoint-4000").write_text("a file, not a checkpoint")
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 90, 500, 1000]
    assert resolve_resume(tmp_path, "latest") == tmp_path / "checkpoint-1000"
