# how to regenerate: python tests/golden/make_preprocess_golden.py   (from the repo root, in a throw-away venv:
#   pip install torch torchvision timm keras pillow numpy scikit-learn; never in the project's .venv)
"""Generate tests/golden/preprocess/<photo>.npz: what torchvision, timm and Keras make of scikit-learn's two
real photos (sklearn/datasets/images/china.jpg, flower.jpg), for tests/test_preprocess.py, which compares
portres.preprocess with them without any of these frameworks installed.

Each file holds, for one photo:

* ``torchvision_resnet50``: float32 (3, 224, 224), ``ResNet50_Weights.IMAGENET1K_V1.transforms()`` of the
  photo opened as torchvision's ImageFolder does (``Image.open(path).convert("RGB")``);
* ``crop_<preset>``: uint8 (224, 224, 3) (256 for resnet101d), the resized and centre-cropped image before
  any scaling: torchvision's ``Resize(256) + CenterCrop(224)`` for resnet50, timm's evaluation transform
  (``create_transform(**resolve_data_config({}, model=timm.create_model(name)))`` with ``normalize=False``)
  for the timm presets resnet50d, resnet101d, resnetv2_50; ``crop_resnet50_portrait`` torchvision's of the
  photo turned 90 degrees (``Image.transpose(ROTATE_90)``: the shorter side is then the width);
* ``<framework>_rows``: float32 rows ROWS of the network input (NCHW, 3 x 4 x width), from the framework
  itself: ``timm_resnetv2_50_rows`` timm's full transform (mean/std 0.5); ``keras_caffe_rows`` and
  ``keras_tf_rows`` ``keras.applications.resnet.preprocess_input`` / ``resnet_v2.preprocess_input`` of
  ``crop_resnet50`` (Keras does not resize: portres's Keras presets resize and crop like torchvision);
  the arithmetic is exact, so a few rows check it and keep the files small;
* ``versions``: the framework versions used.
"""

import os
import sys
import types
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")
# the PyPI torchvision wheel is a CUDA build: with a CPU-only torch its meta registrations fail to import
sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import PIL  # noqa: E402
import sklearn  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision import transforms  # noqa: E402
from torchvision.models import ResNet50_Weights  # noqa: E402

ROWS = slice(100, 104)  # the rows of the network input kept for the *_rows arrays
PHOTOS = ("china.jpg", "flower.jpg")
TIMM_PRESETS = ("resnet50d", "resnet101d", "resnetv2_50")
OUT = Path(__file__).parent / "preprocess"


def timm_transform(name: str, normalize: bool):
    model = timm.create_model(name, pretrained=False)
    config = timm.data.resolve_data_config({}, model=model)
    return timm.data.create_transform(**config, normalize=normalize), config


def main() -> None:
    OUT.mkdir(exist_ok=True)
    folder = Path(sklearn.__file__).parent / "datasets" / "images"
    resnet50 = ResNet50_Weights.IMAGENET1K_V1.transforms()
    crop = transforms.Compose([transforms.Resize(256, transforms.InterpolationMode.BILINEAR),
                               transforms.CenterCrop(224)])
    versions = (f"torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}, "
                f"keras {keras.__version__}, Pillow {PIL.__version__}, numpy {np.__version__}")
    for photo in PHOTOS:
        image = Image.open(folder / photo).convert("RGB")
        arrays = {"torchvision_resnet50": resnet50(image).numpy(),
                  "crop_resnet50": np.asarray(crop(image)), "versions": np.array(versions),
                  "crop_resnet50_portrait": np.asarray(crop(image.transpose(Image.Transpose.ROTATE_90)))}
        for name in TIMM_PRESETS:
            transform, config = timm_transform(name, normalize=False)
            print(photo, name, config)
            arrays[f"crop_{name}"] = transform(image).numpy().transpose(1, 2, 0)  # uint8 CHW -> HWC
        full, _ = timm_transform("resnetv2_50", normalize=True)
        arrays["timm_resnetv2_50_rows"] = full(image).numpy()[:, ROWS]
        batch = arrays["crop_resnet50"][None].astype(np.float32)  # NHWC RGB 0-255, as Keras takes it
        caffe = keras.applications.resnet.preprocess_input(batch.copy())
        tf = keras.applications.resnet_v2.preprocess_input(batch.copy())
        arrays["keras_caffe_rows"] = np.asarray(caffe)[0].transpose(2, 0, 1)[:, ROWS].astype(np.float32)
        arrays["keras_tf_rows"] = np.asarray(tf)[0].transpose(2, 0, 1)[:, ROWS].astype(np.float32)
        np.savez_compressed(OUT / Path(photo).with_suffix(".npz"), **arrays)
        print(photo, {k: (v.shape, v.dtype) for k, v in arrays.items()})


if __name__ == "__main__":
    main()
