"""Photos to network inputs, exactly as the weights' own framework prepares them.

:func:`preprocess` turns image files, Pillow images or HWC uint8 arrays into a float32 (N, C, H, W)
batch following a preset's :class:`~portres.zoo.DataConfig`; for the torchvision presets it equals
``ResNet50_Weights.IMAGENET1K_V1.transforms()`` within float32 rounding (the resize is Pillow's, as
torchvision's on PIL images, with torchvision's size and crop arithmetic).

    >>> import portres
    >>> x = portres.preprocess(["china.jpg", "flower.jpg"], "resnet50")  # doctest: +SKIP
    >>> x.shape, x.dtype  # doctest: +SKIP
    ((2, 3, 224, 224), dtype('float32'))

Pillow (``pip install 'portres[images]'``) is imported only by the functions that read or resize
images; :func:`to_array` on an array needs only NumPy.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from .zoo import DataConfig, data_config

INSTALL = "pip install 'portres[images]'"  # what a missing Pillow asks for
# what counts as an image file when a folder is expanded (compared lower-case)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class ImageError(ValueError):
    """An image that cannot be used: one line naming the file (or the image's position) and the fix."""


def pillow():
    """Pillow's ``PIL.Image`` module, or an :class:`ImageError` saying how to install it."""
    try:
        from PIL import Image
    except ImportError:
        raise ImageError(f"reading images needs Pillow, which is not installed: {INSTALL}") from None
    return Image


def open_image(path, mode: str = "RGB"):
    """The image at ``path`` decoded and converted to ``mode`` ("RGB" or "L"), as a Pillow image.

    A missing or unreadable file, or one over Pillow's decompression-bomb limit
    (``PIL.Image.MAX_IMAGE_PIXELS``), raises :class:`ImageError` naming the path.

        >>> open_image("china.jpg").size  # doctest: +SKIP
        (640, 427)
    """
    Image = pillow()
    path = Path(path)
    if path.is_dir():
        raise ImageError(f"{path} is a folder, not an image (portres.images.image_paths expands folders)")
    if not path.is_file():
        raise ImageError(f"{path}: no such image file")
    bomb = ImageError(f"{path}: refused as a possible decompression bomb, over Pillow's limit of "
                      f"{Image.MAX_IMAGE_PIXELS or 0:,} pixels (raise PIL.Image.MAX_IMAGE_PIXELS if you trust it)")
    try:
        with Image.open(path) as image:  # reads the header only
            # Pillow refuses more than twice MAX_IMAGE_PIXELS itself and only warns above it: refuse those too,
            # from the header, before decoding (checked here rather than by turning the warning into an error:
            # warning filters are process-wide, and images are read on several threads)
            limit = Image.MAX_IMAGE_PIXELS
            if limit is not None and image.width * image.height > limit:
                raise bomb
            return image.convert(mode)  # decodes now (even to the same mode), so a corrupt file fails here
    except ImageError:
        raise
    except Image.DecompressionBombError:
        raise bomb from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"{path}: not an image format Pillow can read; convert it to PNG or JPEG") from None
    except PermissionError as error:
        raise ImageError(f"{path}: cannot be opened ({error.strerror})") from None
    except (OSError, ValueError, SyntaxError) as error:  # Pillow's decoders raise all three on bad data
        raise ImageError(f"{path}: the image data is damaged or truncated ({_first_line(error)}); "
                         "replace the file") from None


def image_paths(inputs) -> list[Path]:
    """Files as given and folders expanded (recursively) to their image files, sorted per folder.

    ``inputs``: one path or an iterable of paths. Image files in a folder are those whose name ends in
    one of :data:`IMAGE_EXTENSIONS` (any case); hidden files and folders are skipped. A missing path,
    or a folder without images, raises :class:`ImageError`.

        >>> image_paths(["china.jpg", "photos/"])  # doctest: +SKIP
        [PosixPath('china.jpg'), PosixPath('photos/a.png'), PosixPath('photos/b/c.JPG')]
    """
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            images = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                            and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not images:
                raise ImageError(f"{path} holds no image files ({' '.join(IMAGE_EXTENSIONS)})")
            found.extend(images)
        elif path.is_file():
            found.append(path)
        else:
            raise ImageError(f"{path}: no such file or folder")
    if not found:
        raise ImageError("no images given")
    return found


def resized_size(width: int, height: int, shorter_side: int) -> tuple[int, int]:
    """``(width, height)`` with the shorter side scaled to ``shorter_side``: torchvision's
    ``_compute_resized_output_size`` (the longer side truncated, not rounded).

        >>> resized_size(640, 427, 256)
        (383, 256)
    """
    if width <= height:
        return shorter_side, int(shorter_side * height / width)
    return int(shorter_side * width / height), shorter_side


def crop_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """The ``(left, top, right, bottom)`` of the central ``size`` x ``size`` square: torchvision's
    ``center_crop`` offsets, ``int(round((side - size) / 2))`` (round half to even).

        >>> crop_box(383, 256, 224)
        (80, 16, 304, 240)
    """
    left = int(round((width - size) / 2.0))
    top = int(round((height - size) / 2.0))
    return left, top, left + size, top + size


