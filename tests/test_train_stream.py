"""Training on an image folder the ImageNet way (issue 19, item 8): ``portres train --data folder --stream``
reads the images from disk batch by batch (never the whole folder), crops training images with
random-resized-crop + flip deterministically from (seed, epoch, batch), evaluates on resize + centre
crop, and records that preprocessing in its checkpoints, so that ``portres.load``, ``predict`` and
``eval`` read images as training did. Tiny synthetic folders (40x48 JPEG and PNG photos, 32-pixel crops)
and a tiny network keep each test to seconds on NumPy."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
from click.testing import CliRunner
from test_train import TINY, Quiet

import portres
from portres import images as image_module
from portres.cli import main
from portres.data.streaming import open_streamed_folder, stream_batches, streamed_data_config
from portres.spec import ResNetSpec
from portres.training import loop
from portres.training.checkpoint import read_description
from portres.training.loop import TrainConfig, train
from portres.weights import read_weights_file
from portres.zoo import data_config

pytest.importorskip("PIL")

# a CIFAR stem, whose preset preprocessing has no resize of its own: streamed, it takes torchvision's 256 : 224
SPEC = ResNetSpec.from_dict({**TINY.to_dict(), "in_channels": 3, "num_classes": 3})
COLOURS = np.array([[220, 40, 40], [40, 200, 60], [50, 70, 220]])


def photo_folder(root, train_per_class=8, test_per_class=3, size=(40, 48), seed=0):
    """``root/train/<class>/`` and ``root/test/<class>/`` of noisy 40x48 (width x height) colour photos, JPEG and
    PNG alternately, each with a bright band at its top: a squash keeps the band, a centre crop cuts into it."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    width, height = size
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for k, colour in enumerate(COLOURS):
            folder = root / split / f"class{k}"
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                pixels = colour[None, None] + rng.integers(-30, 31, (height, width, 3))
                pixels[:6] = 255
                image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
                image.save(folder / f"{index}.{'jpg' if index % 2 else 'png'}", quality=95)
    return root


def settings(tmp_path, data_dir, name="run", **overrides) -> TrainConfig:
    fields = dict(out=str(tmp_path / name), spec=SPEC.to_dict(), data="folder", data_dir=str(data_dir), stream=True,
                  data_options={"image_size": 32}, backend="numpy", dtype="float32", epochs=1, batch_size=2, lr=0.05,
                  seed=5)
    return TrainConfig(**{**fields, **overrides})


def invoke(*args):
    result = CliRunner().invoke(main, [str(arg) for arg in args])
    return result, result.output.strip().splitlines()


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return photo_folder(tmp_path_factory.mktemp("photos"))


@pytest.fixture
def recorded(monkeypatch):
    """Record what the loop trains on: the inputs of each step, and how many images had been opened by then."""
    opened, steps, lock = [0], [], threading.Lock()
    open_image = image_module.open_image

    def counting_open(path, mode="RGB"):
        with lock:
            opened[0] += 1
        return open_image(path, mode)

    make_train_step = loop.make_train_step

    def recording_make_train_step(plan, lowering, *args, **kwargs):
        step = make_train_step(plan, lowering, *args, **kwargs)

        def recording_step(state, images, targets, lr, number):
            result = step(state, images, targets, lr, number)
            if number <= 12:  # the first epoch: give the loader time to run as far ahead as it may
                time.sleep(0.05)
            steps.append((np.array(lowering.to_numpy(images)), opened[0]))
            return result
        return recording_step

    monkeypatch.setattr(image_module, "open_image", counting_open)
    monkeypatch.setattr(loop, "make_train_step", recording_make_train_step)
    return steps


def test_streamed_training_is_deterministic_trains_on_stream_batches_and_reads_a_few_batches_ahead(
        photos, tmp_path, recorded):
    config = settings(tmp_path, photos, epochs=2)
    summary = train(config, progress=Quiet())
    assert summary["finished"] and summary["steps_done"] == 24  # 24 images, batches of 2, 2 epochs
    expected_config = streamed_data_config(data_config(SPEC), 32)
    assert (expected_config.input_size, expected_config.resize_size) == (32, 36)  # torchvision's 224 : 256
    folder = open_streamed_folder(photos, expected_config)
    expected = [x for epoch in (0, 1) for x, _ in stream_batches(folder.train, 2, expected_config, train=True, seed=5,
                                                                 epoch=epoch, drop_last=True)]
    trained = [images for images, _ in recorded]
    assert len(trained) == len(expected) == 24
    for got, want in zip(trained, expected):
        np.testing.assert_array_equal(got, want)
    assert not np.array_equal(trained[0], trained[0][:, :, :, ::-1])  # crops of photos, not a constant
    # bounded memory: after the k-th step at most k + 3 batches (2 waiting + 1 made and waiting for room) have been
    # opened, never the folder's 24 training images at once (the evaluation after epoch 1 opens the 9 test images)
    for k, (_, opened) in enumerate(recorded[:12], 1):
        assert opened <= (k + 3) * 2, (k, opened)
    first = read_weights_file(tmp_path / "run" / "last.safetensors")
    recorded.clear()
    again = train(settings(tmp_path, photos, name="again", epochs=2), progress=Quiet())
    assert again["final"] == summary["final"] | {"seconds": again["final"]["seconds"],
                                                 "images_per_s": again["final"]["images_per_s"]}
    second = read_weights_file(tmp_path / "again" / "last.safetensors")
    assert first.keys() == second.keys()
    for name in first:
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)
    train(settings(tmp_path, photos, name="other", epochs=2, seed=6), progress=Quiet())  # another seed, other crops
    other = read_weights_file(tmp_path / "other" / "last.safetensors")
    assert any(not np.array_equal(first[name], other[name]) for name in first)


