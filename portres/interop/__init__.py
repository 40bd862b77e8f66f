"""Weights in and out of other ecosystems: PyTorch checkpoints read and written without torch,
foreign naming schemes (timm, Keras, mlx-image) mapped onto portres's, and ONNX export. Each
conversion is proved numerically by the parity suite, like everything else here.
"""
