"""Tests for lcmla.images: every awkward input either loads as RGB or fails with a clear ImageError."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

import faceutils  # noqa: E402
from lcmla.errors import ImageError  # noqa: E402
from lcmla.images import MAX_SIDE, MIN_SIDE, describe_source, load_image, to_rgb  # noqa: E402


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return faceutils.make_test_images(tmp_path_factory.mktemp("images"))


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("missing", "does not exist"),
        ("folder", "is a folder"),
        ("empty", "is empty"),
        ("truncated", "corrupt or truncated"),
        ("text", "is not an image PIL can read (JPEG, PNG, WebP, …): cannot identify image file; upload a photo"),
        ("tiny", "is only 16x16 pixels"),
        ("bomb", "decompression bomb"),
    ],
)
def test_bad_inputs_raise_image_error_naming_file_and_problem(images: dict[str, Path], kind: str, expected: str):
    path = images[kind]
    with pytest.raises(ImageError) as caught:
        load_image(path)
    message = str(caught.value)
    assert message.startswith(f"face photo '{path.name}' ")
    assert expected in message
    assert ";" in message  # problem; fix


def test_bad_bytes_and_arrays_name_uploaded_image():
    with pytest.raises(ImageError, match="'upload.bin' is not an image"):
        load_image(b"hello", name="upload.bin")
    with pytest.raises(ImageError, match="dtype float64"):
        load_image(np.zeros((64, 64, 3)))
    with pytest.raises(ImageError, match="shape"):
        load_image(np.zeros((64, 64, 5), dtype=np.uint8))
    with pytest.raises(ImageError, match="unsupported type int"):
        load_image(5)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kind", ["face", "exif_rotated", "rgba", "la", "p", "p_transparent", "cmyk", "gray16", "float_tiff", "two_faces"]
)
def test_good_inputs_load_as_rgb(images: dict[str, Path], kind: str):
    image = load_image(images[kind])
    assert image.mode == "RGB"
    assert min(image.size) >= MIN_SIDE and max(image.size) <= MAX_SIDE


def test_exif_orientation_is_honoured(images: dict[str, Path]):
    with Image.open(images["exif_rotated"]) as raw:
        assert raw.size == (400, 300)  # stored sideways
    image = load_image(images["exif_rotated"])
    assert image.size == (300, 400)  # shown upright
    pixels = np.asarray(image).astype(int)
    top_left = pixels[5:35, 5:35].mean(axis=(0, 1))
    assert top_left[0] > 200 and top_left[1] < 60 and top_left[2] < 60  # the red marker is top-left
    for corner in (pixels[5:35, -35:-5], pixels[-35:-5, 5:35], pixels[-35:-5, -35:-5]):
        mean = corner.mean(axis=(0, 1))
        assert not (mean[0] > 200 and mean[1] < 60)


def test_alpha_is_composited_over_white(images: dict[str, Path]):
    face = np.asarray(faceutils.face_image()).astype(int)
    for kind in ("rgba", "la"):
        pixels = np.asarray(load_image(images[kind])).astype(int)
        assert (pixels[:, :64] == 255).all()  # fully transparent -> white
        half = pixels[:, 64:128]
        assert (half >= 127).all()  # half transparent -> at least half-way to white
        if kind == "rgba":
            assert np.abs(pixels[:, 128:] - face[:, 128:]).max() <= 1  # opaque part untouched


def test_palette_with_transparency_becomes_white_where_transparent(images: dict[str, Path]):
    with Image.open(images["p_transparent"]) as raw:
        indices = np.asarray(raw)
    pixels = np.asarray(load_image(images["p_transparent"]))
    transparent = indices == 0
    if transparent.any():
        assert (pixels[transparent] == 255).all()


def test_sixteen_bit_is_stretched_not_clipped(images: dict[str, Path]):
    with Image.open(images["gray16"]) as raw:
        assert raw.mode.startswith("I")
        values = np.asarray(raw.convert("I"))
        assert values.min() >= 1000 and values.max() <= 3000  # clipping would make it all white
    pixels = np.asarray(load_image(images["gray16"])).astype(float)
    assert pixels.min() == 0 and pixels.max() == 255
    grey = np.asarray(faceutils.face_image().convert("L")).astype(float)
    assert np.corrcoef(pixels[..., 0].ravel(), grey.ravel())[0, 1] > 0.99


def test_in_memory_modes_convert_to_rgb():
    ramp = np.arange(64 * 64, dtype=np.int32).reshape(64, 64) * 7 - 5000
    for image in (
        Image.fromarray(ramp),  # mode I, negative values
        Image.fromarray(ramp.astype(np.float32) / 3.0),  # mode F
        Image.new("1", (64, 64), 1),
        Image.new("CMYK", (64, 64), (0, 255, 255, 0)),
        Image.new("YCbCr", (64, 64), (128, 128, 128)),
    ):
        rgb = to_rgb(image)
        assert rgb.mode == "RGB" and rgb.size == (64, 64)
    stretched = np.asarray(to_rgb(Image.fromarray(ramp)))
    assert stretched.min() == 0 and stretched.max() == 255
    assert tuple(np.asarray(to_rgb(Image.new("CMYK", (8, 8), (0, 255, 255, 0))))[0, 0]) == (255, 0, 0)


def test_huge_image_is_downscaled(images: dict[str, Path]):
    image = load_image(images["huge"])
    assert image.size == (MAX_SIDE, MAX_SIDE * 3 // 4)


def test_extreme_aspect_ratio_fails_after_downscale():
    with pytest.raises(ImageError, match="after shrinking"):
        load_image(Image.new("RGB", (5000, 40)))


def test_all_source_kinds_give_the_same_pixels(images: dict[str, Path]):
    path = images["face"]
    reference = np.asarray(load_image(path))
    data = path.read_bytes()
    with Image.open(path) as opened:
        pil = opened.copy()
    sources = [str(path), path, data, bytearray(data), io.BytesIO(data), pil, np.asarray(pil)]
    for source in sources:
        assert np.array_equal(np.asarray(load_image(source)), reference), type(source)


def test_load_image_returns_a_new_object():
    original = Image.new("RGB", (64, 64), (10, 20, 30))
    loaded = load_image(original)
    assert loaded is not original
    loaded.putpixel((0, 0), (255, 255, 255))
    assert original.getpixel((0, 0)) == (10, 20, 30)


def test_describe_source(images: dict[str, Path]):
    assert describe_source("photos/a.jpg") == "a.jpg"
    assert describe_source(images["face"]) == "face.png"
    assert describe_source(b"...", 1) == "uploaded image 2"
    assert describe_source(np.zeros((2, 2, 3), np.uint8)) == "uploaded image"
    with open(images["face"], "rb") as handle:
        assert describe_source(handle) == "face.png"
    assert describe_source(io.BytesIO(b""), 0) == "uploaded image 1"


# --------------------------------------------------------------------------------------------------
# corners found by a mutation audit


def test_one_photo_of_any_binary_kind_is_one_photo_and_a_list_is_several():
    from lcmla.images import as_photo_list

    data = b"\x89PNG..."
    for one in (data, bytearray(data), memoryview(data), io.BytesIO(data), "a.jpg", Path("a.jpg"),
                Image.new("RGB", (4, 4)), np.zeros((4, 4, 3), np.uint8)):
        got = as_photo_list(one)
        assert len(got) == 1 and got[0] is one, type(one)
    assert as_photo_list(p for p in ("a.jpg", "b.jpg")) == ["a.jpg", "b.jpg"]  # a generator, read once
    with pytest.raises(ImageError, match="expected a photo or a list of photos"):
        as_photo_list(3)


def test_a_stream_without_a_real_file_name_is_an_uploaded_image():
    stream = io.BytesIO(b"")
    stream.name = "<stdin>"
    assert describe_source(stream, 0) == "uploaded image 1"
    stream.name = "/tmp/me.jpg"
    assert describe_source(stream) == "me.jpg"


def test_a_file_opened_in_text_mode_is_refused_with_the_fix(images: dict[str, Path]):
    with open(images["face"], encoding="latin-1") as text_file:
        with pytest.raises(ImageError, match=r"was opened in text mode; open the file in binary mode \('rb'\)"):
            load_image(text_file)


def test_a_photo_above_pils_pixel_limit_is_refused_before_it_is_decoded():
    """PIL only warns between MAX_IMAGE_PIXELS and twice that (it raises above): the warning is
    an error here too, so a 10000×10000 claim never allocates 100 million pixels."""
    assert Image.MAX_IMAGE_PIXELS < 10000 * 10000 < 2 * Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(faceutils.bomb_png_bytes(10000, 10000))


def test_single_channel_arrays_load_as_grey():
    ramp = np.tile(np.arange(64, dtype=np.uint8)[None, :, None] * 4, (64, 1, 1))  # (64, 64, 1)
    rgb = np.asarray(load_image(ramp))
    assert rgb.shape == (64, 64, 3) and np.array_equal(rgb[..., 1], ramp[..., 0])


def test_a_flat_sixteen_bit_image_keeps_its_level_and_nan_pixels_become_the_minimum():
    """A constant 16-bit image has no range to stretch: it is scaled by 65535 (mid grey stays mid
    grey, not black). In a float image NaN and ±inf pixels count as 0 and the rest is stretched."""
    flat = Image.fromarray(np.full((32, 32), 32768, np.uint16))
    assert np.asarray(to_rgb(flat))[0, 0].tolist() == [128, 128, 128]
    values = np.tile(np.linspace(0.0, 1.0, 32, dtype=np.float32), (32, 1))
    values[0, 5], values[1, 6] = np.nan, np.inf
    out = np.asarray(to_rgb(Image.fromarray(values)))[..., 0]
    assert out[5, 31] == 255 and out[5, 0] == 0 and out[0, 5] == 0 and out[1, 6] == 0