def test_a_resumed_streamed_run_continues_exactly(photos, tmp_path):
    whole = train(settings(tmp_path, photos, name="whole", epochs=2), progress=Quiet())
    train(settings(tmp_path, photos, name="parts", epochs=2, stop_after_steps=7), progress=Quiet())
    resumed = train(settings(tmp_path, photos, name="parts", epochs=2), resume=True, progress=Quiet())
    assert resumed["finished"] and resumed["steps_done"] == whole["steps_done"]
    first = read_weights_file(tmp_path / "whole" / "last.safetensors")
    second = read_weights_file(tmp_path / "parts" / "last.safetensors")
    for name in first:
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)


@pytest.fixture(scope="module")
def trained_run(photos, tmp_path_factory):
    """A one-epoch streamed run from the command line: its run directory."""
    root = tmp_path_factory.mktemp("streamed")
    spec_file = root / "tiny.json"
    spec_file.write_text(SPEC.to_json())
    result, lines = invoke("train", "--spec", spec_file, "--data", "folder", "--data-dir", photos, "--stream",
                           "--image-size", 32, "--backend", "numpy", "--dtype", "float32", "--epochs", 1,
                           "--batch-size", 3, "--lr", 0.05, "--out", root / "run")
    assert result.exit_code == 0, result.output
    return root / "run"


def test_the_checkpoint_records_the_crop_and_the_test_split_is_resized_and_centre_cropped(photos, trained_run):
    description = read_description(trained_run / "best.safetensors")
    assert description["config"]["stream"] is True and description["config"]["augment"] == "random_resized_crop_flip"
    config = streamed_data_config(data_config(SPEC), 32)
    assert description["data"] == {"image_size": [32, 32], "mean": list(config.mean), "std": list(config.std),
                                   "resize_size": 36, "interpolation": "bilinear", "channel_order": "RGB",
                                   "scale": "unit"}
    model = portres.load(trained_run, "numpy")
    assert model.data_config == config.__class__(**{**config.__dict__, "source": "portres train"})
    assert model.class_names == ("class0", "class1", "class2")
    # the evaluation after the epoch saw each test photo resized to 36 and centre-cropped, as preprocess does
    paths = sorted((photos / "test").glob("*/*.*"))
    labels = np.array([int(path.parent.name[-1]) for path in paths])
    x = portres.preprocess(paths, config=model.data_config)
    squashed = portres.preprocess(paths, config=config.__class__(**{**config.__dict__, "resize_size": None}))
    assert np.abs(x - squashed).max() > 0.5  # the two differ: the bright band is cut by the crop
    logits = np.asarray(model(x), np.float64)
    shifted = logits - logits.max(1, keepdims=True)
    loss = float(-(shifted[np.arange(len(labels)), labels] - np.log(np.exp(shifted).sum(1))).mean())
    record = description["metrics"][-1]
    assert record["test_top1_error"] == pytest.approx(float((logits.argmax(1) != labels).mean()))
    assert record["test_loss"] == pytest.approx(loss, rel=1e-4)
    # portres eval reads the checkpoint's folder the same way, and predict prepares a photo the same way
    result, lines = invoke("eval", "--weights", trained_run, "--data-dir", photos, "--backend", "numpy", "--json")
    assert result.exit_code == 0, result.output
    evaluated = json.loads(lines[-1])
    assert evaluated["images"] == 9 and evaluated["data"] == "folder"
    assert evaluated["top1_error"] == pytest.approx(record["test_top1_error"])
    assert evaluated["loss"] == pytest.approx(record["test_loss"], rel=1e-4)
    result, lines = invoke("eval", "--weights", trained_run, "--data-dir", photos, "--backend", "numpy",
                           "--image-size", 32)
    assert result.exit_code == 2 and len(lines) == 1 and "leave out --image-size" in lines[0], result.output
    result, lines = invoke("predict", paths[4], "--weights", trained_run, "--backend", "numpy", "--json", "--top", 3)
    assert result.exit_code == 0, result.output
    top = json.loads(lines[-1])["top"]
    probabilities = np.exp(shifted[4]) / np.exp(shifted[4]).sum()
    assert [entry["class"] for entry in top] == list(np.argsort(-probabilities))
    assert [entry["label"] for entry in top] == [f"class{k}" for k in np.argsort(-probabilities)]
    np.testing.assert_allclose([entry["probability"] for entry in top], np.sort(probabilities)[::-1], atol=1e-5)


