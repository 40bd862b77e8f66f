"""Users' own images in the ImageFolder layout (torchvision's), read with Pillow::

    DIR/train/<class>/*.png|jpg|jpeg
    DIR/test/<class>/...          (or DIR/val/<class>/...)

Class names are the folder names, sorted; labels are their indices. Every image is converted to
RGB or grayscale and resized to ``image_size`` x ``image_size`` (bilinear, antialiased when
shrinking; the aspect ratio is not kept: crop first if it matters) by
:func:`portres.images.resize_and_crop`, the function ``portres predict`` prepares photos with, so
the set is a uint8 array. Photos and large folders train better streamed from disk, cropped the
ImageNet way (``portres train --stream``: :class:`portres.data.streaming.StreamedFolder`).
Files with other extensions and hidden entries are skipped; a file is read only if it is a PNG or
JPEG (whatever its name says) of at most :data:`MAX_PIXELS` pixels, checked from its header before
it is decoded (set ``portres.data.folder.MAX_PIXELS`` to read larger images).

    >>> ds = load_folder("pets", image_size=64)  # doctest: +SKIP
    >>> ds.describe()  # doctest: +SKIP
    'folder:pets: 800 train / 200 test, 3x64x64 uint8, 2 classes'
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..images import resize_and_crop
from ..zoo import DataConfig
from .dataset import DataError, Dataset

EXTENSIONS = (".png", ".jpg", ".jpeg")  # what counts as an image (case-insensitive)
COLORS = {"rgb": "RGB", "grayscale": "L"}  # color option -> Pillow mode
TEST_FOLDERS = ("test", "val")  # the held-out split's folder, first found wins
INSTALL = "pip install 'portres[images]'"  # what a missing Pillow asks for
FORMATS = ("PNG", "JPEG")  # the formats Pillow may read: it detects formats by content, not by name
# The most pixels (width x height) an image may have, checked from its header before decoding: a
# small file can declare a huge image (a 140 KB PNG of 12000x12000 decodes to 750 MB). 40 megapixels
# is a sane bound for a training image; raise it here (portres.data.folder.MAX_PIXELS = ...) for
# larger photos. Pillow's own hard limit (twice PIL.Image.MAX_IMAGE_PIXELS: 179 megapixels) still applies.
MAX_PIXELS = 40_000_000


def _pillow():
    try:
        from PIL import Image
    except ImportError:
        raise DataError(f"reading an image folder needs Pillow, which is not installed: {INSTALL}") from None
    return Image


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def scan(split_dir: Path) -> dict[str, list[Path]]:
    """``{class name: sorted image paths}`` of one split folder; raises on empty classes."""
    classes = _visible_dirs(split_dir)
    if not classes:
        raise DataError(f"{split_dir} has no class folders; put each class's images in {split_dir}/<class name>/")
    found = {}
    for folder in classes:
        images = sorted(p for p in folder.iterdir()
                        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in EXTENSIONS)
        if not images:
            raise DataError(f"class folder {folder} has no images ({', '.join(EXTENSIONS)}); add some or remove it")
        found[folder.name] = images
    return found


def _read(path: Path, mode: str, size: int | None) -> np.ndarray:
    Image = _pillow()
    try:
        with Image.open(path, formats=FORMATS) as image:  # reads the header only
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise DataError(f"image {path} is {width}x{height} = {width * height:,} pixels, more than the "
                                f"{MAX_PIXELS:,} a training image may have (the limit is "
                                f"portres.data.folder.MAX_PIXELS); resize it or remove the file")
            image = image.convert(mode)
            if size is not None:  # squashed as portres.preprocess squashes: one function for training and predict
                image = resize_and_crop(image, _squash_config(mode, size))
            array = np.asarray(image, dtype=np.uint8)
    except DataError:
        raise
    except Image.DecompressionBombError as error:  # over twice Pillow's limit: refused by Image.open itself
        raise DataError(f"image {path} is too large to decode safely ({error}); portres.data.folder.MAX_PIXELS is "
                        f"{MAX_PIXELS:,}: resize it or remove the file") from None
    except Exception as error:  # Pillow signals bad files with several exception types
        raise DataError(f"cannot read image {path} ({type(error).__name__}: {error}); only "
                        f"{' and '.join(FORMATS)} files are read: replace or remove the file") from None
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)  # HW or HWC -> CHW


def _squash_config(mode: str, size: int) -> DataConfig:
    """The :class:`DataConfig` whose :func:`portres.images.resize_and_crop` squashes to ``size`` x ``size``
    (bilinear, no crop); its mean and std play no part in the resize."""
    channels = 1 if mode == "L" else 3
    return DataConfig(input_size=size, resize_size=None, interpolation="bilinear", mean=(0.0,) * channels,
                      std=(1.0,) * channels, channel_order="L" if mode == "L" else "RGB", source="portres folder")


def _read_split(found: dict[str, list[Path]], class_names: tuple[str, ...], mode: str,
                size: int | None) -> tuple[np.ndarray, np.ndarray]:
    paths = [path for name in class_names for path in found[name]]
    labels = np.concatenate([np.full(len(found[name]), index, np.int64) for index, name in enumerate(class_names)])
    # Pillow decodes without the GIL: a few threads read a folder of small files several times faster.
    # _read's MAX_PIXELS check replaces Pillow's DecompressionBombWarning (above 89 megapixels), so that
    # warning is silenced around the pool (the filters are process-wide: set from this thread, not the workers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", _pillow().DecompressionBombWarning)
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            images = list(pool.map(lambda path: _read(path, mode, size), paths))
    first = images[0].shape
    for path, image in zip(paths, images):
        if image.shape != first:
            raise DataError(f"images differ in size ({paths[0]} is {first[2]}x{first[1]}, {path} is "
                            f"{image.shape[2]}x{image.shape[1]}); pass image_size to resize them all")
    return np.stack(images), labels


def folder_root(data_dir) -> Path:
    """``data_dir`` as a path to an existing folder; :class:`DataError` in one line when it is not given or missing."""
    if data_dir is None:
        raise DataError("the folder data set needs a directory: --data-dir DIR with DIR/train/<class>/ and "
                        "DIR/test/<class>/ (or val/)")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist; it needs train/<class>/ and test/<class>/ (or val/)")
    return root


def split_folders(root: Path) -> tuple[Path, Path]:
    """``(train folder, test folder)`` of an ImageFolder-layout directory (``test/``, else ``val/``);
    :class:`DataError` in one line when one is missing.

        >>> split_folders(Path("pets"))  # doctest: +SKIP
        (PosixPath('pets/train'), PosixPath('pets/test'))
    """
    train_dir = root / "train"
    test_dir = next((root / name for name in TEST_FOLDERS if (root / name).is_dir()), None)
    lacking = [folder for folder, present in (("train/", train_dir.is_dir()), ("test/ (or val/)", test_dir))
               if not present]
    if lacking:
        raise DataError(f"image folder {root} has no {' and no '.join(lacking)}; it needs train/<class>/ and "
                        f"test/<class>/ (or val/)")
    return train_dir, test_dir


def check_same_classes(root: Path, train_dir: Path, test_dir: Path, train_classes, test_classes) -> None:
    """Refuse (one line) splits whose class folders differ: the labels are the sorted names' indices."""
    if set(train_classes) != set(test_classes):
        only_train = sorted(set(train_classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(train_classes))
        parts = [f"only in {d.name}/: {', '.join(names)}" for d, names in ((train_dir, only_train),
                                                                          (test_dir, only_test)) if names]
        raise DataError(f"image folder {root}: train and {test_dir.name} have different classes ({'; '.join(parts)}); "
                        f"give both splits the same class folders")


def load_folder(data_dir, image_size: int | None = 32, color: str = "rgb") -> Dataset:
    """An ImageFolder-layout directory (see the module docstring) as a uint8 :class:`Dataset`.

    ``image_size``: the side every image is resized to; None keeps the files' own size, which must
    then be the same for all. ``color``: ``"rgb"`` (3 channels) or ``"grayscale"`` (1).
    """
    if color not in COLORS:
        raise DataError(f"color={color!r} must be one of {', '.join(COLORS)}")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer))
                                   or image_size < 1):
        raise DataError(f"image_size={image_size!r} must be a positive integer (or None to keep the files' size)")
    root = folder_root(data_dir)
    _pillow()  # say so before scanning a large tree
    train_dir, test_dir = split_folders(root)
    train_found, test_found = scan(train_dir), scan(test_dir)
    check_same_classes(root, train_dir, test_dir, train_found, test_found)
    class_names = tuple(sorted(train_found))
    mode = COLORS[color]
    train_images, train_labels = _read_split(train_found, class_names, mode, image_size)
    test_images, test_labels = _read_split(test_found, class_names, mode, image_size)
    if train_images.shape[1:] != test_images.shape[1:]:
        raise DataError(f"image folder {root}: train images are {train_images.shape[3]}x{train_images.shape[2]} but "
                        f"{test_dir.name} images are {test_images.shape[3]}x{test_images.shape[2]}; "
                        f"pass image_size to resize them all")
    return Dataset(f"folder:{root.resolve().name}", train_images, train_labels, test_images, test_labels,
                   num_classes=len(class_names), class_names=class_names)
