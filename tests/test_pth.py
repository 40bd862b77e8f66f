"""PyTorch checkpoints without torch: reading, refusing code, writing, `portres convert`.

The reader's inputs come from two independent sources: files this test writes opcode by
opcode in torch's format (`TorchPickle` below, never `write_pth`), which always run, and
files written by a real `torch.save`, which run where torch is installed.
"""

from __future__ import annotations

import collections
import os
import pickle
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from click.testing import CliRunner

import portres
from portres.backends import available as available_backends
from portres.cli import main
from portres.interop.pth import inspect_pth, read_pth, write_pth
from portres.weights import WeightsError, init_params, load_weights, read_weights_file, save_weights

try:
    import torch
except ImportError:  # CI has no torch: the tests that need it skip
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")
FRAMEWORKS = [name for name in available_backends() if name != "numpy"]


# -- a hand-written writer of torch's formats (independent of portres.interop.pth) ------------------


def _string(text: str) -> bytes:
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data  # BINUNICODE


def _int(value: int) -> bytes:
    if -2**31 <= value < 2**31:
        return b"J" + struct.pack("<i", value)  # BININT
    data = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(data)]) + data  # LONG1


def _tuple(items: list[bytes]) -> bytes:
    return b"(" + b"".join(items) + b"t"  # MARK ... TUPLE


def _global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()  # GLOBAL


def _call(function: bytes, args: list[bytes]) -> bytes:
    return function + _tuple(args) + b"R"  # REDUCE


EMPTY_ORDERED_DICT = _call(_global("collections", "OrderedDict"), [])


class Storage:
    """One storage: its torch class, key and little-endian bytes."""

    def __init__(self, kind: str, key: str, values: np.ndarray, dtype: str):
        self.kind, self.key = kind, key
        self.data = np.ascontiguousarray(values, dtype=dtype).tobytes()
        self.numel = len(self.data) // np.dtype(dtype).itemsize


class TorchPickle:
    """Builds the opcodes `torch.save` writes for a state_dict, one tensor at a time."""

    def __init__(self, legacy: bool = False):
        self.legacy = legacy  # legacy persistent ids have a sixth field (view metadata, None)
        self.storages: dict[str, Storage] = {}

    def storage(self, kind: str, key: str, values, dtype: str) -> Storage:
        return self.storages.setdefault(key, Storage(kind, key, values, dtype))

    def tensor(self, storage: Storage, shape, stride=None, offset=0, metadata: bytes | None = None,
               rebuild=("torch._utils", "_rebuild_tensor_v2")) -> bytes:
        stride = stride if stride is not None else tuple(int(np.prod(shape[i + 1:])) for i in range(len(shape)))
        fields = [_string("storage"), _global("torch", storage.kind), _string(storage.key), _string("cpu"),
                  _int(storage.numel)] + ([b"N"] if self.legacy else [])
        args = [_tuple(fields) + b"Q", _int(offset), _tuple([_int(n) for n in shape]),
                _tuple([_int(s) for s in stride]), b"\x89", EMPTY_ORDERED_DICT]  # NEWFALSE, backward hooks
        if metadata is not None:
            args.append(metadata)
        return _call(_global(*rebuild), args)

    @staticmethod
    def mapping(items: dict[str, bytes], ordered=True, build: bytes = b"") -> bytes:
        start = EMPTY_ORDERED_DICT if ordered else b"}"
        return start + b"(" + b"".join(_string(k) + v for k, v in items.items()) + b"u" + build

    @staticmethod
    def program(body: bytes) -> bytes:
        return b"\x80\x02" + body + b"."  # PROTO 2 ... STOP


def write_zip(path, pickled: bytes, storages, archive="model", byteorder="little"):
    """The zip container: <archive>/data.pkl, data/<key>, byteorder and version, as torch writes them."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{archive}/data.pkl", pickled)
        z.writestr(f"{archive}/byteorder", byteorder)
        for storage in storages:
            z.writestr(f"{archive}/data/{storage.key}", storage.data)
        z.writestr(f"{archive}/version", "3\n")
    return path


def write_legacy(path, pickled: bytes, storages):
    """torch < 1.6's stream: magic, protocol, system info, the pickle, the keys, then each storage."""
    with open(path, "wb") as f:
        f.write(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2))
        f.write(pickle.dumps(1001, protocol=2))
        f.write(pickle.dumps({"protocol_version": 1001, "little_endian": True,
                              "type_sizes": {"short": 2, "int": 4, "long": 4}}, protocol=2))
        f.write(pickled)
        f.write(pickle.dumps(sorted(s.key for s in storages), protocol=2))
        for storage in sorted(storages, key=lambda s: s.key):
            f.write(struct.pack("<q", storage.numel) + storage.data)
    return path


def bfloat16_exact(rng, shape) -> np.ndarray:
    """float32 values that bfloat16 holds exactly (their low 16 bits are zero)."""
    bits = rng.standard_normal(shape).astype(np.float32).view(np.uint32) & np.uint32(0xFFFF0000)
    return bits.view(np.float32)


