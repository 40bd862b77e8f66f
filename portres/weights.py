"""Seeded initialisation, safetensors/npz I/O and strict loading.

Parameter names are the plan's: torchvision's state_dict keys wherever torchvision has
the model (``layer1.0.conv1.weight``, ``layer1.0.downsample.1.running_var``, ``fc.bias``).
Elsewhere the scheme is the analogous one:

* pre-activation blocks: ``bnK`` is the BN-ReLU *before* ``convK``; the network ends with
  ``final_bn``; projections are ``downsample.0`` (a bare 1x1 conv, as in timm's v2);
* deep stem (ResNet-D): timm's ``conv1.0 / conv1.1 / conv1.3 / conv1.4 / conv1.6`` then
  ``bn1``; avg-down shortcuts are ``downsample.1`` (conv) and ``downsample.2`` (BN);
* CIFAR: ``conv1``, ``bn1``, ``layer1..3``, ``fc``; option-A shortcuts have no parameters.

    >>> import portres
    >>> params = portres.init_params(portres.get("resnet18"), seed=0)
    >>> params["conv1.weight"].shape
    (64, 3, 7, 7)
    >>> portres.save_weights("/tmp/r18.safetensors", params)
    >>> loaded = portres.load_weights("/tmp/r18.safetensors", portres.get("resnet18"))
"""

from __future__ import annotations

import json
import math
import os
import struct
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .plan import Plan, as_plan
from .spec import ResNetSpec


class WeightsError(ValueError):
    """Weights that do not fit the spec, or a file that cannot be read; nothing was loaded."""


def init_params(spec: ResNetSpec | Plan, seed: int = 0, *, randomize_batch_norm: bool = False) -> dict[str, np.ndarray]:
    """Deterministic float32 parameters and buffers for ``spec``.

    Convs: He-normal, fan-out (torchvision). Linear: U(±1/sqrt(fan_in)) for weight and bias
    (PyTorch's default). BN: scale 1 (0 where ``zero_init_last_bn``), shift 0, running mean
    0, variance 1. Each tensor draws from its own stream seeded by ``(seed, crc32(name))``,
    so values do not depend on plan order, platform or which other tensors exist.

    ``randomize_batch_norm=True`` draws non-trivial BN scales, shifts and running
    statistics instead (for parity tests: identity BN hides bugs).
    """
    plan = as_plan(spec)
    params: dict[str, np.ndarray] = {}
    for op in plan.ops:
        layer = op.layer
        for name, (shape, _) in op.param_shapes().items():
            rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
            suffix = name.rsplit(".", 1)[1]
            if op.kind == "conv2d" and suffix == "weight":
                fan_out = shape[0] * shape[2] * shape[3]
                value = rng.standard_normal(shape) * math.sqrt(2.0 / fan_out)
            elif op.kind == "linear":
                value = rng.uniform(-1, 1, shape) / math.sqrt(layer.in_features)
            elif randomize_batch_norm:
                low_high = {"weight": (0.5, 1.5), "running_var": (0.5, 2.0)}
                if suffix in low_high:
                    value = rng.uniform(*low_high[suffix], shape)
                else:  # bias, running_mean
                    value = rng.normal(0.0, 0.2, shape)
            else:
                one = suffix == "running_var" or (suffix == "weight" and not layer.zero_init)
                value = np.full(shape, 1.0 if one else 0.0)
            params[name] = value.astype(np.float32)
    return params


# -- files --------------------------------------------------------------------------------

_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": None,
                       "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
                       "BOOL": np.bool_}
_NUMPY_TO_SAFETENSORS = {np.dtype(v): k for k, v in _SAFETENSORS_DTYPES.items() if v is not None}
_MAX_HEADER = 100 * 1024 * 1024


