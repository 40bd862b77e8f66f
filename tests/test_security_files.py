"""Security: what writing and strictly loading weights files must never do.

Attacks reproduced here (every crafted file or node is made in ``tmp_path`` at run time):

* **Replacing a device or FIFO through the output path.** ``save_weights``, ``write_pth``,
  ``atomic_write`` (checkpoints build on it) and ``portres convert`` are pointed at a FIFO,
  a symlink to a FIFO, a symlink to a directory and (as root) a symlink to a private
  character device made with ``mknod`` (never ``/dev/null`` itself: the bug would replace it).
  Each must refuse with one ``WeightsError`` line (``portres: error:`` and exit status 2 from
  the CLI) and leave the node as it was.
* **Error messages as large as the file.** A weights file (or mapping) of 200,000 tiny
  tensors, none of which fit, used to produce a 1.7 MB error; the names each error lists are
  capped (the first 20, then "... and N more") while the totals are still stated, and so are
  overlong names. Saving 200,000 unsavable tensors and converting with many lossy tensors
  are bounded the same way.
"""

from __future__ import annotations

import json
import os
import stat
import struct

import numpy as np
import pytest
from click.testing import CliRunner

import portres
from portres.cli import main
from portres.interop.pth import write_pth
from portres.tensorfiles import atomic_write
from portres.weights import WeightsError, init_params, load_weights, save_weights

pytestmark = pytest.mark.skipif(os.name == "nt", reason="FIFOs, device nodes and symlinks are POSIX")

_MANY = 200_000


def _writers():
    params = init_params(portres.get("resnet20"))
    return {
        "safetensors": lambda path: save_weights(path, params),
        "npz": lambda path: save_weights(path, params),
        "pth": lambda path: write_pth(path, params),
        "atomic": lambda path: atomic_write(path, lambda file: file.write(b"checkpoint")),
    }


WRITERS = ["safetensors", "npz", "pth", "atomic"]


def _output(tmp_path, writer: str):
    return tmp_path / f"out.{writer if writer != 'atomic' else 'ckpt'}"


def _char_device(path) -> None:
    """A private character device with /dev/null's numbers; a bug replaces this node, not /dev/null."""
    os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3))


needs_root = pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="mknod needs root")


# -- writing never replaces anything but a regular file ----------------------------------------------------


