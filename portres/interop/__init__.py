"""Weights in and out of other ecosystems: PyTorch checkpoints read and written without torch,
foreign naming schemes (timm, Keras, mlx-image) mapped onto portres's, and ONNX export. Each
conversion is proved numerically by the parity suite, like everything else here.

* :mod:`portres.interop.pth`: ``read_pth``, ``inspect_pth`` and ``write_pth`` for ``torch.save``
  checkpoints (``.pth``/``.pt``/``.bin``), read by an unpickler that runs nothing from the file;
  ``load_weights`` and ``save_weights`` use it for those suffixes.
"""

from .pth import CheckpointInfo, inspect_pth, read_pth, write_pth

__all__ = ["CheckpointInfo", "inspect_pth", "read_pth", "write_pth"]
