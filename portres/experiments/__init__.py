"""The ResNet papers' experiments, on any backend (docs/experiments.md):

- :mod:`~portres.experiments.degradation`: plain vs residual twins trained with one recipe
  (He et al. 2015, Figure 6);
- :mod:`~portres.experiments.gradflow`: gradient norms, layer responses and shattered gradients at
  initialisation (He et al. 2015, Figure 7; Balduzzi et al. 2017);
- :mod:`~portres.experiments.lesion`: deleting blocks and the gradient per path length (Veit et al. 2016).

Each is built from what the rest of portres already has: the training loop, the backends' own
gradients (with zero probes for values inside the network) and plan rewrites
(:func:`portres.rewrites.delete_blocks`). Nothing here imports a framework until a backend is used.
"""

from .degradation import DegradationConfig, run_degradation
from .gradflow import NetworkFlow, gradient_flow
from .lesion import LesionStudy, lesion_parity, lesion_study, lesioned_model, path_gradients

__all__ = ["DegradationConfig", "LesionStudy", "NetworkFlow", "gradient_flow", "lesion_parity", "lesion_study",
           "lesioned_model", "path_gradients", "run_degradation"]
