"""Pixels: the image processor (resolution, per-channel mean/std) and the train augmentation.

The per-channel normalisation is the model's own: model.pretrained's preprocessor_config.json
(AutoImageProcessor) if it has one, else data.image.mean/std, else 0.5 (what ViT's processor
uses). The resolution is always data.image.size. The processor is saved with every checkpoint
and export, so `AutoImageProcessor.from_pretrained(<export>)` prepares inputs the same way.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def image_processor(cfg):
    from transformers import AutoImageProcessor

    try:  # transformers 5's PIL-backed processor (the default one wants torchvision)
        from transformers import ViTImageProcessorPil as ViTImageProcessor
    except ImportError:
        from transformers import ViTImageProcessor

    im, size = cfg.data.image, cfg.data.image.size
    processor = None
    pretrained = cfg.model.pretrained
    if pretrained and (Path(pretrained).expanduser() / "preprocessor_config.json").is_file():
        processor = AutoImageProcessor.from_pretrained(str(Path(pretrained).expanduser()))
    mean = list(im.mean) if im.mean is not None else getattr(processor, "image_mean", None)
    std = list(im.std) if im.std is not None else getattr(processor, "image_std", None)
    return ViTImageProcessor(
        do_resize=True, size={"height": size, "width": size}, do_rescale=True,
        do_normalize=True, image_mean=mean or [0.5] * 3, image_std=std or [0.5] * 3,
    )  # fmt: skip


def channel_stats(processor) -> tuple[np.ndarray, np.ndarray]:
    mean = np.asarray(processor.image_mean, np.float32).reshape(3, 1, 1)
    return mean, np.asarray(processor.image_std, np.float32).reshape(3, 1, 1)


def _crop_box(rng: np.random.Generator, w: int, h: int, min_scale: float) -> tuple:
    """A random resized crop (torchvision's rule: area share and aspect ratio, 10 tries)."""
    for _ in range(10):
        area = w * h * rng.uniform(min_scale, 1.0)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            return (x0, y0, x0 + cw, y0 + ch)
    return (0, 0, w, h)


def to_pixels(array: np.ndarray, size: int, mean: np.ndarray, std: np.ndarray,
              rng: np.random.Generator | None = None, crop_scale: float = 1.0) -> np.ndarray:  # fmt: skip
    """uint8 [H, W, 3] -> normalised float32 [3, size, size]; `rng`: random crop + flip."""
    from PIL import Image

    img = Image.fromarray(array)
    box = (0, 0, img.width, img.height)
    if rng is not None:
        box = _crop_box(rng, img.width, img.height, crop_scale)
    if box != (0, 0, size, size) or img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR, box=box)
    out = np.asarray(img, np.float32).transpose(2, 0, 1) / 255.0
    if rng is not None and rng.random() < 0.5:
        out = out[:, :, ::-1]
    return (out - mean) / std