def hand_written_case(legacy=False):
    """A state_dict covering every storage kind and layout; returns (pickle body, storages, expected)."""
    rng = np.random.default_rng(1)
    p = TorchPickle(legacy)
    a = rng.standard_normal((2, 3)).astype(np.float32)
    h = rng.standard_normal((4,)).astype(np.float16)
    b = bfloat16_exact(rng, (3, 2))
    d = rng.standard_normal((2,))
    shared = rng.standard_normal(10).astype(np.float32)
    s_a = p.storage("FloatStorage", "0", a, "<f4")
    s_h = p.storage("HalfStorage", "1", h, "<f2")
    s_b = p.storage("BFloat16Storage", "2", b.view(np.uint32) >> 16, "<u2")
    s_d = p.storage("DoubleStorage", "3", d, "<f8")
    s_shared = p.storage("FloatStorage", "4", shared, "<f4")
    s_count = p.storage("LongStorage", "5", [12345], "<i8")
    items = {
        "conv.weight": p.tensor(s_a, (2, 3)),
        "conv.weight_t": p.tensor(s_a, (3, 2), stride=(1, 3)),  # a transposed view of the same storage
        "half": p.tensor(s_h, (4,)),
        "bf16": p.tensor(s_b, (3, 2)),
        "double": p.tensor(s_d, (2,)),
        "view.middle": p.tensor(s_shared, (3,), offset=2),  # two views of one storage
        "view.every_third": p.tensor(s_shared, (4,), stride=(3,)),
        "bn.num_batches_tracked": p.tensor(s_count, ()),
        "param": _call(_global("torch._utils", "_rebuild_parameter"),
                       [p.tensor(s_a, (3,), offset=3), b"\x88", EMPTY_ORDERED_DICT]),  # NEWTRUE
        "negated": p.tensor(s_h, (2,), metadata=b"}" + _string("neg") + b"\x88s"),  # {"neg": True}
        "empty": p.tensor(s_d, (0, 5)),
    }
    expected = {"conv.weight": a, "conv.weight_t": a.T, "half": h, "bf16": b, "double": d,
                "view.middle": shared[2:5], "view.every_third": shared[::3],
                "bn.num_batches_tracked": np.array(12345, np.int64), "param": a.reshape(-1)[3:6],
                "negated": -h[:2], "empty": np.zeros((0, 5))}
    return p, items, expected


def assert_same(loaded: dict, expected: dict):
    assert list(loaded) == list(expected)
    for name, value in expected.items():
        assert loaded[name].dtype == (np.float32 if value.dtype == np.float32 else value.dtype), name
        assert loaded[name].shape == value.shape and np.array_equal(loaded[name], value), name
        assert loaded[name].flags.c_contiguous and loaded[name].flags.writeable, name


# -- reading hand-written files -----------------------------------------------------------------------


def test_hand_written_zip_checkpoint_every_dtype_view_and_layout(tmp_path):
    p, items, expected = hand_written_case()
    # a real state_dict's OrderedDict carries _metadata, set by a BUILD
    metadata = b"}" + _string("_metadata") + EMPTY_ORDERED_DICT + b"s" + b"b"
    path = write_zip(tmp_path / "m.pth", p.program(p.mapping(items, build=metadata)), p.storages.values())
    assert_same(read_pth(path), expected)
    info = inspect_pth(path)
    assert info.container == "zip" and info.wrapper == () and info.stripped_prefix == ""
    assert info.tensors["bf16"] == ((3, 2), "bfloat16") and info.tensors["half"] == ((4,), "float16")


def test_a_big_endian_checkpoint_and_any_file_name(tmp_path):
    p = TorchPickle()
    values = np.array([[1.5, -2.0], [3.25, 1e-3]], np.float32)
    s = p.storage("FloatStorage", "0", values, ">f4")
    c = p.storage("LongStorage", "1", [2**40], ">i8")
    path = write_zip(tmp_path / "checkpoint.pth.tar", p.program(p.mapping({"w": p.tensor(s, (2, 2), stride=(1, 2)),
                                                                          "n": p.tensor(c, ())})),
                     p.storages.values(), byteorder="big")
    loaded = read_pth(path)  # read_pth takes any name; load_weights goes by the suffix
    assert np.array_equal(loaded["w"], values.T) and loaded["w"].dtype == np.float32  # native byte order
    assert loaded["n"] == 2**40
    with pytest.raises(WeightsError, match="unknown weights format '.tar'"):
        load_weights(path, portres.get("resnet20"))


def test_hand_written_legacy_checkpoint(tmp_path):
    p, items, expected = hand_written_case(legacy=True)
    path = write_legacy(tmp_path / "old.pt", p.program(p.mapping(items, ordered=False)), p.storages.values())
    assert_same(read_pth(path), expected)
    assert inspect_pth(path).container == "legacy"


