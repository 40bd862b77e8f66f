"""portres.data: the Dataset contract, CIFAR archives (a synthetic one in the exact format), digits,
image folders, augmentation, deterministic prefetched batches, and fitting a data set to a spec."""

import gc
import io
import pickle
import pickletools
import subprocess
import sys
import tarfile
import threading

import numpy as np
import pytest

import portres
from portres import data
from portres.data import DataError, Dataset, augment, batches, cifar
from portres.data import digits as digits_module

HAS_SKLEARN = digits_module.importlib.util.find_spec("sklearn") is not None
try:
    from PIL import Image
except ImportError:
    Image = None
needs_sklearn = pytest.mark.skipif(not HAS_SKLEARN, reason="scikit-learn not installed (portres[digits])")
needs_pillow = pytest.mark.skipif(Image is None, reason="Pillow not installed (portres[images])")


def toy(seed=0, count=(12, 5), shape=(3, 6, 6), classes=4, dtype=np.uint8, name="toy"):
    rng = np.random.default_rng(seed)
    make = (lambda n: rng.integers(0, 256, (n, *shape), dtype=np.uint8)) if dtype == np.uint8 else \
        (lambda n: rng.random((n, *shape), dtype=np.float32))
    return Dataset(name, make(count[0]), rng.integers(0, classes, count[0]), make(count[1]),
                   rng.integers(0, classes, count[1]), num_classes=classes,
                   class_names=tuple(f"c{i}" for i in range(classes)))


# -- Dataset ------------------------------------------------------------------------------------


def test_dataset_properties_and_read_only_arrays():
    ds = toy()
    assert (ds.in_channels, ds.image_size, ds.num_classes) == (3, (6, 6), 4)
    assert ds.train_labels.dtype == np.int64 and ds.mean.dtype == ds.std.dtype == np.float32
    assert repr(ds) == "Dataset(toy: 12 train / 5 test, 3x6x6 uint8, 4 classes)"
    with pytest.raises(ValueError, match="read-only"):
        ds.train_images[0, 0, 0, 0] = 1
    images, labels = ds.split("test")
    assert images is ds.test_images and labels is ds.test_labels