def resize_and_crop(image, config: DataConfig):
    """The Pillow image ``image`` resized and centre-cropped as ``config`` says (its mode is kept).

        >>> resize_and_crop(open_image("china.jpg"), data_config("resnet50")).size  # doctest: +SKIP
        (224, 224)
    """
    Image = pillow()
    filters = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}
    resample = filters[config.interpolation]
    size = config.input_size
    if config.resize_size is None:  # no resize, except to fit the input (squashing, as the folder loader)
        return image if image.size == (size, size) else image.resize((size, size), resample)
    width, height = image.size
    target = resized_size(width, height, config.resize_size)
    if target != image.size:
        image = image.resize(target, resample)
    return image.crop(crop_box(image.width, image.height, size))


def to_array(image, config: DataConfig) -> np.ndarray:
    """``image`` (Pillow, or an HWC / HW uint8 array already resized) as a (C, H, W) float32 network
    input: channels in ``config.channel_order``, scaled and normalised. The arithmetic is float32 in
    torchvision's order (``x / 255``, then ``(x - mean) / std``) and Keras' (caffe: ``x - mean`` in BGR;
    tf: ``x / 127.5 - 1``), so the results agree to the last bit.

        >>> to_array(np.full((1, 1, 3), 255, np.uint8), data_config("keras_resnet50v2")).ravel().tolist()
        [1.0, 1.0, 1.0]
    """
    pixels = np.asarray(image)
    if pixels.dtype != np.uint8:
        raise ImageError(f"an image array must be uint8 (0-255), got {pixels.dtype}")
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pixels.ndim != 3 or pixels.shape[2] != config.channels:
        raise ImageError(f"an image array of shape {pixels.shape} does not fit: {config.channel_order} needs "
                         f"(height, width, {config.channels})")
    if config.channel_order == "BGR":
        pixels = pixels[:, :, ::-1]
    x = pixels.transpose(2, 0, 1).astype(np.float32)
    if config.scale == "unit":
        x /= np.float32(255)
    elif config.scale == "symmetric":
        x /= np.float32(127.5)
        x -= np.float32(1)
    mean = np.asarray(config.mean, np.float32)[:, None, None]
    std = np.asarray(config.std, np.float32)[:, None, None]
    x -= mean
    x /= std
    return x


def preprocess(images, preset_or_spec=None, *, config: DataConfig | None = None) -> np.ndarray:
    """Images as one float32 (N, C, H, W) batch, prepared as ``preset_or_spec``'s weights expect
    (:func:`portres.data_config`) or as ``config`` says (a :class:`DataConfig` may also come second).

    ``images``: one image or a list; each a path to an image file, a Pillow image, or a uint8 array of
    shape (H, W, 3) RGB (or (H, W) grayscale). A bad image raises :class:`ImageError` naming it.

        >>> x = preprocess(np.zeros((300, 400, 3), np.uint8), "resnet50")
        >>> x.shape, x.dtype
        ((1, 3, 224, 224), dtype('float32'))
    """
    if config is None and isinstance(preset_or_spec, DataConfig):
        config = preset_or_spec
    if config is None:
        if preset_or_spec is None:
            raise ImageError("preprocess needs a preset name, a spec or config=DataConfig(...)")
        config = data_config(preset_or_spec)
    if isinstance(images, (str, Path, np.ndarray)) or not isinstance(images, Iterable):
        images = [images]
    images = list(images)
    if not images:
        raise ImageError("no images given")
    mode = "L" if config.channel_order == "L" else "RGB"
    batch = np.empty((len(images), config.channels, config.input_size, config.input_size), np.float32)
    for index, item in enumerate(images):
        if isinstance(item, (str, Path)):
            image = open_image(item, mode)
            name = str(item)
        else:
            name = f"image {index}"
            image = _as_pillow(item, mode, name)
        try:
            batch[index] = to_array(resize_and_crop(image, config), config)
        except ImageError as error:
            raise ImageError(f"{name}: {error}") from None
    return batch


def _as_pillow(item, mode: str, name: str):
    Image = pillow()
    if isinstance(item, Image.Image):
        return item if item.mode == mode else item.convert(mode)
    if not isinstance(item, np.ndarray):
        raise ImageError(f"{name} is a {type(item).__name__}: give a path, a Pillow image or a uint8 array")
    if item.dtype != np.uint8:
        raise ImageError(f"{name}: an image array must be uint8 (0-255), got {item.dtype}; "
                         "scale and convert it first (np.uint8)")
    if item.ndim == 3 and item.shape[2] == 1:
        item = item[:, :, 0]
    if not (item.ndim == 2 or (item.ndim == 3 and item.shape[2] == 3)) or min(item.shape[:2]) < 1:
        raise ImageError(f"{name}: an image array must be (height, width, 3) RGB or (height, width) grayscale, "
                         f"got shape {item.shape}")
    image = Image.fromarray(np.ascontiguousarray(item))  # uint8 (H, W) -> "L", (H, W, 3) -> "RGB"
    return image if image.mode == mode else image.convert(mode)


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]
