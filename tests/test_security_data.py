"""Security: what reading a data set must never do.

Attacks reproduced here (every crafted file is made in ``tmp_path`` at run time):

* **A CIFAR pickle that allocates memory its file does not hold.** A few hundred bytes call
  ``numpy.ndarray(shape, dtype)`` directly (uninitialised memory: 949 MB from a 15.8 KB
  archive, stale heap contents coming out as labels), call numpy's ``_reconstruct`` with a huge
  shape, give an array a shape larger than the bytes behind it, or ask for an object array
  (numpy allocates and zeroes the whole shape before reading the list). Each is refused with
  one ``DataError`` line naming the member, before anything is allocated (most shapes used,
  2**40 elements, could not be allocated at all: a refusal naming them came first).
* **Labels from nowhere.** Labels built by such a call, a label far outside the class count
  (like the heap address 94846518834032 the issue saw) and a ragged label list are refused
  naming the member and the value (or the type) at fault.
* **A tar member or header larger than CIFAR can be.** A 1 MB ``.tar.gz`` whose member header
  declares 1 GiB (backed by real, highly compressible zeros) used to be read whole (2.1 GB
  RSS); a GNU long-name header declaring 1 GiB is read whole by :mod:`tarfile` itself while it
  parses the header. Both are refused from the declared size before any of it is read (checked
  in a subprocess's peak RSS). So are archives with thousands of entries (each kept in memory
  by :mod:`tarfile`), entry types no CIFAR archive holds (pax, sparse: :mod:`tarfile` reads
  their data ahead of the member), and an extracted file larger than any CIFAR member.
* **A decompression bomb in an image folder.** A 12000x12000 PNG of 18 KB used to decode to
  hundreds of MB with only Pillow's warning. Images over ``MAX_PIXELS`` (40 megapixels) are refused
  from the header, before decoding, as are images over Pillow's own bomb limits, each with one
  line naming the file and the limit.
* **A file that is not what its name says.** An image folder's ``.png`` holding another format
  (Pillow opens anything it knows, EPS through Ghostscript included) is refused; a truncated
  PNG gives one line naming the file.
"""

from __future__ import annotations

import io
import pickle
import re
import struct
import subprocess
import sys
import tarfile
import textwrap
import zlib

import numpy as np
import pytest
from test_data import write_cifar

from portres import data
from portres.data import DataError, cifar, folder

try:
    from PIL import Image
except ImportError:
    Image = None
needs_pillow = pytest.mark.skipif(Image is None, reason="Pillow not installed (portres[images])")

HUGE = 2**40  # elements: no machine allocates this, so a refusal that names it came before any allocation
GIB = 2**30


def load_error(root, name="cifar10", **options) -> str:
    """The one-line DataError that loading ``root`` raises."""
    with pytest.raises(DataError) as error:
        data.load(name, root, **options)
    message = str(error.value)
    assert "\n" not in message
    return message


# -- CIFAR pickles ------------------------------------------------------------------------------


class Reduces:
    """An object the test pickler writes as ``function(*args)`` then BUILD ``state``: how a crafted
    pickle calls the allowed numpy globals."""

    def __init__(self, function, args, state=None):
        self.reduced = (function, args) if state is None else (function, args, state)

    def __reduce__(self):
        return self.reduced


def reconstruct(shape, dtype, raw):
    """numpy's own pickled form of an array, with the state an attacker controls."""
    function = cifar.ALLOWED_GLOBALS[("numpy.core.multiarray", "_reconstruct")]
    return Reduces(function, (np.ndarray, (0,), b"b"), (1, shape, np.dtype(dtype), False, raw))