def test_channel_stats_histogram_matches_float64():
    images = np.random.default_rng(1).integers(0, 256, (40, 3, 9, 7), dtype=np.uint8)
    mean, std = data.channel_stats(images)
    scaled = images.astype(np.float64) / 255
    np.testing.assert_allclose(mean, scaled.mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(std, scaled.std(axis=(0, 2, 3)), rtol=1e-6)
    ds = toy(dtype=np.float32)  # float images are taken as they are
    np.testing.assert_allclose(ds.mean, ds.train_images.astype(np.float64).mean(axis=(0, 2, 3)), rtol=1e-6)


@pytest.mark.parametrize("change, message", [
    (dict(train_labels=np.array([0, 1, 4] + [0] * 9)), r"labels outside \[0, 4\) \(e\.g\. 4, 1 in all\).*renumber"),
    (dict(test_labels=np.array([0, -1, 0, 0, 0])), r"test_labels has labels outside \[0, 4\)"),
    (dict(train_labels=np.zeros(11, np.int64)), r"train_labels has shape \(11,\); expected \(12,\)"),
    (dict(train_labels=np.zeros(12, np.float32)), "must be integer class indices"),
    (dict(test_images=np.zeros((5, 1, 6, 6), np.uint8)), "both splits need the same channels"),
    (dict(train_images=np.zeros((12, 3, 6, 6), np.float64)), r"dtype float64; expected uint8 .* or float32"),
    (dict(train_images=np.zeros((0, 3, 6, 6), np.uint8), train_labels=np.zeros(0, np.int64)), "is empty"),
    (dict(train_images=np.zeros((12, 6, 6), np.uint8)), r"expected 4 axes \(N, C, H, W\)"),
    (dict(class_names=("a", "b")), "class_names must be 4 strings"),
    (dict(num_classes=0), "num_classes=0 must be an integer >= 1"),
    (dict(mean=np.zeros(2, np.float32), std=np.ones(2, np.float32)), "one value per channel"),
    (dict(mean=np.zeros(3, np.float32), std=np.zeros(3, np.float32)), "std must be finite and > 0"),
])
def test_dataset_rejects_bad_input(change, message):
    ds = toy()
    fields = dict(name=ds.name, train_images=ds.train_images, train_labels=ds.train_labels,
                  test_images=ds.test_images, test_labels=ds.test_labels, num_classes=ds.num_classes,
                  class_names=ds.class_names)
    fields.update(change)
    with pytest.raises(DataError, match=message):
        Dataset(**fields)


def test_float_images_must_lie_in_unit_range():
    ds = toy(dtype=np.float32)
    with pytest.raises(DataError, match=r"float32 train_images must lie in \[0, 1\] \(found .*\.\.254\.\d+\); divide"):
        Dataset("f", ds.train_images * 255, ds.train_labels, ds.test_images, ds.test_labels, 4, ds.class_names)


def test_normalize_uint8_and_float_agree_with_the_formula():
    images = np.random.default_rng(2).integers(0, 256, (4, 3, 5, 5), dtype=np.uint8)
    mean, std = np.array([0.1, 0.5, 0.9]), np.array([0.2, 0.3, 0.4])
    expected = (images / 255.0 - mean[:, None, None]) / std[:, None, None]
    for given in (images, (images / np.float32(255)).astype(np.float32)):
        out = data.normalize(given, mean, std)
        assert out.dtype == np.float32 and out.shape == images.shape
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(DataError, match="one mean and one std per channel"):
        data.normalize(images, [0.5], [0.5])


# -- augmentation -------------------------------------------------------------------------------


def pad_crop_flip_loop(images, rng, pad):
    """The paper's recipe image by image: the reference the vectorised version must equal."""
    count, _, height, width = images.shape
    rows, cols, flips = rng.integers(0, 2 * pad + 1, count), rng.integers(0, 2 * pad + 1, count), rng.random(count)
    out = np.empty_like(images)
    for i in range(count):
        canvas = np.zeros((images.shape[1], height + 2 * pad, width + 2 * pad), images.dtype)
        canvas[:, pad:pad + height, pad:pad + width] = images[i]
        crop = canvas[:, rows[i]:rows[i] + height, cols[i]:cols[i] + width]
        out[i] = crop[:, :, ::-1] if flips[i] < 0.5 else crop
    return out


@pytest.mark.parametrize("pad", [0, 1, 4])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_pad_crop_flip_equals_the_per_image_loop(pad, dtype):
    images = (np.random.default_rng(3).random((33, 3, 8, 6)) * 200).astype(dtype)
    out = augment.pad_crop_flip(images, np.random.default_rng(7), pad=pad)
    assert out.dtype == images.dtype and out.shape == images.shape
    np.testing.assert_array_equal(out, pad_crop_flip_loop(images, np.random.default_rng(7), pad))
    assert not np.shares_memory(out, images)


def test_pad_crop_flip_outputs_are_padded_crops_of_every_offset_and_flip():
    images = np.random.default_rng(4).random((300, 1, 6, 6)).astype(np.float32) + 1  # no zeros inside
    out = augment.pad_crop_flip(images, np.random.default_rng(0), pad=2)
    found = []
    for image, result in zip(images, out):  # which (row offset, column offset, flip) made each output?
        canvas = np.pad(image, ((0, 0), (2, 2), (2, 2)))
        found += [(dy, dx, f) for dy in range(5) for dx in range(5) for f in (0, 1)
                  if np.array_equal(result, canvas[:, dy:dy + 6, dx:dx + 6][..., ::-1 if f else 1])][:1]
    assert len(found) == 300  # every output is one padded crop, flipped or not
    assert {(dy, dx) for dy, dx, _ in found} == {(dy, dx) for dy in range(5) for dx in range(5)}
    assert 0.4 < np.mean([f for _, _, f in found]) < 0.6


def test_flip_equals_the_per_image_loop():
    images = np.random.default_rng(5).random((50, 2, 4, 5)).astype(np.float32)
    out = augment.flip(images, np.random.default_rng(9))
    flips = np.random.default_rng(9).random(50) < 0.5
    expected = np.stack([image[..., ::-1] if f else image for image, f in zip(images, flips)])
    np.testing.assert_array_equal(out, expected)
    assert 10 < flips.sum() < 40


def test_augmentation_rejects_a_single_image():
    with pytest.raises(ValueError, match=r"batch of shape \(N, C, H, W\)"):
        augment.pad_crop_flip(np.zeros((3, 32, 32)), np.random.default_rng(0))
    with pytest.raises(ValueError, match="pad=-1"):
        augment.pad_crop_flip(np.zeros((1, 3, 4, 4)), np.random.default_rng(0), pad=-1)


# -- batches ------------------------------------------------------------------------------------


def collect(iterator):
    with iterator:
        return [(x.copy(), y.copy()) for x, y in iterator]


def batch_args(ds, **overrides):
    args = dict(mean=ds.mean, std=ds.std, shuffle=True, seed=3, epoch=1, augment="pad_crop_flip")
    args.update(overrides)
    return args


def test_batches_follow_the_documented_pure_function():
    ds = toy(count=(23, 4))
    got = collect(batches(ds.train_images, ds.train_labels, 5, **batch_args(ds), prefetch=0))
    order = np.random.default_rng([3, 1]).permutation(23)
    assert [len(y) for _, y in got] == [5, 5, 5, 5, 3]
    for index, (x, y) in enumerate(got):
        chosen = order[index * 5:(index + 1) * 5]
        expected = augment.pad_crop_flip(data.normalize(ds.train_images[chosen], ds.mean, ds.std),
                                         np.random.default_rng([3, 1, index]))
        np.testing.assert_array_equal(x, expected)
        np.testing.assert_array_equal(y, ds.train_labels[chosen])
        assert x.dtype == np.float32 and y.dtype == np.int64 and x.flags.c_contiguous


def test_an_epoch_visits_every_example_once_and_epochs_differ():
    ds = toy(count=(23, 4))
    labels = np.arange(23) % 4
    index = np.arange(23)  # label = example index, to see which examples come out
    seen = [np.concatenate([y for _, y in collect(batches(ds.train_images, index, 4, **batch_args(ds, epoch=epoch)))])
            for epoch in (0, 1)]
    assert sorted(seen[0]) == list(range(23)) and not np.array_equal(seen[0], seen[1])
    unshuffled = collect(batches(ds.train_images, labels, 4, **batch_args(ds, shuffle=False, augment=None),
                                 drop_last=True))
    assert len(unshuffled) == 5 == data.num_batches(23, 4, drop_last=True)
    np.testing.assert_array_equal(np.concatenate([y for _, y in unshuffled]), labels[:20])


@pytest.mark.parametrize("drop_last", [False, True])
def test_prefetching_yields_exactly_what_the_synchronous_iterator_does(drop_last):
    ds = toy(count=(37, 4))
    args = dict(batch_args(ds), drop_last=drop_last)
    synchronous = collect(batches(ds.train_images, ds.train_labels, 8, **args, prefetch=0))
    for prefetch in (1, 2, 5):
        prefetched = collect(batches(ds.train_images, ds.train_labels, 8, **args, prefetch=prefetch))
        assert len(prefetched) == len(synchronous) == data.num_batches(37, 8, drop_last)
        for (x1, y1), (x2, y2) in zip(prefetched, synchronous):
            np.testing.assert_array_equal(x1, x2)
            np.testing.assert_array_equal(y1, y2)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_start_batch_equals_dropping_batches_without_making_them(prefetch):
    ds = toy(count=(30, 4))
    made = []

    def counting_flip(images, rng):
        made.append(len(images))
        return augment.flip(images, rng)

    full = collect(batches(ds.train_images, ds.train_labels, 4, **batch_args(ds, augment=counting_flip),
                           prefetch=prefetch))
    made.clear()
    resumed = batches(ds.train_images, ds.train_labels, 4, **batch_args(ds, augment=counting_flip), start_batch=5,
                      prefetch=prefetch)
    assert len(resumed) == len(full) - 5
    resumed = collect(resumed)
    assert len(made) == len(full) - 5  # the skipped batches were never made
    for (x1, y1), (x2, y2) in zip(resumed, full[5:], strict=True):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    assert collect(batches(ds.train_images, ds.train_labels, 4, **batch_args(ds), start_batch=len(full))) == []


def batch_threads():
    return [t for t in threading.enumerate() if t.name == "portres-batches"]


def test_closing_early_or_dropping_the_iterator_leaves_no_thread():
    ds = toy(count=(200, 4))
    before = len(batch_threads())
    iterator = batches(ds.train_images, ds.train_labels, 2, **batch_args(ds), prefetch=2)
    next(iterator)
    assert len(batch_threads()) == before + 1  # the worker is blocked on a full queue
    iterator.close()
    assert len(batch_threads()) == before
    with pytest.raises(StopIteration):
        next(iterator)

    iterator = batches(ds.train_images, ds.train_labels, 2, **batch_args(ds), prefetch=2)
    next(iterator)
    del iterator  # never closed: garbage collection stops the thread
    gc.collect()
    assert len(batch_threads()) == before

    for _ in batches(ds.train_images, ds.train_labels, 64, **batch_args(ds)):  # run to the end
        pass
    assert len(batch_threads()) == before


def test_an_error_on_the_worker_thread_reaches_the_consumer():
    ds = toy(count=(20, 4))
    calls = []

    def failing(images, rng):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("augmentation broke on the third batch")
        return images

    iterator = batches(ds.train_images, ds.train_labels, 4, **batch_args(ds, augment=failing), prefetch=2)
    assert len([next(iterator), next(iterator)]) == 2
    with pytest.raises(RuntimeError, match="augmentation broke on the third batch"):
        next(iterator)
    assert batch_threads() == []
    with pytest.raises(StopIteration):
        next(iterator)


@pytest.mark.parametrize("change, message", [
    (dict(batch_size=0), "batch_size=0 must be an integer >= 1"),
    (dict(start_batch=9), r"start_batch=9 is past the end of the epoch \(5 batches of 4\)"),
    (dict(augment="cutout"), "augment='cutout' is not known; use one of pad_crop_flip, flip"),
    (dict(mean=[0.5]), "one mean and one std per channel"),
    (dict(seed=-1), "seed=-1 must be an integer >= 0"),
    (dict(labels=np.arange(19)), r"images \(20, 3, 6, 6\) and labels \(19,\)"),
])
def test_bad_batch_arguments_fail_before_any_thread_starts(change, message):
    ds = toy(count=(20, 4))
    args = dict(images=ds.train_images, labels=ds.train_labels, batch_size=4, **batch_args(ds))
    args.update(change)
    with pytest.raises(DataError, match=message):
        batches(**args)
    assert batch_threads() == []


# -- CIFAR: a synthetic archive in the exact format ---------------------------------------------


class Python2Pickler(pickle._Pickler):
    """Writes what Python 2's cPickle wrote for the CIFAR files: bytes as py2 str (SHORT_BINSTRING /
    BINSTRING), numpy arrays through numpy.core.multiarray._reconstruct, ndarray and dtype with
    numpy 1's reduce arguments."""

    dispatch = pickle._Pickler.dispatch.copy()
    NAMES = {id(np.ndarray): b"numpy\nndarray\n", id(np.dtype): b"numpy\ndtype\n",
             id(cifar.ALLOWED_GLOBALS[("numpy.core.multiarray", "_reconstruct")]):
                 b"numpy.core.multiarray\n_reconstruct\n"}

    def save_py2_str(self, value):
        self.write(b"U" + bytes([len(value)]) + value if len(value) < 256
                   else b"T" + len(value).to_bytes(4, "little") + value)
        self.memoize(value)

    dispatch[bytes] = save_py2_str

    def save_global(self, obj, name=None):
        self.write(b"c" + self.NAMES[id(obj)])
        self.memoize(obj)

    def reducer_override(self, obj):
        reconstruct = cifar.ALLOWED_GLOBALS[("numpy.core.multiarray", "_reconstruct")]
        if type(obj) is np.ndarray:
            return reconstruct, (np.ndarray, (0,), b"b"), (1, obj.shape, obj.dtype, False, obj.tobytes())
        if isinstance(obj, np.dtype):
            return np.dtype, (obj.str[1:].encode(), 0, 1), (3, b"|", None, None, None, -1, -1, 0)
        return NotImplemented


def python2_pickle(value) -> bytes:
    buffer = io.BytesIO()
    Python2Pickler(buffer, protocol=2).dump(value)
    return buffer.getvalue()


def cifar_batch(rng, count, label_keys, classes, index):
    batch = {b"batch_label": f"training batch {index} of 5".encode(),
             b"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
             b"filenames": [f"img_{index}_{i}.png".encode() for i in range(count)]}
    for key, n in zip(label_keys, classes):
        batch[key] = [int(v) for v in rng.integers(0, n, count)]
    return batch


def write_cifar(root, variant="cifar10", form="archive", seed=0, count=4, tweak=None, dumps=python2_pickle):
    """A tiny CIFAR-10/100 in the official layout under ``root``: the .tar.gz or its extracted folder."""
    rng = np.random.default_rng(seed)
    if variant == "cifar10":
        layout, keys, classes = cifar.CIFAR10, (b"labels",), (10,)
        meta = {b"num_cases_per_batch": count, b"label_names": [f"class{i}".encode() for i in range(10)],
                b"num_vis": 3072}
    else:
        layout, keys, classes = cifar.CIFAR100, (b"fine_labels", b"coarse_labels"), (100, 20)
        meta = {b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
                b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]}
    members = {name: cifar_batch(rng, count, keys, classes, i + 1) for i, name in enumerate(layout.train)}
    members[layout.test] = cifar_batch(rng, count + 1, keys, classes, 0)
    members[layout.meta] = meta
    if tweak:
        tweak(members)
    payloads = {name: value if isinstance(value, bytes) else dumps(value) for name, value in members.items()}
    payloads["readme.html"] = b"<html>a member the loader ignores</html>"
    if form == "archive":
        with tarfile.open(root / layout.archive, "w:gz") as tar:
            for name, payload in payloads.items():
                info = tarfile.TarInfo(f"{layout.folder}/{name}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    else:
        (root / layout.folder).mkdir(parents=True)
        for name, payload in payloads.items():
            (root / layout.folder / name).write_bytes(payload)
    return members


def test_the_synthetic_pickles_use_only_python2_opcodes_and_numpy_globals():
    payload = python2_pickle(cifar_batch(np.random.default_rng(0), 3, (b"labels",), (10,), 1))
    opcodes = {op.name for op, _, _ in pickletools.genops(payload)}
    globals_ = {arg for op, arg, _ in pickletools.genops(payload) if op.name == "GLOBAL"}
    assert payload[:2] == b"\x80\x02"  # protocol 2
    assert globals_ == {"numpy.core.multiarray _reconstruct", "numpy ndarray", "numpy dtype"}
    assert {"SHORT_BINSTRING", "BINSTRING"} <= opcodes
    assert not opcodes & {"BINBYTES", "SHORT_BINBYTES", "BINUNICODE", "STACK_GLOBAL", "FRAME"}


@pytest.mark.parametrize("variant", ["cifar10", "cifar100"])
def test_cifar_loads_from_the_archive_and_the_extracted_folder_alike(tmp_path, variant):
    (tmp_path / "a").mkdir()
    members = write_cifar(tmp_path / "a", variant, "archive")
    write_cifar(tmp_path / "b", variant, "extracted")
    layout = cifar.CIFAR10 if variant == "cifar10" else cifar.CIFAR100
    label_key = b"labels" if variant == "cifar10" else b"fine_labels"
    sources = [tmp_path / "a", tmp_path / "a" / layout.archive, tmp_path / "b", tmp_path / "b" / layout.folder]
    loaded = [data.load(variant, source) for source in sources]
    train = [members[name] for name in layout.train]
    expected_train = np.concatenate([b[b"data"] for b in train]).reshape(-1, 3, 32, 32)
    for ds in loaded:
        assert ds.name == variant and ds.train_images.dtype == np.uint8 and ds.in_channels == 3
        np.testing.assert_array_equal(ds.train_images, expected_train)
        np.testing.assert_array_equal(ds.train_labels, np.concatenate([b[label_key] for b in train]))
        np.testing.assert_array_equal(ds.test_images, members[layout.test][b"data"].reshape(-1, 3, 32, 32))
        np.testing.assert_array_equal(ds.test_labels, members[layout.test][label_key])
        np.testing.assert_array_equal(ds.mean, loaded[0].mean)
    # the row layout is 1024 red, 1024 green, 1024 blue values, each 32x32 row-major
    first = train[0][b"data"][0]
    assert loaded[0].train_images[0, 1, 2, 5] == first[1024 + 2 * 32 + 5]
    assert loaded[0].num_classes == (10 if variant == "cifar10" else 100)
    assert loaded[0].class_names[:2] == (("class0", "class1") if variant == "cifar10" else ("fine0", "fine1"))


def test_cifar100_coarse_labels(tmp_path):
    members = write_cifar(tmp_path, "cifar100", "extracted")
    ds = data.load("cifar100", tmp_path, labels="coarse")
    assert ds.name == "cifar100-coarse" and ds.num_classes == 20 and ds.class_names[19] == "coarse19"
    np.testing.assert_array_equal(ds.test_labels, members["test"][b"coarse_labels"])
    with pytest.raises(DataError, match="labels='medium' must be 'fine'"):
        data.load("cifar100", tmp_path, labels="medium")


def test_files_re_saved_by_python3_load_too(tmp_path):
    members = write_cifar(tmp_path, "cifar10", "extracted", dumps=lambda v: pickle.dumps(v, protocol=2))
    ds = data.load("cifar10", tmp_path)
    np.testing.assert_array_equal(ds.test_labels, members["test_batch"][b"labels"])


def test_missing_cifar_says_what_to_place_where(tmp_path):
    with pytest.raises(DataError) as error:
        data.load("cifar10", tmp_path)
    message = str(error.value)
    assert f"place cifar-10-python.tar.gz (from {cifar.URL}) in {tmp_path.resolve()} or extract it there" in message
    assert "does not download" in message
    with pytest.raises(DataError, match=r"cifar100 not found \(.*nowhere does not exist\): place cifar-100-python"):
        data.load("cifar100", tmp_path / "nowhere")


def test_an_incomplete_extraction_or_archive_names_the_missing_member(tmp_path):
    (tmp_path / "x").mkdir()
    write_cifar(tmp_path / "x", form="extracted")
    (tmp_path / "x" / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(DataError, match=r"cifar-10-batches-py lacks data_batch_4 of cifar10; extract"):
        data.load("cifar10", tmp_path / "x")
    members = write_cifar(tmp_path / "x", form="archive", seed=1)  # with the archive beside it, it is read
    np.testing.assert_array_equal(data.load("cifar10", tmp_path / "x").test_labels, members["test_batch"][b"labels"])
    (tmp_path / "y").mkdir()
    write_cifar(tmp_path / "y", tweak=lambda members: members.pop("batches.meta"))
    with pytest.raises(DataError, match=r"lacks cifar-10-batches-py/batches.meta; it is not cifar-10-python.tar.gz"):
        data.load("cifar10", tmp_path / "y")
    (tmp_path / "z" / "cifar-10-python.tar.gz").parent.mkdir()
    (tmp_path / "z" / "cifar-10-python.tar.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError, match="is not a readable .tar.gz"):
        data.load("cifar10", tmp_path / "z")


class RunsCode:
    """What a malicious pickle does: call a function on load."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return subprocess.call, (["touch", str(self.marker)],)


def test_a_pickle_that_would_run_code_is_refused_by_name(tmp_path):
    marker = tmp_path / "ran"
    payload = pickle.dumps({b"data": RunsCode(marker)}, protocol=2, fix_imports=False)
    write_cifar(tmp_path, "cifar10", "archive", tweak=lambda members: members.update(data_batch_2=payload))
    with pytest.raises(DataError, match=r"data_batch_2: refusing to load subprocess.call: .* not an original CIFAR"):
        data.load("cifar10", tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize("tweak, message", [
    (lambda m: m["data_batch_1"].update({b"data": np.zeros((4, 100), np.uint8)}),
     r"data_batch_1: b'data' must be a uint8 array of shape \(N, 3072\), got uint8 \(4, 100\)"),
    (lambda m: m["test_batch"].pop(b"labels"), r"test_batch lacks the keys b'data' and b'labels'"),
    (lambda m: m["data_batch_3"].update({b"labels": [0, 1, 2, 10]}), r"train_labels has labels outside \[0, 10\)"),
    (lambda m: m.update(data_batch_5=b"\x80\x02}q\x01(U\x04data"), "data_batch_5 is not a readable CIFAR file"),
    (lambda m: m.update(test_batch=python2_pickle([1, 2])), "test_batch holds a list, not the dict"),
])
def test_corrupt_cifar_contents_are_named(tmp_path, tweak, message):
    write_cifar(tmp_path, "cifar10", "extracted", tweak=tweak)
    with pytest.raises(DataError, match=message):
        data.load("cifar10", tmp_path)


# -- digits -------------------------------------------------------------------------------------


@needs_sklearn
def test_digits_split_shape_and_scale():
    ds = data.load("digits")
    assert ds.describe() == "digits: 1,437 train / 360 test, 1x16x16 float32, 10 classes"
    assert ds.class_names == tuple("0123456789")
    values = np.unique(np.concatenate([ds.train_images.ravel(), ds.test_images.ravel()]))
    np.testing.assert_allclose(values, np.arange(17) / 16, rtol=1e-6)  # the 17 levels 0..16, scaled
    # stratified: every class gets its share of the 360 test images, to within one image
    counts = np.bincount(ds.train_labels, minlength=10) + np.bincount(ds.test_labels, minlength=10)
    share = counts * 360 / counts.sum()
    assert np.all(np.abs(np.bincount(ds.test_labels, minlength=10) - share) < 1)
    again = data.load_digits()
    np.testing.assert_array_equal(again.test_images, ds.test_images)
    np.testing.assert_array_equal(again.train_labels, ds.train_labels)


@needs_sklearn
def test_digits_equal_sklearn_load_digits_and_upsample_by_replication():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels, labels = digits_module.read_raw()
    np.testing.assert_array_equal(pixels, bunch.images)
    np.testing.assert_array_equal(labels, bunch.target)
    train, test = digits_module.stratified_split(labels, 360, digits_module.SPLIT_SEED)
    assert len(np.intersect1d(train, test)) == 0 and len(train) + len(test) == 1797
    for size in (8, 16, 32):
        ds = data.load("digits", image_size=size)
        factor = size // 8
        # averaging factor x factor blocks gives back the 8x8 originals exactly: nothing was invented
        blocks = ds.test_images[:, 0].reshape(360, 8, factor, 8, factor).mean(axis=(2, 4))
        np.testing.assert_allclose(blocks, bunch.images[test] / 16, rtol=1e-6)


def test_digits_image_size_and_missing_sklearn(monkeypatch):
    with pytest.raises(DataError, match="image_size=12 must be a multiple of 8"):
        data.load("digits", image_size=12)
    real_find_spec = digits_module.importlib.util.find_spec
    monkeypatch.setattr(digits_module.importlib.util, "find_spec",
                        lambda name, *a: None if name == "sklearn" else real_find_spec(name, *a))
    with pytest.raises(DataError, match=r"scikit-learn, which is not installed: pip install 'portres\[digits\]'"):
        data.load("digits")


def test_stratified_split_does_not_depend_on_anything_but_its_seed():
    labels = np.random.default_rng(0).integers(0, 3, 100)
    first = digits_module.stratified_split(labels, 20, seed=5)
    np.random.seed(1)  # global NumPy state must not matter
    second = digits_module.stratified_split(labels, 20, seed=5)
    np.testing.assert_array_equal(first[1], second[1])
    assert not np.array_equal(first[1], digits_module.stratified_split(labels, 20, seed=6)[1])


# -- image folders ------------------------------------------------------------------------------


def write_folder(root, classes=("cat", "dog"), splits=("train", "test"), size=(10, 7), per_class=3, seed=0):
    rng = np.random.default_rng(seed)
    written = {}
    for split in splits:
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                path = root / split / name / f"{i}.png"
                Image.fromarray(pixels).save(path)
                written[path] = pixels
    return written


@needs_pillow
def test_folder_loads_classes_labels_and_exact_pixels(tmp_path):
    written = write_folder(tmp_path)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("skipped")
    Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(tmp_path / "test" / "dog" / "big.JPG")
    ds = data.load("folder", tmp_path, image_size=8)
    assert ds.class_names == ("cat", "dog") and ds.name == f"folder:{tmp_path.name}"
    assert ds.train_images.shape == (6, 3, 8, 8) and ds.test_images.shape == (7, 3, 8, 8)
    np.testing.assert_array_equal(ds.train_labels, [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(ds.test_labels, [0, 0, 0, 1, 1, 1, 1])
    (tmp_path / "test" / "dog" / "big.JPG").unlink()
    native = data.load("folder", tmp_path, image_size=None)  # PNG is lossless: the pixels come back as written
    dog = written[tmp_path / "train" / "dog" / "1.png"]
    np.testing.assert_array_equal(native.train_images[4], dog.transpose(2, 0, 1))
    gray = data.load("folder", tmp_path, image_size=4, color="grayscale")
    assert gray.in_channels == 1 and gray.image_size == (4, 4)


@needs_pillow
def test_folder_accepts_val_instead_of_test(tmp_path):
    write_folder(tmp_path, splits=("train", "val"))
    assert len(data.load("folder", tmp_path).test_labels) == 6


@needs_pillow
@pytest.mark.parametrize("arrange, message", [
    (lambda root: write_folder(root, splits=("train",)), r"has no test/ \(or val/\)"),
    (lambda root: (root / "train").mkdir() or (root / "test").mkdir(), "train has no class folders"),
    (lambda root: write_folder(root) and (root / "train" / "bird").mkdir(), r"class folder .*bird has no images"),
    (lambda root: write_folder(root) and write_folder(root / "x", classes=("bird",), splits=("test",))
     and (root / "x" / "test" / "bird").rename(root / "test" / "bird"), "only in test/: bird"),
    (lambda root: write_folder(root) and (root / "test" / "cat" / "9.png").write_bytes(b"garbage"),
     r"cannot read image .*test/cat/9.png \(UnidentifiedImageError"),
])
def test_folder_problems_are_named(tmp_path, arrange, message):
    arrange(tmp_path)
    with pytest.raises(DataError, match=message):
        data.load("folder", tmp_path)


@needs_pillow
def test_folder_of_mixed_sizes_needs_image_size(tmp_path):
    write_folder(tmp_path)
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(tmp_path / "train" / "dog" / "small.png")
    with pytest.raises(DataError, match="images differ in size .* is 5x5.*pass image_size"):
        data.load("folder", tmp_path, image_size=None)
    assert data.load("folder", tmp_path, image_size=6).image_size == (6, 6)


def test_folder_needs_a_directory_and_pillow(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="needs a directory: --data-dir DIR"):
        data.load("folder")
    with pytest.raises(DataError, match="does not exist"):
        data.load("folder", tmp_path / "missing")
    monkeypatch.setitem(sys.modules, "PIL", None)  # a None entry makes the import fail
    with pytest.raises(DataError, match=r"needs Pillow, which is not installed: pip install 'portres\[images\]'"):
        data.load("folder", tmp_path)


# -- registry, fitting a spec, hygiene ----------------------------------------------------------


def test_registry_names_options_and_errors():
    assert data.names() == ("cifar10", "cifar100", "digits", "folder")
    assert data.options("cifar100") == {"labels": "fine"}
    assert data.options("digits") == {"image_size": 16}
    assert data.options("folder") == {"image_size": 32, "color": "rgb"}
    with pytest.raises(DataError, match="unknown data set 'mnist'; known: cifar10, cifar100, digits, folder"):
        data.load("mnist")
    with pytest.raises(DataError, match="data set cifar10 does not take labels; it takes no options"):
        data.load("cifar10", labels="coarse")
    with pytest.raises(ValueError, match="already registered"):
        data.register("digits", data.load_digits)


def test_check_fits_names_the_mismatch_and_the_fix():
    cifar_like = toy(shape=(3, 32, 32), classes=10, name="cifar10")
    with pytest.raises(DataError) as error:
        data.check_fits(cifar_like, portres.get("resnet50"))
    assert str(error.value) == (
        "data set cifar10 has 3-channel 32x32 images in 10 classes but the spec resnet50 expects num_classes=1000: "
        "write the spec with `portres spec resnet50 > net.json`, set \"num_classes\": 10 and pass --spec net.json")
    gray = toy(shape=(1, 16, 16), classes=5, name="gray")
    with pytest.raises(DataError, match=r"expects in_channels=3 / num_classes=10: .*set \"in_channels\": 1 and "
                                        r"\"num_classes\": 5"):
        data.check_fits(gray, portres.get("resnet20"))
    fitted = data.fit_spec(portres.get("resnet20"), gray)
    assert (fitted.in_channels, fitted.num_classes, fitted.stages) == (1, 5, portres.get("resnet20").stages)
    data.check_fits(gray, fitted)
    data.check_fits(gray, portres.make_plan(fitted))  # a plan works too
    small = toy(shape=(3, 16, 16), classes=1000, name="small")
    with pytest.raises(DataError, match=r"data set small has 3-channel 16x16 images in 1000 classes: input 16x16 "
                                        r"is too small for resnet50: .* at least 32 pixels; use larger images"):
        data.check_fits(small, portres.get("resnet50"))


def test_importing_portres_data_loads_no_framework_sklearn_or_pillow():
    code = ("import sys, portres.data\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('mlx', 'tinygrad', 'torch', 'sklearn', 'PIL', 'scipy')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@needs_sklearn
def test_docstring_examples_run():
    import doctest
    import importlib

    for name in ("", ".augment", ".batches", ".cifar", ".dataset", ".digits", ".folder", ".streaming"):
        module = importlib.import_module(f"portres.data{name}")  # portres.data.batches is also the function
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0, module.__name__
