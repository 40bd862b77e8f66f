"""Initialisation, canonical names, file formats and strict loading."""

import errno
import hashlib
import json
import math
import os
import stat
import struct
import subprocess
import sys
import tracemalloc
import warnings
import zipfile

import numpy as np
import pytest

import portres
from portres.backends import available as available_backends
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
    assert list(loaded) == list(params) and all(loaded[k].dtype == np.float32 for k in loaded)
    assert all(np.array_equal(loaded[k], params[k]) for k in params)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary file left behind
    if suffix == ".npz":  # a plain NumPy archive: np.load reads it too
        with np.load(path, allow_pickle=False) as archive:
            assert all(np.array_equal(archive[k], params[k]) for k in params)


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
    with pytest.raises(WeightsError, match="unknown weights format '.ckpt'"):
        load_weights(tmp_path / "w.ckpt", portres.get("resnet20"))
    with pytest.raises(WeightsError, match="no such weights file"):
        load_weights(tmp_path / "absent.safetensors", portres.get("resnet20"))
    with pytest.raises(WeightsError, match="unknown weights format"):
        save_weights(tmp_path / "w.h5", {})


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


# -- values: checked in the dtype the model will use ---------------------------------------------


def test_values_that_overflow_the_target_dtype_are_reported_after_the_cast_without_warnings():
    spec = portres.get("resnet20")
    params = {k: v.astype(np.float64) for k, v in init_params(spec).items()}
    params["fc.bias"][3] = -1e39  # finite in float64, inf in float32
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the overflow is an error naming the tensor, not a RuntimeWarning
        with pytest.raises(WeightsError, match=r"fc\.bias: largest magnitude 1e\+39 overflows float32") as caught:
            load_weights(params, spec)
    assert "dtype='float64'" in str(caught.value)  # the fix
    assert np.array_equal(load_weights(params, spec, dtype="float64")["fc.bias"], params["fc.bias"])
    assert load_weights(params, spec, dtype="float64")["fc.bias"].dtype == np.float64


def test_the_dtype_keyword_casts_and_checks_in_that_dtype(tmp_path):
    spec = portres.get("resnet20")
    params = init_params(spec, seed=4)
    as_half = load_weights(params, spec, dtype="float16")
    assert all(v.dtype == np.float16 for v in as_half.values())
    assert np.array_equal(as_half["conv1.weight"], params["conv1.weight"].astype(np.float16))
    params["bn1.running_var"] = np.full(16, 70000, np.int64)  # fits float32, not float16 (max 65504)
    path = tmp_path / "w.safetensors"
    save_weights(path, params)
    assert load_weights(path, spec)["bn1.running_var"][0] == 70000
    with pytest.raises(WeightsError, match=r"bn1\.running_var: largest magnitude 70000 overflows float16"):
        load_weights(path, spec, dtype="float16")
    for bad in ("int32", "bfloat16", "nonsense"):
        with pytest.raises(WeightsError, match="not a floating-point type"):
            load_weights(params, spec, dtype=bad)