@pytest.mark.parametrize("writer", WRITERS)
def test_writing_to_a_fifo_is_refused_and_keeps_the_fifo(tmp_path, writer):
    path = _output(tmp_path, writer)
    os.mkfifo(path)
    with pytest.raises(WeightsError, match="is a FIFO, not a regular file; choose another output path") as caught:
        _writers()[writer](path)
    assert "\n" not in str(caught.value) and ".tmp" not in str(caught.value)
    assert stat.S_ISFIFO(os.lstat(path).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary file left


@pytest.mark.parametrize("writer", WRITERS)
def test_writing_through_a_symlink_to_a_fifo_is_refused(tmp_path, writer):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    link = _output(tmp_path, writer)
    link.symlink_to(fifo)
    with pytest.raises(WeightsError) as caught:
        _writers()[writer](link)
    assert str(caught.value) == (f"cannot write {link}: it is a FIFO (via symlink to {fifo}), not a regular file; "
                                 "choose another output path")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and link.is_symlink()


@needs_root
@pytest.mark.parametrize("writer", WRITERS)
def test_writing_through_a_symlink_to_a_character_device_is_refused(tmp_path, writer):
    device = tmp_path / "null"
    _char_device(device)
    link = _output(tmp_path, writer)
    link.symlink_to(device)
    with pytest.raises(WeightsError, match=f"it is a character device \\(via symlink to {device}\\), not a regular"):
        _writers()[writer](link)
    assert stat.S_ISCHR(os.lstat(device).st_mode) and os.lstat(device).st_rdev == os.makedev(1, 3)


def test_writing_through_a_symlink_to_a_directory_is_refused(tmp_path):
    (tmp_path / "store").mkdir()
    link = tmp_path / "w.safetensors"
    link.symlink_to(tmp_path / "store")
    with pytest.raises(WeightsError, match="it is a directory \\(via symlink to .*store\\); give the path of a file"):
        save_weights(link, init_params(portres.get("resnet20")))
    assert (tmp_path / "store").is_dir() and list((tmp_path / "store").iterdir()) == []


def test_a_fifo_appearing_while_writing_is_not_replaced(tmp_path):
    path = tmp_path / "state.ckpt"

    def write(file):  # the destination turns into a FIFO after the checks, before the rename
        file.write(b"new")
        os.mkfifo(path)

    with pytest.raises(WeightsError, match="is a FIFO"):
        atomic_write(path, write)
    assert stat.S_ISFIFO(os.lstat(path).st_mode) and [p.name for p in tmp_path.iterdir()] == ["state.ckpt"]


def _convert(tmp_path, destination):
    source = tmp_path / "good.safetensors"
    save_weights(source, init_params(portres.get("resnet20")))
    return CliRunner().invoke(main, ["convert", str(source), str(destination)])


def _one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.output.splitlines()
    assert len(lines) == 1 and lines[0].startswith("portres: error: "), result.output
    return lines[0]


def test_convert_refuses_an_output_symlinked_to_a_fifo(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "out.safetensors").symlink_to(fifo)
    line = _one_error_line(_convert(tmp_path, tmp_path / "out.safetensors"))
    assert "is a FIFO (via symlink to" in line and "choose another output path" in line
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


@needs_root
def test_convert_refuses_an_output_symlinked_to_a_character_device(tmp_path):
    device = tmp_path / "null"
    _char_device(device)
    (tmp_path / "out.npz").symlink_to(device)
    line = _one_error_line(_convert(tmp_path, tmp_path / "out.npz"))
    assert f"is a character device (via symlink to {device}), not a regular file" in line
    assert stat.S_ISCHR(os.lstat(device).st_mode)


# -- errors stay readable however many tensors a file holds ----------------------------------------------


def _safetensors(path, shapes: dict[str, tuple[int, ...]]) -> None:
    """A valid safetensors file of zero-filled float32 tensors, written directly (fast for 200,000 entries)."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 4 * int(np.prod(shape))
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(offset))


def _crowd() -> dict[str, tuple[int, ...]]:
    """resnet20's names with one missing and every other misshapen, and 200,000 tensors it does not have."""
    names = list(init_params(portres.get("resnet20")))
    shapes = {name: (1,) for name in names[1:]}
    shapes.update({f"extra.{index}": (1,) for index in range(_MANY)})
    return shapes


def _assert_bounded(message: str) -> None:
    assert len(message) < 5_000, len(message)
    assert f"unexpected ({_MANY:,}): extra.0, extra.1," in message
    assert f"... and {_MANY - 20:,} more" in message
    assert "missing (1): conv1.weight" in message
    assert "more problems" in message  # 96 misshapen tensors: the first ones listed, the rest counted


def test_a_file_with_200000_unexpected_tensors_gives_a_bounded_error(tmp_path):
    path = tmp_path / "crowd.safetensors"
    _safetensors(path, _crowd())
    with pytest.raises(WeightsError) as caught:
        load_weights(path, portres.get("resnet20"))
    _assert_bounded(str(caught.value))


def test_a_mapping_with_200000_unexpected_tensors_gives_a_bounded_error():
    tiny = np.zeros(1, np.float32)
    with pytest.raises(WeightsError) as caught:
        load_weights({name: tiny for name in _crowd()}, portres.get("resnet20"))
    _assert_bounded(str(caught.value))


def test_an_overlong_name_is_shortened_in_errors(tmp_path):
    params = init_params(portres.get("resnet20"))
    params["x" * 1_000_000] = np.zeros(1, np.float32)
    path = tmp_path / "long.safetensors"
    save_weights(path, params)
    with pytest.raises(WeightsError) as caught:
        load_weights(path, portres.get("resnet20"))
    message = str(caught.value)
    assert len(message) < 5_000 and "unexpected (1): xxx" in message and "characters" in message


def test_saving_200000_unsavable_tensors_gives_a_bounded_error(tmp_path):
    bad = np.array([np.nan], np.float32)
    with pytest.raises(WeightsError) as caught:
        save_weights(tmp_path / "w.npz", {f"t.{index}": bad for index in range(_MANY)})
    message = str(caught.value)
    assert len(message) < 5_000 and "t.0: contains NaN or inf" in message
    assert f"... and {_MANY - 20:,} more problems" in message
    assert list(tmp_path.iterdir()) == []


def test_convert_lists_a_bounded_number_of_lossy_tensors(tmp_path):
    params = {name: np.full_like(value, 1e6) for name, value in init_params(portres.get("resnet20")).items()}
    source = tmp_path / "big.npz"
    save_weights(source, params)  # every one of its 97 tensors overflows float16
    for flags, status in [((), 2), (("--allow-lossy",), 0)]:
        result = CliRunner().invoke(main, ["convert", str(source), str(tmp_path / "h.npz"), "--dtype", "float16",
                                           *flags])
        assert result.exit_code == status, result.output
        assert result.output.count("overflow float16") == 20 and f"... and {len(params) - 20} more" in result.output
