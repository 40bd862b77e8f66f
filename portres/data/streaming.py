"""Image folders the ImageNet way: decoded from disk batch by batch, never held whole in memory.

Two layouts (torchvision's ``ImageFolder`` and the flat validation folder)::

    DIR/val/<class>/*.JPEG        (or DIR/<class>/*.JPEG; DIR/train/<class>/ for training)
    DIR/*.JPEG + a labels file    one ``filename label`` per line, label an integer class index

Class folders sorted by name give the class indices, as in torchvision's ``ImageFolder``: for
ImageNet's ``val/<wnid>/`` folders that is the ImageNet-1k index order every published ResNet uses.

Evaluation reads each image the preset's way (:func:`portres.images.resize_and_crop`: resize the
shorter side, centre crop; then :func:`portres.images.to_array`); training crops with torchvision's
``RandomResizedCrop`` (:func:`portres.data.augment.random_resized_crop_boxes`) and flips half the
images. What a training batch holds is a pure function of ``(seed, epoch, batch index)``, like
:func:`portres.data.batches`. At most ``prefetch`` batches wait ahead of the consumer; each is decoded
by a few threads (Pillow decodes without the GIL).

    >>> folder = scan_image_folder("imagenet")                        # doctest: +SKIP
    >>> config = portres.data_config("resnet50")                      # doctest: +SKIP
    >>> for x, y in stream_batches(folder, 256, config):               # doctest: +SKIP
    ...     pass                        # x: float32 (256, 3, 224, 224), y: int64 (256,)

The in-memory ``folder`` data set (:mod:`portres.data.folder`) stays as it was: it squashes small
images to a square for CIFAR-size networks; this module is for photos and ImageNet-size presets.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .augment import resized_crop_boxes, resized_crop_draws
from .batches import BatchIterator, epoch_order, num_batches
from .dataset import DataError
from .folder import check_same_classes, folder_root, split_folders

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")  # case-insensitive
LABELS_FORMAT = "one `filename label` per line, label an integer class index"
LAYOUTS = "DIR/val/<class>/*.JPEG, DIR/<class>/*.JPEG, or DIR/*.JPEG with a labels file"
DECODE_THREADS = min(8, os.cpu_count() or 1)  # threads that decode one batch's images
HEADER_CHUNK = 4096  # files whose headers check_headers reads per round (ImageNet's train split: 1.28 million)


@dataclass(frozen=True, eq=False)  # compared by identity: it holds an array
class ImageFolder:
    """The labelled image files of one split; read lazily by :func:`stream_batches`."""

    root: Path  # the folder the paths lie in (DIR/val, DIR, or the flat folder)
    paths: tuple[Path, ...]  # one per image, class by class (class folders) or as the labels file lists them
    labels: np.ndarray  # (N,) int64 class indices, read-only
    class_names: tuple[str, ...] | None  # the class folders' names (index = label); None for a labels file

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        """Classes the labels refer to: the folders' count, or the largest label + 1 (a labels file)."""
        return len(self.class_names) if self.class_names is not None else int(self.labels.max()) + 1

    def describe(self) -> str:
        """One line: where, how many images and classes."""
        return f"{self.root}: {len(self):,} images, {self.num_classes:,} classes"


def _visible(entries: Iterable[Path]) -> list[Path]:
    return sorted(p for p in entries if not p.name.startswith("."))


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def _class_images(folder: Path) -> list[Path]:
    """The images anywhere under a class folder (as ImageFolder walks it), hidden entries skipped."""
    found = []
    for current, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(current) / name for name in sorted(files)
                  if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS]
    return found


def scan_image_folder(directory, *, labels_file=None, split: str = "val") -> ImageFolder:
    """The images and labels of ``directory`` (see the module docstring for the layouts): its ``split``
    subfolder when it has one, else the folder itself; with ``labels_file``, a flat folder of images
    labelled by that file. Raises :class:`DataError` (one line: what is wrong and the fix).

        >>> scan_image_folder("imagenet").describe()                   # doctest: +SKIP
        'imagenet/val: 50,000 images, 1,000 classes'
    """
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist or is not a folder; it needs {LAYOUTS}")
    if labels_file is not None:
        return _scan_flat(root, Path(labels_file).expanduser())
    if (root / split).is_dir():
        root = root / split
    return scan_class_folders(root)


