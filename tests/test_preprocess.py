"""portres.preprocess and the presets' data configurations against what torchvision, timm and Keras do.

The expected arrays (tests/golden/preprocess/*.npz, made by tests/golden/make_preprocess_golden.py with the
real frameworks) are compared always; torchvision itself where it is installed. The photos are
scikit-learn's two bundled JPEGs (640 x 427: the resize's long side 383.7 truncates to 383, the crop's
left offset 79.5 rounds to 80, so truncation and rounding mistakes show).
"""

import dataclasses
import hashlib
import struct
import subprocess
import sys
import types
import zlib
from pathlib import Path

import numpy as np
import pytest

import portres
from portres import zoo
from portres.data.imagenet import CLASS_NAMES, NUM_CLASSES, class_names
from portres.images import (
    IMAGE_EXTENSIONS,
    ImageError,
    crop_box,
    image_paths,
    open_image,
    preprocess,
    resize_and_crop,
    resized_size,
    to_array,
)
from portres.spec import SpecError
from portres.zoo import DataConfig, data_config

Image = pytest.importorskip("PIL.Image")
sklearn = pytest.importorskip("sklearn")

PHOTOS_DIR = Path(sklearn.__file__).parent / "datasets" / "images"
PHOTOS = ("china", "flower")
GOLDEN = Path(__file__).parent / "golden" / "preprocess"
ROWS = slice(100, 104)  # the rows make_preprocess_golden.py keeps of the framework outputs


def photo(name: str) -> Path:
    return PHOTOS_DIR / f"{name}.jpg"


def golden(name: str) -> dict:
    with np.load(GOLDEN / f"{name}.npz") as arrays:
        return {key: arrays[key] for key in arrays.files}


def assert_float32_close(actual, expected):
    """Equal within float32 rounding: an ulp of the value, 1e-6 near zero."""
    assert actual.dtype == np.float32 and actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=2.0**-23, atol=1e-6)


def torchvision_or_skip():
    """torchvision, importable with a CPU-only torch (the PyPI wheel is a CUDA build whose meta
    registrations fail to import there), or a skip."""
    pytest.importorskip("torch")
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    try:
        import torchvision
        from torchvision.models import ResNet50_Weights  # noqa: F401
    except Exception as error:  # ImportError, or a CUDA-only build's RuntimeError
        pytest.skip(f"torchvision is not usable here: {type(error).__name__}: {error}")
    return torchvision


def one_line_error(excinfo, *needles):
    message = str(excinfo.value)
    assert "\n" not in message, message
    for needle in needles:
        assert str(needle) in message, message
        if isinstance(needle, Path):  # named once: not an error wrapped in another
            assert message.count(str(needle)) == 1, message
    return message


# ---------------------------------------------------------------------------------------------- the goldens


@pytest.mark.parametrize("name", PHOTOS)
def test_resnet50_preprocessing_equals_torchvisions_stored_output(name):
    expected = golden(name)["torchvision_resnet50"]
    actual = preprocess(photo(name), "resnet50")
    assert actual.shape == (1, 3, 224, 224)
    assert_float32_close(actual[0], expected)


@pytest.mark.parametrize("name", PHOTOS)
@pytest.mark.parametrize("preset", ["resnet50", "resnet50d", "resnet101d", "resnetv2_50"])
def test_resize_and_crop_equals_torchvisions_and_timms(name, preset):
    expected = golden(name)[f"crop_{preset}"]  # uint8 HWC, before any scaling
    actual = np.asarray(resize_and_crop(open_image(photo(name)), data_config(preset)))
    np.testing.assert_array_equal(actual, expected)


@pytest.mark.parametrize("name", PHOTOS)
def test_a_portrait_photo_resizes_its_width(name):
    turned = open_image(photo(name)).transpose(Image.Transpose.ROTATE_90)  # 427 x 640: width is the shorter side
    actual = np.asarray(resize_and_crop(turned, data_config("resnet50")))
    np.testing.assert_array_equal(actual, golden(name)["crop_resnet50_portrait"])


