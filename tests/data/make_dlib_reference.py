"""Writes dlib_reference.json and the dlib chips the dlib tests compare against.

Needs dlib's own binary (``pip install dlib-bin``), which lcmla does not depend on; run once:
    python tests/data/make_dlib_reference.py
The outputs are committed, so the tests run without dlib.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
import sys  # noqa: E402

sys.path.insert(0, str(HERE.parents[1]))


def portraits() -> dict[str, np.ndarray]:
    import matplotlib
    import skimage.data

    hopper = Image.open(os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")).convert("RGB")
    return {"astronaut": skimage.data.astronaut(), "hopper": np.asarray(hopper)}


def main() -> None:
    import dlib

    from lcmla.recognizers.dlib_resnet import model_path

    det = dlib.cnn_face_detection_model_v1(str(model_path("detector")))
    sp = dlib.shape_predictor(str(model_path("landmarks")))
    fr = dlib.face_recognition_model_v1(str(model_path("recognition")))
    out = {"dlib_version": dlib.__version__, "faces": {}}
    for name, img in portraits().items():
        dets = {up: [[[d.rect.left(), d.rect.top(), d.rect.right(), d.rect.bottom()], d.confidence] for d in det(img, up)]
                for up in (0, 1)}
        rect = det(img, 0)[0].rect
        shape = sp(img, rect)
        chip = dlib.get_face_chip(img, shape, 150, 0.25)
        Image.fromarray(chip).save(HERE / f"dlib_chip_{name}.png")
        out["faces"][name] = {
            "detections": dets,
            "landmarks": [[p.x, p.y] for p in shape.parts()],
            "descriptor_of_chip": list(fr.compute_face_descriptor(chip)),
            "descriptor": list(fr.compute_face_descriptor(img, shape, 0, 0.25)),
        }
    (HERE / "dlib_reference.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
