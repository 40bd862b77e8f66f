"""`portres.load`, `portres predict` and `portres embed`: networks rebuilt from files, photos classified
and embedded the same way on every backend, and bad input as one line with exit status 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import portres
from portres import backends
from portres.cli import main
from portres.interop import export_weights, write_pth

BACKENDS = backends.available()
pytest.importorskip("PIL")
sklearn = pytest.importorskip("sklearn")
PHOTOS = [str(Path(sklearn.__file__).parent / "datasets" / "images" / name) for name in ("china.jpg", "flower.jpg")]
TOP_KEYS = {"class", "label", "probability"}


def run(*args):
    return CliRunner().invoke(main, [str(arg) for arg in args])


def one_error_line(result, message: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.output.strip().count("\n") == 0, result.output
    assert result.output.startswith("portres: error: ") and message in result.output, result.output
    assert "Traceback" not in result.output


@pytest.fixture(scope="module")
def resnet18_files(tmp_path_factory):
    """resnet18's seeded weights as .safetensors and as a torch.save'd state_dict (.pth), written without torch."""
    folder = tmp_path_factory.mktemp("resnet18")
    params = portres.init_params("resnet18", 3, randomize_batch_norm=True)
    portres.save_weights(folder / "r18.safetensors", params)
    write_pth(folder / "r18.pth", params)
    return params, folder / "r18.safetensors", folder / "r18.pth"


@pytest.fixture(scope="module")
def resnet50_pth(tmp_path_factory):
    """resnet50 with fixed random weights, its classifier scaled so the top classes stand apart."""
    params = portres.init_params("resnet50", 7)
    params["fc.weight"] = params["fc.weight"] * np.float32(0.1)
    path = tmp_path_factory.mktemp("resnet50") / "resnet50.pth"
    write_pth(path, params)
    return params, path


# -- portres.load --------------------------------------------------------------------------------


def test_load_recognises_the_preset_of_a_weights_file(resnet18_files):
    params, safetensors, pth = resnet18_files
    images = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
    expected = portres.build("resnet18", "numpy", params)(images)
    for path in (safetensors, pth, str(pth)):
        model = portres.load(path)
        assert model.spec == portres.get("resnet18") and model.backend.name == "numpy"
        assert np.array_equal(model(images), expected)
        assert model.class_names is not None and len(model.class_names) == 1000 and model.class_names[1] == "goldfish"
    assert portres.load(pth, arch="resnet18").spec.name == "resnet18"


def test_load_recognises_keras_names_and_layouts(tmp_path):
    params = portres.init_params("keras_resnet50", 1)
    np.savez(tmp_path / "keras.npz", **export_weights(params, "keras_resnet50", "keras"))
    model = portres.load(tmp_path / "keras.npz")
    assert model.spec.name == "keras_resnet50"
    images = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    assert np.array_equal(model(images), portres.build("keras_resnet50", "numpy", params)(images))


def test_load_passes_the_backend_and_its_options(resnet18_files):
    _, safetensors, _ = resnet18_files
    backend = next(name for name in ("onnxruntime", "torch", "mlx", "numpy") if name in BACKENDS)
    model = portres.load(safetensors, backend, dtype="float32")
    assert model.backend.name == backend and model.backend.dtype == "float32"


def test_load_refuses_weights_of_another_network_in_one_line(resnet18_files):
    _, _, pth = resnet18_files
    with pytest.raises(portres.WeightsError) as error:
        portres.load(pth, arch="resnet34")
    assert "looks like resnet18" in str(error.value) and "\n" not in str(error.value)


def test_load_names_the_closest_presets_when_nothing_fits(tmp_path, resnet18_files):
    params, _, _ = resnet18_files
    partial = {name: value for name, value in params.items() if name != "fc.bias"}
    portres.save_weights(tmp_path / "partial.safetensors", partial)
    with pytest.raises(portres.WeightsError) as error:
        portres.load(tmp_path / "partial.safetensors")
    message = str(error.value)
    assert "closest: resnet18" in message and "arch=" in message and "\n" not in message
    with pytest.raises(FileNotFoundError, match="does not exist"):
        portres.load(tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError, match="without best.safetensors or last.safetensors"):
        portres.load(tmp_path)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A one-epoch `portres train` run of resnet20 on a 3-class image folder (seconds)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in ("cat", "dog", "emu"):
            (root / split / name).mkdir(parents=True)
            for index in range(4):
                pixels = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{index}.png")
    out = root / "run"
    result = run("train", "--arch", "resnet20", "--data", "folder", "--data-dir", root, "--image-size", 8,
                 "--epochs", 1, "--batch-size", 4, "--backend", "numpy", "--out", out)
    assert result.exit_code == 0, result.output
    return root, out


def test_load_rebuilds_a_training_checkpoint_with_its_class_names(trained_run):
    from portres.training.checkpoint import load_checkpoint, read_description

    root, out = trained_run
    tensors, description = load_checkpoint(out / "best.safetensors")
    spec = portres.ResNetSpec.from_dict(description["spec"])
    images = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    expected = portres.build(spec, "numpy", tensors)(images)
    for path in (out, out / "best.safetensors", out / "last.safetensors"):
        model = portres.load(path)
        assert model.spec == spec and model.spec.num_classes == 3
        assert model.class_names == ("cat", "dog", "emu")
    assert np.array_equal(portres.load(out)(images), expected)  # the run directory reads best.safetensors
    assert read_description(out / "best.safetensors")["class_names"] == ["cat", "dog", "emu"]
    with pytest.raises(portres.WeightsError, match="is a checkpoint of resnet20"):
        portres.load(out, arch="resnet18")


def test_predict_on_a_checkpoint_uses_its_class_names(trained_run):
    root, out = trained_run
    result = run("predict", root / "test" / "dog", "--weights", out, "--json", "--top", 3)
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 4 and {entry["label"] for entry in lines[0]["top"]} == {"cat", "dog", "emu"}


# -- predict ---------------------------------------------------------------------------------------


def predictions(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def test_predict_json_lines_have_the_issue_keys(resnet18_files):
    _, safetensors, _ = resnet18_files
    result = run("predict", *PHOTOS, "--arch", "resnet18", "--weights", safetensors, "--json", "--top", 4)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    for photo, line in zip(PHOTOS, lines):
        record = json.loads(line)
        assert set(record) == {"image", "top"} and record["image"] == photo
        assert len(record["top"]) == 4 and all(set(entry) == TOP_KEYS for entry in record["top"])
        probabilities = [entry["probability"] for entry in record["top"]]
        assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1 + 1e-12
        from portres.data.imagenet import CLASS_NAMES

        assert all(entry["label"] == CLASS_NAMES[entry["class"]] for entry in record["top"])


def test_predict_prints_a_table_per_image(resnet18_files):
    _, safetensors, _ = resnet18_files
    result = run("predict", *PHOTOS, "--weights", safetensors, "--top", 2)
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert text.count("rank  class  label") == 2 and PHOTOS[0] in text and PHOTOS[1] in text
    blocks = text.strip().split("\n\n")
    assert len(blocks) == 2 and all(len(block.splitlines()) == 5 for block in blocks)  # path, header, rule, 2 rows


def test_predict_without_class_names_labels_class_numbers(tmp_path):
    portres.save_weights(tmp_path / "r20.safetensors", portres.init_params("resnet20"))
    result = run("predict", PHOTOS[0], "--weights", tmp_path / "r20.safetensors", "--json", "--top", 10)
    assert result.exit_code == 0, result.output
    (record,) = predictions(result.stdout)
    assert len(record["top"]) == 10 and sum(entry["probability"] for entry in record["top"]) == pytest.approx(1.0)
    assert all(entry["label"] == f"class {entry['class']}" for entry in record["top"])


def test_predict_batches_and_shows_progress_for_many_images(tmp_path, resnet18_files):
    from PIL import Image

    _, safetensors, _ = resnet18_files
    folder = tmp_path / "photos"
    folder.mkdir()
    for index in range(5):
        Image.open(PHOTOS[index % 2]).resize((64, 48)).save(folder / f"{index}.png")
    result = run("predict", folder, "--weights", safetensors, "--json", "--batch-size", 2)
    assert result.exit_code == 0, result.output
    records = predictions(result.stdout)
    assert [record["image"] for record in records] == [str(folder / f"{index}.png") for index in range(5)]
    assert "images" in result.stderr  # the progress bar: 3 batches
    single = predictions(run("predict", folder, "--weights", safetensors, "--json", "--batch-size", 16).stdout)
    for a, b in zip(records, single):  # batching does not change a prediction
        assert [entry["class"] for entry in a["top"]] == [entry["class"] for entry in b["top"]]
        assert np.allclose([e["probability"] for e in a["top"]], [e["probability"] for e in b["top"]], atol=1e-12)


@pytest.fixture(scope="module")
def reference_prediction(resnet50_pth):
    _, path = resnet50_pth
    result = run("predict", *PHOTOS, "--arch", "resnet50", "--weights", path, "--json")
    assert result.exit_code == 0, result.output
    records = predictions(result.stdout)
    return records


@pytest.mark.parametrize("backend", [name for name in BACKENDS if name != "numpy"])
def test_predictions_agree_across_backends(backend, resnet50_pth, reference_prediction):
    params, path = resnet50_pth
    result = run("predict", *PHOTOS, "--arch", "resnet50", "--weights", path, "--json", "--backend", backend)
    assert result.exit_code == 0, result.output
    for got, expected in zip(predictions(result.stdout), reference_prediction, strict=True):
        assert [entry["class"] for entry in got["top"]] == [entry["class"] for entry in expected["top"]]
        for a, b in zip(got["top"], expected["top"]):
            assert abs(a["probability"] - b["probability"]) < 1e-4


def test_torchvision_resnet50_weights_are_recognised_as_resnet50_not_its_v1_twin(resnet50_pth):
    from portres.loading import recognise

    _, path = resnet50_pth
    assert recognise(path).name == "resnet50"  # resnet50_v1 has every shape too: torchvision's is the first


def test_the_reference_prediction_is_not_a_near_tie(resnet50_pth, reference_prediction):
    """What makes the cross-backend test meaningful: the classes it compares stand apart."""
    from portres.images import preprocess

    params, _ = resnet50_pth
    logits = portres.build("resnet50", "numpy", params)(preprocess(PHOTOS, "resnet50"))
    ranked = np.sort(logits, axis=1)[:, ::-1]
    assert (ranked[:, 4] - ranked[:, 5]).min() > 1e-3  # 5th and 6th apart by far more than float32 error
    assert [entry["class"] for entry in reference_prediction[0]["top"]] == list(np.argsort(-logits[0])[:5])
    assert reference_prediction[0]["top"][0]["probability"] > 2 / 1000  # not a uniform guess


def test_predictions_agree_with_torchvision(resnet50_pth, reference_prediction):
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    from PIL import Image

    params, _ = resnet50_pth
    net = torchvision.models.resnet50()
    net.load_state_dict({name: torch.from_numpy(value) for name, value in params.items()})
    net.eval()
    transforms = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.transforms()
    with torch.no_grad():
        batch = torch.stack([transforms(Image.open(photo).convert("RGB")) for photo in PHOTOS])
        probabilities = torch.softmax(net(batch).double(), dim=1).numpy()
    for row, expected in zip(probabilities, reference_prediction):
        assert list(np.argsort(-row)[:5]) == [entry["class"] for entry in expected["top"]]
        assert np.allclose(np.sort(row)[::-1][:5], [entry["probability"] for entry in expected["top"]], atol=1e-4)


# what torchvision computes for these weights and photos (made by tests/golden/make_predict_golden.py)
GOLDEN = Path(__file__).parent / "golden" / "predict" / "torchvision_resnet50.npz"


@pytest.mark.parametrize("backend", BACKENDS)
def test_predictions_embeddings_and_layer3_equal_torchvisions_stored_outputs(backend, resnet50_pth):
    """The issue's acceptance check, on every run: torchvision's own outputs for these weights and photos
    (softmax, pooled features, layer3), stored; the preset recognised from the .pth alone."""
    from portres.images import preprocess

    stored = np.load(GOLDEN)
    _, path = resnet50_pth
    result = run("predict", *PHOTOS, "--weights", path, "--json", "--backend", backend)
    assert result.exit_code == 0, result.output
    for record, expected in zip(predictions(result.stdout), stored["probabilities"], strict=True):
        assert [entry["class"] for entry in record["top"]] == list(np.argsort(-expected)[:5])
        assert max(abs(entry["probability"] - expected[entry["class"]]) for entry in record["top"]) < 1e-4
    model = portres.load(path, backend)
    x = preprocess(PHOTOS, "resnet50")
    relative = lambda got, want: np.linalg.norm(got - want) / np.linalg.norm(want)  # noqa: E731
    assert relative(model.embed(x), stored["pooled"]) < 1e-4
    assert relative(model.features(x[:1], ["layer3"])["layer3"][0], stored["layer3_first_image"]) < 1e-4


# -- embed -----------------------------------------------------------------------------------------


def test_embed_writes_the_pooled_features(tmp_path, resnet18_files):
    from portres.images import preprocess

    params, safetensors, _ = resnet18_files
    out = tmp_path / "embeddings.npy"
    result = run("embed", *PHOTOS, "--arch", "resnet18", "--weights", safetensors, "-o", out)
    assert result.exit_code == 0, result.output
    embeddings = np.load(out)
    assert embeddings.shape == (2, 512) and embeddings.dtype == np.float32
    model = portres.build("resnet18", "numpy", params)
    x = preprocess(PHOTOS, "resnet18")
    assert np.allclose(embeddings, model.embed(x), rtol=1e-6, atol=1e-6)
    result = run("embed", *PHOTOS, "--weights", safetensors, "--stage", "layer3", "-o", tmp_path / "l3.npy")
    assert result.exit_code == 0, result.output
    layer3 = np.load(tmp_path / "l3.npy")
    assert layer3.shape == (2, 256) and layer3.dtype == np.float32
    assert np.allclose(layer3, model.features(x, ["layer3"])["layer3"].mean(axis=(2, 3)), rtol=1e-6, atol=1e-6)


# -- bad input -------------------------------------------------------------------------------------


def test_bad_input_is_one_line_with_status_2_and_nothing_written(tmp_path, resnet18_files):
    _, safetensors, pth = resnet18_files
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out.npy"
    one_error_line(run("predict", PHOTOS[0], broken, "--weights", safetensors), f"{broken}: ")
    one_error_line(run("embed", broken, "--weights", safetensors, "-o", out), "convert it to PNG or JPEG")
    one_error_line(run("predict", PHOTOS[0], "--arch", "resnet101", "--weights", pth), "looks like resnet18")
    one_error_line(run("embed", PHOTOS[0], "--weights", safetensors, "--stage", "layer9", "-o", out),
                   "unknown stage 'layer9' of resnet18: choose from stem, layer1, layer2, layer3, layer4")
    one_error_line(run("embed", PHOTOS[0], "--weights", safetensors, "-o", tmp_path / "no" / "out.npy"),
                   "does not exist (create it first)")
    one_error_line(run("predict", PHOTOS[0], "--weights", tmp_path / "missing.pth"), "missing.pth does not exist")
    one_error_line(run("predict", tmp_path / "missing.jpg", "--weights", safetensors), "no such file or folder")
    one_error_line(run("predict", empty, "--weights", safetensors), "holds no image files")
    one_error_line(run("predict", PHOTOS[0], "--weights", safetensors, "--backend", "jax"), "jax")
    one_error_line(run("predict", PHOTOS[0], "--weights", safetensors, "--top", 0), "--top")
    one_error_line(run("predict", PHOTOS[0]), "--weights")
    assert not out.exists() and sorted(tmp_path.iterdir()) == sorted([broken, empty])


def test_a_headless_network_cannot_predict(tmp_path):
    import dataclasses

    spec = dataclasses.replace(portres.get("resnet20"), num_classes=0)
    (tmp_path / "headless.json").write_text(spec.to_json())
    portres.save_weights(tmp_path / "w.safetensors", portres.init_params(spec))
    one_error_line(run("predict", PHOTOS[0], "--spec", tmp_path / "headless.json", "--weights",
                       tmp_path / "w.safetensors"), "headless (num_classes=0)")
    out = tmp_path / "e.npy"
    result = run("embed", PHOTOS[0], "--spec", tmp_path / "headless.json", "--weights", tmp_path / "w.safetensors",
                 "-o", out)
    assert result.exit_code == 0, result.output
    assert np.load(out).shape == (1, 64)