def scan_class_folders(directory) -> ImageFolder:
    """The images of ``directory``'s class folders (``directory/<class>/...``, classes in sorted order), as
    :func:`scan_image_folder` reads them but without looking for a split subfolder.

        >>> scan_class_folders("pets/train").class_names                # doctest: +SKIP
        ('cat', 'dog')
    """
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist or is not a folder; it needs {LAYOUTS}")
    entries = _visible(root.iterdir())
    if not entries:
        raise DataError(f"image folder {root} is empty; it needs {LAYOUTS}")
    class_dirs = [p for p in entries if p.is_dir()]
    if not class_dirs:
        loose = [p for p in entries if _is_image(p)]
        if loose:
            raise DataError(f"image folder {root} holds {len(loose):,} images but no class folders: put each "
                            f"class's images in {root}/<class>/, or give a labels file ({LABELS_FORMAT})")
        raise DataError(f"image folder {root} has no class folders and no images ({', '.join(IMAGE_EXTENSIONS)}); "
                        f"it needs {LAYOUTS}")
    paths, labels = [], []
    for index, folder in enumerate(class_dirs):
        images = _class_images(folder)
        if not images:
            raise DataError(f"class folder {folder} has no images ({', '.join(IMAGE_EXTENSIONS)}); add some or "
                            f"remove it (class indices are the sorted folder names)")
        paths += images
        labels += [index] * len(images)
    return ImageFolder(root, tuple(paths), _read_only(np.asarray(labels, np.int64)),
                       tuple(p.name for p in class_dirs))


