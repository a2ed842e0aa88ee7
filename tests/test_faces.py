"""Tests for lcmla.faces: the offline Haar backend and the insightface backend on tiny test models."""

from __future__ import annotations

import shutil
import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

import faceutils  # noqa: E402
from lcmla.errors import ImageError, MissingWeightsError, NoFaceError  # noqa: E402
from lcmla.faces import (  # noqa: E402
    CROP_SIZE,
    DetectedFace,
    FaceAnalyzer,
    align_face,
    l2_normalize,
    mean_embedding,
)
from lcmla.images import load_image  # noqa: E402

FACE_PNG = faceutils.FACE_PNG
#: Where the face is in assets/face.png (x1, y1, x2, y2), measured with the Haar cascade.
FACE_BOX = (177.0, 104.0, 331.0, 258.0)


def _inside(point: tuple[float, float], box: tuple[float, float, float, float]) -> bool:
    return box[0] <= point[0] <= box[2] and box[1] <= point[1] <= box[3]


def _centre(box: tuple[float, float, float, float]) -> tuple[float, float]:
    return ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)


def _check_face(face: DetectedFace) -> None:
    assert len(face.bbox) == 4 and all(isinstance(v, float) for v in face.bbox)
    assert face.kps.shape == (5, 2) and face.kps.dtype == np.float32
    assert face.embedding.shape == (512,) and face.embedding.dtype == np.float32
    assert np.linalg.norm(face.embedding) == pytest.approx(1.0, abs=1e-5)
    assert face.crop.mode == "RGB" and face.crop.size == (CROP_SIZE, CROP_SIZE)
    assert 0.0 < face.score <= 1.0
    assert face.area == pytest.approx((face.bbox[2] - face.bbox[0]) * (face.bbox[3] - face.bbox[1]))


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return faceutils.make_test_images(tmp_path_factory.mktemp("face_images"))


@pytest.fixture(scope="session")
def haar() -> FaceAnalyzer:
    return FaceAnalyzer.haar()


@pytest.fixture(scope="session")
def tiny_pack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return faceutils.write_tiny_buffalo(tmp_path_factory.mktemp("insightface") / "tiny_buffalo")


@pytest.fixture(scope="session")
def tiny(tiny_pack: Path) -> FaceAnalyzer:
    return FaceAnalyzer.insightface(name=str(tiny_pack))


# --------------------------------------------------------------------------------------------------
# pure helpers


def test_mean_embedding_is_normalised_mean():
    a, b = np.array([3.0, 4.0, 0.0]), np.array([0.0, 0.0, 2.0])
    expected = ((a + b) / 2) / np.linalg.norm((a + b) / 2)
    assert np.allclose(mean_embedding([a, b]), expected)
    assert np.allclose(l2_normalize(np.zeros(3)), 0)


def test_align_face_puts_keypoints_on_arcface_template():
    image = np.zeros((300, 300, 3), np.uint8)
    template = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655],
                         [70.7299, 92.2041]], np.float32)  # insightface's arcface_dst (112 px)
    kps = np.round(template * 2 + (40, 30))  # the same face, shifted, at the 224 scale
    for x, y in kps.astype(int):
        image[y - 2 : y + 3, x - 2 : x + 3] = (255, 0, 0)
    crop = align_face(image, kps, 224)
    assert crop.shape == (224, 224, 3)
    # the left-eye marker lands near the template's left eye (38.29, 51.70) * 2
    red = crop[..., 0] > 100
    for x, y in template * 2:  # each marker lands on its template point
        ys, xs = np.nonzero(red[int(y) - 10 : int(y) + 10, int(x) - 10 : int(x) + 10])
        assert len(xs) and abs(xs.mean() + int(x) - 10 - x) < 2 and abs(ys.mean() + int(y) - 10 - y) < 2


# --------------------------------------------------------------------------------------------------
# Haar backend


def test_haar_backend_is_labelled_as_not_a_recognizer(haar: FaceAnalyzer):
    assert haar.backend == "haar"
    assert haar.is_recognizer is False
    assert "NOT a face recognizer" in haar.backend_note


def test_haar_finds_the_face_in_the_asset(haar: FaceAnalyzer):
    faces = haar.detect(FACE_PNG)
    assert len(faces) == 1
    face = faces[0]
    _check_face(face)
    assert _inside(_centre(face.bbox), FACE_BOX)
    left_eye, right_eye, nose, left_mouth, right_mouth = face.kps
    assert left_eye[0] < nose[0] < right_eye[0] and left_mouth[0] < right_mouth[0]
    assert left_eye[1] < nose[1] < left_mouth[1]