ATTACKS = {
    # the attack: numpy.ndarray(shape, dtype) allocates uninitialised memory of any size
    "ndarray called for the data": (
        {"data_batch_1": {b"data": Reduces(np.ndarray, ((HUGE, 3072), np.dtype("u1")))}},
        r"data_batch_1: refusing a call of numpy\.ndarray"),
    "ndarray called for the labels": (
        {"test_batch": {b"labels": Reduces(np.ndarray, ((5,), np.dtype("i8")))}},
        r"test_batch: refusing a call of numpy\.ndarray"),
    "_reconstruct with a huge shape": (
        {"data_batch_2": {b"data": Reduces(cifar.ALLOWED_GLOBALS[("numpy.core.multiarray", "_reconstruct")],
                                           (np.ndarray, (HUGE,), b"b"))}},
        rf"data_batch_2: refusing numpy _reconstruct\(ndarray, \({HUGE},\), b'b'\)"),
    "a shape larger than its bytes": (
        {"data_batch_3": {b"data": reconstruct((HUGE, 3072), "u1", b"\0" * 3072)}},
        rf"data_batch_3: an array of shape \({HUGE}, 3072\) and dtype uint8 needs {HUGE * 3072:,} bytes but the "
        r"file holds 3,072 for it"),
    "an object array": (  # numpy would allocate and zero 8 bytes per element before reading the list
        {"data_batch_4": {b"data": reconstruct((2**20,), "O", [0])}},
        r"data_batch_4: refusing numpy\.dtype\(b'O', 0, 1\): .*plain numbers"),
}


@pytest.mark.parametrize("attack", ATTACKS)
def test_cifar_arrays_are_only_built_from_their_own_bytes(tmp_path, attack):
    changes, message = ATTACKS[attack]
    write_cifar(tmp_path, "cifar10", "archive",
                tweak=lambda members: [members[name].update(change) for name, change in changes.items()])
    error = load_error(tmp_path)
    assert re.search(message, error) and "not an original CIFAR file" in error, error


@pytest.mark.parametrize("labels, message", [
    ([94846518834032, 0, 1, 2], r"data_batch_1: train_labels has labels outside \[0, 10\) \(e\.g\. 94846518834032, "
                                r"1 in all\)"),
    ([2**70, 0, 1, 2], r"data_batch_1: train_labels has labels outside \[0, 10\) \(e\.g\. 1180591620717411303424"),
    ([0, [1, 2], 3, 4], r"data_batch_1: b'labels' must be a list of 4 integer labels, got a list holding list"),
    ([0, 1.5, 3, 4], r"data_batch_1: b'labels' must be a list of 4 integer labels, got a list holding float"),
])
def test_cifar_labels_out_of_range_or_malformed_are_refused_naming_the_member(tmp_path, labels, message):
    write_cifar(tmp_path, "cifar10", "extracted", tweak=lambda members: members["data_batch_1"].update(
        {b"labels": labels}))
    error = load_error(tmp_path)
    assert re.search(message, error), error


def test_the_original_pickled_forms_still_load(tmp_path):
    # labels as an int64 array; as numpy itself pickles (Python 3): Fortran-order data, big-endian labels
    def tweak(members):
        members["data_batch_1"][b"labels"] = np.array(members["data_batch_1"][b"labels"], np.int64)
        members["data_batch_2"][b"data"] = np.asfortranarray(members["data_batch_2"][b"data"])
        members["data_batch_2"] = pickle.dumps(members["data_batch_2"], protocol=2)
        members["data_batch_3"][b"labels"] = np.array(members["data_batch_3"][b"labels"], ">i4")
        members["data_batch_3"] = pickle.dumps(members["data_batch_3"], protocol=2)
        originals.update(members)
    originals = {}
    write_cifar(tmp_path, "cifar10", "archive", tweak=tweak)
    ds = data.load("cifar10", tmp_path)
    np.testing.assert_array_equal(ds.train_labels[:4], originals["data_batch_1"][b"labels"])
    second, third = (pickle.loads(originals[name]) for name in ("data_batch_2", "data_batch_3"))
    np.testing.assert_array_equal(ds.train_images[4:8].reshape(4, -1), second[b"data"])
    np.testing.assert_array_equal(ds.train_labels[8:12], third[b"labels"])


# -- CIFAR archives -----------------------------------------------------------------------------


def gzip_with_zeros(head: bytes, zeros: int) -> bytes:
    """A gzip file of ``head`` then ``zeros`` zero bytes (a multiple of 1 MiB) in one deflate stream, as
    tarfile reads it: one full-flushed segment of 1 MiB of zeros repeated (a full flush makes each
    segment independent), so 1 GiB costs 1 MB and its CRC a fraction of a second, not a compression."""
    assert zeros % (1 << 20) == 0
    stream = zlib.compressobj(9, zlib.DEFLATED, -15)  # raw deflate: the gzip header and trailer are written here
    start = stream.compress(head) + stream.flush(zlib.Z_FULL_FLUSH)
    segment = stream.compress(bytes(1 << 20)) + stream.flush(zlib.Z_FULL_FLUSH)
    crc = zlib.crc32(head)
    for _ in range(zeros >> 20):
        crc = zlib.crc32(bytes(1 << 20), crc)
    trailer = struct.pack("<II", crc, (len(head) + zeros) & 0xFFFFFFFF)
    return b"\x1f\x8b\x08\0\0\0\0\0\0\xff" + start + segment * (zeros >> 20) + stream.flush() + trailer