def test_non_finite_values_in_a_file_are_reported(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    spec = portres.get("resnet20")
    params = init_params(spec)
    params["layer2.1.bn2.bias"][5] = np.inf
    path = tmp_path / "theirs.safetensors"
    st.save_file(params, str(path))  # save_weights refuses to write this; other writers do not
    with pytest.raises(WeightsError, match=r"layer2\.1\.bn2\.bias: contains NaN or inf"):
        load_weights(path, spec)


# -- writing: validated first, all or nothing ----------------------------------------------------


_CONCURRENT_WRITER = """
import sys
import numpy as np
from portres.weights import save_weights
path, writer = sys.argv[1], int(sys.argv[2])
params = {f"t{i}": np.full(150_000 + 1_000 * writer, writer + i / 10, np.float32) for i in range(4)}
sys.stdin.read()  # every writer starts at once
for _ in range(4):
    save_weights(path, params)
"""


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_concurrent_writers_leave_exactly_one_writers_complete_file(tmp_path, suffix):
    path = tmp_path / f"shared{suffix}"
    writers = [subprocess.Popen([sys.executable, "-c", _CONCURRENT_WRITER, str(path), str(n)], stdin=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for n in range(4)]
    for writer in writers:
        writer.stdin.close()
    errors = "\n".join(writer.stderr.read() for writer in writers)
    codes = [writer.wait() for writer in writers]
    loaded = read_weights_file(path)
    writer = int(loaded["t0"][0])
    assert sorted(loaded) == ["t0", "t1", "t2", "t3"]
    for i in range(4):  # every tensor, every value, from that one writer
        assert np.array_equal(loaded[f"t{i}"], np.full(150_000 + 1_000 * writer, writer + i / 10, np.float32))
    assert codes == [0] * 4, errors  # and no writer failed
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def _fails_midway(file):
    file.write(b"half of a file")
    raise KeyboardInterrupt


def _disk_full(file):
    file.write(b"half of a file")
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("write, error, message", [
    (_fails_midway, KeyboardInterrupt, None),
    (_disk_full, WeightsError, "No space left on device; the existing file, if any, is unchanged"),
    (lambda file: json.loads("{"), json.JSONDecodeError, None),  # the writer's own errors pass through
])
def test_a_write_that_fails_midway_leaves_the_old_file_and_no_temporary_file(tmp_path, write, error, message):
    from portres.tensorfiles import atomic_write

    path = tmp_path / "state.bin"
    atomic_write(path, lambda file: file.write(b"old"))
    with pytest.raises(error, match=message) as caught:
        atomic_write(path, write)
    assert ".tmp" not in str(caught.value)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["state.bin"]


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_save_weights_interrupted_at_fsync_or_rename_keeps_the_old_file(tmp_path, monkeypatch, suffix):
    path = _valid_file(tmp_path, suffix)
    old = path.read_bytes()
    params = init_params(portres.get("resnet20"), seed=9)

    def fsync_fails(descriptor):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", fsync_fails)
    with pytest.raises(WeightsError, match=f"cannot write {path}: Input/output error"):
        save_weights(path, params)
    monkeypatch.undo()

    def interrupted(source, destination):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_weights(path, params)
    assert path.read_bytes() == old and [p.name for p in tmp_path.iterdir()] == [path.name]


_UNSAVABLE = {
    "object array": ({"x": np.array([1, "a"], dtype=object)}, "x: dtype object is not numeric"),
    "str array": ({"x": np.array(["a", "b"])}, "x: dtype <U1 is not numeric"),
    "bool array": ({"x": np.ones(3, bool)}, "x: dtype bool is not numeric"),
    "complex array": ({"x": np.ones(3, complex)}, "x: dtype complex128 is not numeric"),
    "nan": ({"x": np.array([1.0, np.nan])}, "x: contains NaN or inf"),
    "inf": ({"x": np.array([np.inf], np.float16)}, "x: contains NaN or inf"),
    "empty name": ({"": np.zeros(3)}, "'': a tensor name must be a non-empty string"),
    "non-string name": ({7: np.zeros(3)}, "7: a tensor name must be a non-empty string"),
    "unconvertible": ({"x": [[1, 2], [3]]}, "x: cannot convert list to an array"),
}


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
@pytest.mark.parametrize("case", list(_UNSAVABLE))
def test_save_refuses_what_loading_would_refuse_and_writes_nothing(tmp_path, suffix, case):
    path = _valid_file(tmp_path, suffix)
    old = path.read_bytes()
    bad, message = _UNSAVABLE[case]
    with pytest.raises(WeightsError, match="nothing was written") as caught:
        save_weights(path, {**init_params(portres.get("resnet20")), **bad})
    assert message in str(caught.value) and str(path) in str(caught.value)
    assert path.read_bytes() == old and [p.name for p in tmp_path.iterdir()] == [path.name]
    with pytest.raises(WeightsError, match="nothing was written"):
        save_weights(tmp_path / f"new{suffix}", bad)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


@pytest.mark.parametrize("suffix, name, message", [
    (".safetensors", "__metadata__", "reserved for the safetensors header"),
    (".npz", "a\x00b", "a zip member cannot be named so"),
])
def test_names_a_format_cannot_store_are_refused(tmp_path, suffix, name, message):
    with pytest.raises(WeightsError, match=message):
        save_weights(tmp_path / f"w{suffix}", {name: np.zeros(2), "other": np.ones(2)})
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_every_name_and_dtype_round_trips(tmp_path, suffix):
    params = {"file": np.arange(3, dtype=np.int64), "allow_pickle": np.ones(2, np.float16),  # np.savez's keywords
              "a/b": np.zeros((2, 0), np.float32), "x.npy": np.array(7, np.uint8), "big": np.arange(4, dtype=">f8"),
              "fortran": np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3))}
    save_weights(tmp_path / f"w{suffix}", params)
    loaded = read_weights_file(tmp_path / f"w{suffix}")
    assert sorted(loaded) == sorted(params)
    for name, value in params.items():
        assert loaded[name].shape == value.shape and np.array_equal(loaded[name], value), name
        assert loaded[name].dtype.newbyteorder("=") == value.dtype.newbyteorder("="), name


# -- permissions and symlinks --------------------------------------------------------------------


