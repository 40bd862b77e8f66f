"""Initialisation, canonical names, file formats and strict loading."""

import hashlib
import json
import math
import struct
import subprocess
import sys

import numpy as np
import pytest

import portres
from portres.weights import WeightsError, init_params, load_weights, read_weights_file, save_weights


def torchvision_keys(depth_blocks, bottleneck, num_classes=1000):
    """torchvision resnet.py's state_dict keys, enumerated from its structure (not from portres)."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = ["conv1.weight"] + [f"bn1.{s}" for s in bn]
    inplanes = 64
    for layer, (blocks, planes) in enumerate(zip(depth_blocks, (64, 128, 256, 512)), start=1):
        expansion = 4 if bottleneck else 1
        for b in range(blocks):
            stride = 1 if layer == 1 or b else 2
            prefix = f"layer{layer}.{b}."
            for i in range(1, (3 if bottleneck else 2) + 1):
                keys += [f"{prefix}conv{i}.weight"] + [f"{prefix}bn{i}.{s}" for s in bn]
            if b == 0 and (stride != 1 or inplanes != planes * expansion):
                keys += [f"{prefix}downsample.0.weight"] + [f"{prefix}downsample.1.{s}" for s in bn]
            inplanes = planes * expansion
    return keys + ["fc.weight", "fc.bias"]


@pytest.mark.parametrize("name, blocks, bottleneck", [
    ("resnet18", (2, 2, 2, 2), False), ("resnet50", (3, 4, 6, 3), True), ("resnext101_32x8d", (3, 4, 23, 3), True),
    ("wide_resnet50_2", (3, 4, 6, 3), True),
])
def test_parameter_names_are_torchvision_state_dict_keys(name, blocks, bottleneck):
    expected = {k for k in torchvision_keys(blocks, bottleneck) if not k.endswith("num_batches_tracked")}
    assert set(init_params(portres.get(name))) == expected


def test_a_torchvision_state_dict_with_counters_loads_as_is():
    spec = portres.get("resnet18")
    params = init_params(spec, seed=3)
    state_dict = dict(params)
    for key in torchvision_keys((2, 2, 2, 2), False):
        if key.endswith("num_batches_tracked"):
            state_dict[key] = np.array(12345, dtype=np.int64)
    loaded = load_weights(state_dict, spec)
    assert list(loaded) == list(portres.make_plan(spec).param_shapes())
    assert all(np.array_equal(loaded[k], params[k]) for k in params)


def test_torch_tensors_load_without_portres_importing_torch():
    torch = pytest.importorskip("torch")
    spec = portres.get("resnet20")
    params = init_params(spec)
    state = {k: torch.from_numpy(v).to(torch.bfloat16 if k == "fc.bias" else torch.float32) for k, v in params.items()}
    state["bn1.num_batches_tracked"] = torch.tensor(7)
    loaded = load_weights(state, spec)
    assert np.allclose(loaded["fc.bias"], params["fc.bias"], rtol=1e-2) and loaded["conv1.weight"].dtype == np.float32


def _digest(params):
    h = hashlib.sha256()
    for k in sorted(params):
        h.update(k.encode() + params[k].tobytes())
    return h.hexdigest()


def test_init_is_deterministic_across_calls_and_processes():
    spec = portres.get("resnet20")
    first = init_params(spec, seed=7)
    assert _digest(first) == _digest(init_params(spec, seed=7))
    assert _digest(first) != _digest(init_params(spec, seed=8))
    code = ("import hashlib, portres; p = portres.init_params(portres.get('resnet20'), seed=7); h = hashlib.sha256()\n"
            "for k in sorted(p): h.update(k.encode() + p[k].tobytes())\nprint(h.hexdigest())")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": "123", "PATH": ""})
    assert other.stdout.strip() == _digest(first)


def test_each_tensor_is_independent_of_the_rest_of_the_network():
    a = init_params(portres.get("resnet50"), seed=1)
    b = init_params(portres.resnet(50, num_classes=10), seed=1)  # a different fc, same trunk
    assert np.array_equal(a["layer3.2.conv2.weight"], b["layer3.2.conv2.weight"])


def test_init_distributions():
    spec = portres.resnet(50, zero_init_last_bn=True)
    p = init_params(spec, seed=0)
    w = p["layer3.0.conv2.weight"]  # 256 x 256 x 3 x 3, fan_out = 2304
    assert abs(w.std() - math.sqrt(2 / 2304)) / math.sqrt(2 / 2304) < 0.02 and abs(w.mean()) < 1e-3
    bound = 1 / math.sqrt(2048)
    assert p["fc.weight"].max() <= bound and p["fc.weight"].min() >= -bound
    assert np.all(p["layer1.0.bn3.weight"] == 0) and np.all(p["layer1.0.bn2.weight"] == 1)
    assert np.all(p["bn1.running_var"] == 1) and np.all(p["bn1.running_mean"] == 0)
    assert all(v.dtype == np.float32 for v in p.values())
    r = init_params(spec, seed=0, randomize_batch_norm=True)
    assert r["layer1.0.bn3.weight"].min() >= 0.5 and r["bn1.running_var"].std() > 0.1


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_save_and_load_round_trip(tmp_path, suffix):
    spec = portres.get("resnext50_32x4d")
    params = init_params(spec, seed=2)
    path = tmp_path / f"w{suffix}"
    save_weights(path, params)
    loaded = load_weights(path, spec)
    assert all(np.array_equal(loaded[k], params[k]) for k in params)
    assert not list(tmp_path.glob("*.tmp"))


def test_safetensors_files_are_interchangeable_with_the_reference_library(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    spec = portres.get("resnet20")
    params = init_params(spec)
    save_weights(tmp_path / "ours.safetensors", params)
    theirs = st.load_file(str(tmp_path / "ours.safetensors"))
    assert all(np.array_equal(theirs[k], params[k]) for k in params)
    mixed = {k: v.astype(np.float16) if "bn" in k else v for k, v in params.items()}
    mixed["bn1.num_batches_tracked"] = np.array(5, np.int64)
    st.save_file(mixed, str(tmp_path / "theirs.safetensors"))
    loaded = load_weights(tmp_path / "theirs.safetensors", spec)
    assert np.array_equal(loaded["bn1.running_var"], params["bn1.running_var"].astype(np.float16).astype(np.float32))


def test_bfloat16_safetensors_are_widened(tmp_path):
    values = np.array([1.0, -2.5, 3.140625], np.float32)
    raw = (values.view(np.uint32) >> 16).astype("<u2").tobytes()
    header = json.dumps({"x": {"dtype": "BF16", "shape": [3], "data_offsets": [0, len(raw)]}}).encode()
    path = tmp_path / "bf.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + raw)
    assert np.array_equal(read_weights_file(path)["x"], values)


def test_strict_loading_reports_everything_at_once():
    spec = portres.get("resnet20")
    params = init_params(spec)
    bad = dict(params)
    del bad["fc.bias"], bad["layer1.0.bn1.running_var"]
    bad["layer9.conv.weight"] = np.zeros(3)
    bad["conv1.weight"] = np.zeros((16, 3, 5, 5))
    bad["bn1.weight"] = np.array(["a"] * 16)
    bad["bn1.bias"] = np.full(16, np.nan, np.float32)
    with pytest.raises(WeightsError) as caught:
        load_weights(bad, spec)
    text = str(caught.value)
    for part in ("missing (2): layer1.0.bn1.running_var, fc.bias", "unexpected (1): layer9.conv.weight",
                 "conv1.weight: shape [16, 3, 5, 5], expected [16, 3, 3, 3]", "bn1.weight: dtype <U1 is not numeric",
                 "bn1.bias: contains NaN or inf"):
        assert part in text


def test_dataparallel_prefix_gets_a_hint():
    spec = portres.get("resnet20")
    with pytest.raises(WeightsError, match="strip the DataParallel prefix"):
        load_weights({f"module.{k}": v for k, v in init_params(spec).items()}, spec)


def test_source_must_be_path_or_mapping():
    with pytest.raises(WeightsError, match="must be a file path or a mapping"):
        load_weights([1, 2], portres.get("resnet20"))


def _valid_file(tmp_path, suffix):
    path = tmp_path / f"w{suffix}"
    save_weights(path, init_params(portres.get("resnet20")))
    return path


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[: len(b) // 2], "truncated"),
    (lambda b: b[:5], "shorter than the 8-byte header length"),
    (lambda b: struct.pack("<Q", 10) + b"not json!!" + b[18:], "header is not JSON"),
    (lambda b: struct.pack("<Q", 2**40) + b[8:], "truncated or corrupt"),
    (lambda b: b"\x00" * 64, "header is not JSON"),
])
def test_corrupt_safetensors_name_the_file(tmp_path, damage, message):
    path = _valid_file(tmp_path, ".safetensors")
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(WeightsError, match=message) as caught:
        load_weights(path, portres.get("resnet20"))
    assert str(path) in str(caught.value)


@pytest.mark.parametrize("damage", [lambda b: b[: len(b) // 2], lambda b: b"garbage" * 10])
def test_corrupt_npz_names_the_file(tmp_path, damage):
    path = _valid_file(tmp_path, ".npz")
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(WeightsError, match="not a valid .npz file") as caught:
        load_weights(path, portres.get("resnet20"))
    assert str(path) in str(caught.value)


def test_wrong_format_and_missing_files(tmp_path):
    with pytest.raises(WeightsError, match="unknown weights format '.pt'"):
        load_weights(tmp_path / "w.pt", portres.get("resnet20"))
    with pytest.raises(WeightsError, match="no such weights file"):
        load_weights(tmp_path / "absent.safetensors", portres.get("resnet20"))
    with pytest.raises(WeightsError, match="unknown weights format"):
        save_weights(tmp_path / "w.bin", {})


def test_npz_of_the_wrong_network_is_rejected_whole(tmp_path):
    path = tmp_path / "r18.npz"
    save_weights(path, init_params(portres.get("resnet18")))
    with pytest.raises(WeightsError, match="do not fit resnet34"):
        portres.build("resnet34", "numpy", params=path)


def test_a_single_array_saved_as_npz_is_rejected_with_the_file_name(tmp_path):
    path = tmp_path / "one.npz"
    with open(path, "wb") as f:
        np.save(f, np.zeros(3))
    with pytest.raises(WeightsError, match="holds a single array") as caught:
        load_weights(path, portres.get("resnet20"))
    assert str(path) in str(caught.value)


@pytest.mark.parametrize("entry", [
    {"dtype": "F32", "shape": ["3"], "data_offsets": [0, 12]},
    {"dtype": "F32", "shape": [3], "data_offsets": [0.0, 12]},
    {"dtype": 7, "shape": [3], "data_offsets": [0, 12]},
    {"dtype": "F32", "shape": [-3], "data_offsets": [0, 12]},
])
def test_safetensors_headers_with_wrong_types_are_corrupt_not_crashes(tmp_path, entry):
    header = json.dumps({"x": entry}).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(12))
    with pytest.raises(WeightsError, match="not a valid safetensors file"):
        read_weights_file(path)
