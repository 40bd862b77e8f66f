"""Make tests/golden/predict/torchvision_resnet50.npz: what torchvision computes for scikit-learn's two
photos with the seeded resnet50 weights tests/test_predict.py uses (``init_params("resnet50", 7)``,
the classifier scaled by 0.1), so the suite compares portres's predictions, pooled features and
layer3 output with torchvision's on every run, also where torchvision is not installed.

Run in a venv with torch, torchvision, Pillow, scikit-learn and NumPy (not the project's: its
torchvision would be a CUDA build), from the repository root:

    python tests/golden/make_predict_golden.py

(torchvision's PyPI wheel is a CUDA build: with a CPU torch it imports after the stub below.)
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))

import sklearn  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from PIL import Image  # noqa: E402

import portres  # noqa: E402 - the seeded weights are portres's own (NumPy only)

PHOTOS = [Path(sklearn.__file__).parent / "datasets" / "images" / name for name in ("china.jpg", "flower.jpg")]


def main() -> None:
    params = portres.init_params("resnet50", 7)
    params["fc.weight"] = params["fc.weight"] * np.float32(0.1)
    net = torchvision.models.resnet50()
    net.load_state_dict({name: torch.from_numpy(value) for name, value in params.items()})
    net.eval()
    transforms = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.transforms()
    batch = torch.stack([transforms(Image.open(photo).convert("RGB")) for photo in PHOTOS])
    with torch.no_grad():
        x = net.maxpool(net.relu(net.bn1(net.conv1(batch))))
        layer3 = net.layer3(net.layer2(net.layer1(x)))
        pooled = torch.flatten(net.avgpool(net.layer4(layer3)), 1)
        probabilities = torch.softmax(net.fc(pooled).double(), dim=1)
    out = ROOT / "tests" / "golden" / "predict" / "torchvision_resnet50.npz"
    np.savez(out, probabilities=probabilities.numpy().astype(np.float32), pooled=pooled.numpy(),
             layer3_first_image=layer3[0].numpy(),
             versions=np.array(f"torch {torch.__version__}, torchvision {torchvision.__version__}"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
