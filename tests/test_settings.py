import dataclasses
import math

import pytest

from lcmla import GenerationSettings, PRESETS, SettingsError, get_preset
from lcmla.settings import AttentionSettings, GuidanceSettings, IdentitySettings, OutputSettings

BAD = [
    ({"identity": {"ip_adapter_scale": math.nan}}, "identity.ip_adapter_scale"),
    ({"identity": {"ip_adapter_scale": -0.1}}, "identity.ip_adapter_scale"),
    ({"identity": {"lora_scale": "high"}}, "identity.lora_scale"),
    ({"identity": {"lora_scale": math.inf}}, "identity.lora_scale"),
    ({"identity": {"face_index": -1}}, "identity.face_index"),
    ({"identity": {"shortcut": "yes"}}, "identity.shortcut"),
    ({"guidance": {"steps": 0}}, "guidance.steps"),
    ({"guidance": {"steps": 2.5}}, "guidance.steps"),
    ({"guidance": {"steps": True}}, "guidance.steps"),
    ({"guidance": {"guidance_scale": -1.0}}, "guidance.guidance_scale"),
    ({"guidance": {"dcg_variant": "sideways"}}, "guidance.dcg_variant"),
    ({"guidance": {"dcg_a": [1.0, math.nan]}}, "guidance.dcg_a[1]"),
    ({"guidance": {"dcg_a": []}}, "guidance.dcg_a"),
    ({"guidance": {"dcg_schedule": "linear"}}, "guidance.dcg_a"),
    ({"guidance": {"dcg_schedule": "cosine"}}, "two values (start, end) for a cosine schedule"),
    ({"guidance": {"dcg_schedule": "constant", "dcg_a": [1.0], "dcg_b": [2.0, 3.0]}}, "one value each for a constant"),
    ({"guidance": {"dcg_a": "1.5, 2"}}, "guidance.dcg_a must be a list of numbers"),
    ({"output": {"width": 70}}, "output.width must be a multiple of 8 (got 70; try 64 or 72)"),
    ({"guidance": {"rescale_phi": 1.5}}, "guidance.rescale_phi"),
    ({"attention": {"mode": "am3"}}, "attention.mode"),
    ({"attention": {"targets": ["left"]}}, "attention.targets"),
    ({"attention": {"tokens": [0, 0]}}, "attention.tokens"),
    ({"attention": {"am2_quantile": 2.0}}, "attention.am2_quantile"),
    ({"lookahead": {"s_kv": -2.0}}, "lookahead.s_kv"),
    ({"lookahead": {"lcm_lora_scale": 1.5}}, "lookahead.lcm_lora_scale"),
    ({"freeu": {"b1": 9.0}}, "freeu.b1"),
    ({"output": {"width": 100}}, "output.width"),
    ({"output": {"height": 4096}}, "output.height"),
    ({"output": {"num_images": 0}}, "output.num_images"),
    ({"output": {"seed": -5}}, "output.seed"),
    ({"output": {"seed": 2**63 - 1, "num_images": 2}}, "output.seed 9223372036854775807 with 2 images"),
    ({"prompt": "   "}, "prompt"),
    ({"prompt": None}, "prompt"),
    ({"identity": {"bogus": 1}}, "identity.bogus"),
]


@pytest.mark.parametrize("kwargs,field", BAD, ids=[f for _, f in BAD])
def test_invalid_values_name_the_field(kwargs, field):
    kwargs = {"prompt": "a face", **kwargs}
    with pytest.raises(ValueError) as info:
        GenerationSettings(**kwargs)
    assert field in str(info.value)
    assert isinstance(info.value, SettingsError)


