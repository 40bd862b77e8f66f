"""Security: what reading a PyTorch checkpoint (``read_pth``) must never do.

Attacks reproduced here (every crafted file is written in ``tmp_path`` at run time, opcode by
opcode, with the helpers of ``tests/test_pth.py``):

* **Poisoning every later load in the process.** A pickle's BUILD opcode sets attributes on
  the object below it; the reader used to hand the pickle its own module-level callables, so a
  file could set ``_rebuild_tensor_v2.__defaults__`` to ``(False, None, {"neg": True})`` and
  every checkpoint loaded afterwards came back negated (a variant stores its own values
  pre-negated, so it loads cleanly itself). Tried: ``__defaults__``, ``__kwdefaults__``,
  ``__dict__`` and plain attributes on every global the reader allows (the rebuild functions,
  ``_codecs.encode``, ``collections.OrderedDict``, the storage classes) and on a storage from a
  persistent id. Each file must be refused with one clear error, and afterwards a good zip
  file, a good legacy file and a file ``write_pth`` wrote must load bit-identically to the
  arrays they hold (and to ``torch.load(weights_only=True)`` where torch is installed).
* **A global taken from copyreg's process-wide cache.** An EXT opcode names a global by an
  integer that ``copyreg`` maps to it; once any unpickle in the process has resolved that
  code, the C unpickler takes it from the cache without asking ``find_class``: a file could
  call ``builtins.eval``. EXT opcodes are refused.
* **Gigabytes from a few bytes.** The C unpickler grows its memo to any index a LONG_BINPUT
  names (index 2**31: a 32 GB array); the reader's memo holds what the file puts in it.
* **Absurd shapes.** A tensor of shape (2**62, 2**62) with zero strides, a stride-0 view that
  turns a 4-byte storage into 512 MiB, an overlapping-stride view of 256 MiB from 64 KiB, a
  stride beyond any machine integer on a dimension that never steps: each used to escape as an
  OverflowError/ValueError or make a huge copy. Now one ``WeightsError`` line naming the
  tensor, or (for a dimension of size 0 or 1, whose stride never matters) the right array;
  expanded and overlapping views of the sizes real checkpoints hold still load.
* Also refused: NEWOBJ (``cls.__new__``, which ``torch.save`` never writes) and a BUILD that
  gives the state_dict's OrderedDict anything but plain attributes such as ``_metadata``.
"""

from __future__ import annotations

import copyreg
import pickle
import struct
import tracemalloc

import numpy as np
import pytest
from test_pth import TorchPickle, _call, _global, _int, _string, _tuple, hand_written_case, write_legacy, write_zip

from portres.interop.pth import inspect_pth, read_pth, write_pth
from portres.weights import WeightsError

try:
    import torch
except ImportError:  # CI has no torch: the comparisons with torch.load skip, the rest runs
    torch = None

ALLOWED_GLOBALS = [("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor"),
                   ("torch._utils", "_rebuild_parameter"), ("torch._utils", "_rebuild_parameter_with_state"),
                   ("_codecs", "encode"), ("collections", "OrderedDict"), ("torch", "FloatStorage"),
                   ("torch", "LongStorage")]


def _dict(items: dict[str, bytes]) -> bytes:
    return TorchPickle.mapping(items, ordered=False)


def _build(target: bytes, state: bytes) -> bytes:
    return target + state + b"b0"  # BUILD (setattr on the target), then POP it: the stack is as before


def _slots(items: dict[str, bytes]) -> bytes:
    return _tuple([b"N", _dict(items)])  # (None, {...}): BUILD's "slot state", set with setattr


NEGATE_BY_DEFAULT = _slots({"__defaults__": _tuple([b"\x89", b"N", _dict({"neg": b"\x88"})])})
POISONS = {  # name -> pickle opcodes that try to change something that outlives the load
    "_rebuild_tensor_v2.__defaults__": _build(_global("torch._utils", "_rebuild_tensor_v2"), NEGATE_BY_DEFAULT),
    "_rebuild_parameter.__kwdefaults__": _build(_global("torch._utils", "_rebuild_parameter"),
                                                _slots({"__kwdefaults__": _dict({"state": _int(1)})})),
    "_rebuild_tensor_v2.__dict__": _build(_global("torch._utils", "_rebuild_tensor_v2"), _dict({"neg": b"\x88"})),
    "_codecs.encode.__defaults__": _build(_global("_codecs", "encode"),
                                          _slots({"__defaults__": _tuple([_string("utf-16")])})),
    "OrderedDict.__init__": _build(_global("collections", "OrderedDict"),
                                   _slots({"__init__": _global("torch._utils", "_rebuild_tensor")})),
    "FloatStorage.name": _build(_global("torch", "FloatStorage"), _slots({"name": _string("DoubleStorage")})),
}


