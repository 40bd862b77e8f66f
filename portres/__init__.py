"""portres: one ResNet description, lowered to tinygrad, MLX and a float64 NumPy reference."""
from . import zoo
from .analysis import summary
from .plan import make_plan
from .spec import ResNetSpec, SpecError, StageSpec, StemSpec
from .zoo import get, resnet