@pytest.mark.parametrize("wrap, wrapper", [
    (lambda sd: {"state_dict": sd, "epoch": _int(3)}, ("state_dict",)),
    (lambda sd: {"model": sd, "optimizer": b"}"}, ("model",)),
    (lambda sd: {"model": TorchPickle.mapping({"state_dict": sd}, ordered=False)}, ("model", "state_dict")),
])
def test_wrappers_are_unwrapped_and_a_module_prefix_is_stripped(tmp_path, wrap, wrapper):
    p, items, expected = hand_written_case()
    state = p.mapping({f"module.{name}": value for name, value in items.items()})
    path = write_zip(tmp_path / "w.pth", p.program(TorchPickle.mapping(wrap(state), ordered=False)),
                     p.storages.values())
    assert_same(read_pth(path), expected)
    info = inspect_pth(path)
    assert info.wrapper == wrapper and info.stripped_prefix == "module."


def test_a_prefix_on_only_some_names_is_kept(tmp_path):
    p = TorchPickle()
    s = p.storage("FloatStorage", "0", [1.0, 2.0], "<f4")
    path = write_zip(tmp_path / "m.pth", p.program(p.mapping({"module.a": p.tensor(s, (1,)), "b": p.tensor(s, (1,))})),
                     p.storages.values())
    assert list(read_pth(path)) == ["module.a", "b"]


def test_a_pth_loads_for_a_spec_and_counters_are_dropped(tmp_path):
    spec = portres.get("resnet20")
    params = init_params(spec, seed=4, randomize_batch_norm=True)
    p = TorchPickle()
    items = {}
    for index, (name, value) in enumerate(params.items()):
        items[name] = p.tensor(p.storage("FloatStorage", str(index), value, "<f4"), value.shape)
        if name.endswith("running_var"):
            counter = p.storage("LongStorage", f"n{index}", [7], "<i8")
            items[name.replace("running_var", "num_batches_tracked")] = p.tensor(counter, ())
    path = write_zip(tmp_path / "r20.pt", p.program(p.mapping(items)), p.storages.values())
    loaded = load_weights(path, spec)
    assert list(loaded) == list(params) and all(np.array_equal(loaded[k], params[k]) for k in params)
    assert read_weights_file(path)["bn1.num_batches_tracked"] == 7


# -- refusing code ------------------------------------------------------------------------------------


class Evil:
    """Pickles as a call to ``function(*args)``: what a malicious checkpoint does."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


# What a careless loader does: resolves every global (torch's to a no-op, so torch is not needed).
PERMISSIVE = """import pickle
class Permissive(pickle.Unpickler):
    def persistent_load(self, pid):
        return None
    def find_class(self, module, name):
        return (lambda *args: None) if module.startswith("torch") else super().find_class(module, name)