def poisoned_checkpoint(tmp_path, poison: bytes, legacy: bool, pre_negated: bool = False):
    """A valid state_dict preceded by ``poison``; ``pre_negated`` stores -x so that a negating poison loads x."""
    p = TorchPickle(legacy)
    values = np.array([1.5, -2.0, 3.0], np.float32)
    s = p.storage("FloatStorage", "0", -values if pre_negated else values, "<f4")
    body = poison + p.mapping({"w": p.tensor(s, (3,))})
    if legacy:
        return write_legacy(tmp_path / "poison.pt", p.program(body), p.storages.values())
    return write_zip(tmp_path / "poison.pth", p.program(body), p.storages.values())


def good_checkpoints(tmp_path) -> dict:
    """Path -> the arrays it was written from: a zip and a legacy file written opcode by opcode, and write_pth's."""
    p, items, expected = hand_written_case()
    metadata = b"}" + _string("_metadata") + _dict({"": _dict({"version": _int(1)})}) + b"s" + b"b"  # torch's BUILD
    zipped = write_zip(tmp_path / "good.pth", p.program(p.mapping(items, build=metadata)), p.storages.values())
    p, items, legacy_expected = hand_written_case(legacy=True)
    legacy = write_legacy(tmp_path / "good.pt", p.program(p.mapping(items, ordered=False)), p.storages.values())
    arrays = {"conv.weight": np.random.default_rng(5).standard_normal((4, 3, 3, 3)).astype(np.float32),
              "bn.num_batches_tracked": np.array(7, np.int64), "half": np.linspace(-1, 1, 5).astype(np.float16)}
    written = tmp_path / "written.pth"
    write_pth(written, arrays)
    return {zipped: expected, legacy: legacy_expected, written: arrays}


def refusal(path, load=read_pth) -> str:
    """The error loading ``path`` raises ("" when it loads)."""
    try:
        load(path)
    except WeightsError as error:
        return str(error)
    return ""


def assert_good_checkpoints_load_exactly(tmp_path):
    for path, expected in good_checkpoints(tmp_path).items():
        loaded = read_pth(path)
        assert list(loaded) == list(expected), path.name
        references = torch.load(path, weights_only=True) if torch is not None else {}
        for name, value in expected.items():
            value = np.array(value, order="C")  # 0-d stays 0-d
            assert loaded[name].dtype == value.dtype and loaded[name].shape == value.shape, (path.name, name)
            assert loaded[name].tobytes() == value.tobytes(), (path.name, name)  # bit for bit
            if references:
                reference = references[name].detach().resolve_neg()
                reference = reference.float() if reference.dtype == torch.bfloat16 else reference
                assert loaded[name].tobytes() == reference.numpy().tobytes(), (path.name, name)


# -- poisoning later loads ---------------------------------------------------------------------------


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("poison", list(POISONS))
def test_a_pickle_cannot_poison_later_loads(tmp_path, poison, legacy):
    path = poisoned_checkpoint(tmp_path, POISONS[poison], legacy)
    error = refusal(path)
    assert_good_checkpoints_load_exactly(tmp_path)  # first: nothing the file did outlives its load
    assert "refused to load: its pickle asks for a BUILD on the global" in error, error
    assert str(path) in error and "\n" not in error


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_a_pre_negated_poison_is_refused_too(tmp_path, legacy):
    # It would load its own values correctly, and negate every tensor of every file loaded after it.
    path = poisoned_checkpoint(tmp_path, POISONS["_rebuild_tensor_v2.__defaults__"], legacy, pre_negated=True)
    errors = [refusal(path), refusal(path, inspect_pth)]
    assert_good_checkpoints_load_exactly(tmp_path)
    assert all("refused to load: its pickle asks for a BUILD on the global torch._utils._rebuild_tensor_v2" in error
               for error in errors), errors


@pytest.mark.parametrize("state", ["__defaults__", "__kwdefaults__", "__dict__", "attribute"])
@pytest.mark.parametrize("target", ALLOWED_GLOBALS, ids=".".join)
def test_no_allowed_global_can_be_modified(tmp_path, target, state):
    value = _dict({"x": _int(1)}) if state in ("__kwdefaults__", "__dict__") else _tuple([b"\x88"])
    state = _dict({"poisoned": _int(1)}) if state == "__dict__" else _slots({state: value})
    path = poisoned_checkpoint(tmp_path, _build(_global(*target), state), legacy=False)
    error = refusal(path)
    assert_good_checkpoints_load_exactly(tmp_path)
    assert f"refused to load: its pickle asks for a BUILD on the global {'.'.join(target)}" in error, error