def test_haar_identity_of_one_photo(haar: FaceAnalyzer):
    identity = haar.identity([FACE_PNG])
    assert identity.backend == "haar" and identity.is_recognizer is False
    assert len(identity.crops) == len(identity.faces) == len(identity.boxes) == 1
    assert identity.crops[0].size == (224, 224) and identity.crops[0].mode == "RGB"
    assert np.allclose(identity.embedding, identity.faces[0].embedding)
    assert identity.boxes[0] == identity.faces[0].bbox


def test_grey_image_has_no_face(haar: FaceAnalyzer, images: dict[str, Path]):
    assert haar.detect(images["grey"]) == []
    with pytest.raises(NoFaceError, match=r"no face found in face photo 'grey.png'.*frontal, well-lit"):
        haar.identity([images["grey"]])


def test_two_faces_largest_by_default_and_face_index(haar: FaceAnalyzer, images: dict[str, Path]):
    faces = haar.detect(images["two_faces"])
    assert len(faces) == 2
    assert faces[0].area > faces[1].area
    big = haar.identity([images["two_faces"]])
    assert _centre(big.boxes[0])[0] < 512  # the big face is on the left
    small = haar.identity([images["two_faces"]], face_index=1)
    assert _centre(small.boxes[0])[0] > 512
    assert not np.allclose(big.embedding, small.embedding)
    with pytest.raises(ImageError, match="face_index 5 .*2 faces found") as caught:
        haar.identity([images["two_faces"]], face_index=5)
    assert not isinstance(caught.value, NoFaceError)


def test_face_index_per_photo(haar: FaceAnalyzer, images: dict[str, Path]):
    identity = haar.identity([images["two_faces"], FACE_PNG], face_index=[1, None])
    assert _centre(identity.boxes[0])[0] > 512
    with pytest.raises(ImageError, match="one per photo"):
        haar.identity([FACE_PNG], face_index=[0, 1])


def test_too_small_face(haar: FaceAnalyzer):
    with pytest.raises(NoFaceError, match=r"too small \(154x154 px, at least 400 px needed\).*closer photo"):
        haar.identity([FACE_PNG], min_face_px=400)


def test_several_photos_average_normalised(haar: FaceAnalyzer, images: dict[str, Path]):
    photos = [FACE_PNG, images["two_faces"], images["exif_rotated"]]
    identity = haar.identity(photos)
    singles = [haar.identity([photo]).embedding for photo in photos]
    mean = np.mean(singles, axis=0)
    assert np.allclose(identity.embedding, mean / np.linalg.norm(mean), atol=1e-6)
    assert np.linalg.norm(identity.embedding) == pytest.approx(1.0, abs=1e-5)
    assert len(identity.crops) == 3 and all(crop.size == (224, 224) for crop in identity.crops)


def test_same_photo_same_embedding_different_photos_differ(haar: FaceAnalyzer, images: dict[str, Path]):
    first = haar.identity([FACE_PNG]).embedding
    again = haar.identity([load_image(FACE_PNG)]).embedding
    assert np.array_equal(first, again)
    other = haar.identity([images["exif_rotated"]]).embedding
    assert float(first @ other) < 0.999


def test_identity_accepts_a_single_photo_or_an_iterable(haar: FaceAnalyzer):
    expected = haar.identity([FACE_PNG]).embedding
    assert np.array_equal(haar.identity(FACE_PNG).embedding, expected)
    assert np.array_equal(haar.identity(photo for photo in [FACE_PNG]).embedding, expected)


def test_identity_errors(haar: FaceAnalyzer, images: dict[str, Path]):
    with pytest.raises(ImageError, match="no face photo was given"):
        haar.identity([])
    with pytest.raises(ImageError, match="'notes.jpg' is not an image"):
        haar.identity([FACE_PNG, images["text"]])
    with pytest.raises(NoFaceError, match="'uploaded image 2'"):
        haar.identity([FACE_PNG, np.full((64, 64, 3), 128, np.uint8)])