@pytest.mark.parametrize("change", [{"resize_size": 31}, {"interpolation": "lanczos"}, {"channel_order": "L"},
                                    {"scale": "percent"}, {"resize_size": None}])
def test_an_altered_crop_record_is_refused_naming_the_field(trained_run, tmp_path, change):
    from portres.training.checkpoint import KEY, CheckpointError
    from portres.weights import save_weights

    path = trained_run / "best.safetensors"
    description = read_description(path)
    description["data"].update(change)
    altered = tmp_path / "altered.safetensors"
    save_weights(altered, read_weights_file(path), metadata={KEY: json.dumps(description)})
    with pytest.raises(CheckpointError, match="field 'data' must be"):
        portres.load(altered)


def test_the_in_memory_folder_stays_as_it_was(photos, tmp_path):
    """Without --stream the folder is squashed into memory, trained with flips, and recorded as before."""
    summary = train(settings(tmp_path, photos, stream=False, augment="recipe"), progress=Quiet())
    description = read_description(tmp_path / "run" / "best.safetensors")
    assert summary["config"]["augment"] == "flip" and description["config"]["stream"] is False
    assert set(description["data"]) == {"image_size", "mean", "std"}
    assert portres.load(tmp_path / "run").data_config.resize_size is None


@pytest.mark.parametrize("color, mode", [("rgb", "RGB"), ("grayscale", "L")])
def test_the_in_memory_folder_squashes_with_the_function_predict_uses(photos, color, mode):
    """The folder loader resizes (40x48 -> 32x32) with portres.images.resize_and_crop: the arrays it trains on
    are those preprocess makes of the same files with the checkpoint's squashing configuration."""
    from portres import data as datasets
    from portres.zoo import DataConfig

    dataset = datasets.load("folder", photos, image_size=32, color=color)
    channels = 3 if mode == "RGB" else 1
    config = DataConfig(input_size=32, resize_size=None, mean=(0.0,) * channels, std=(1.0,) * channels,
                        channel_order=mode)
    paths = sorted((photos / "train").glob("*/*.*"))  # class by class, as the loader lists them
    expected = np.rint(portres.preprocess(paths, config=config) * 255).astype(np.uint8)
    np.testing.assert_array_equal(dataset.train_images, expected)


def corrupt(root):
    (root / "train" / "class1" / "3.jpg").write_bytes(b"not a jpeg at all")


def empty_class(root):
    for path in (root / "train" / "class2").iterdir():
        path.unlink()


def no_test_split(root):
    for path in sorted((root / "test").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (root / "test").rmdir()


@pytest.mark.parametrize("damage, extra, message", [
    (corrupt, [], "3.jpg: not an image Pillow can read"),
    (empty_class, [], "class2 has no images"),
    (no_test_split, [], "has no test/ (or val/)"),
    (None, ["--image-size", 1], "1x1 images"),
    (None, ["--augment", "flip"], "augment='flip' does not apply to a streamed folder"),
    (None, ["--data", "digits"], "stream=True reads an image folder from disk, not 'digits'"),
])
def test_bad_input_is_refused_in_one_line_with_nothing_written(tmp_path, damage, extra, message):
    root = photo_folder(tmp_path / "photos", train_per_class=4, test_per_class=2)
    if damage is not None:
        damage(root)
    out = tmp_path / "out"
    result, lines = invoke("train", "--spec", _spec_file(tmp_path), "--data", "folder", "--data-dir", root, "--stream",
                           "--backend", "numpy", "--epochs", 1, "--batch-size", 2, "--out", out, *extra)
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("portres: error: ") and message in lines[0], lines
    assert not out.exists()


def test_random_resized_crop_needs_stream_and_a_stream_takes_only_folder_options(tmp_path):
    with pytest.raises(ValueError, match="add stream=True"):
        train(settings(tmp_path, tmp_path, stream=False, augment="random_resized_crop_flip"), progress=Quiet())
    with pytest.raises(ValueError, match="does not take labels"):
        train(settings(tmp_path, tmp_path, data_options={"labels": "fine"}), progress=Quiet())
    with pytest.raises(ValueError, match="color='sepia' must be one of rgb, grayscale"):
        train(settings(tmp_path, tmp_path, data_options={"color": "sepia"}), progress=Quiet())
    assert not (tmp_path / "run").exists()


def _spec_file(tmp_path):
    path = tmp_path / "tiny.json"
    path.write_text(SPEC.to_json())
    return path