"""


def _payloads(marker, legacy):
    """(description, global the error must name, pickle bytes) for each attack; each creates ``marker``."""
    command = f"touch {marker}"
    code = f"open({str(marker)!r}, 'w').write('pwned')"
    p = TorchPickle()
    view = [b"N"] if legacy else []  # legacy persistent ids end with view metadata
    hooks_smuggled = _call(_global("torch._utils", "_rebuild_tensor_v2"), [
        _tuple([_string("storage"), _global("torch", "FloatStorage"), _string("0"), _string("cpu"), _int(1), *view])
        + b"Q",
        _int(0), _tuple([_int(1)]), _tuple([_int(1)]), b"\x89", _call(_global("os", "system"), [_string(command)])])
    return [
        ("os.system", "posix.system" if os.name == "posix" else "nt.system",
         pickle.dumps({"w": Evil(os.system, command)}, protocol=2)),
        ("builtins.eval", "builtins.eval", pickle.dumps(collections.OrderedDict(w=Evil(eval, code)), protocol=2)),
        ("subprocess via __reduce__", "subprocess.call",
         pickle.dumps({"state_dict": {"w": Evil(subprocess.call, ["touch", str(marker)])}}, protocol=2)),
        ("protocol 4 (STACK_GLOBAL)", "builtins.exec", pickle.dumps({"w": Evil(exec, code)}, protocol=4)),
        ("a global smuggled as a nested reduce inside a tensor", "os.system",
         p.program(p.mapping({"w": hooks_smuggled}))),
        ("a global inside a persistent id", "os.system",
         p.program(p.mapping({"w": _call(_global("torch._utils", "_rebuild_tensor_v2"), [
             _tuple([_string("storage"), _call(_global("os", "system"), [_string(command)]), _string("0"),
                     _string("cpu"), _int(1), *view]) + b"Q", _int(0), _tuple([_int(1)]), _tuple([_int(1)])])}))),
    ]


@pytest.mark.parametrize("index", range(6), ids=["os.system", "eval", "subprocess", "stack_global", "nested",
                                                  "persistent_id"])
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_a_malicious_pickle_is_refused_and_its_payload_never_runs(tmp_path, index, legacy):
    description, name, payload = _payloads(tmp_path / "pwned", legacy)[index]
    # prove the payload is live: a permissive unpickler runs it (in a child process)
    probe = tmp_path / "probe.pkl"
    probe.write_bytes(payload)
    subprocess.run([sys.executable, "-c", PERMISSIVE + f"Permissive(open({str(probe)!r}, 'rb')).load()"],
                   capture_output=True)
    assert (tmp_path / "pwned").exists(), f"{description}: the payload is not live, so this test proves nothing"
    (tmp_path / "pwned").unlink()
    storages = [Storage("FloatStorage", "0", [1.0], "<f4")]
    path = (write_legacy(tmp_path / "evil.pt", payload, storages) if legacy
            else write_zip(tmp_path / "evil.pth", payload, storages))
    for load in (read_pth, lambda f: load_weights(f, portres.get("resnet20")), inspect_pth):
        with pytest.raises(WeightsError, match="refused") as caught:
            load(path)
        assert name in str(caught.value) and "nothing from the file was run" in str(caught.value)
        assert not (tmp_path / "pwned").exists(), description


def test_a_build_on_a_tensor_is_refused(tmp_path):
    p = TorchPickle()
    s = p.storage("FloatStorage", "0", [1.0], "<f4")
    tensor = p.tensor(s, (1,)) + b"}" + _string("shape") + _tuple([_int(10**9)]) + b"sb"  # BUILD: set .shape
    path = write_zip(tmp_path / "m.pth", p.program(p.mapping({"w": tensor})), p.storages.values())
    with pytest.raises(WeightsError, match="a BUILD on a tensor"):
        read_pth(path)


def test_a_torchscript_archive_and_a_pickle_of_objects_get_clear_advice(tmp_path):
    path = tmp_path / "script.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("script/constants.pkl", b"")
        z.writestr("script/code/__torch__.py", b"")
    with pytest.raises(WeightsError, match="TorchScript archive"):
        read_pth(path)
    not_weights = write_zip(tmp_path / "m.pth", pickle.dumps({"epoch": 3, "lr": 0.1}, protocol=2), [])
    with pytest.raises(WeightsError, match="holds no state_dict.*'epoch': int"):
        read_pth(not_weights)


# -- corrupt and inconsistent files ----------------------------------------------------------------------


def _valid(tmp_path):
    p, items, _ = hand_written_case()
    return write_zip(tmp_path / "m.pth", p.program(p.mapping(items)), p.storages.values())


@pytest.mark.parametrize("cut", [lambda n: n // 2, lambda n: n - 10, lambda n: 100, lambda n: 3])
def test_a_truncated_zip_is_reported_with_the_file_name(tmp_path, cut):
    path = _valid(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:cut(len(data))])
    with pytest.raises(WeightsError) as caught:
        read_pth(path)
    assert str(path) in str(caught.value)
    assert "truncated" in str(caught.value) or "not a PyTorch checkpoint" in str(caught.value)


def test_a_truncated_legacy_file_is_reported(tmp_path):
    p, items, _ = hand_written_case(legacy=True)
    path = write_legacy(tmp_path / "old.pt", p.program(p.mapping(items)), p.storages.values())
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(WeightsError, match="truncated"):
        read_pth(path)


def test_storage_sizes_are_checked_against_the_zip_directory_before_reading(tmp_path):
    p = TorchPickle()
    s = p.storage("FloatStorage", "0", np.zeros(4), "<f4")
    s.numel = 10**12  # the pickle claims a terabyte; the record holds 16 bytes
    huge = write_zip(tmp_path / "huge.pth", p.program(p.mapping({"w": p.tensor(s, (10**12,))})), [s])
    with pytest.raises(WeightsError, match=r"holds 16 bytes, but the pickle declares 1000000000000 x FloatStorage"):
        read_pth(huge)
    p = TorchPickle()
    s = p.storage("FloatStorage", "0", np.zeros(4), "<f4")
    past = write_zip(tmp_path / "past.pth", p.program(p.mapping({"w": p.tensor(s, (3,), offset=2)})), [s])
    with pytest.raises(WeightsError, match="'w'.*reaches past the end of its storage"):
        read_pth(past)
    missing = write_zip(tmp_path / "missing.pth", p.program(p.mapping({"w": p.tensor(s, (4,))})), [])
    with pytest.raises(WeightsError, match="no record model/data/0"):
        read_pth(missing)


def test_files_that_are_not_checkpoints(tmp_path):
    cases = {"random.pth": np.random.default_rng(0).bytes(600), "arrays.pth": None,
             "tar.pt": b"\0" * 257 + b"ustar" + b"\0" * 300}
    np.savez(tmp_path / "arrays.npz", a=np.zeros(2))
    (tmp_path / "arrays.pth").write_bytes((tmp_path / "arrays.npz").read_bytes())
    messages = {"random.pth": "not a PyTorch checkpoint", "arrays.pth": "NumPy .npz archive",
                "tar.pt": "tar archive, the checkpoint format of torch < 0.4"}
    for name, data in cases.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
        with pytest.raises(WeightsError, match=messages[name]):
            read_pth(tmp_path / name)


def test_unsupported_tensor_kinds_are_named(tmp_path):
    p = TorchPickle()
    s = Storage("ComplexFloatStorage", "0", np.zeros(2), "<f4")
    path = write_zip(tmp_path / "c.pth", p.program(p.mapping({"w": p.tensor(s, (1,))})), [s])
    with pytest.raises(WeightsError, match="torch.ComplexFloatStorage"):
        read_pth(path)
    s = p.storage("FloatStorage", "0", np.zeros(2), "<f4")
    conj = write_zip(tmp_path / "conj.pth", p.program(p.mapping({"w": p.tensor(
        s, (2,), metadata=b"}" + _string("conj") + b"\x88s")})), [s])
    with pytest.raises(WeightsError, match="tensor metadata 'conj'"):
        read_pth(conj)


# -- the network the weights were made for ----------------------------------------------------------


def test_a_checkpoint_for_another_architecture_names_the_preset_it_looks_like(tmp_path):
    path = tmp_path / "r20.pth"
    save_weights(path, init_params(portres.get("resnet20")))
    with pytest.raises(WeightsError, match="do not fit resnet32") as caught:
        load_weights(path, portres.get("resnet32"))
    assert "looks like resnet20 or plain20 (every name and shape matches)" in str(caught.value)
    resnet101 = {name: np.broadcast_to(np.float32(0), shape)  # the shapes of a resnet101, without its 170 MB
                 for name, (shape, _) in portres.make_plan(portres.get("resnet101")).param_shapes().items()}
    with pytest.raises(WeightsError, match="do not fit resnet50") as caught:
        load_weights(resnet101, portres.get("resnet50"))
    assert "looks like resnet101" in str(caught.value)
    with pytest.raises(WeightsError, match="looks like resnet18 "):  # a mapping too, e.g. a torch state_dict
        load_weights(init_params(portres.get("resnet18")), portres.get("resnet34"))
    partial = init_params(portres.get("resnet34"))
    partial["fc.weight"] = partial["fc.weight"][:10]  # fine-tuned head: no preset matches exactly
    with pytest.raises(WeightsError, match=r"closest preset: resnet34 \(\d+ of its 182 tensors"):
        load_weights(partial, portres.get("resnet50"))
    overflowing = init_params(portres.get("resnet50_v1"))  # fits, but not in float16: no preset to suggest
    overflowing["fc.bias"][0] = 1e6
    with pytest.raises(WeightsError, match="overflows float16") as caught:
        load_weights(overflowing, portres.get("resnet50_v1"), dtype="float16")
    assert "looks like" not in str(caught.value)
    unrelated = {"encoder.weight": np.zeros((3, 3))}
    with pytest.raises(WeightsError) as caught:
        load_weights(unrelated, portres.get("resnet18"))
    assert "looks like" not in str(caught.value) and "closest" not in str(caught.value)


# -- writing ------------------------------------------------------------------------------------------


def test_write_pth_lays_out_torch_records_with_aligned_storages(tmp_path):
    params = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.float16),
              "c": np.array(5, np.int64), "d": np.zeros((0, 2))}
    path = tmp_path / "w.pth"
    write_pth(path, params)
    with zipfile.ZipFile(path) as z, open(path, "rb") as f:
        names = z.namelist()
        assert names[0] == "archive/data.pkl" and "archive/version" in names and "archive/byteorder" in names
        for info in z.infolist():
            if "/data/" in info.filename:
                f.seek(info.header_offset)
                header = f.read(30)
                start = info.header_offset + 30 + sum(struct.unpack("<HH", header[26:30]))
                assert start % 64 == 0, info.filename
    assert_same(read_pth(path), params)


def test_write_pth_refuses_what_torch_cannot_hold_and_writes_nothing(tmp_path):
    path = tmp_path / "w.pth"
    with pytest.raises(WeightsError, match="cannot store dtype uint32"):
        write_pth(path, {"a": np.zeros(2, np.uint32)})
    with pytest.raises(WeightsError, match="overflow bfloat16.*: big"):
        write_pth(path, {"big": np.array([1e39]), "ok": np.ones(2)}, bfloat16=True)
    with pytest.raises(WeightsError, match="contains NaN"):
        save_weights(path, {"a": np.array([np.nan], np.float32)})
    assert not path.exists()


@needs_torch
def test_write_pth_loads_in_torch_with_weights_only(tmp_path):
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "h": rng.standard_normal(5).astype(np.float16),
              "d": rng.standard_normal(3), "i": np.array([1, -2], np.int32), "n": np.array(9, np.int64),
              "u": np.array([200], np.uint8), "e": np.zeros((0, 3), np.float32),
              "t": rng.standard_normal((3, 4)).astype(np.float32).T}  # non-contiguous input
    path = tmp_path / "w.pth"
    write_pth(path, params)
    for mmap in (False, True):
        loaded = torch.load(path, weights_only=True, mmap=mmap)
        assert list(loaded) == list(params)
        for name, value in params.items():
            assert loaded[name].numpy().dtype == value.dtype and np.array_equal(loaded[name].numpy(), value), name
    rounded = rng.standard_normal(1000).astype(np.float32) * np.float32(1e3)
    write_pth(path, {"x": rounded}, bfloat16=True)
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.from_numpy(rounded).bfloat16())


@needs_torch
def test_write_pth_pickles_byte_for_byte_as_torch_save(tmp_path):
    params = {"conv.weight": np.random.default_rng(0).standard_normal((2, 3, 1, 1)).astype(np.float32),
              "half": np.ones(3, np.float16), "steps": np.array(4, np.int64)}
    torch.save(collections.OrderedDict((k, torch.from_numpy(v)) for k, v in params.items()), tmp_path / "t.pth")
    write_pth(tmp_path / "m.pth", params)
    with zipfile.ZipFile(tmp_path / "t.pth") as theirs, zipfile.ZipFile(tmp_path / "m.pth") as ours:
        assert ours.read("archive/data.pkl") == theirs.read("t/data.pkl")
        for key in range(3):
            assert ours.read(f"archive/data/{key}") == theirs.read(f"t/data/{key}")


@needs_torch
def test_a_written_state_dict_loads_strictly_into_a_torch_module(tmp_path):
    class Net(torch.nn.Module):  # torchvision's names: conv1, bn1 (with num_batches_tracked), fc
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1, self.fc = torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.BatchNorm2d(4), \
                torch.nn.Linear(4, 2)

    net = Net()
    params = {k: np.random.default_rng(1).standard_normal(tuple(v.shape)).astype(np.float32)
              for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    write_pth(tmp_path / "n.pth", params)
    net.load_state_dict(torch.load(tmp_path / "n.pth", weights_only=True), strict=True)
    assert np.array_equal(net.conv1.weight.detach().numpy(), params["conv1.weight"])


# -- files written by torch.save ---------------------------------------------------------------------


def _torch_state():
    torch.manual_seed(0)
    state = collections.OrderedDict()
    state["fp32"] = torch.randn(3, 4)
    state["fp16"] = torch.randn(5).half()
    state["bf16"] = torch.randn(2, 3).bfloat16()
    state["fp64"] = torch.randn(2).double()
    state["transposed"] = state["fp32"].t()
    base = torch.randn(12)
    state["view.a"], state["view.b"] = base[2:7], base.view(3, 4)[:, 1]  # two views of one storage
    state["param"] = torch.nn.Parameter(torch.randn(3))
    state["negated"] = torch.randn(4)._neg_view()
    state["bn.num_batches_tracked"] = torch.tensor(17)
    state["scalar"] = torch.tensor(2.5)
    state._metadata = collections.OrderedDict({"": {"version": 1}, "bn": {"version": 2}})
    return state


def _as_numpy(tensor) -> np.ndarray:
    tensor = tensor.detach().resolve_neg()
    return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()


@needs_torch
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_files_written_by_torch_save(tmp_path, legacy):
    state = _torch_state()
    path = tmp_path / "t.pth"
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    assert_same(read_pth(path), {k: _as_numpy(v) for k, v in state.items()})
    assert inspect_pth(path).tensors["bf16"] == ((2, 3), "bfloat16")


@needs_torch
def test_a_data_parallel_checkpoint_in_a_wrapper(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    wrapped = torch.nn.DataParallel(model)  # on a CPU-only machine it only wraps: names gain "module."
    torch.save({"epoch": 4, "model": wrapped.state_dict(), "optimizer": torch.optim.SGD(model.parameters(), 0.1)
                .state_dict()}, tmp_path / "ddp.pth")
    loaded = read_pth(tmp_path / "ddp.pth")
    assert_same(loaded, {k: _as_numpy(v) for k, v in model.state_dict().items()})
    assert inspect_pth(tmp_path / "ddp.pth").stripped_prefix == "module."


def torchvision_forward(state: dict, x):
    """torchvision's ResNet forward (resnet.py), written with torch.nn.functional on a state_dict."""
    F = torch.nn.functional

    def bn(t, name):
        return F.batch_norm(t, state[f"{name}.running_mean"], state[f"{name}.running_var"], state[f"{name}.weight"],
                            state[f"{name}.bias"], False, 0.0, 1e-5)

    x = F.max_pool2d(F.relu(bn(F.conv2d(x, state["conv1.weight"], stride=2, padding=3), "bn1")), 3, 2, 1)
    for layer in range(1, 5):
        block = 0
        while f"layer{layer}.{block}.conv1.weight" in state:
            p, stride = f"layer{layer}.{block}", 2 if layer > 1 and block == 0 else 1
            if f"{p}.conv3.weight" in state:  # bottleneck, stride on the 3x3 (v1.5)
                out = F.relu(bn(F.conv2d(x, state[f"{p}.conv1.weight"]), f"{p}.bn1"))
                out = F.relu(bn(F.conv2d(out, state[f"{p}.conv2.weight"], stride=stride, padding=1), f"{p}.bn2"))
                out = bn(F.conv2d(out, state[f"{p}.conv3.weight"]), f"{p}.bn3")
            else:
                out = F.relu(bn(F.conv2d(x, state[f"{p}.conv1.weight"], stride=stride, padding=1), f"{p}.bn1"))
                out = bn(F.conv2d(out, state[f"{p}.conv2.weight"], padding=1), f"{p}.bn2")
            if f"{p}.downsample.0.weight" in state:
                x = bn(F.conv2d(x, state[f"{p}.downsample.0.weight"], stride=stride), f"{p}.downsample.1")
            x = F.relu(out + x)
            block += 1
    return F.linear(F.adaptive_avg_pool2d(x, 1).flatten(1), state["fc.weight"], state["fc.bias"])