@pytest.mark.skipif(os.name == "nt", reason="POSIX mode bits")
def test_a_new_file_gets_the_umask_mode_and_a_replaced_file_keeps_its_mode(tmp_path):
    params = init_params(portres.get("resnet20"))
    old_umask = os.umask(0o027)
    try:
        save_weights(tmp_path / "new.npz", params)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE((tmp_path / "new.npz").stat().st_mode) == 0o640
    path = tmp_path / "kept.safetensors"
    save_weights(path, params)
    path.chmod(0o604)  # a mode no umask gives
    save_weights(path, init_params(portres.get("resnet20"), seed=1))
    assert stat.S_IMODE(path.stat().st_mode) == 0o604
    assert np.array_equal(read_weights_file(path)["fc.bias"], init_params(portres.get("resnet20"), seed=1)["fc.bias"])


@pytest.mark.skipif(os.name == "nt", reason="symlinks need privileges on Windows")
def test_saving_through_a_symlink_updates_its_target_and_keeps_the_link(tmp_path):
    (tmp_path / "store").mkdir()
    target = tmp_path / "store" / "blob"  # like a hub cache: the link has the suffix, the blob does not
    link = tmp_path / "model.safetensors"
    link.symlink_to(target)  # dangling until the first save
    save_weights(link, init_params(portres.get("resnet20"), seed=1))
    target.chmod(0o640)
    new = init_params(portres.get("resnet20"), seed=2)
    save_weights(link, new)
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert np.array_equal(read_weights_file(link)["fc.weight"], new["fc.weight"])
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["blob"]


# -- user mistakes: WeightsError saying what to do, never an internal path -------------------------


def _weights_error(action) -> str:
    with pytest.raises(WeightsError) as caught:
        action()
    message = str(caught.value)
    assert ".tmp" not in message
    return message


