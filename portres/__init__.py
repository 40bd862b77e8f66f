"""portres: one ResNet description, lowered to tinygrad, MLX and a float64 NumPy reference.

    >>> import numpy as np, portres
    >>> spec = portres.get("resnet50")                  # or portres.resnet(50, shortcut="avg_down")
    >>> portres.summary(spec).params
    25557032
    >>> model = portres.build(spec, "numpy")             # "tinygrad", "mlx", "torch"
    >>> model(np.zeros((1, 3, 224, 224), np.float32)).shape
    (1, 1000)

Importing portres imports only the standard library and NumPy; a framework is imported
when a backend is built.
"""

from . import zoo
from .analysis import Summary, summary
from .images import ImageError, preprocess
from .loading import load
from .model import Model, build
from .plan import Plan, make_plan
from .rewrites import fold_batch_norm
from .spec import ResNetSpec, SpecError, StageSpec, StemSpec
from .training.grads import loss_and_grads
from .weights import LoadReport, WeightsError, init_params, load_weights, save_weights
from .zoo import DataConfig, data_config, get, resnet

__version__ = "0.1.0"

__all__ = [
    "DataConfig", "ImageError", "LoadReport", "Model", "Plan", "ResNetSpec", "SpecError", "StageSpec", "StemSpec",
    "Summary", "WeightsError",
    "build", "data_config", "fold_batch_norm", "get", "init_params", "load", "load_weights", "loss_and_grads",
    "make_plan", "preprocess", "resnet", "save_weights",
    "summary", "zoo",
]
