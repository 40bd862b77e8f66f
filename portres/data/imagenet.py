"""The 1000 ImageNet-1k class names, in torchvision's index order (``torchvision.models._meta.
_IMAGENET_CATEGORIES``, shipped as ``imagenet_classes.txt``, one name a line): what a classifier
trained on ImageNet-1k by torchvision, timm or Keras means by output ``i``.

    >>> from portres.data.imagenet import CLASS_NAMES, class_names
    >>> CLASS_NAMES[0], CLASS_NAMES[281], len(CLASS_NAMES)
    ('tench', 'tabby', 1000)
    >>> class_names(10) is None   # only a 1000-way head is an ImageNet-1k head
    True
"""

from __future__ import annotations

from importlib import resources

NUM_CLASSES = 1000
CLASS_NAMES_FILE = "imagenet_classes.txt"  # package data of portres.data


def read_class_names() -> tuple[str, ...]:
    """The names in :data:`CLASS_NAMES_FILE`, checked to be exactly :data:`NUM_CLASSES` non-empty lines."""
    text = resources.files(__package__).joinpath(CLASS_NAMES_FILE).read_text(encoding="utf-8")
    names = tuple(text.splitlines())
    if len(names) != NUM_CLASSES or not all(names):
        raise RuntimeError(f"portres/data/{CLASS_NAMES_FILE} must hold {NUM_CLASSES} non-empty lines, found "
                           f"{len(names)}: the installation is damaged (reinstall portres)")
    return names


CLASS_NAMES: tuple[str, ...] = read_class_names()


def class_names(count: int) -> tuple[str, ...] | None:
    """The ImageNet-1k names for a ``count``-way classifier: :data:`CLASS_NAMES` when ``count`` is 1000,
    else None (a head of another size was trained on something else).

        >>> class_names(1000)[1]
        'goldfish'
    """
    return CLASS_NAMES if count == NUM_CLASSES else None