@pytest.mark.parametrize("name", PHOTOS)
@pytest.mark.parametrize("preset, key", [("resnetv2_50", "timm_resnetv2_50_rows"),
                                         ("keras_resnet50", "keras_caffe_rows"),
                                         ("keras_resnet50v2", "keras_tf_rows")])
def test_scaling_equals_the_frameworks_own(name, preset, key):
    # timm's full transform; Keras' preprocess_input (caffe: BGR minus the mean; tf: [-1, 1]) of the
    # torchvision-style crop, which portres's Keras presets use since Keras itself does not resize
    actual = preprocess(photo(name), preset)[0][:, ROWS]
    assert_float32_close(actual, golden(name)[key])


# ------------------------------------------------------------------------------------------- torchvision


@pytest.mark.parametrize("name", PHOTOS)
def test_equals_torchvision_on_the_photos(name):
    torchvision_or_skip()
    from torchvision.models import ResNet50_Weights

    transform = ResNet50_Weights.IMAGENET1K_V1.transforms()
    expected = transform(Image.open(photo(name)).convert("RGB")).numpy()
    assert_float32_close(preprocess(photo(name), "resnet50")[0], expected)


@pytest.mark.parametrize("width, height", [(640, 427), (427, 640), (256, 256), (300, 300), (257, 999), (225, 224),
                                           (301, 4000), (224, 224), (100, 60)])
def test_equals_torchvision_on_any_shape(width, height):
    torchvision_or_skip()
    from torchvision.models import ResNet50_Weights

    pixels = np.random.default_rng(width * 10007 + height).integers(0, 256, (height, width, 3), np.uint8)
    expected = ResNet50_Weights.IMAGENET1K_V1.transforms()(Image.fromarray(pixels)).numpy()
    assert_float32_close(preprocess(pixels, "resnet50")[0], expected)