def test_defaults_and_groups():
    s = GenerationSettings(prompt="a photo of a face")
    assert s.identity.ip_adapter_scale == 0.8 and s.identity.lora_scale == 1.0 and s.identity.shortcut
    assert s.guidance.dcg_a == (1.0, 1.5, 1.5, 1.0) and s.guidance.dcg_b == (1.0, 3.0, 3.0, 1.0)
    assert s.attention.am2_sharpness == (7.5, 5.0, 5.0, 5.0)
    assert (s.lookahead.s_nokv, s.lookahead.s_full, s.lookahead.s_kv) == (3.0, 2.0, 2.0)
    assert (s.freeu.b1, s.freeu.b2, s.freeu.s1, s.freeu.s2) == (1.1, 1.1, 0.9, 0.2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.prompt = "changed"  # frozen


def test_round_trip_json_and_replace():
    s = GenerationSettings(prompt="x", identity=IdentitySettings(lora_scale=0.5), output=OutputSettings(seed=9))
    assert GenerationSettings.from_json(s.to_json()) == s
    t = s.replace(identity__ip_adapter_scale=0.3, prompt="y")
    assert t.identity.ip_adapter_scale == 0.3 and t.identity.lora_scale == 0.5 and t.prompt == "y"
    assert s.identity.ip_adapter_scale == 0.8
    u = s.replace_dotted({"guidance.dcg_a": [2, 2]})
    assert u.guidance.dcg_a == (2.0, 2.0)
    with pytest.raises(SettingsError, match="unknown setting"):
        s.replace_dotted({"guidance.nope": 1})
    with pytest.raises(SettingsError, match="version"):
        GenerationSettings.from_dict({**s.to_dict(), "version": 99})


def test_values_are_normalised_so_equal_requests_have_equal_settings():
    """What a JSON file, the CLI or the UI hands in is normalised to one form: whole floats in
    integer fields become ints, ints in float fields floats, a single number a one-value list,
    token and step lists sorted. So two spellings of one request give equal JSON (PNG metadata,
    evaluation cache keys)."""
    a = GenerationSettings(prompt="x", guidance={"steps": 4.0, "dcg_a": 2, "guidance_scale": 1},
                           identity={"ip_adapter_scale": 1}, attention={"tokens": (3, 1), "steps": [2, 0]},
                           output={"width": 512.0})
    b = GenerationSettings(prompt="x", guidance={"steps": 4, "dcg_a": [2.0], "guidance_scale": 1.0},
                           identity={"ip_adapter_scale": 1.0}, attention={"tokens": [1, 3], "steps": (0, 2)},
                           output={"width": 512})
    assert a.to_json() == b.to_json()
    assert type(a.guidance.steps) is int and type(a.output.width) is int
    assert type(a.identity.ip_adapter_scale) is float and type(a.guidance.guidance_scale) is float
    assert a.guidance.dcg_a == (2.0,) and a.attention.tokens == (1, 3) and a.attention.steps == (0, 2)


def test_preview_steps_are_checked_against_the_run():
    from lcmla.settings import check_preview_steps

    check_preview_steps(None, 4)  # every step
    check_preview_steps({0, 3}, 4)
    with pytest.raises(SettingsError, match=r"steps to preview 4 is outside this run's 4 steps.*among 0–3"):
        check_preview_steps({0, 4}, 4)
    with pytest.raises(SettingsError, match="steps to preview 5, 7 are outside"):
        check_preview_steps({7, 5, 1}, 4)
    with pytest.raises(SettingsError, match="no steps to preview were given; name step indices 0–3"):
        check_preview_steps(set(), 4)


def test_groups_validate_on_their_own():
    with pytest.raises(SettingsError, match="guidance.steps"):
        GuidanceSettings(steps=-3)
    assert AttentionSettings(targets=("up", "down")).targets == ("down", "up")


def test_presets_registry():
    assert {"tiny", "hyper-sdxl-4step", "sdxl-lightning-4step", "sdxl-lcm-lora", "sdxl-turbo", "sdxl-base"} <= set(PRESETS)
    for p in PRESETS.values():
        assert p.steps >= 1 and p.width % 8 == 0 and p.height % 8 == 0
        files = p.required_files("fp16")
        assert "faceid" in files and "image_encoder" in files and "base" in files
    assert PRESETS["sdxl-turbo"].width == 512 and PRESETS["sdxl-base"].steps == 30
    assert PRESETS["sdxl-lightning-4step"].required_files(None)["unet"][1] == ("sdxl_lightning_4step_unet.safetensors",)
    assert dict(PRESETS["hyper-sdxl-4step"].scheduler_kwargs)["timestep_spacing"] == "trailing"
    with pytest.raises(SettingsError, match="unknown preset"):
        get_preset("sdxl-magic")


def test_import_is_light():
    import subprocess
    import sys

    code = "import sys, lcmla; lcmla.GenerationSettings(prompt='a'); print(sorted(m for m in ('torch','diffusers','cv2','insightface') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


@pytest.mark.parametrize(
    ("changes", "names"),
    [
        ({"attention": {"am_norm_scope": "image-branches"}, "lookahead": {"kv": True}},
         ("attention.am_norm_scope=image-branches", "lookahead.kv")),
        ({"guidance": {"dcg": True}, "lookahead": {"kv": True}}, ("guidance.dcg", "lookahead.kv")),
    ],
)
def test_incompatible_modes_are_refused_with_the_way_out(changes, names):
    with pytest.raises(SettingsError) as info:
        GenerationSettings(prompt="a face", **changes)
    assert all(name in str(info.value) for name in names) and "switch" in str(info.value)