def test_a_build_on_a_storage_or_a_tensor_is_refused(tmp_path):
    p = TorchPickle()
    s = p.storage("FloatStorage", "0", [1.0, 2.0], "<f4")
    storage_id = _tuple([_string("storage"), _global("torch", "FloatStorage"), _string("0"), _string("cpu"), _int(2)])
    attacks = {"a storage": _build(storage_id + b"Q", _slots({"numel": _int(10**9)})),
               "a tensor": _build(p.tensor(s, (2,)), _slots({"negative": b"\x88"}))}
    for what, poison in attacks.items():
        path = write_zip(tmp_path / "m.pth", p.program(poison + p.mapping({"w": p.tensor(s, (2,))})), [s])
        with pytest.raises(WeightsError, match=f"refused.*BUILD on {what}"):
            read_pth(path)
    assert_good_checkpoints_load_exactly(tmp_path)


def test_the_state_dicts_own_metadata_build_still_loads(tmp_path):
    # torch.save's state_dict is an OrderedDict whose _metadata a BUILD sets: that one is allowed.
    p = TorchPickle()
    s = p.storage("FloatStorage", "0", [1.0, 2.0], "<f4")
    metadata = _dict({"_metadata": _dict({"": _dict({"version": _int(1)})})}) + b"b"
    path = write_zip(tmp_path / "m.pth", p.program(p.mapping({"w": p.tensor(s, (2,))}, build=metadata)), [s])
    assert read_pth(path)["w"].tolist() == [1.0, 2.0]
    smuggled = _dict({"__class__": _global("collections", "OrderedDict")}) + b"b"  # a dunder through the same door
    path = write_zip(tmp_path / "m.pth", p.program(p.mapping({"w": p.tensor(s, (2,))}, build=smuggled)), [s])
    with pytest.raises(WeightsError, match="refused.*BUILD on an object of type OrderedDict"):
        read_pth(path)


def test_newobj_on_an_allowed_global_is_refused(tmp_path):
    # cls.__new__(cls): torch.save never writes it, and the stand-ins a load hands out are not classes
    p = TorchPickle()
    s = p.storage("FloatStorage", "0", [1.0], "<f4")
    newobj = _global("collections", "OrderedDict") + b")\x81" + b"0"  # EMPTY_TUPLE, NEWOBJ, POP
    path = write_zip(tmp_path / "m.pth", p.program(newobj + p.mapping({"w": p.tensor(s, (1,))})), [s])
    error = refusal(path)
    assert "refused to load: its pickle asks for NEWOBJ" in error and "\n" not in error, error


# -- copyreg and the memo ----------------------------------------------------------------------------


def test_an_extension_code_cannot_fetch_a_cached_global(tmp_path):
    marker = tmp_path / "pwned"
    code = 0x5EC0DE
    ext4 = b"\x84" + struct.pack("<I", code)  # EXT4: the global copyreg registered under `code`
    copyreg.add_extension("builtins", "eval", code)  # what some library in the process might have done...
    try:
        assert pickle.loads(b"\x80\x02" + ext4 + b".") is eval  # ...and some unpickle since then resolved it
        p = TorchPickle()
        s = p.storage("FloatStorage", "0", [1.0], "<f4")
        payload = _call(ext4, [_string(f"open({str(marker)!r}, 'w').write('pwned')")]) + b"0"
        path = write_zip(tmp_path / "ext.pth", p.program(payload + p.mapping({"w": p.tensor(s, (1,))})), [s])
        with pytest.raises(WeightsError, match=r"refused.*extension code \(EXT1/EXT2/EXT4\)"):
            read_pth(path)
    finally:
        copyreg.remove_extension("builtins", "eval", code)
    assert not marker.exists()


def test_a_memo_index_cannot_allocate_memory(tmp_path):
    # LONG_BINPUT 2**22: the C unpickler would grow its memo array to 2**23 pointers (64 MiB); 2**31 is 32 GB.
    p = TorchPickle()
    s = p.storage("FloatStorage", "0", [1.0], "<f4")
    body = b"N" + b"r" + struct.pack("<I", 2**22) + b"0" + p.mapping({"w": p.tensor(s, (1,))})
    path = write_zip(tmp_path / "memo.pth", p.program(body), [s])
    tracemalloc.start()
    try:
        assert read_pth(path)["w"].tolist() == [1.0]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"reading a 1-tensor checkpoint peaked at {peak} bytes"