def save_weights(path, params: Mapping[str, np.ndarray]) -> None:
    """Write ``params`` to ``path`` (``.safetensors`` or ``.npz``), atomically."""
    path = Path(path)
    arrays = {name: np.ascontiguousarray(np.asarray(value)) for name, value in params.items()}
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".safetensors":
        header, offset = {}, 0
        for name, array in arrays.items():
            if array.dtype not in _NUMPY_TO_SAFETENSORS:
                raise WeightsError(f"cannot store {name} of dtype {array.dtype} in safetensors")
            header[name] = {"dtype": _NUMPY_TO_SAFETENSORS[array.dtype], "shape": list(array.shape),
                            "data_offsets": [offset, offset + array.nbytes]}
            offset += array.nbytes
        header["__metadata__"] = {"format": "np", "writer": "portres"}
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the format aligns the data to 8 bytes
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(text)))
            f.write(text)
            for array in arrays.values():
                f.write(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
    elif path.suffix == ".npz":
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    else:
        raise WeightsError(f"{path}: unknown weights format {path.suffix!r}; use .safetensors or .npz")
    os.replace(tmp, path)


def read_weights_file(path) -> dict[str, np.ndarray]:
    """Every tensor in a ``.safetensors`` or ``.npz`` file, unchecked against any spec."""
    path = Path(path)
    if path.suffix not in (".safetensors", ".npz"):
        raise WeightsError(f"{path}: unknown weights format {path.suffix!r}; use .safetensors or .npz")
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file")
    if path.suffix == ".npz":
        return _read_npz(path)
    return _read_safetensors(path, path.read_bytes())


def _read_safetensors(path: Path, data: bytes) -> dict[str, np.ndarray]:
    def bad(why: str) -> WeightsError:
        return WeightsError(f"{path}: not a valid safetensors file ({why})")

    if len(data) < 8:
        raise bad(f"{len(data)} bytes, shorter than the 8-byte header length")
    (size,) = struct.unpack("<Q", data[:8])
    if size > min(_MAX_HEADER, len(data) - 8):
        raise bad(f"header length {size} exceeds the file's {len(data) - 8} remaining bytes: truncated or corrupt")
    try:
        header = json.loads(data[8:8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise bad(f"header is not JSON: {error}") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    header.pop("__metadata__", None)
    body = memoryview(data)[8 + size:]
    tensors = {}
    for name, info in header.items():
        try:
            dtype_name, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise bad(f"entry {name!r} lacks dtype/shape/data_offsets") from None
        integers = (*shape, begin, end)
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in integers):
            raise bad(f"entry {name!r} has a shape or offsets that are not non-negative integers")
        if not isinstance(dtype_name, str) or dtype_name not in _SAFETENSORS_DTYPES:
            raise bad(f"entry {name!r} has unsupported dtype {dtype_name!r}")
        itemsize = 2 if dtype_name == "BF16" else np.dtype(_SAFETENSORS_DTYPES[dtype_name]).itemsize
        if not (0 <= begin <= end <= len(body)):
            raise bad(f"entry {name!r} points at bytes {begin}..{end} of a {len(body)}-byte body: truncated")
        if end - begin != math.prod(shape) * itemsize:
            raise bad(f"entry {name!r} has {end - begin} bytes for shape {list(shape)} of {dtype_name}")
        if dtype_name == "BF16":  # bfloat16 is the top half of a float32
            raw = np.frombuffer(body[begin:end], dtype="<u2").astype(np.uint32) << 16
            tensors[name] = raw.view(np.float32).reshape(shape)
        else:
            dtype = np.dtype(_SAFETENSORS_DTYPES[dtype_name]).newbyteorder("<")
            tensors[name] = np.frombuffer(body[begin:end], dtype=dtype).reshape(shape).copy()
    return tensors


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        archive = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as error:
        raise WeightsError(f"{path}: not a valid .npz file ({type(error).__name__}: {error})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):  # np.save output renamed to .npz
        raise WeightsError(f"{path}: holds a single array, not a .npz archive of named tensors")
    try:
        with archive:
            return {name: archive[name] for name in archive.files}
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as error:
        raise WeightsError(f"{path}: not a valid .npz file ({type(error).__name__}: {error})") from None


# -- strict loading -------------------------------------------------------------------------


def _to_numpy(value):
    if hasattr(value, "detach"):  # a torch tensor; torch stays un-imported here
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        value = value.numpy()
    return np.asarray(value)


def load_weights(source, spec: ResNetSpec | Plan) -> dict[str, np.ndarray]:
    """Check ``source`` (a path or a mapping) against ``spec``; return float32 copies.

    Strict: every missing, unexpected, misshapen, non-numeric or non-finite entry is
    reported in one :class:`WeightsError`. A torchvision ``state_dict`` loads as is
    (its ``num_batches_tracked`` counters are ignored). Nothing is returned half-loaded.
    """
    plan = as_plan(spec)
    origin = f"{source}" if isinstance(source, (str, os.PathLike)) else "the given mapping"
    if isinstance(source, (str, os.PathLike)):
        source = read_weights_file(source)
    if not isinstance(source, Mapping):
        raise WeightsError(f"weights must be a file path or a mapping of name -> array, got {type(source).__name__}")
    given = {str(k): v for k, v in source.items() if not str(k).endswith("num_batches_tracked")}
    expected = plan.param_shapes()
    problems, result = [], {}
    missing = [name for name in expected if name not in given]
    unexpected = [name for name in given if name not in expected]
    if missing:
        problems.append(f"missing ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        hint = ""
        if all(name.startswith("module.") for name in unexpected):
            hint = " (every unexpected key starts with 'module.': strip the DataParallel prefix)"
        problems.append(f"unexpected ({len(unexpected)}): {', '.join(unexpected)}{hint}")
    for name, (shape, _) in expected.items():
        if name not in given:
            continue
        try:
            array = _to_numpy(given[name])
        except Exception as error:  # noqa: BLE001 - any unconvertible object is a user error here
            problems.append(f"{name}: cannot convert {type(given[name]).__name__} to an array ({error})")
            continue
        if array.dtype.kind not in "fiu":
            problems.append(f"{name}: dtype {array.dtype} is not numeric")
        elif array.shape != shape:
            problems.append(f"{name}: shape {list(array.shape)}, expected {list(shape)}")
        elif not np.all(np.isfinite(array)):
            problems.append(f"{name}: contains NaN or inf")
        else:
            result[name] = np.array(array, dtype=np.float32)
    if problems:
        raise WeightsError(f"weights from {origin} do not fit {plan.spec.name}:\n  " + "\n  ".join(problems))
    return result