def write_big_archive(path, kind: bytes, size: int) -> None:
    """A cifar-10-python.tar.gz whose first entry's header declares ``size`` bytes of type ``kind``,
    all of them present (zeros), then the end of the archive: about 1 KB per MiB declared."""
    info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
    info.size, info.type = size, kind
    header = info.tobuf(tarfile.GNU_FORMAT)
    assert len(header) == 512 and size % 512 == 0
    path.write_bytes(gzip_with_zeros(header, size + (1 << 20)))  # the end-of-archive blocks, and then some


def test_gzip_with_zeros_is_a_real_gzip_file():
    import gzip
    assert gzip.decompress(gzip_with_zeros(b"head", 3 << 20)) == b"head" + bytes(3 << 20)


@pytest.mark.parametrize("kind, message", [
    (tarfile.REGTYPE, r"member cifar-10-batches-py/data_batch_1 declares 1,073,741,824 bytes, more than the "
                      r"64,000,000 a CIFAR-10 data_batch_1 can hold"),
    (tarfile.GNUTYPE_LONGNAME, r"entry cifar-10-batches-py/data_batch_1 is a GNU long name header, which no "
                               r"CIFAR archive holds"),
])
def test_an_archive_member_declaring_1_gib_is_refused_before_reading(tmp_path, kind, message):
    write_big_archive(tmp_path / "cifar-10-python.tar.gz", kind, GIB)
    assert (tmp_path / "cifar-10-python.tar.gz").stat().st_size < 2 << 20
    # in a fresh process, so that its peak RSS says what this load allocated
    script = textwrap.dedent(f"""
        import resource, sys
        from portres import data
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            data.load("cifar10", {str(tmp_path)!r})
        except data.DataError as error:
            print(error)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)  # KiB -> MiB
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    error, grown = result.stdout.strip().splitlines()
    assert re.search(message, error), error
    assert int(grown) < 100, f"loading grew the peak RSS by {grown} MiB"


def write_archive(path, entries) -> None:
    with tarfile.open(path, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        for info, payload in entries:
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def test_archives_with_entries_no_cifar_archive_holds_are_refused(tmp_path):
    write_cifar(tmp_path, "cifar10", "archive")
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "r:gz") as tar:
        entries = [(info, tar.extractfile(info).read()) for info in tar.getmembers()]
    many = [(tarfile.TarInfo(f"cifar-10-batches-py/empty_{i}"), b"") for i in range(100)]
    write_archive(archive, many + entries)
    assert "holds more than 64 entries" in load_error(tmp_path)
    named = tarfile.TarInfo("cifar-10-batches-py/r\u00e9sum\u00e9.txt")  # a non-ASCII name needs a pax header
    write_archive(archive, [(named, b"x")] + entries)
    assert "is a pax header, which no CIFAR archive holds" in load_error(tmp_path)
    sparse = tarfile.TarInfo("cifar-10-batches-py/holes")
    sparse.type = tarfile.GNUTYPE_SPARSE
    write_archive(archive, [(sparse, b"")] + entries)
    assert "is a GNU sparse file, which no CIFAR archive holds" in load_error(tmp_path)
    unwanted = tarfile.TarInfo("cifar-10-batches-py/readme.html")
    write_archive(archive, [(unwanted, bytes(2 << 20))] + entries)
    assert "readme.html declares 2,097,152 bytes, more than the 1,048,576" in load_error(tmp_path)
    write_archive(archive, entries)  # the entries themselves are fine
    assert data.load("cifar10", tmp_path).num_classes == 10


def test_an_extracted_file_larger_than_a_cifar_member_is_refused_before_reading(tmp_path):
    write_cifar(tmp_path, "cifar100", "extracted")
    with open(tmp_path / "cifar-100-python" / "meta", "r+b") as file:
        file.truncate(3 << 20)  # sparse: no disk used
    message = load_error(tmp_path, "cifar100")
    assert "cifar-100-python/meta is 3,145,728 bytes, more than the 1,048,576 a CIFAR-100 meta can hold" in message
    with open(tmp_path / "cifar-100-python" / "train", "r+b") as file:
        file.truncate(400_000_000)
    message = load_error(tmp_path, "cifar100")
    assert "train is 400,000,000 bytes, more than the 320,000,000 a CIFAR-100 train can hold" in message


# -- image folders ------------------------------------------------------------------------------


def write_png(path, width: int, height: int) -> None:
    """A valid black 1-bit PNG of any size, a few KB per 100 megapixels: the zero rows stream through zlib."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    rows = bytes(1 + (width + 7) // 8) * 100  # each row: filter type 0, then width bits
    stream = zlib.compressobj(9)
    body = b"".join(stream.compress(rows) for _ in range(height // 100))
    body += stream.compress(rows[:(height % 100) * (len(rows) // 100)]) + stream.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def write_small_folder(root) -> None:
    for split in ("train", "test"):
        for name in ("cat", "dog"):
            (root / split / name).mkdir(parents=True)
            pixels = np.random.default_rng(len(name)).integers(0, 256, (4, 4, 3), np.uint8)
            Image.fromarray(pixels).save(root / split / name / "0.png")


@needs_pillow
def test_write_png_makes_a_real_image(tmp_path):
    write_png(tmp_path / "x.png", 21, 250)
    with Image.open(tmp_path / "x.png") as image:
        assert image.size == (21, 250) and image.mode == "1"
        assert not np.asarray(image.convert("L")).any()


@needs_pillow
@pytest.mark.parametrize("width, height, message", [
    # over MAX_PIXELS but under Pillow's warning (89 megapixels): only the project's check stops it
    (8000, 8000, r"big\.png is 8000x8000 = 64,000,000 pixels, more than the 40,000,000 a training image may have"),
    # the file: Pillow only warns (DecompressionBombWarning) and decodes 144 megapixels
    (12000, 12000, r"big\.png is 12000x12000 = 144,000,000 pixels, more than the 40,000,000"),
    # over twice Pillow's limit: Pillow itself raises DecompressionBombError from the header
    (20000, 20000, r"big\.png is too large to decode safely \(Image size \(400000000 pixels\) exceeds limit"),
])
def test_an_image_over_the_pixel_limit_is_refused_before_decoding(tmp_path, recwarn, width, height, message):
    write_small_folder(tmp_path)
    write_png(tmp_path / "train" / "dog" / "big.png", width, height)
    assert (tmp_path / "train" / "dog" / "big.png").stat().st_size < 200_000
    error = load_error(tmp_path, "folder")
    assert re.search(message, error), error
    assert "portres.data.folder.MAX_PIXELS" in error and "resize it or remove the file" in error
    assert not [w for w in recwarn if "DecompressionBomb" in type(w.message).__name__]


@needs_pillow
def test_the_pixel_limit_is_a_setting(tmp_path, monkeypatch):
    write_small_folder(tmp_path)
    write_png(tmp_path / "train" / "dog" / "wide.png", 300, 200)
    monkeypatch.setattr(folder, "MAX_PIXELS", 50_000)
    assert "wide.png is 300x200 = 60,000 pixels, more than the 50,000" in load_error(tmp_path, "folder")
    monkeypatch.setattr(folder, "MAX_PIXELS", 60_000)
    assert data.load("folder", tmp_path, image_size=4).train_images.shape == (3, 3, 4, 4)


@needs_pillow
def test_unreadable_images_and_other_formats_give_one_line_naming_the_file(tmp_path):
    write_small_folder(tmp_path)
    truncated = tmp_path / "test" / "cat" / "cut.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    assert f"cannot read image {truncated} (" in load_error(tmp_path, "folder")
    truncated.unlink()
    gif = tmp_path / "test" / "cat" / "really_a_gif.png"  # Pillow would open it (and an EPS through Ghostscript)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(gif, format="GIF")
    message = load_error(tmp_path, "folder")
    assert f"cannot read image {gif} (" in message and "only PNG and JPEG files are read" in message