# -- absurd shapes -----------------------------------------------------------------------------------


def one_tensor(tmp_path, values, shape, stride, offset=0, dtype="<f4", kind="FloatStorage"):
    p = TorchPickle()
    s = p.storage(kind, "0", values, dtype)
    return write_zip(tmp_path / "m.pth", p.program(p.mapping({"w": p.tensor(s, shape, stride, offset)})), [s])


@pytest.mark.parametrize("shape, stride, offset, message", [
    ((2**62, 2**62), (0, 0), 0, "repeats the 4 bytes of its storage '0' into"),
    ((2**62, 2**62), None, 0, "reaches past the end of its storage"),
    ((0, 2**64), (1, 1), 0, "repeats the 4 bytes"),  # empty, but no array of that shape exists
    ((2**27,), (0,), 0, "repeats the 4 bytes of its storage '0' into 536870912 bytes"),  # 512 MiB of one float
    ((-1, 4), None, 0, "malformed shape"),
    ((1,), (1,), 2**70, "reaches past the end"),
    ((0,), (1,), 5, "reaches past the end"),
], ids=["2**62-squared-stride-0", "2**62-squared", "empty-2**64", "stride-0-512MiB", "negative-size",
        "offset-2**70", "offset-past-the-end"])
def test_absurd_shapes_are_one_error_naming_the_tensor(tmp_path, shape, stride, offset, message):
    path = one_tensor(tmp_path, [1.0], shape, stride, offset)
    for load in (read_pth, inspect_pth):
        with pytest.raises(WeightsError, match=message) as caught:
            load(path)
        assert "tensor 'w'" in str(caught.value) and "\n" not in str(caught.value)


def test_overlapping_strides_cannot_blow_a_small_storage_up(tmp_path):
    # a sliding window of 8192 x 8192 floats over 16383 of them: 64 KiB on disk, 256 MiB as an array
    path = one_tensor(tmp_path, np.zeros(16383), (8192, 8192), (1, 1))
    with pytest.raises(WeightsError, match=r"tensor 'w' .* into 268435456 bytes, more than 16 times them"):
        read_pth(path)


def test_strides_of_dimensions_that_never_step_are_ignored(tmp_path):
    # torch keeps whatever stride a size-1 or empty dimension had; it must not overflow NumPy
    assert read_pth(one_tensor(tmp_path, [1.0, 2.0], (1, 2), (2**70, 1)))["w"].tolist() == [[1.0, 2.0]]
    assert read_pth(one_tensor(tmp_path, [1.0], (0, 3), (1, 2**70)))["w"].shape == (0, 3)


def test_expanded_and_overlapping_views_of_real_size_still_load(tmp_path):
    values = np.arange(3, dtype=np.float32)
    assert np.array_equal(read_pth(one_tensor(tmp_path, values, (1000, 3), (0, 1)))["w"],
                          np.broadcast_to(values, (1000, 3)))  # 12 KB from 12 bytes: under 64 MiB
    window = read_pth(one_tensor(tmp_path, np.arange(10.0), (8, 3), (1, 1), dtype="<f8", kind="DoubleStorage"))["w"]
    assert np.array_equal(window, np.lib.stride_tricks.sliding_window_view(np.arange(10.0), 3))
    big = np.arange(2**21, dtype=np.float32)  # 8 MiB repeated 10 times: 80 MiB is under 16 x its storage
    assert read_pth(one_tensor(tmp_path, big, (10, 2**21), (0, 1)))["w"].shape == (10, 2**21)


@pytest.mark.skipif(torch is None, reason="torch is not installed")
def test_torch_saved_views_load_as_torch_loads_them(tmp_path):
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    state = {"expanded": torch.arange(3.0).expand(1000, 3), "transposed": base.t(), "column": base[:, 1:2],
             "window": torch.arange(10.0).as_strided((8, 3), (1, 1)), "empty": base[:, :0]}
    torch.save(state, tmp_path / "views.pth")
    loaded, reference = read_pth(tmp_path / "views.pth"), torch.load(tmp_path / "views.pth", weights_only=True)
    for name, value in reference.items():
        assert loaded[name].shape == tuple(value.shape) and np.array_equal(loaded[name], value.numpy()), name
