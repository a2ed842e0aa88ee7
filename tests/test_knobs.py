"""The knob table's crossings between widget (or command-line) values and settings, without an app."""

from __future__ import annotations

import pytest

from lcmla.errors import SettingsError
from lcmla.knobs import KNOB, MAX_SEED


def test_number_lists_take_commas_semicolons_or_spaces_and_python_lists():
    a = KNOB["guidance.dcg_a"]
    for text in ("1, 1.5, 2", "1;1.5;2", "1 1.5 2", " 1 ; 1.5,  2 "):
        assert a.parse(text) == [1.0, 1.5, 2.0], text
    # settings_from_ui called from Python with the setting's own type
    assert a.parse([1, 2.5]) == [1.0, 2.5] and a.parse((3,)) == [3.0]
    assert KNOB["attention.steps"].parse([0, 2]) == [0, 2]


def test_whole_numbers_stay_exact_and_within_the_field():
    # an int goes through untouched: float() would round it (2**60 + 1 → 2**60)
    assert KNOB["output.num_images"].parse(2**60 + 1) == 2**60 + 1
    seed = KNOB["output.seed"]
    assert seed.parse(MAX_SEED) == MAX_SEED
    with pytest.raises(SettingsError, match=rf"Seed \(output\.seed\) must be a whole number from 0 to {MAX_SEED} "
                                            rf"\(got {MAX_SEED + 1}\)"):
        seed.parse(MAX_SEED + 1)


def test_an_empty_text_box_is_an_empty_text():
    assert KNOB["prompt"].parse(None) == "" and KNOB["negative_prompt"].parse(None) == ""
    assert KNOB["prompt"].parse(12) == "12"


def test_the_sampler_box_left_empty_is_the_presets():
    sampler = KNOB["guidance.scheduler"]
    assert sampler.parse("") is None and sampler.parse(None) is None and sampler.parse("the preset's") is None
    assert sampler.parse("DPMSolverMultistepScheduler") == "DPMSolverMultistepScheduler"


def test_open_fields_show_the_presets_defaults():
    from lcmla.knobs import settings_to_ui
    from lcmla.presets import get_preset
    from lcmla.settings import GenerationSettings

    tiny = get_preset("tiny")
    shown = settings_to_ui(GenerationSettings(prompt="a face"), tiny)  # steps, size and CFG left open (None)
    assert (shown["guidance.steps"], shown["guidance.guidance_scale"]) == (tiny.steps, tiny.guidance_scale)
    assert (shown["output.width"], shown["output.height"]) == (tiny.width, tiny.height)
    assert settings_to_ui(GenerationSettings(prompt="a face"))["guidance.steps"] is None  # no preset: as they are


def test_a_short_flag_equal_to_the_long_one_is_given_once():
    from lcmla.knobs import Knob, cli_flags

    assert cli_flags(Knob("prompt", "Prompt", "text", flag="prompt")) == ["--prompt"]
    assert cli_flags(KNOB["output.seed"]) == ["--output-seed", "--seed"]


def test_help_says_which_flags_take_lists():
    from lcmla.knobs import cli_help

    for name in ("guidance.dcg_a", "attention.targets", "attention.tokens", "attention.steps"):
        assert "comma-separated" in cli_help(KNOB[name]), name
    assert "comma-separated" not in cli_help(KNOB["output.seed"])
    # a knob without info text ends at its range
    assert cli_help(KNOB["lookahead.kv_lora_scale"]) == "KV encoder LoRA scale · 0…2 in the app"


def test_command_line_words():
    from lcmla.knobs import parse_cli

    kv = KNOB["lookahead.kv"]
    for word, value in (("true", True), (" YES ", True), ("On", True), ("1", True), ("False", False), ("off", False)):
        assert parse_cli(kv, word) is value, word
    with pytest.raises(SettingsError, match=r"--lookahead-kv takes true or false \(got 'maybe'\)"):
        parse_cli(kv, "maybe")
    assert parse_cli(KNOB["identity.face_index"], "2") == 2
    assert parse_cli(KNOB["attention.targets"], "down; up") == ["down", "up"]
    assert parse_cli(KNOB["attention.tokens"], "0,2") == [0, 2]
    for word in ("", "preset", "the preset's"):
        assert parse_cli(KNOB["guidance.scheduler"], word) is None, word
    assert parse_cli(KNOB["guidance.scheduler"], " LCMScheduler ") == "LCMScheduler"
