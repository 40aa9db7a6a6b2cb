"""Image data: data=shapes (generated, embedded) and data=imagefolder, in the text data's order.

Both are a list of samples indexed 0..n-1, read through the same `GlobalOrder` as token data:
global batch s is stream positions [s*G, (s+1)*G) of one seeded permutation per epoch, rank r
takes its contiguous G/W and cuts K micro-batches of b. So the images of global batch s depend
only on (seed, data, G), never on the world size or data.num_workers.

Decoding and augmentation run in the DataLoader's workers. Augmentation (random resized crop and
horizontal flip, train split only) draws from a generator seeded by (seed, stream position):
the same sample at the same position gets the same crop on 1 rank or 64.

  shapes       image i of a split is a pure function of (split, i): one of 8 patterns (disc,
               square, triangle, ring, cross, horizontal/vertical stripes, checkerboard; label
               i % num_classes) at a random place, size and colour pair, with pixel noise. A
               small CNN separates them in minutes on a CPU; nothing is stored.
  imagefolder  data.path/<class>/<image> (or data.path/train/<class>/..., data.path/val/...):
               classes are the sorted folder names; without a val/ folder every 50th image of
               the sorted list is held out. Only the file list is held; images decode on use.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
PATTERNS = ("disc", "square", "triangle", "ring", "cross", "hstripes", "vstripes", "checker")
_SPLIT_SEED = {"train": 11, "val": 12}


def shape_image(split: str, index: int, size: int, num_classes: int) -> tuple[np.ndarray, int]:
    """(uint8 [size, size, 3], label) of generated image `index` of `split`."""
    label = index % num_classes
    rng = np.random.default_rng([_SPLIT_SEED[split], index])
    y, x = np.mgrid[-1 : 1 : size * 1j, -1 : 1 : size * 1j]
    cx, cy = rng.uniform(-0.3, 0.3, 2)
    r = rng.uniform(0.35, 0.6)
    dx, dy = x - cx, y - cy
    freq, phase = rng.uniform(6, 10), rng.uniform(0, 2 * np.pi)
    mask = {
        "disc": lambda: dx**2 + dy**2 < r**2,
        "square": lambda: np.maximum(abs(dx), abs(dy)) < 0.8 * r,
        "triangle": lambda: (abs(dy) < 0.7 * r) & (abs(dx) < 0.6 * (dy + 0.7 * r)),
        "ring": lambda: abs(np.sqrt(dx**2 + dy**2) - 0.75 * r) < 0.2 * r,
        "cross": lambda: (
            (np.minimum(abs(dx), abs(dy)) < 0.2 * r) & (np.maximum(abs(dx), abs(dy)) < r)
        ),
        "hstripes": lambda: np.sin(y * freq + phase) > 0,
        "vstripes": lambda: np.sin(x * freq + phase) > 0,
        "checker": lambda: np.sin(x * freq + phase) * np.sin(y * freq) > 0,
    }[PATTERNS[label]]()
    background = rng.uniform(0.0, 0.45, 3)
    foreground = np.clip(background + rng.uniform(0.35, 0.55, 3) * rng.choice([-1, 1]), 0, 1)
    if foreground.mean() < background.mean():
        foreground, background = background, foreground
    img = np.where(mask[..., None], foreground, background) + rng.normal(0, 0.08, (size, size, 3))
    return (np.clip(img, 0, 1) * 255).astype(np.uint8), label


class ShapesSplit:
    def __init__(self, split: str, n: int, size: int, num_classes: int):
        self.split, self.n, self.size, self.num_classes = split, n, size, num_classes

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return shape_image(self.split, int(i), self.size, self.num_classes)

    def describe(self, i: int) -> str:
        return f"generated {self.split} image {i}"


class FolderSplit:
    """Sorted (path, label) list of an imagefolder split; images decode on use, in workers."""

    def __init__(self, files: list[tuple[str, int]], convert_rgb: bool):
        self.files, self.convert_rgb = files, convert_rgb

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        from PIL import Image

        path, label = self.files[int(i)]
        try:
            with Image.open(path) as img:
                img.load()
                if img.mode != "RGB" and self.convert_rgb:
                    img = img.convert("RGB")
                array = np.asarray(img)
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: cannot decode this image ({e}); replace or delete the "
                             "file") from None  # fmt: skip
        if array.ndim != 3 or array.shape[2] != 3:
            raise ValueError(f"{path}: mode {img.mode}, not RGB; set data.image.convert_rgb=true "
                             "or convert the folder to RGB")  # fmt: skip
        return array, label

    def describe(self, i: int) -> str:
        return self.files[int(i)][0]


def folder_classes(root: Path) -> tuple[Path, Path | None, list[str]]:
    """(train dir, val dir or None, class names) of an imagefolder root."""
    train = root / "train" if (root / "train").is_dir() else root
    val = root / "val" if train != root and (root / "val").is_dir() else None
    classes = sorted(p.name for p in train.iterdir() if p.is_dir() and not p.name.startswith("."))
    return train, val, classes


def folder_files(split_dir: Path, classes: list[str]) -> list[tuple[str, int]]:
    out = []
    for label, name in enumerate(classes):
        here = split_dir / name
        if not here.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(here):
            dirnames.sort()
            for f in sorted(filenames):
                if f.lower().endswith(EXTENSIONS):
                    out.append((os.path.join(dirpath, f), label))
    return out


@dataclass
class ImageData:
    """What the trainer reads from data: splits, the label count, the image processor (saved
    with every checkpoint, like a tokenizer), and the fingerprint resume compares."""

    train: object
    val: object
    labels: list[str]
    tokenizer: object  # the image processor: save_pretrained() into the checkpoint's hf/
    fingerprint: str
    pad_id: int = 0  # unused: images have no padding

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def samples(self, split: str, data_cfg=None):
        return self.train if split == "train" else self.val


def open_images(cfg, progress: bool = False) -> ImageData:
    """data=shapes|imagefolder -> ImageData. Folder contents are checked by vision.checks (in
    validate(), before any process group); this only lists what passed."""
    from gradcycle.vision.processor import image_processor

    im = cfg.data.image
    if cfg.data.name == "shapes":
        train = ShapesSplit("train", im.train_samples, im.size, im.num_classes)
        val = ShapesSplit("val", im.val_samples, im.size, im.num_classes)
        labels = list(PATTERNS[: im.num_classes])
        key = f"shapes/{im.size}/{im.num_classes}/{im.train_samples}/{im.val_samples}"
    else:
        train_dir, val_dir, labels = folder_classes(Path(cfg.data.path).expanduser())
        files = folder_files(train_dir, labels)
        if val_dir is not None:
            train, val = files, folder_files(val_dir, labels)
        else:  # every 50th image held out, by sorted position: stable as the folder is
            train = [f for i, f in enumerate(files) if i % 50 != 49]
            val = [f for i, f in enumerate(files) if i % 50 == 49] or files[:1]
        digest = hashlib.sha256()
        for path, label in train + val:
            digest.update(f"{os.path.relpath(path, cfg.data.path)}\0{label}\0".encode())
            digest.update(str(os.path.getsize(path)).encode())
        key = f"imagefolder/{digest.hexdigest()}"
        train, val = FolderSplit(train, im.convert_rgb), FolderSplit(val, im.convert_rgb)
    fingerprint = hashlib.sha256(key.encode()).hexdigest()[:16]
    return ImageData(train, val, labels, image_processor(cfg), fingerprint)