def _read_only(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


def _scan_flat(root: Path, labels_file: Path) -> ImageFolder:
    where = f"labels file {labels_file}"
    if not labels_file.is_file():
        raise DataError(f"{where} does not exist; it lists the images of {root}: {LABELS_FORMAT}")
    try:
        text = labels_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{where} cannot be read ({error}); it must be UTF-8 text: {LABELS_FORMAT}") from None
    listed: dict[str, tuple[int, int]] = {}  # file name -> (label, line number)
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            raise DataError(f"{where} line {number} reads {line.strip()[:80]!r}; expected {LABELS_FORMAT}")
        name, label = parts
        if name in listed:
            raise DataError(f"{where} lists {name} twice (lines {listed[name][1]} and {number}); keep one")
        listed[name] = (int(label), number)
    if not listed:
        raise DataError(f"{where} lists no images; expected {LABELS_FORMAT}")
    present = {p.name for p in _visible(root.iterdir()) if _is_image(p)}
    missing = [name for name in listed if name not in present]
    if missing:
        name = missing[0]
        raise DataError(f"{where} line {listed[name][1]} names {name}, which is not an image in {root} "
                        f"({len(missing):,} listed files are missing); is it the labels file of this folder?")
    unlisted = sorted(present - set(listed))
    if unlisted:
        raise DataError(f"{root / unlisted[0]} is not in {where} ({len(unlisted):,} images of {root} are not); "
                        f"list every image of the folder, or move the others out")
    paths = tuple(root / name for name in listed)
    labels = np.array([label for label, _ in listed.values()], np.int64)
    return ImageFolder(root, paths, _read_only(labels), None)


def check_labels_fit(folder: ImageFolder, num_classes: int, network: str = "the network") -> None:
    """Raise :class:`DataError` unless every label of ``folder`` is a class of a ``num_classes``-way network."""
    if folder.num_classes > num_classes:
        what = f"{len(folder.class_names):,} class folders" if folder.class_names is not None else \
            f"labels up to {folder.num_classes - 1}"
        raise DataError(f"{folder.root} has {what} but {network} has {num_classes:,} classes; "
                        f"give the folder of the data set the network was trained on")


def _eval_transform(config, read: Callable) -> Callable[[Path], np.ndarray]:
    from portres import images

    return lambda path: images.to_array(images.resize_and_crop(read(path), config), config)


def _train_transform(config, read: Callable) -> Callable:
    from portres import images

    size = config.input_size
    resample = resampling(config.interpolation)

    def transform(path: Path, tries: np.ndarray, offsets: np.ndarray, flip: bool) -> np.ndarray:
        image = read(path)
        [[left, top, width, height]] = resized_crop_boxes([image.width], [image.height], tries[None], offsets[None])
        # torchvision's resized_crop on a PIL image: crop, then resize (Pillow antialiases when shrinking)
        image = image.crop((left, top, left + width, top + height)).resize((size, size), resample)
        array = images.to_array(image, config)
        return np.ascontiguousarray(array[:, :, ::-1]) if flip else array

    return transform


def resampling(interpolation: str):
    """Pillow's resampling filter named ``interpolation`` ("bilinear", "bicubic", ...)."""
    from portres import images

    Image = images.pillow()  # an ImageError naming `pip install 'portres[images]'` without Pillow
    try:
        return Image.Resampling[str(interpolation).upper()]
    except KeyError:
        raise DataError(f"interpolation {interpolation!r} is not one of Pillow's "
                        f"({', '.join(m.name.lower() for m in Image.Resampling)})") from None


def _reader(config) -> Callable:
    from portres import images

    mode = "L" if config.channel_order == "L" else "RGB"
    return lambda path: images.open_image(path, mode)


def stream_batches(folder: ImageFolder, batch_size: int, config, *, train: bool = False, shuffle: bool | None = None,
                   seed: int = 0, epoch: int = 0, drop_last: bool = False, start_batch: int = 0, prefetch: int = 2,
                   threads: int = DECODE_THREADS, read: Callable | None = None) -> BatchIterator:
    """One epoch of ``(images float32 (N, C, S, S), labels int64 (N,))`` batches read from ``folder``.

    ``config``: the preset's :class:`portres.zoo.DataConfig` (S is its ``input_size``). ``train=False``:
    resize + centre crop; ``train=True``: random-resized-crop + horizontal flip, from
    ``default_rng([seed, epoch, batch index])`` (crop draws of :func:`portres.data.augment.resized_crop_draws`,
    then one uniform per image, flipped below 1/2), shuffled by ``default_rng([seed, epoch])`` unless
    ``shuffle=False``. ``prefetch``: batches made ahead on a background thread (0: each when asked for);
    no more than ``prefetch`` + 2 batches are alive at a time. ``read``: ``path -> RGB PIL image``
    (default :func:`portres.images.open_image`, whose error names an unreadable file; grayscale
    for a one-channel config).
    """
    for name, value, minimum in (("batch_size", batch_size, 1), ("seed", seed, 0), ("epoch", epoch, 0),
                                 ("start_batch", start_batch, 0), ("prefetch", prefetch, 0), ("threads", threads, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
            raise DataError(f"{name}={value!r} must be an integer >= {minimum}")
    count = len(folder)
    total = num_batches(count, batch_size, drop_last)
    if start_batch > total:
        raise DataError(f"start_batch={start_batch} is past the end of the epoch ({total} batches of {batch_size})")
    read = read or _reader(config)
    order = epoch_order(count, shuffle=train if shuffle is None else shuffle, seed=seed, epoch=epoch)
    transform = _train_transform(config, read) if train else _eval_transform(config, read)

    def make(index: int) -> tuple[np.ndarray, np.ndarray]:
        chosen = order[index * batch_size:(index + 1) * batch_size]
        paths = [folder.paths[i] for i in chosen]
        if train:
            rng = np.random.default_rng([seed, epoch, index])
            tries, offsets = resized_crop_draws(rng, len(paths))
            flips = rng.random(len(paths)) < 0.5
            jobs = [(transform, path, tries[i], offsets[i], flips[i]) for i, path in enumerate(paths)]
        else:
            jobs = [(transform, path) for path in paths]
        with ThreadPoolExecutor(max_workers=min(threads, len(jobs))) as pool:
            arrays = list(pool.map(lambda job: job[0](*job[1:]), jobs))
        return np.stack(arrays).astype(np.float32, copy=False), folder.labels[chosen].astype(np.int64)

    def job(index: int) -> Callable[[], tuple[np.ndarray, np.ndarray]]:
        return lambda: make(index)

    return BatchIterator([job(index) for index in range(start_batch, total)], prefetch)


# -- training on a folder the ImageNet way (`portres train --stream`) ---------------------------------

TRAIN_AUGMENT = "random_resized_crop_flip"  # the augmentation of streamed training (TrainConfig.augment)
STREAM_OPTIONS = ("image_size", "color")  # the data options a streamed folder takes (as the in-memory one)
COLORS = {"rgb": 3, "grayscale": 1}  # color option -> input channels
TORCHVISION_CROP = (224, 256)  # input side, resized shorter side: the ratio where the network's preset squashes


def streamed_data_config(base, image_size: int | None = None):
    """How a network trained on a streamed folder prepares its images: ``base`` (its preset's
    :class:`~portres.zoo.DataConfig`: mean, std, channels, interpolation) at ``image_size`` (default:
    ``base.input_size``), the shorter side resized in ``base``'s ratio before the centre crop (torchvision's
    256 : 224 where ``base`` has no resize, as CIFAR presets do), in exact integer arithmetic.

        >>> from portres.zoo import data_config
        >>> config = streamed_data_config(data_config("resnet50"), 32)
        >>> config.input_size, config.resize_size
        (32, 36)
        >>> streamed_data_config(data_config("resnet50")).resize_size
        256
    """
    size = base.input_size if image_size is None else image_size
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise DataError(f"image_size={size!r} must be a positive integer (the side of the training crops)")
    size = int(size)
    if base.resize_size is None:
        crop, resize = TORCHVISION_CROP
    else:
        crop, resize = base.input_size, base.resize_size
    return dataclasses.replace(base, input_size=size, resize_size=size * resize // crop,
                               source="portres train --stream")


@dataclass(frozen=True, eq=False)  # compared by identity: it holds arrays
class StreamedFolder:
    """An image folder's train and test splits, read from disk batch by batch (never held whole): training
    batches random-resized-cropped and flipped, test batches resized and centre-cropped, both as ``config``
    says. It answers what a :class:`~portres.data.Dataset` answers about its shape (``in_channels``,
    ``image_size``, ``num_classes``, ``class_names``, labels, ``mean``/``std``), so it fits a spec the same way.

        >>> folder = open_streamed_folder("pets", streamed_data_config(data_config("resnet18"), 64))  # doctest: +SKIP
        >>> folder.describe()                                                                       # doctest: +SKIP
        'folder:pets: 800 train / 200 test, streamed 3x64x64 (resize 73, centre crop), 2 classes'
    """

    name: str  # for messages and logs ("folder:pets")
    train: ImageFolder
    test: ImageFolder
    config: object  # the DataConfig every image is prepared with (input_size: the side of the crops)

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.train.class_names

    @property
    def num_classes(self) -> int:
        return len(self.train.class_names)

    @property
    def in_channels(self) -> int:
        return self.config.channels

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of every network input: the crops' side."""
        return self.config.input_size, self.config.input_size

    @property
    def train_labels(self) -> np.ndarray:
        return self.train.labels

    @property
    def test_labels(self) -> np.ndarray:
        return self.test.labels

    @property
    def mean(self) -> np.ndarray:
        return np.asarray(self.config.mean, np.float32)

    @property
    def std(self) -> np.ndarray:
        return np.asarray(self.config.std, np.float32)

    def describe(self) -> str:
        """One line: sizes, crops, classes."""
        config = self.config
        return (f"{self.name}: {len(self.train):,} train / {len(self.test):,} test, streamed {config.channels}x"
                f"{config.input_size}x{config.input_size} (resize {config.resize_size}, centre crop), "
                f"{self.num_classes} classes")

    def limited(self, count: int) -> StreamedFolder:
        """The first ``count`` training images only (the test split unchanged)."""
        return dataclasses.replace(self, train=subset(self.train, slice(0, count)))

    def record(self) -> dict:
        """What a checkpoint records of it (its description's ``data``): what ``portres.load`` prepares
        photos with, so that predictions see images as the evaluation did."""
        config = self.config
        return {"image_size": [config.input_size, config.input_size], "mean": list(config.mean),
                "std": list(config.std), "resize_size": config.resize_size, "interpolation": config.interpolation,
                "channel_order": config.channel_order, "scale": config.scale}

    def train_batches(self, batch_size: int, *, seed: int, epoch: int, augment: str | None = TRAIN_AUGMENT,
                      start_batch: int = 0, prefetch: int = 2) -> BatchIterator:
        """One epoch of shuffled, full training batches (:func:`stream_batches`): random-resized-crop + flip
        with ``augment=TRAIN_AUGMENT``, the evaluation's resize + centre crop with ``augment=None``."""
        if augment not in (TRAIN_AUGMENT, None):
            raise DataError(f"augment={augment!r}: a streamed folder trains with {TRAIN_AUGMENT!r} or none")
        return stream_batches(self.train, batch_size, self.config, train=augment is not None, shuffle=True,
                              seed=seed, epoch=epoch, drop_last=True, start_batch=start_batch, prefetch=prefetch)

    def test_batches(self, batch_size: int, rows: slice = slice(None), prefetch: int = 2) -> BatchIterator:
        """The test images ``rows`` (a process's share) in order, resized and centre-cropped."""
        return stream_batches(subset(self.test, rows), batch_size, self.config, prefetch=prefetch)


def subset(folder: ImageFolder, rows: slice) -> ImageFolder:
    """The images ``rows`` of ``folder`` (a slice), as an :class:`ImageFolder` of its own."""
    return ImageFolder(folder.root, folder.paths[rows], _read_only(folder.labels[rows].copy()), folder.class_names)


def open_streamed_folder(data_dir, config, *, check: bool = True) -> StreamedFolder:
    """``data_dir``'s ``train/`` and ``test/`` (or ``val/``) class folders (same classes), scanned but not
    decoded, to be read as ``config`` says. ``check``: read every file's header first (not its pixels), so
    that an image Pillow cannot read is refused in one line before a run writes anything.

        >>> open_streamed_folder("pets", streamed_data_config(data_config("resnet18"))).num_classes  # doctest: +SKIP
        2
    """
    root = folder_root(data_dir)
    train_dir, test_dir = split_folders(root)
    train, test = scan_class_folders(train_dir), scan_class_folders(test_dir)
    check_same_classes(root, train_dir, test_dir, train.class_names, test.class_names)
    if check:
        check_headers(train.paths + test.paths)
    return StreamedFolder(f"folder:{root.resolve().name}", train, test, config)


def check_headers(paths, threads: int = DECODE_THREADS) -> None:
    """Refuse (:class:`DataError` naming the file and the fix) a file Pillow cannot identify as an image, or
    one over its decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``), from the headers alone: the
    pixels are decoded batch by batch later, where damaged data still fails naming its file."""
    import warnings

    from portres import images

    Image = images.pillow()

    def check(path: Path) -> None:
        try:
            with Image.open(path) as image:  # the header only
                limit = Image.MAX_IMAGE_PIXELS
                if limit is not None and image.width * image.height > limit:
                    raise Image.DecompressionBombError(f"{image.width}x{image.height}")
        except Image.DecompressionBombError:
            raise DataError(f"{path}: refused as a possible decompression bomb, over Pillow's limit of "
                            f"{Image.MAX_IMAGE_PIXELS or 0:,} pixels (raise PIL.Image.MAX_IMAGE_PIXELS if you trust "
                            "it, or remove the file)") from None
        except Exception as error:  # Pillow signals bad files with several exception types
            raise DataError(f"{path}: not an image Pillow can read ({type(error).__name__}); replace it with a PNG "
                            "or JPEG, or remove it") from None

    # the warning Pillow gives below twice its limit is refused above; the filters are process-wide: set here
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with ThreadPoolExecutor(max_workers=threads) as pool:
            paths = list(paths)
            for start in range(0, len(paths), HEADER_CHUNK):  # a bounded number of futures alive at a time
                list(pool.map(check, paths[start:start + HEADER_CHUNK]))


def top_k_hits(logits: np.ndarray, labels: np.ndarray, k: int) -> int:
    """How many rows of ``logits`` (N, classes) have their label among the ``k`` largest: fewer than ``k``
    classes score strictly higher than the label (a tie counts as a hit).

        >>> top_k_hits(np.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2]]), np.array([2, 0]), 1)
        1
    """
    logits = np.asarray(logits)
    labels = np.asarray(labels)
    label_scores = logits[np.arange(len(labels)), labels]
    return int(((logits > label_scores[:, None]).sum(axis=1) < k).sum())


def evaluate_stream(predict: Callable[[np.ndarray], np.ndarray], batches: Iterable, *,
                    progress: Callable[[int], None] | None = None) -> dict:
    """Top-1 and top-5 of ``predict`` (``images -> logits``) over ``batches`` of ``(images, labels)``:
    ``{"images", "top1_hits", "top5_hits", "top1_accuracy", "top5_accuracy"}``; ``progress(images done)``
    after each batch."""
    images = top1 = top5 = 0
    for x, y in batches:
        logits = np.asarray(predict(x))
        top1 += top_k_hits(logits, y, 1)
        top5 += top_k_hits(logits, y, 5)
        images += len(y)
        if progress is not None:
            progress(images)
    if images == 0:
        raise DataError("no images to evaluate")
    return {"images": images, "top1_hits": top1, "top5_hits": top5, "top1_accuracy": top1 / images,
            "top5_accuracy": top5 / images}