@pytest.fixture(scope="module")
def resnet50_checkpoint(tmp_path_factory):
    """torch.save of a resnet50 state_dict (random BN statistics), its input and torch's logits."""
    if torch is None:
        pytest.skip("torch is not installed")
    spec = portres.get("resnet50")
    state = collections.OrderedDict()
    for name, value in init_params(spec, seed=7, randomize_batch_norm=True).items():
        state[name] = torch.from_numpy(value)
        if name.endswith("running_var"):
            state[name.replace("running_var", "num_batches_tracked")] = torch.tensor(1000)
    state._metadata = collections.OrderedDict()
    path = tmp_path_factory.mktemp("r50") / "resnet50.pth"
    torch.save(state, path)
    images = np.random.default_rng(3).standard_normal((2, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        logits = torchvision_forward(state, torch.from_numpy(images)).numpy()
    return spec, path, images, logits


def _relative(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def test_resnet50_from_torch_save_gives_torchs_logits_without_torch(resnet50_checkpoint, tmp_path):
    spec, path, images, logits = resnet50_checkpoint
    np.save(tmp_path / "x.npy", images)
    code = ("import sys\nsys.modules['torch'] = None  # torch cannot be imported in this process\n"
            "import numpy as np, portres\n"
            f"model = portres.build('resnet50', 'numpy', {str(path)!r})\n"
            f"np.save({str(tmp_path / 'y.npy')!r}, model(np.load({str(tmp_path / 'x.npy')!r})))\n"
            "assert not any(m.split('.')[0] == 'torch' for m in sys.modules if sys.modules[m] is not None)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert _relative(np.load(tmp_path / "y.npy"), logits) < 1e-5


@pytest.mark.parametrize("backend", FRAMEWORKS)
def test_resnet50_from_torch_save_in_each_framework_backend(resnet50_checkpoint, backend):
    spec, path, images, logits = resnet50_checkpoint
    model = portres.build(spec, backend, path, dtype="float32")
    assert _relative(model(images), logits) < 1e-5


# -- portres convert ------------------------------------------------------------------------------------


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _hand_written_resnet20(tmp_path, dtype="float32"):
    """A resnet20 checkpoint written opcode by opcode, DataParallel-prefixed, in a wrapper, with counters."""
    spec = portres.get("resnet20")
    params = init_params(spec, seed=2, randomize_batch_norm=True)
    p = TorchPickle()
    kind = {"float32": ("FloatStorage", "<f4"), "bfloat16": ("BFloat16Storage", "<u2")}[dtype]
    items = {}
    for index, (name, value) in enumerate(params.items()):
        if dtype == "bfloat16":
            value = params[name] = bfloat16_exact(np.random.default_rng(index), value.shape)
            value = value.view(np.uint32) >> 16
        items[f"module.{name}"] = p.tensor(p.storage(kind[0], str(index), value, kind[1]), value.shape)
        if name.endswith("running_var"):
            count = p.storage("LongStorage", f"c{index}", [3], "<i8")
            items[f"module.{name.replace('running_var', 'num_batches_tracked')}"] = p.tensor(count, ())
    body = TorchPickle.mapping({"state_dict": p.mapping(items), "epoch": _int(30)}, ordered=False)
    return write_zip(tmp_path / "r20.pth", p.program(body), p.storages.values()), params


def test_convert_round_trips_through_every_format(tmp_path):
    source, params = _hand_written_resnet20(tmp_path)
    result = run("convert", source, tmp_path / "a.safetensors", "--arch", "resnet20")
    assert result.exit_code == 0, result.output
    assert "mapped:     97 tensors, dtypes unchanged" in result.output
    assert "unwrapped:  the state_dict from checkpoint['state_dict']" in result.output
    assert "renamed:    97 (e.g. module.conv1.weight -> conv1.weight)" in result.output
    assert "dropped:    19 (num_batches_tracked counters: 19)" in result.output
    for a, b in [("a.safetensors", "b.npz"), ("b.npz", "c.pth"), ("c.pth", "d.safetensors")]:
        result = run("convert", tmp_path / a, tmp_path / b)  # no --arch: recognised from the names and shapes
        assert result.exit_code == 0, result.output
        assert "recognised from the names and shapes" in result.output and "renamed:    0" in result.output
    final = read_weights_file(tmp_path / "d.safetensors")
    assert list(final) == list(params) and all(np.array_equal(final[k], params[k]) for k in params)
    from safetensors.numpy import load_file  # the reference library reads what convert wrote

    assert all(np.array_equal(load_file(tmp_path / "a.safetensors")[k], params[k]) for k in params)


def test_convert_keeps_bfloat16_in_torch_files_and_widens_it_elsewhere(tmp_path):
    source, params = _hand_written_resnet20(tmp_path, "bfloat16")
    result = run("convert", source, tmp_path / "b.pth")
    assert result.exit_code == 0 and "dtypes unchanged" in result.output, result.output
    assert inspect_pth(tmp_path / "b.pth").tensors["fc.weight"][1] == "bfloat16"
    result = run("convert", tmp_path / "b.pth", tmp_path / "w.npz")
    assert result.exit_code == 0 and "97 bfloat16 -> float32" in result.output, result.output
    widened = read_weights_file(tmp_path / "w.npz")
    assert all(widened[k].dtype == np.float32 and np.array_equal(widened[k], params[k]) for k in params)
    result = run("convert", tmp_path / "w.npz", tmp_path / "x.npz", "--dtype", "bfloat16")
    assert result.exit_code == 2 and "bfloat16 is written to torch checkpoints (.pth) only" in result.output


def test_convert_refuses_lossy_casts_unless_asked(tmp_path):
    spec = portres.get("resnet20")
    params = init_params(spec, seed=1)
    params["fc.weight"][0, :3] = [1e5, -7e4, 1.0]  # beyond float16's 65504
    params["bn1.running_var"][:] = 1e-9  # a whole tensor below float16's normal range
    source = tmp_path / "s.npz"
    save_weights(source, params)
    target = tmp_path / "h.safetensors"
    result = run("convert", source, target, "--dtype", "float16")
    assert result.exit_code == 2 and not target.exists()
    assert "fc.weight: 2 values overflow float16 (largest 100000" in result.output
    assert "bn1.running_var: relative error" in result.output and "16 of 16 values lie below" in result.output
    assert "conv1.weight" not in result.output  # ordinary rounding is not loss
    result = run("convert", source, target, "--dtype", "float16", "--allow-lossy")
    assert result.exit_code == 0 and "lossy:      fc.weight: 2 values overflow" in result.output, result.output
    written = read_weights_file(target)
    assert written["fc.weight"].dtype == np.float16 and list(written["fc.weight"][0, :3]) == [65504, -65504, 1]
    assert _relative(written["conv1.weight"], params["conv1.weight"]) < 2**-11


def test_convert_errors_are_one_line_and_write_nothing(tmp_path):
    source, _ = _hand_written_resnet20(tmp_path)
    result = run("convert", source, tmp_path / "x.h5")
    assert result.exit_code == 2 and "give DESTINATION the suffix .safetensors, .npz or .pth" in result.output
    result = run("convert", source, tmp_path / "x.npz", "--arch", "resnet32")
    assert result.exit_code == 2 and "do not fit resnet32" in result.output and "looks like resnet20" in result.output
    spec_file = tmp_path / "s.json"
    spec_file.write_text(portres.get("resnet20").to_json())
    result = run("convert", source, tmp_path / "x.npz", "--arch", "resnet20", "--spec", spec_file)
    assert result.exit_code == 2 and "give exactly one of --arch NAME or --spec FILE.json" in result.output
    result = run("convert", source, tmp_path / "x.npz", "--spec", spec_file)
    assert result.exit_code == 0, result.output
    odd = {"fc.weight": np.zeros((3, 64), np.float32)}
    save_weights(tmp_path / "odd.npz", odd)
    result = run("convert", tmp_path / "odd.npz", tmp_path / "y.npz")
    assert result.exit_code == 2 and "does not match any preset exactly" in result.output
    assert not (tmp_path / "y.npz").exists() and not (tmp_path / "x.h5").exists()


def test_convert_names_every_preset_with_the_same_tensors(tmp_path):
    save_weights(tmp_path / "r20.npz", init_params(portres.get("resnet20")))
    result = run("convert", tmp_path / "r20.npz", tmp_path / "r20.pth")  # option-A shortcuts have no weights
    assert result.exit_code == 0, result.output
    assert "for resnet20 (recognised from the names and shapes; plain20 has the same tensors)" in result.output


def test_the_help_lists_convert_and_its_options():
    assert "convert" in run("--help").output
    text = run("convert", "--help").output
    assert "--allow-lossy" in text and "--arch" in text and "--dtype" in text