def test_the_size_and_crop_arithmetic_equals_torchvisions():
    torchvision_or_skip()
    from torchvision.transforms import functional

    for width in range(200, 700, 7):
        for height in (224, 225, 256, 331, 427, 640):
            for side in (224, 235, 256):
                new_height, new_width = functional._compute_resized_output_size((height, width), [side])
                assert resized_size(width, height, side) == (new_width, new_height)
            if width >= 224:  # pixels that say where they are: R, G the column, B the row
                x, y = np.meshgrid(np.arange(width), np.arange(height))
                pixels = np.stack([x % 256, x // 256, y % 256], axis=-1).astype(np.uint8)
                image = Image.fromarray(pixels)
                expected = np.asarray(functional.center_crop(image, [224]))
                np.testing.assert_array_equal(np.asarray(image.crop(crop_box(width, height, 224))), expected)


# ------------------------------------------------------------------------------------ the arithmetic itself


def test_resized_size_truncates_the_long_side_like_torchvision():
    assert resized_size(640, 427, 256) == (383, 256)  # 383.7: truncated, not rounded
    assert resized_size(427, 640, 256) == (256, 383)
    assert resized_size(300, 300, 256) == (256, 256)
    assert resized_size(1000, 3, 2) == (666, 2)


def test_crop_box_rounds_half_to_even_like_torchvision():
    assert crop_box(383, 256, 224) == (80, 16, 304, 240)  # 79.5 -> 80
    assert crop_box(225, 225, 224) == (0, 0, 224, 224)  # 0.5 -> 0
    assert crop_box(227, 229, 224) == (2, 2, 226, 226)  # 1.5 -> 2, 2.5 -> 2
    assert crop_box(224, 224, 224) == (0, 0, 224, 224)


def solid(rgb, size=(300, 260)):
    return np.broadcast_to(np.array(rgb, np.uint8), (size[1], size[0], 3)).copy()


def test_torchvision_scaling_is_unit_then_imagenet_mean_and_std():
    x = preprocess(solid((255, 0, 51)), "resnet50")[0]
    expected = (np.array([1.0, 0.0, 0.2]) - np.array(zoo.IMAGENET_MEAN)) / np.array(zoo.IMAGENET_STD)
    np.testing.assert_allclose(x[:, 0, 0], expected, rtol=1e-6)
    assert np.all(x == x[:, :1, :1])


def test_keras_v1_is_caffe_mode_bgr_minus_the_mean_without_scaling():
    x = preprocess(solid((200, 100, 50)), "keras_resnet50")[0]
    # Keras subtracts in float32 (its floatx): float32(pixel) - float32(mean)
    np.testing.assert_array_equal(x[:, 0, 0], np.float32([50, 100, 200]) - np.float32([103.939, 116.779, 123.68]))
    config = data_config("keras_resnet50")
    assert (config.channel_order, config.scale, config.input_size, config.resize_size) == ("BGR", "raw", 224, 256)


def test_keras_v2_is_minus_one_to_one():
    x = preprocess(solid((0, 255, 51)), "keras_resnet50v2")[0]
    np.testing.assert_array_equal(x[:, 0, 0], np.float32([-1.0, 1.0, 51 / 127.5 - 1]))


def test_timm_presets_use_what_timm_declares():
    # timm/models/resnet.py and resnetv2.py, each model's default (first listed) pretrained tag
    declared = {  # name: input size, crop_pct, interpolation, mean
        "resnet26d": (224, 0.875, "bicubic", zoo.IMAGENET_MEAN),
        "resnet50d": (224, 0.875, "bicubic", zoo.IMAGENET_MEAN),
        "resnet101d": (256, 0.95, "bicubic", zoo.IMAGENET_MEAN),
        "resnetv2_18": (224, 0.9, "bicubic", (0.5, 0.5, 0.5)),
        "resnetv2_50": (224, 0.95, "bicubic", (0.5, 0.5, 0.5)),
        "resnetv2_101": (224, 0.95, "bicubic", (0.5, 0.5, 0.5)),
    }
    for name, (size, crop_pct, interpolation, mean) in declared.items():
        config = data_config(name)
        assert (config.input_size, config.interpolation, config.mean) == (size, interpolation, mean), name
        assert config.resize_size == int(size / crop_pct), name  # timm: floor(img_size / crop_pct)
        assert config.source == "timm"


@pytest.mark.parametrize("name", [n for n in zoo.names() if zoo.entry(n).source == "torchvision"])
def test_torchvision_presets_resize_256_crop_224_bilinear(name):
    assert data_config(name) == DataConfig(224, 256, "bilinear", zoo.IMAGENET_MEAN, zoo.IMAGENET_STD, "RGB", "unit")


def test_every_preset_has_a_data_config_that_fits_its_network():
    for name in zoo.names():
        config = data_config(name)
        spec = zoo.get(name)
        assert config.channels == spec.in_channels, name
        if spec.stem.kind == "cifar":
            assert (config.input_size, config.resize_size) == (32, None), name
        else:
            assert config.input_size in (224, 256) and config.resize_size > config.input_size, name


def test_cifar_presets_do_not_resize_and_normalise_as_training_does():
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)
    x = preprocess(pixels, "resnet20")[0]
    # exactly what training feeds the network: portres.data.normalize with CIFAR-10's statistics
    expected = portres.data.normalize(pixels.transpose(2, 0, 1)[None], zoo.CIFAR10_MEAN, zoo.CIFAR10_STD)[0]
    np.testing.assert_allclose(x, expected, rtol=1e-6, atol=1e-6)
    config = data_config("resnet56")
    assert (config.input_size, config.resize_size) == (32, None)


def test_cifar_presets_squash_a_larger_image_to_32_bilinear_as_the_folder_loader():
    image = open_image(photo("flower"))
    squashed = np.asarray(image.resize((32, 32), Image.BILINEAR))
    np.testing.assert_array_equal(np.asarray(resize_and_crop(image, data_config("resnet20"))), squashed)
    np.testing.assert_array_equal(preprocess(image, "resnet20"), preprocess(squashed, "resnet20"))


def test_the_cifar_statistics_are_cifar_10s():
    # the published per-channel statistics of CIFAR-10's 50,000 training images (population std)
    np.testing.assert_allclose(zoo.CIFAR10_MEAN, (0.4914, 0.4822, 0.4465), atol=1e-4)
    np.testing.assert_allclose(zoo.CIFAR10_STD, (0.2470, 0.2435, 0.2616), atol=1e-4)
    try:  # where the data set is at hand, exactly what training computes from it
        dataset = portres.data.load("cifar10")
    except (portres.data.DataError, OSError):
        return
    mean, std = portres.data.channel_stats(dataset.train_images)
    np.testing.assert_allclose(zoo.CIFAR10_MEAN, mean, atol=1e-6)
    np.testing.assert_allclose(zoo.CIFAR10_STD, std, atol=1e-6)


def test_a_fine_tuned_preset_keeps_its_preprocessing_and_an_unknown_spec_gets_the_usual():
    assert data_config(portres.resnet(50, num_classes=5)) == data_config("resnet50")
    assert data_config(dataclasses.replace(zoo.get("resnet50d"), num_classes=5)) == data_config("resnet50d")
    custom = portres.resnet(50, name="resnet50", width_factor=3)  # registered name, another network
    assert data_config(custom) == zoo.TORCHVISION_DATA
    assert data_config(dataclasses.replace(zoo.get("resnet50d"), name="mine")).interpolation == "bilinear"
    assert data_config(zoo.cifar_resnet(14)) == zoo.CIFAR10_DATA


def test_one_input_channel_reads_grayscale():
    spec = portres.resnet(18, in_channels=1)
    config = data_config(spec)
    assert config.channel_order == "L" and config.channels == 1
    assert (config.mean, config.std) == ((0.449,), (0.226,))  # the means of the RGB statistics
    x = preprocess(solid((255, 255, 255)), spec)
    assert x.shape == (1, 1, 224, 224)
    np.testing.assert_allclose(x[0, 0, 0, 0], (1 - config.mean[0]) / config.std[0], rtol=1e-6)
    with pytest.raises(SpecError, match="4-channel"):
        data_config(portres.resnet(18, in_channels=4))


@pytest.mark.parametrize("changes, message", [
    ({"input_size": 0}, "input_size"), ({"resize_size": 200}, "smaller than input_size"),
    ({"interpolation": "lanczos"}, "interpolation"), ({"channel_order": "RGBA"}, "channel_order"),
    ({"scale": "percent"}, "scale"), ({"mean": (0.5,)}, "mean"), ({"std": (1.0, 0.0, 1.0)}, "std"),
    ({"input_size": True}, "input_size"),
])
def test_a_bad_data_config_is_refused(changes, message):
    with pytest.raises(SpecError, match=message):
        DataConfig(**changes)


def test_portres_exports_the_names():
    assert portres.data_config is data_config and portres.preprocess is preprocess
    assert portres.DataConfig is DataConfig and portres.ImageError is ImageError


# ------------------------------------------------------------------------------------------------- inputs


def test_paths_pillow_images_arrays_and_lists_give_the_same_batch():
    path = photo("china")
    image = open_image(path)
    pixels = np.asarray(image)
    one = preprocess(path, "resnet50")
    assert np.array_equal(preprocess(str(path), "resnet50"), one)
    assert np.array_equal(preprocess(image, "resnet50"), one)
    assert np.array_equal(preprocess(pixels, "resnet50"), one)
    batch = preprocess([path, image, pixels, photo("flower")], "resnet50")
    assert batch.shape == (4, 3, 224, 224) and batch.dtype == np.float32
    assert all(np.array_equal(batch[i], one[0]) for i in range(3))
    assert np.array_equal(batch[3], preprocess(photo("flower"), "resnet50")[0])
    assert np.array_equal(preprocess((p for p in [path]), "resnet50"), one)  # any iterable


def test_other_modes_are_converted_to_rgb_as_torchvision_s_loader_does():
    image = open_image(photo("flower"))
    rgba = image.convert("RGBA")
    gray = image.convert("L")
    assert np.array_equal(preprocess(rgba, "resnet50"), preprocess(image, "resnet50"))
    assert np.array_equal(preprocess(gray, "resnet50"), preprocess(gray.convert("RGB"), "resnet50"))
    assert np.array_equal(preprocess(np.asarray(gray), "resnet50"), preprocess(gray.convert("RGB"), "resnet50"))


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16"])
def test_image_files_of_other_modes_are_read_as_rgb(tmp_path, mode):
    image = open_image(photo("china")).resize((300, 250))
    path = tmp_path / f"{mode.replace(';', '')}.png"
    stored = image.convert(mode) if mode != "I;16" else Image.fromarray(np.asarray(image.convert("L"), np.uint16))
    stored.save(path)
    with Image.open(path) as reread:
        expected = reread.convert("RGB")  # torchvision's ImageFolder loader
    assert np.array_equal(preprocess(path, "resnet50"), preprocess(expected, "resnet50"))


def test_a_config_overrides_the_preset():
    config = DataConfig(64, 72, "bicubic", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    assert preprocess(photo("china"), config=config).shape == (1, 3, 64, 64)
    assert preprocess(photo("china"), "resnet50", config=config).shape == (1, 3, 64, 64)
    assert np.array_equal(preprocess(photo("china"), config), preprocess(photo("china"), config=config))


def test_to_array_alone_needs_only_numpy():
    pixels = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    x = to_array(pixels, data_config("keras_resnet50"))
    assert x.shape == (3, 2, 3)
    np.testing.assert_array_equal(x[0], pixels[:, :, 2] - np.float32(103.939))  # BGR
    with pytest.raises(ImageError, match="uint8"):
        to_array(pixels.astype(np.float32), data_config("resnet50"))
    with pytest.raises(ImageError, match=r"\(2, 3, 3\)"):
        to_array(pixels, data_config(portres.resnet(18, in_channels=1)))


def test_image_paths_expands_folders_recursively_and_sorted(tmp_path):
    (tmp_path / "b" / "c").mkdir(parents=True)
    (tmp_path / ".hidden").mkdir()
    for name in ("b/z.PNG", "a.jpg", "b/c/y.JpEg", "notes.txt", ".hidden/x.jpg", "b/.x.png", "w.webp"):
        (tmp_path / name).write_bytes(b"")
    found = image_paths(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["a.jpg", "b/c/y.JpEg", "b/z.PNG", "w.webp"]
    odd = tmp_path / "notes.txt"
    assert image_paths([odd, tmp_path / "a.jpg"]) == [odd, tmp_path / "a.jpg"]  # files as given
    assert {".jpg", ".jpeg", ".png"} <= set(IMAGE_EXTENSIONS)


# ---------------------------------------------------------------------------------------------- bad input


def huge_png(path: Path, width: int, height: int) -> Path:
    """A valid PNG header (signature and IHDR) declaring ``width`` x ``height``, with almost no data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def test_a_file_pillow_cannot_read_names_the_file(tmp_path):
    bad = tmp_path / "not an image.jpg"
    bad.write_text("hello")
    with pytest.raises(ImageError) as excinfo:
        preprocess([photo("china"), bad], "resnet50")
    one_line_error(excinfo, bad, "not an image format Pillow can read")


def test_a_truncated_jpeg_names_the_file(tmp_path):
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(photo("china").read_bytes()[:5000])
    with pytest.raises(ImageError) as excinfo:
        preprocess(cut, "resnet50")
    one_line_error(excinfo, cut, "truncated")


def test_a_decompression_bomb_is_refused_from_its_header(tmp_path):
    bomb = huge_png(tmp_path / "bomb.png", 40_000, 40_000)  # 1.6 gigapixels in a few bytes
    with pytest.raises(ImageError) as excinfo:
        preprocess(bomb, "resnet50")
    one_line_error(excinfo, bomb, "decompression bomb", "MAX_IMAGE_PIXELS")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # what Pillow says there besides
@pytest.mark.parametrize("limit", [1000, 200_000])  # 640 x 427 = 273,280: over twice 1000 (Pillow's error),
def test_pillows_limit_applies_to_real_photos_too(monkeypatch, limit):  # between 200,000 and twice (its warning)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with pytest.raises(ImageError) as excinfo:
        preprocess(photo("china"), "resnet50")
    one_line_error(excinfo, photo("china"), "decompression bomb")


def test_missing_files_folders_and_empty_folders(tmp_path):
    with pytest.raises(ImageError) as excinfo:
        preprocess(tmp_path / "nope.jpg", "resnet50")
    one_line_error(excinfo, tmp_path / "nope.jpg", "no such")
    with pytest.raises(ImageError) as excinfo:
        preprocess(tmp_path, "resnet50")
    one_line_error(excinfo, tmp_path, "folder")
    with pytest.raises(ImageError) as excinfo:
        image_paths([tmp_path])
    one_line_error(excinfo, tmp_path, "no image files")
    with pytest.raises(ImageError) as excinfo:
        image_paths([photo("china"), tmp_path / "gone"])
    one_line_error(excinfo, tmp_path / "gone")
    with pytest.raises(ImageError, match="no images"):
        preprocess([], "resnet50")


@pytest.mark.parametrize("array, needle", [
    (np.zeros((30, 30, 3), np.float64), "uint8"),
    (np.zeros((30, 30, 3), np.int64), "uint8"),
    (np.zeros((30, 30, 4), np.uint8), "(30, 30, 4)"),
    (np.zeros((3, 30, 30), np.uint8), "(3, 30, 30)"),  # CHW, not HWC
    (np.zeros(30, np.uint8), "(30,)"),
    (np.zeros((0, 30, 3), np.uint8), "(0, 30, 3)"),
])
def test_a_wrong_array_names_its_position(array, needle):
    with pytest.raises(ImageError) as excinfo:
        preprocess([np.zeros((30, 30, 3), np.uint8), array], "resnet50")
    one_line_error(excinfo, "image 1", needle)


def test_something_else_is_refused():
    with pytest.raises(ImageError) as excinfo:
        preprocess([42], "resnet50")
    one_line_error(excinfo, "image 0", "int")
    with pytest.raises(ImageError, match="preset"):
        preprocess(photo("china"))


def test_a_missing_pillow_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ImageError, match=r"pip install 'portres\[images\]'"):
        preprocess(photo("china"), "resnet50")


def test_importing_portres_imports_no_pillow():
    code = ("import sys, portres; portres.data_config('resnet50'); import portres.images, portres.data.imagenet; "
            "print('PIL' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


# ------------------------------------------------------------------------------------------- class names


def test_the_imagenet_class_names_ship_in_torchvisions_order():
    assert len(CLASS_NAMES) == NUM_CLASSES == 1000
    assert (CLASS_NAMES[0], CLASS_NAMES[1], CLASS_NAMES[281], CLASS_NAMES[999]) == (
        "tench", "goldfish", "tabby", "toilet tissue")
    # the whole list, as torchvision.models._meta._IMAGENET_CATEGORIES held it when the file was made
    digest = hashlib.sha256("\n".join(CLASS_NAMES).encode()).hexdigest()
    assert digest == EXPECTED_CLASS_NAMES_SHA256
    assert class_names(1000) is CLASS_NAMES and class_names(10) is None


EXPECTED_CLASS_NAMES_SHA256 = "0b0f9fee7c952f257418d62aa701f023a9da13b443a14f5c4291e5724d92967c"


def test_the_class_names_equal_torchvisions():
    torchvision_or_skip()
    from torchvision.models import ResNet50_Weights

    assert list(CLASS_NAMES) == ResNet50_Weights.IMAGENET1K_V1.meta["categories"]


def test_docstring_examples_run():
    import doctest
    import importlib

    for name in ("portres.images", "portres.zoo", "portres.data.imagenet"):
        module = importlib.import_module(name)
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0 and result.attempted > 0, name
