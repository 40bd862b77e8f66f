"""Image folders the ImageNet way (portres.data.streaming, `portres eval --data imagenet`): the layouts,
the preset's resize + centre crop, torchvision's random-resized-crop sampling, streaming with bounded
memory, top-1/top-5 counting, and one-line errors for bad folders. Tiny synthetic folders are written
at run time with Pillow (3 classes x 4 JPEGs of about 40x50 pixels)."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import threading
import time

import numpy as np
import pytest
from click.testing import CliRunner

import portres
from portres.cli import main
from portres.data import DataError, augment
from portres.data.streaming import (
    ImageFolder,
    check_labels_fit,
    evaluate_stream,
    scan_image_folder,
    stream_batches,
    top_k_hits,
)
from portres.spec import StageSpec, StemSpec
from portres.weights import init_params, save_weights

Image = pytest.importorskip("PIL.Image", reason="Pillow not installed (portres[images])")
from PIL import ImageDraw  # noqa: E402 (after the skip)

from portres import images  # noqa: E402

WNIDS = ("n01440764", "n01443537", "n01484850")  # the first three ImageNet-1k classes, in index order
COLORS = ((220, 40, 30), (30, 190, 60), (40, 60, 220))


def write_image(path, index: int, color) -> None:
    """A 40x50-ish image (sizes vary, so the resize and crop arithmetic matters) with a coloured shape."""
    size = (40 + 3 * index, 50 - 2 * index)
    image = Image.new("RGB", size, (15 * index, 30, 90 - 10 * index))
    draw = ImageDraw.Draw(image)
    draw.ellipse((4 + index, 6, 30, 36 + index), fill=color)
    draw.rectangle((0, 40 - index, 12, 47 - index), fill=tuple(255 - c for c in color))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, "JPEG", quality=90)


def write_val(root, per_class: int = 4):
    """``root/val/<wnid>/<i>.JPEG``, the classes made in reverse order (the index is the sorted name)."""
    for wnid, color in reversed(list(zip(WNIDS, COLORS))):
        for index in range(per_class):
            write_image(root / "val" / wnid / f"ILSVRC2012_val_{index:08d}.JPEG", index, color)
    return root


def expected_paths(root, per_class: int = 4):
    return [root / "val" / wnid / f"ILSVRC2012_val_{index:08d}.JPEG" for wnid in WNIDS for index in range(per_class)]


def tiny_spec(num_classes: int = 10):
    """An ImageNet-stem network small enough for NumPy at 224x224 (the preset preprocessing applies)."""
    return dataclasses.replace(portres.get("resnet18"), name="tiny", stem=StemSpec(width=4),
                               stages=(StageSpec(1, 4, 1), StageSpec(1, 8, 2)), block="basic",
                               num_classes=num_classes)


def write_network(tmp_path, seed: int = 3):
    spec = tiny_spec()
    spec_file, weights = tmp_path / "tiny.json", tmp_path / "tiny.safetensors"
    spec_file.write_text(spec.to_json())
    save_weights(weights, init_params(spec, seed=seed, randomize_batch_norm=True))
    return spec, spec_file, weights


def write_classifier(tmp_path, paths, labels):
    """The tiny network with a classifier that ranks the images' labels at ranks 0 to 7: a nearest-class-mean
    head over its pooled features for classes 0-2, and the other 7 classes constant logits placed between the
    labels' own logits (so that top-1 and top-5 counts depend on every image's preprocessing and label)."""
    spec, spec_file, weights = write_network(tmp_path)
    params = init_params(spec, seed=3, randomize_batch_norm=True)
    channels = params["fc.weight"].shape[1]
    params["fc.weight"] = np.eye(10, channels, dtype=np.float32)  # logits[:, :channels] = pooled features
    params["fc.bias"] = np.zeros(10, np.float32)
    save_weights(weights, params)
    features = direct_logits(spec, weights, paths, len(paths))[:, :channels]
    labels = np.asarray(labels)
    means = np.stack([features[labels == k].mean(0) for k in range(3)])
    label_logits = np.sort((features * means[labels]).sum(1) - (means[labels] ** 2).sum(1) / 2)
    between = [(label_logits[k] + label_logits[k + 1]) / 2 for k in (0, 1, 3, 5, 7, 9, 10)]
    params["fc.weight"] = np.concatenate([means, np.zeros((7, channels))]).astype(np.float32)
    params["fc.bias"] = np.concatenate([-(means ** 2).sum(1) / 2, between]).astype(np.float32)
    save_weights(weights, params)
    return spec, spec_file, weights


def invoke(*args):
    result = CliRunner().invoke(main, [str(arg) for arg in args])
    return result, result.output.strip().splitlines()


def direct_logits(spec, weights, paths, batch_size):
    """The numpy backend on the preset's preprocessing of ``paths`` (portres.images.preprocess)."""
    model = portres.build(spec, "numpy", str(weights))
    x = images.preprocess(paths, spec)
    return np.concatenate([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def hits(logits, labels, k):
    """Top-k hits written out per image: the label's rank among the classes (ties in its favour)."""
    return sum(int(sum(score > row[label] for score in row) < k) for row, label in zip(logits, labels))


# -- layouts --------------------------------------------------------------------------------------


def test_class_folders_are_indexed_in_sorted_order_and_val_is_found(tmp_path):
    write_val(tmp_path)
    (tmp_path / "val" / WNIDS[0] / "notes.txt").write_text("not an image")
    (tmp_path / "val" / WNIDS[0] / ".hidden.JPEG").write_bytes(b"skipped")
    (tmp_path / "val" / ".cache").mkdir()
    for directory in (tmp_path, tmp_path / "val"):  # the ImageNet root or its val folder
        folder = scan_image_folder(directory)
        assert folder.class_names == WNIDS
        assert list(folder.paths) == expected_paths(tmp_path)
        assert folder.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
        assert not folder.labels.flags.writeable
        assert folder.describe() == f"{tmp_path / 'val'}: 12 images, 3 classes"


def test_a_flat_folder_reads_its_labels_file(tmp_path):
    write_val(tmp_path)
    flat = tmp_path / "flat"
    flat.mkdir()
    lines = ["# filename label"]
    for path, label in zip(expected_paths(tmp_path), [2, 0, 7, 1] * 3):
        name = f"{path.parent.name}_{path.name}"
        (flat / name).write_bytes(path.read_bytes())
        lines.append(f"{name} {label}")
    (tmp_path / "labels.txt").write_text("\n".join(lines[::-1]) + "\n\n")  # any order; blank lines and # skipped
    folder = scan_image_folder(flat, labels_file=tmp_path / "labels.txt")
    assert folder.class_names is None and folder.num_classes == 8
    assert [(p.name, int(y)) for p, y in zip(folder.paths, folder.labels)] == \
        [(line.split()[0], int(line.split()[1])) for line in lines[:0:-1]]


# -- the preset's preprocessing, streamed ---------------------------------------------------------


@pytest.mark.parametrize("preset", ["resnet50", "resnet50d", "keras_resnet50", "resnet20"])
def test_evaluation_batches_equal_preprocess_for_the_preset(tmp_path, preset):
    write_val(tmp_path)
    folder = scan_image_folder(tmp_path)
    config = portres.data_config(preset)
    with stream_batches(folder, 5, config) as batches:
        parts = list(batches)
    assert [len(y) for _, y in parts] == [5, 5, 2]
    x = np.concatenate([x for x, _ in parts])
    assert x.dtype == np.float32 and x.shape == (12, 3, config.input_size, config.input_size)
    np.testing.assert_array_equal(x, images.preprocess(list(folder.paths), preset))
    assert np.concatenate([y for _, y in parts]).tolist() == folder.labels.tolist()


def test_evaluation_is_resize_and_centre_crop_not_a_squash(tmp_path):
    path = tmp_path / "val" / "a" / "wide.png"
    path.parent.mkdir(parents=True)
    pixels = np.zeros((30, 90, 3), np.uint8)
    pixels[:, :30] = 255  # a white left third: a centre crop of the 30x30 middle sees none of it
    Image.fromarray(pixels).save(path)
    config = dataclasses.replace(portres.data_config("resnet50"), input_size=30, resize_size=30)
    with stream_batches(scan_image_folder(tmp_path), 1, config) as batches:
        [(x, _)] = list(batches)
    np.testing.assert_array_equal(x[0], images.to_array(np.zeros((30, 30, 3), np.uint8), config))


# -- random-resized-crop --------------------------------------------------------------------------


def torchvision_get_params(width, height, tries, offsets, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision.transforms.RandomResizedCrop.get_params transcribed line by line, its torch.rand
    draws replaced by the given uniforms: (left, top, width, height)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for u_scale, u_ratio in tries:
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u_scale)
        aspect_ratio = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u_ratio)
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = int(offsets[0] * (height - h + 1))
            j = int(offsets[1] * (width - w + 1))
            return j, i, w, h
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w = width
        h = height
    return (width - w) // 2, (height - h) // 2, w, h


def test_random_resized_crop_samples_as_torchvision_does():
    rng = np.random.default_rng(0)
    widths = np.concatenate([rng.integers(1, 600, 300), [1, 2, 500, 4000, 3, 375]])
    heights = np.concatenate([rng.integers(1, 600, 300), [1, 900, 3, 10, 4000, 500]])
    tries, offsets = augment.resized_crop_draws(np.random.default_rng(1), len(widths))
    tries[:20, :, 0] = 1.0  # whole-image area with extreme ratios: often no try fits, the fallback is used
    tries[:20, :, 1] = np.tile([0.0, 1.0], 5)
    boxes = augment.resized_crop_boxes(widths, heights, tries, offsets)
    expected = [torchvision_get_params(int(w), int(h), t, o) for w, h, t, o in zip(widths, heights, tries, offsets)]
    assert boxes.tolist() == [list(box) for box in expected]
    assert sum(augment.resized_crop_boxes(widths[:20], heights[:20], tries[:20], offsets[:20])[:, 2] == widths[:20]) > 0


def test_random_resized_crops_lie_within_the_image_with_ratios_in_range():
    rng = np.random.default_rng(5)
    widths = rng.integers(200, 800, 2000)
    heights = (widths * rng.uniform(0.6, 1.6, 2000)).astype(np.int64)  # photos: some fallbacks, mostly fits
    left, top, w, h = augment.random_resized_crop_boxes(widths, heights, rng).T
    assert (left >= 0).all() and (top >= 0).all() and (w >= 1).all() and (h >= 1).all()
    assert (left + w <= widths).all() and (top + h <= heights).all()
    # rounding each side to whole pixels moves the ratio and the area by at most half a pixel per side
    assert ((w + 0.5) / (h - 0.5) >= 3 / 4).all() and ((w - 0.5) / (h + 0.5) <= 4 / 3).all()
    share = w * h / (widths * heights)
    assert ((w + 0.5) * (h + 0.5) / (widths * heights) >= 0.08).all() and share.max() <= 1
    assert share.min() < 0.09 and share.max() > 0.95 and 0.3 < np.median(share) < 0.6  # uniform in (0.08, 1)
    assert len(set(zip(left.tolist(), top.tolist()))) > 1900  # the offsets vary


def train_batches(folder, config, **options):
    with stream_batches(folder, 5, config, train=True, **options) as batches:
        return list(batches)


def test_training_batches_are_a_pure_function_of_seed_epoch_and_batch(tmp_path):
    write_val(tmp_path)
    folder = scan_image_folder(tmp_path, split="val")
    config = dataclasses.replace(portres.data_config("resnet50"), input_size=24)
    first = train_batches(folder, config, seed=7, epoch=0)
    again = train_batches(folder, config, seed=7, epoch=0, prefetch=0, threads=1)
    for (x, y), (x2, y2) in zip(first, again, strict=True):
        np.testing.assert_array_equal(x, x2)
        np.testing.assert_array_equal(y, y2)
    resumed = train_batches(folder, config, seed=7, epoch=0, start_batch=1)
    for (x, y), (x2, y2) in zip(first[1:], resumed, strict=True):
        np.testing.assert_array_equal(x, x2)
        np.testing.assert_array_equal(y, y2)
    other_epoch = train_batches(folder, config, seed=7, epoch=1)
    assert not np.array_equal(first[0][0], other_epoch[0][0])
    assert not np.array_equal(first[0][0], train_batches(folder, config, seed=8, epoch=0)[0][0])
    # batch b is made as the docstring says: the epoch order, then crops, flips from default_rng([seed, epoch, b])
    order = np.random.default_rng([7, 0]).permutation(12)
    for batch, (x, y) in enumerate(first):
        chosen = order[batch * 5:(batch + 1) * 5]
        rng = np.random.default_rng([7, 0, batch])
        tries, offsets = augment.resized_crop_draws(rng, len(chosen))
        flips = rng.random(len(chosen)) < 0.5
        for row, index in enumerate(chosen):
            image = images.open_image(folder.paths[index])
            [[left, top, w, h]] = augment.resized_crop_boxes([image.width], [image.height], tries[row:row + 1],
                                                            offsets[row:row + 1])
            crop = image.crop((left, top, left + w, top + h)).resize((24, 24), Image.Resampling.BILINEAR)
            if flips[row]:
                crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            np.testing.assert_array_equal(x[row], images.to_array(crop, config))
        assert y.tolist() == folder.labels[chosen].tolist()


# -- streaming ------------------------------------------------------------------------------------


class CountingReader:
    """Counts the images read, and how many batches of them exist at once (the loader's memory)."""

    def __init__(self):
        self.read = 0
        self.lock = threading.Lock()

    def __call__(self, path):
        with self.lock:
            self.read += 1
        return images.open_image(path)


def test_the_loader_reads_a_batch_at_a_time_and_holds_a_bounded_number(tmp_path):
    write_val(tmp_path, per_class=8)  # 24 images, 12 batches of 2
    folder = scan_image_folder(tmp_path)
    config = dataclasses.replace(portres.data_config("resnet50"), input_size=16, resize_size=18)
    reader = CountingReader()
    with stream_batches(folder, 2, config, read=reader, prefetch=0) as batches:
        assert reader.read == 0  # nothing is read before it is asked for
        for taken, _ in enumerate(batches, 1):
            assert reader.read == 2 * taken  # synchronous: exactly the batches handed out
    prefetch = 2
    reader = CountingReader()
    with stream_batches(folder, 2, config, read=reader, prefetch=prefetch) as batches:
        for taken, _ in enumerate(batches, 1):
            # let the producer run ahead as far as it can (it stops by itself when the queue is full)
            deadline = time.monotonic() + 1.0
            while reader.read < min(24, 2 * (taken + prefetch + 1)) and time.monotonic() < deadline:
                time.sleep(0.01)
            # the batch handed out, `prefetch` queued, one made and waiting to be queued
            assert reader.read <= 2 * (taken + prefetch + 1), (taken, reader.read)
    assert reader.read == 24


# -- counting -------------------------------------------------------------------------------------


def test_top_k_hits_count_ranks_with_ties_in_the_labels_favour():
    logits = np.array([[5.0, 1, 2, 3, 4, 0, -1],   # label 0 ranks first
                       [5.0, 1, 2, 3, 4, 0, -1],   # label 4 ranks second
                       [5.0, 1, 2, 3, 4, 0, -1],   # label 1 ranks fifth
                       [5.0, 1, 2, 3, 4, 0, -1],   # label 5 ranks sixth
                       [2.0, 2, 2, 2, 2, 2, 2]])  # all tied: a hit for every k
    labels = np.array([0, 4, 1, 5, 3])
    assert [top_k_hits(logits, labels, k) for k in (1, 2, 5, 6)] == [2, 3, 4, 5]
    assert [hits(logits, labels, k) for k in (1, 2, 5, 6)] == [2, 3, 4, 5]
    done = []
    result = evaluate_stream(lambda x: x, [(logits[:3], labels[:3]), (logits[3:], labels[3:])], progress=done.append)
    assert result == {"images": 5, "top1_hits": 2, "top5_hits": 4, "top1_accuracy": 0.4, "top5_accuracy": 0.8}
    assert done == [3, 5]


def test_eval_counts_equal_a_direct_numpy_computation(tmp_path):
    write_val(tmp_path)
    labels = [0] * 4 + [1] * 4 + [2] * 4
    spec, spec_file, weights = write_classifier(tmp_path, expected_paths(tmp_path), labels)
    result, lines = invoke("eval", "--data", "imagenet", "--data-dir", tmp_path, "--spec", spec_file, "--weights",
                           weights, "--backend", "numpy", "--batch-size", 5, "--json")
    assert result.exit_code == 0, result.output
    reported = json.loads(result.stdout)
    logits = direct_logits(spec, weights, expected_paths(tmp_path), 5)
    expected = (hits(logits, labels, 1), hits(logits, labels, 5))
    assert 0 < expected[0] < expected[1] < 12  # the counts tell right from wrong labels and preprocessing
    assert (reported["images"], reported["top1_hits"], reported["top5_hits"]) == (12, *expected)
    assert reported["top1_accuracy"] == reported["top1_hits"] / 12
    assert "note:" in result.output and "3 class folders" in result.output  # 3 folders, 10 classes: said
    text, _ = invoke("eval", "--data", "imagenet", "--data-dir", tmp_path / "val", "--spec", spec_file, "--weights",
                     weights, "--backend", "numpy")
    assert text.exit_code == 0, text.output
    assert f"top-1 {reported['top1_hits']}/12" in text.stdout and f"top-5 {reported['top5_hits']}/12" in text.stdout
    assert "eval [" in text.output  # the progress bar, on stderr


def test_eval_of_a_flat_folder_counts_the_labels_ranks(tmp_path):
    """Labels chosen from the network's own ranking (ranks 0, 1, 2, 4, 5, 7 twice over): exactly 2 top-1
    and 8 top-5 hits, unless the command prepares or counts the images differently."""
    write_val(tmp_path)
    spec, spec_file, weights = write_network(tmp_path)
    paths = expected_paths(tmp_path)
    logits = direct_logits(spec, weights, paths, 4)
    ranks = [0, 1, 2, 4, 5, 7] * 2
    labels = [int(np.argsort(-row, kind="stable")[rank]) for row, rank in zip(logits, ranks)]
    assert (hits(logits, labels, 1), hits(logits, labels, 5)) == (2, 8)  # no ties among these logits
    flat = tmp_path / "flat"
    flat.mkdir()
    for path in paths:
        (flat / f"{path.parent.name}_{path.name}").write_bytes(path.read_bytes())
    (tmp_path / "labels.txt").write_text("".join(f"{path.parent.name}_{path.name} {label}\n"
                                                 for path, label in zip(paths, labels)))
    result, _ = invoke("eval", "--data", "imagenet", "--data-dir", flat, "--labels", tmp_path / "labels.txt", "--spec",
                       spec_file, "--weights", weights, "--backend", "numpy", "--batch-size", 4, "--json")
    assert result.exit_code == 0, result.output
    reported = json.loads(result.stdout)
    assert (reported["images"], reported["top1_hits"], reported["top5_hits"]) == (12, 2, 8)


# -- bad input ------------------------------------------------------------------------------------


def loose_images(root):
    write_image(root / "a.JPEG", 0, COLORS[0])
    write_image(root / "b.JPEG", 1, COLORS[1])


def flat_with_labels(root, text):
    (root / "flat").mkdir()
    write_image(root / "flat" / "a.JPEG", 0, COLORS[0])
    write_image(root / "flat" / "b.JPEG", 1, COLORS[1])
    (root / "labels.txt").write_text(text)
    return root / "flat", root / "labels.txt"


@pytest.mark.parametrize("arrange, message", [
    (lambda root: None, r"is empty; it needs DIR/val/<class>/\*.JPEG"),
    (lambda root: (root / "val").mkdir(), "val is empty"),
    (loose_images, "holds 2 images but no class folders: put each class's images in"),
    (lambda root: (root / "readme.txt").write_text("x"), "has no class folders and no images"),
    (lambda root: write_val(root) and (root / "val" / "n09999999").mkdir(),
     r"class folder .*n09999999 has no images"),
], ids=["empty", "empty-val", "no-class-folders", "no-images", "empty-class"])
def test_bad_folders_are_refused_in_one_line(tmp_path, arrange, message):
    arrange(tmp_path)
    with pytest.raises(DataError, match=message):
        scan_image_folder(tmp_path)
    result, lines = invoke("eval", "--data", "imagenet", "--data-dir", tmp_path, "--arch", "resnet18", "--weights",
                           tmp_path / "none.safetensors")
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("portres: error:"), result.output


@pytest.mark.parametrize("text, message", [
    ("a.JPEG 0\n", r"b.JPEG is not in labels file .*labels.txt \(1 images of"),
    ("a.JPEG 0\nb.JPEG 1\nc.JPEG 2\n", r"line 3 names c.JPEG, which is not an image in"),
    ("a.JPEG 0\nb.JPEG n01440764\n", r"line 2 reads 'b.JPEG n01440764'; expected one `filename label` per line"),
    ("a.JPEG 0 extra\nb.JPEG 1\n", "line 1 reads 'a.JPEG 0 extra'"),
    ("a.JPEG 0\nb.JPEG 1\na.JPEG 1\n", r"lists a.JPEG twice \(lines 1 and 3\)"),
    ("# nothing\n\n", "lists no images"),
], ids=["unlisted", "missing", "wnid", "fields", "twice", "none"])
def test_a_labels_file_that_does_not_match_is_named(tmp_path, text, message):
    flat, labels = flat_with_labels(tmp_path, text)
    with pytest.raises(DataError, match=message):
        scan_image_folder(flat, labels_file=labels)
    result, lines = invoke("eval", "--data", "imagenet", "--data-dir", flat, "--labels", labels, "--arch", "resnet18",
                           "--weights", tmp_path / "none.safetensors")
    assert result.exit_code == 2 and len(lines) == 1 and "labels.txt" in lines[0], result.output


def test_labels_beyond_the_networks_classes_are_refused(tmp_path):
    flat, labels = flat_with_labels(tmp_path, "a.JPEG 0\nb.JPEG 12\n")
    folder = scan_image_folder(flat, labels_file=labels)
    check_labels_fit(folder, 13)
    with pytest.raises(DataError, match="has labels up to 12 but tiny has 10 classes"):
        check_labels_fit(folder, 10, "tiny")
    _, spec_file, weights = write_network(tmp_path)
    result, lines = invoke("eval", "--data", "imagenet", "--data-dir", flat, "--labels", labels, "--spec", spec_file,
                           "--weights", weights, "--backend", "numpy")
    assert result.exit_code == 2 and len(lines) == 1 and "labels up to 12" in lines[0], result.output
    write_val(tmp_path / "many")
    folder = scan_image_folder(tmp_path / "many")
    with pytest.raises(DataError, match="has 3 class folders but tiny has 2 classes"):
        check_labels_fit(folder, 2, "tiny")


def test_an_unreadable_image_is_named(tmp_path):
    write_val(tmp_path)
    bad = tmp_path / "val" / WNIDS[1] / "ILSVRC2012_val_00000002.JPEG"
    bad.write_bytes(b"\xff\xd8 not really a JPEG")
    config = portres.data_config("resnet50")
    for train in (False, True):
        with pytest.raises(ValueError, match=re.escape(f"{bad}: not an image format Pillow can read")):
            with stream_batches(scan_image_folder(tmp_path), 4, config, train=train) as batches:
                list(batches)
    _, spec_file, weights = write_network(tmp_path)
    result, lines = invoke("eval", "--data", "imagenet", "--data-dir", tmp_path, "--spec", spec_file, "--weights",
                           weights, "--backend", "numpy", "--batch-size", 16)
    errors = [line for line in lines if line.startswith("portres: error:")]
    assert result.exit_code == 2 and errors == lines[-1:] and str(bad) in errors[0], result.output


@pytest.mark.parametrize("args, message", [
    ([], "--data imagenet needs --data-dir DIR"),
    (["--data-dir", "/nonexistent/imagenet"], "image folder /nonexistent/imagenet does not exist"),
    (["--data-dir", ".", "--image-size", "64"], "--image-size squashes digits/folder images"),
    (["--data-dir", ".", "--labels", "/nonexistent/labels.txt"], "labels file /nonexistent/labels.txt does not exist"),
])
def test_eval_imagenet_usage_errors(args, message):
    result, lines = invoke("eval", "--data", "imagenet", "--arch", "resnet18", "--weights", "none.safetensors", *args)
    assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], result.output


def test_labels_are_only_for_imagenet():
    result, lines = invoke("eval", "--data", "digits", "--labels", "labels.txt", "--arch", "resnet20", "--weights",
                           "none.safetensors")
    assert result.exit_code == 2 and len(lines) == 1 and "--labels labels a flat image folder" in lines[0]


def test_an_image_folder_is_a_frozen_record(tmp_path):
    write_val(tmp_path)
    folder = scan_image_folder(tmp_path)
    assert isinstance(folder, ImageFolder) and len(folder) == 12 and folder.num_classes == 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        folder.paths = ()