def test_saving_to_unusable_places_says_what_to_do(tmp_path):
    params = init_params(portres.get("resnet20"))
    message = _weights_error(lambda: save_weights(tmp_path / "absent" / "w.npz", params))
    assert f"directory {tmp_path / 'absent'} does not exist" in message and "mkdir -p" in message
    (tmp_path / "w.safetensors").mkdir()
    assert "is a directory" in _weights_error(lambda: save_weights(tmp_path / "w.safetensors", params))
    (tmp_path / "plain").write_text("")
    assert "is not a directory" in _weights_error(lambda: save_weights(tmp_path / "plain" / "w.npz", params))
    assert "give a mapping" in _weights_error(lambda: save_weights(tmp_path / "w.npz", [1, 2]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain", "w.safetensors"]


def test_no_permission_to_create_the_file_says_what_to_do(tmp_path, monkeypatch):
    real_open = os.open

    def refuse_new_files(file, flags, mode=0o777, **kwargs):
        if flags & os.O_CREAT:
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, flags, mode, **kwargs)

    monkeypatch.setattr(os, "open", refuse_new_files)
    message = _weights_error(lambda: save_weights(tmp_path / "w.npz", init_params(portres.get("resnet20"))))
    assert f"no permission to create files in {tmp_path}; choose a writable directory" in message


@pytest.mark.skipif(os.name == "nt" or os.geteuid() == 0, reason="POSIX permissions; root ignores them")
def test_read_only_directories_and_files_say_what_to_do(tmp_path):
    params = init_params(portres.get("resnet20"))
    path = tmp_path / "w.npz"
    save_weights(path, params)
    path.chmod(0o444)
    assert "is read-only (mode 444)" in _weights_error(lambda: save_weights(path, params))
    path.chmod(0o000)
    assert "permission denied" in _weights_error(lambda: load_weights(path, portres.get("resnet20")))
    path.chmod(0o644)
    tmp_path.chmod(0o555)
    try:
        assert "no permission to create files" in _weights_error(lambda: save_weights(tmp_path / "x.npz", params))
    finally:
        tmp_path.chmod(0o755)


def test_loading_a_directory_says_so(tmp_path):
    (tmp_path / "w.npz").mkdir()
    assert "is a directory, not a weights file" in _weights_error(lambda: read_weights_file(tmp_path / "w.npz"))
    message = _weights_error(lambda: load_weights(tmp_path / "absent" / "w.npz", portres.get("resnet20")))
    assert "no such weights file" in message


# -- reading: the directory first, data only when it fits ----------------------------------------


def _rejection_and_peak_memory(action) -> tuple[str, int]:
    """The WeightsError ``action`` raises, and the most memory Python and NumPy held meanwhile."""
    tracemalloc.start()
    try:
        message = _weights_error(action)
        return message, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


_BOMB_ITEMS = 32 * 1024 * 1024  # float32: 128 MB once decompressed, about 0.6 MB in the zip


@pytest.fixture(scope="module")
def npz_bombs(tmp_path_factory):
    """resnet20 .npz files with one member that declares (and holds) 128 MB of zeros."""
    folder = tmp_path_factory.mktemp("bombs")
    params = init_params(portres.get("resnet20"))
    paths = {}
    for name in ("evil", "fc.weight"):
        path = paths[name] = folder / f"{name}.npz"
        save_weights(path, {k: v for k, v in params.items() if k != name})
        with zipfile.ZipFile(path, "a", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array_header_1_0(member, {"descr": "<f4", "fortran_order": False,
                                                              "shape": (_BOMB_ITEMS,)})
                zeros = bytes(1 << 22)
                for _ in range(_BOMB_ITEMS * 4 // len(zeros)):
                    member.write(zeros)
    return paths


@pytest.mark.parametrize("name, message", [
    ("evil", "unexpected (1): evil"), ("fc.weight", f"fc.weight: shape [{_BOMB_ITEMS}], expected [10, 64]"),
])
def test_an_npz_that_does_not_fit_is_rejected_from_its_directory_without_decompressing(npz_bombs, monkeypatch,
                                                                                         name, message):
    assert npz_bombs[name].stat().st_size < 2_000_000
    decompressed = []
    real_read = zipfile.ZipExtFile.read
    monkeypatch.setattr(zipfile.ZipExtFile, "read", lambda self, n=-1: decompressed.append(real_read(self, n))
                        or decompressed[-1])
    spec = portres.get("resnet20")
    assert message in _weights_error(lambda: load_weights(npz_bombs[name], spec))
    assert sum(map(len, decompressed)) < 64 * 1024  # the .npy headers only: no tensor data
    monkeypatch.undo()
    rejection, peak = _rejection_and_peak_memory(lambda: load_weights(npz_bombs[name], spec))
    assert message in rejection and peak < 8_000_000


def test_an_npz_member_whose_size_disagrees_with_its_header_is_corrupt(tmp_path):
    path = tmp_path / "lies.npz"
    with zipfile.ZipFile(path, "w") as archive:
        with archive.open("x.npy", "w") as member:
            np.lib.format.write_array_header_1_0(member, {"descr": "<f4", "fortran_order": False,
                                                          "shape": (100_000_000,)})
            member.write(bytes(64))
    message, peak = _rejection_and_peak_memory(lambda: read_weights_file(path))
    assert "member 'x.npy' declares shape [100000000] of float32 (400000000 bytes) but stores 64 bytes" in message
    assert str(path) in message and peak < 1_000_000


@pytest.mark.parametrize("members, message", [
    ({"notes.txt": b"hello"}, "member 'notes.txt' is not a .npy array"),
    ({"x.npy": b"\x93NUMPY\x09\x00"}, "member 'x.npy'"),
    ({".npy": b""}, "a member has an empty name"),
])
def test_npz_members_that_are_not_named_arrays_are_corrupt(tmp_path, members, message):
    path = tmp_path / "odd.npz"
    with zipfile.ZipFile(path, "w") as archive:
        for member, data in members.items():
            archive.writestr(member, data)
    with pytest.raises(WeightsError, match="not a valid .npz file") as caught:
        read_weights_file(path)
    assert message in str(caught.value)


def test_npz_object_arrays_are_never_unpickled(tmp_path):
    path = tmp_path / "pickle.npz"
    np.savez(path, x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(WeightsError, match="holds Python objects, which are never unpickled"):
        read_weights_file(path)


def test_a_safetensors_file_that_does_not_fit_is_rejected_without_reading_its_body(tmp_path):
    spec = portres.get("resnet20")
    good = _valid_file(tmp_path, ".safetensors").read_bytes()
    (length,) = struct.unpack("<Q", good[:8])
    header = json.loads(good[8:8 + length])
    body = good[8 + length:]
    header["evil"] = {"dtype": "F32", "shape": [_BOMB_ITEMS], "data_offsets": [len(body), len(body) + 4 * _BOMB_ITEMS]}
    text = json.dumps(header).encode()
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + body)
        f.truncate(8 + len(text) + len(body) + 4 * _BOMB_ITEMS)  # sparse: 128 MB of zeros, no disk
    assert set(read_weights_file(path)) == set(header) - {"__metadata__"}  # a valid file
    message, peak = _rejection_and_peak_memory(lambda: load_weights(path, spec))
    assert "unexpected (1): evil" in message and peak < 8_000_000


def _safetensors(tmp_path, header, body=b""):
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path = tmp_path / "crafted.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + body)
    return path


def _f32(begin, count):
    return {"dtype": "F32", "shape": [count], "data_offsets": [begin, begin + 4 * count]}


@pytest.mark.parametrize("header, body, message, reference_rejects", [
    ({"a": _f32(0, 2), "b": _f32(4, 1)}, bytes(8), "entry 'b' (bytes 4..8) overlaps the tensor before it", True),
    ({"a": _f32(0, 1), "b": _f32(8, 1)}, bytes(12), "bytes 4..8 before entry 'b' belong to no tensor", True),
    ({"a": _f32(4, 1)}, bytes(8), "bytes 0..4 before entry 'a' belong to no tensor", True),
    ({"a": _f32(0, 1)}, bytes(8), "the last 4 bytes of the body belong to no tensor", True),
    ({"a": _f32(0, 4)}, bytes(8), "the tensors need 16 bytes but the body holds 8: truncated", True),
    (b"[" * 100_000 + b"]" * 100_000, b"", "nested thousands of levels deep", True),
    (b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", b"", "nested thousands of levels deep", True),
    (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {"dtype": "F32", "shape": [1], '
     b'"data_offsets": [0, 4]}}', bytes(4), "header has the key 'a' more than once", False),
    (b'{"\xff": 1}', b"", "header is not UTF-8 text", True),
    ({"__metadata__": {"x": 1}, "a": _f32(0, 1)}, bytes(4), "__metadata__ is not a map of strings to strings", True),
    ({"__metadata__": ["x"], "a": _f32(0, 1)}, bytes(4), "__metadata__ is not a map of strings to strings", True),
    ({"": _f32(0, 1)}, bytes(4), "a tensor has an empty name", False),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 4]}}, bytes(4), "not non-negative integers", True),
    ({"a": {"dtype": "F32", "shape": [1]}}, bytes(4), "entry 'a' lacks dtype/shape/data_offsets", True),
    ({"a": {"dtype": "F8_E4M3", "shape": [1], "data_offsets": [0, 1]}}, bytes(1), "unsupported dtype 'F8_E4M3'",
     False),
])
def test_malformed_safetensors_headers_are_rejected_naming_the_file(tmp_path, header, body, message,
                                                                    reference_rejects):
    path = _safetensors(tmp_path, header, body)
    with pytest.raises(WeightsError, match="not a valid safetensors file") as caught:
        read_weights_file(path)
    assert message in str(caught.value) and str(path) in str(caught.value)
    st = pytest.importorskip("safetensors.numpy")
    if reference_rejects:  # the reference library agrees (where it is stricter than nothing)
        with pytest.raises(Exception):  # noqa: B017 - it raises its own SafetensorError
            st.load_file(str(path))


def test_a_header_longer_than_the_file_is_rejected(tmp_path):
    path = tmp_path / "short.safetensors"
    path.write_bytes(struct.pack("<Q", 100) + b'{"a": 1}')
    with pytest.raises(WeightsError, match="header length 100 exceeds the file's 8 remaining bytes") as caught:
        read_weights_file(path)
    assert str(path) in str(caught.value)


def test_zero_sized_tensors_and_every_reference_dtype_read(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    arrays = {"empty": np.zeros((0, 3), np.float32), "also_empty": np.zeros(0, np.int8),
              "u16": np.arange(3, dtype=np.uint16), "u32": np.arange(3, dtype=np.uint32),
              "u64": np.arange(3, dtype=np.uint64), "scalar": np.array(2.5, np.float64)}
    st.save_file(arrays, str(tmp_path / "theirs.safetensors"))
    loaded = read_weights_file(tmp_path / "theirs.safetensors")
    assert sorted(loaded) == sorted(arrays)
    assert all(loaded[k].dtype == v.dtype and np.array_equal(loaded[k], v) for k, v in arrays.items())


@pytest.mark.parametrize("backend", [b for b in ("mlx", "tinygrad", "torch") if b in available_backends()])
def test_a_float16_model_refuses_weights_float16_cannot_hold(backend):
    spec = portres.get("resnet20")
    params = init_params(spec)
    params["fc.weight"] = np.full_like(params["fc.weight"], 7e4)  # fine in float32, inf in float16
    try:
        with pytest.raises(WeightsError, match=r"too large for float16.*fc\.weight"):
            portres.build(spec, backend, params, dtype="float16")
    except ValueError as error:  # a device that cannot compute in float16 says so first
        if "cannot compute in" not in str(error):
            raise
        pytest.skip(str(error))
    portres.build(spec, backend, params, dtype="float32")  # float32 holds it