def test_huge_photo_is_detected_in_downscaled_pixels(haar: FaceAnalyzer, images: dict[str, Path]):
    faces = haar.detect(images["huge"])
    assert faces
    x1, y1, x2, y2 = faces[0].bbox
    assert 0 <= x1 < x2 <= 2048 and 0 <= y1 < y2 <= 1536


def test_draw_boxes(haar: FaceAnalyzer, images: dict[str, Path]):
    faces = haar.detect(images["two_faces"])
    drawn = FaceAnalyzer.draw_boxes(images["two_faces"], faces, chosen=1)
    original = load_image(images["two_faces"])
    assert drawn.mode == "RGB" and drawn.size == original.size
    difference = np.abs(np.asarray(drawn).astype(int) - np.asarray(original).astype(int)).sum(axis=2) > 0
    for face in faces:
        x1, y1, x2, y2 = (int(round(v)) for v in face.bbox)
        assert difference[y1 - 2 : y1 + 3, x1:x2].any()  # top edge drawn


def test_concurrent_calls_agree(haar: FaceAnalyzer):
    expected = haar.identity([FACE_PNG]).embedding
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda _: haar.identity([FACE_PNG]).embedding, range(4)))
    assert all(np.array_equal(result, expected) for result in results)


# --------------------------------------------------------------------------------------------------
# insightface backend, offline, on the tiny models of tests/faceutils.py


def test_face_analysis_loaded_both_tiny_models(tiny: FaceAnalyzer, tiny_pack: Path):
    assert tiny.backend == "insightface" and tiny.is_recognizer is True
    assert tiny.model_dir == tiny_pack.absolute()
    assert tiny.tasks == ("detection", "recognition")
    models = tiny.engine.models
    assert set(models) == {"detection", "recognition"}
    assert type(models["detection"]).__name__ == "SCRFD"
    assert type(models["recognition"]).__name__ == "ArcFaceONNX"
    assert Path(models["detection"].model_file).name == faceutils.DET_FILE
    assert Path(models["recognition"].model_file).name == faceutils.REC_FILE
    assert models["detection"].use_kps is True


def test_insightface_finds_the_face_in_the_asset(tiny: FaceAnalyzer):
    faces = tiny.detect(FACE_PNG)
    assert len(faces) >= 1
    face = faces[0]
    _check_face(face)
    assert face.score > 0.5
    assert _inside(_centre(face.bbox), FACE_BOX)
    assert all(_inside(tuple(point), face.bbox) for point in face.kps)
    identity = tiny.identity([FACE_PNG])
    assert identity.backend == "insightface" and identity.is_recognizer is True
    assert np.array_equal(identity.embedding, face.embedding)


def test_insightface_crop_is_rgb_aligned_on_its_keypoints(tiny: FaceAnalyzer):
    """The CLIP branch reads the crop: it is the RGB photo warped on the detected keypoints (the
    detector itself is fed BGR, insightface's order)."""
    face = tiny.detect(FACE_PNG)[0]
    rgb = np.asarray(load_image(FACE_PNG))
    assert np.array_equal(np.asarray(face.crop), align_face(rgb, face.kps, CROP_SIZE))


def test_the_smaller_side_of_a_face_decides_too_small():
    from lcmla.faces import choose_face

    wide = DetectedFace((0.0, 0.0, 300.0, 50.0), np.zeros((5, 2), np.float32), 0.9, np.ones(512, np.float32),
                        Image.new("RGB", (224, 224)))
    with pytest.raises(NoFaceError, match=r"too small \(300x50 px, at least 64 px needed\)"):
        choose_face([wide], "wide.png", None, 64)
    assert choose_face([wide], "wide.png", None, 50) is wide


def test_insightface_embedding_is_deterministic_and_image_dependent(tiny: FaceAnalyzer, images: dict[str, Path]):
    first = tiny.identity([FACE_PNG]).embedding
    again = tiny.identity([FACE_PNG.read_bytes()]).embedding
    assert np.array_equal(first, again)
    darker = (np.asarray(load_image(FACE_PNG)).astype(float) * np.linspace(0.6, 1.0, 512)[None, :, None]).astype(
        np.uint8
    )
    other = tiny.identity([darker]).embedding
    assert float(first @ other) < 0.999


def test_insightface_grey_image_has_no_face(tiny: FaceAnalyzer, images: dict[str, Path]):
    assert tiny.detect(images["grey"]) == []
    assert tiny.detect(Image.new("RGB", (700, 300), (128, 128, 128))) == []  # letter-boxed, non-square
    with pytest.raises(NoFaceError, match="grey.png"):
        tiny.identity([images["grey"]])


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record (and refuse) any attempt to open a connection or to download insightface models."""
    attempts: list[str] = []

    def refuse(*args, **kwargs):
        attempts.append(repr(args)[:200])
        raise AssertionError("network access attempted")

    import insightface.app.face_analysis as face_analysis
    import insightface.utils.storage as storage

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(storage, "download_file", refuse)
    monkeypatch.setattr(face_analysis, "ensure_available", refuse)
    return attempts


def test_missing_pack_raises_missing_weights_without_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: list[str]
):
    import insightface.app

    constructed: list[object] = []
    monkeypatch.setattr(insightface.app, "FaceAnalysis", lambda *a, **k: constructed.append(a) or None)
    expected = tmp_path / "models" / "buffalo_l"
    with pytest.raises(MissingWeightsError) as caught:
        FaceAnalyzer.insightface(name="buffalo_l", root=tmp_path)
    message = str(caught.value)
    assert str(expected) in message
    assert "buffalo_l.zip" in message and "--face-models" in message
    assert caught.value.missing == [str(expected)]
    monkeypatch.setenv("INSIGHTFACE_HOME", str(tmp_path / "home"))
    with pytest.raises(MissingWeightsError, match=str(tmp_path / "home" / "models" / "buffalo_l")):
        FaceAnalyzer.insightface()
    assert constructed == [] and no_network == []


def test_empty_or_incomplete_pack_raises_missing_weights(tmp_path: Path, tiny_pack: Path, no_network: list[str]):
    empty = tmp_path / "empty_pack"
    empty.mkdir()
    (empty / "readme.txt").write_text("no models here")
    with pytest.raises(MissingWeightsError, match="holds no .onnx files"):
        FaceAnalyzer.insightface(name=str(empty))
    with pytest.raises(MissingWeightsError, match=r"readme.txt' is a file, not a folder; pass the folder"):
        FaceAnalyzer.insightface(name=str(empty / "readme.txt"))
    only_recognizer = tmp_path / "only_recognizer"
    only_recognizer.mkdir()
    shutil.copy(tiny_pack / faceutils.REC_FILE, only_recognizer)
    with pytest.raises(MissingWeightsError, match="face detector"):
        FaceAnalyzer.insightface(name=str(only_recognizer))
    only_detector = tmp_path / "only_detector"
    only_detector.mkdir()
    shutil.copy(tiny_pack / faceutils.DET_FILE, only_detector)
    with pytest.raises(MissingWeightsError, match="face recognizer"):
        FaceAnalyzer.insightface(name=str(only_detector))
    assert no_network == []


def test_pack_found_by_name_under_root(tmp_path: Path, tiny_pack: Path, no_network: list[str]):
    folder = tmp_path / "models" / "tiny_buffalo"
    shutil.copytree(tiny_pack, folder)
    analyzer = FaceAnalyzer.insightface(name="tiny_buffalo", root=tmp_path)
    assert analyzer.model_dir == folder.absolute()
    assert analyzer.detect(FACE_PNG)
    assert no_network == []


# --------------------------------------------------------------------------------------------------
# the corners a mutation audit found untested


def _face(box, score):
    return DetectedFace(bbox=box, kps=np.zeros((5, 2), np.float32), score=score, embedding=np.zeros(512, np.float32),
                        crop=Image.new("RGB", (CROP_SIZE, CROP_SIZE)))


def test_faces_are_ordered_by_size_then_by_score():
    from lcmla.faces import _sorted_faces

    small_sure, big_unsure, big_sure = _face((0, 0, 10, 10), 0.99), _face((0, 0, 50, 50), 0.4), _face((60, 0, 110, 50), 0.9)
    assert _sorted_faces([small_sure, big_unsure, big_sure]) == [big_sure, big_unsure, small_sure]


def test_a_negative_face_index_is_refused_not_counted_from_the_end(haar: FaceAnalyzer, images: dict[str, Path]):
    with pytest.raises(ImageError, match=r"face_index -1 is out of range .*2 faces found \(valid indices 0..1"):
        haar.identity([images["two_faces"]], face_index=-1)


def test_huge_photo_boxes_are_in_the_loaded_images_pixels(haar: FaceAnalyzer, images: dict[str, Path]):
    """Haar runs on a copy shrunk to 1024 px; its boxes are scaled back to the loaded image's pixels:
    the face of the 4000×3000 photo (loaded at 2048×1536) sits where it sits in face.png, scaled."""
    (face,) = haar.detect(images["huge"])
    loaded = load_image(images["huge"])
    sx, sy = loaded.width / Image.open(FACE_PNG).width, loaded.height / Image.open(FACE_PNG).height
    cx, cy = _centre(face.bbox)
    ex, ey = _centre(FACE_BOX)
    assert abs(cx - ex * sx) < 0.1 * (FACE_BOX[2] - FACE_BOX[0]) * sx and abs(cy - ey * sy) < 0.1 * (FACE_BOX[3] - FACE_BOX[1]) * sy
    assert face.width > 0.5 * (FACE_BOX[2] - FACE_BOX[0]) * sx


def test_haar_scores_grow_with_the_detectors_neighbours(haar: FaceAnalyzer):
    """score = n/(n + 5) for n ≥ 5 neighbouring detections: in [0.5, 1) for any face Haar reports."""
    (face,) = haar.detect(FACE_PNG)
    assert 0.5 <= face.score < 1.0


def test_canonical_keypoints_sit_inside_the_box_at_face_proportions():
    from lcmla.faces import canonical_keypoints

    kps = canonical_keypoints((100.0, 50.0, 200.0, 250.0))
    np.testing.assert_allclose(kps, [[131, 126], [169, 126], [150, 170], [134, 210], [166, 210]], atol=1e-4)


def test_draw_boxes_highlights_the_chosen_face(haar: FaceAnalyzer, images: dict[str, Path]):
    faces = haar.detect(images["two_faces"])
    for chosen in (0, 1):
        drawn = np.asarray(FaceAnalyzer.draw_boxes(images["two_faces"], faces, chosen=chosen))
        for number, face in enumerate(faces):
            x1, y1, x2, _ = (int(round(v)) for v in face.bbox)
            edge = drawn[y1, (x1 + x2) // 2]
            assert tuple(edge) == ((40, 220, 80) if number == chosen else (255, 150, 0))


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider':UserWarning")
def test_insightface_runs_on_the_gpu_context_only_when_asked_for_a_gpu(monkeypatch, tiny_pack: Path):
    """insightface's ``prepare(ctx_id=-1)`` forces the CPU provider: it is passed only for CPU-only
    provider lists; a CUDA list keeps ctx_id 0 (and onnxruntime's own fallback)."""
    import insightface.app

    from lcmla.faces import _load_face_analysis

    seen = []
    real = insightface.app.FaceAnalysis.prepare

    def prepare(self, ctx_id, **kwargs):
        seen.append(ctx_id)
        return real(self, -1, **kwargs)  # this machine has no GPU: prepare on the CPU

    monkeypatch.setattr(insightface.app.FaceAnalysis, "prepare", prepare)
    _load_face_analysis(tiny_pack, tiny_pack.parent, ["CPUExecutionProvider"], (640, 640))
    _load_face_analysis(tiny_pack, tiny_pack.parent, [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"],
                        (640, 640))
    assert seen == [-1, 0]


def test_a_pack_under_the_root_wins_over_a_folder_of_that_name_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from lcmla.faces import resolve_model_dir

    monkeypatch.chdir(tmp_path)
    (tmp_path / "buffalo_l").mkdir()
    root = tmp_path / "home"
    assert resolve_model_dir("buffalo_l", root) == tmp_path / "buffalo_l"  # only here: used
    (root / "models" / "buffalo_l").mkdir(parents=True)
    assert resolve_model_dir("buffalo_l", root) == root / "models" / "buffalo_l"  # under the root: preferred
    assert resolve_model_dir("./buffalo_l", root) == tmp_path / "buffalo_l"  # a path is a path


def test_a_model_package_manifest_counts_as_models(tmp_path: Path):
    """insightface also reads packs described by a manifest.json (their ONNX files may sit in
    subfolders): such a folder is not refused as empty."""
    from lcmla.faces import _check_model_dir

    (tmp_path / "pack").mkdir()
    with pytest.raises(MissingWeightsError, match="holds no .onnx files"):
        _check_model_dir(tmp_path / "pack")
    (tmp_path / "pack" / "manifest.json").write_text("{}")
    _check_model_dir(tmp_path / "pack")
