"""validation.validate()'s checks for task=image: every bad input stops here, before any process
group starts or anything is written (exit 2 through gradcycle.cli).

- data: data=shapes|imagefolder and data.image.*; an imagefolder with no class folders, a class
  without images, a file PIL cannot open (or, with data.image.verify=header, a PNG whose chunks
  are truncated or corrupt; verify=full decodes every image), grayscale/RGBA beside RGB (unless
  data.image.convert_rgb=true): one message naming the file and the fix;
- the model: model.image or model.pretrained builds (on the meta device: nothing allocated), its
  label count and resolution agree with the data's, its parameters can be drawn shard by shard,
  the sharded backends and activation checkpointing find its blocks;
- BatchNorm: the guard (batchnorm.check_guard) for the configured micro-batch and world size.
"""

from __future__ import annotations

import os
from pathlib import Path


def _positive(name: str, value) -> None:
    if value is None or value <= 0:
        raise ValueError(f"{name}={value} must be > 0")


def check_image(cfg) -> None:
    data, im, m = cfg.data, cfg.data.image, cfg.model
    if data.name not in ("shapes", "imagefolder"):
        raise ValueError(f"task=image with data={data.name}: image classification reads "
                         "data=shapes (generated, no download) or data=imagefolder "
                         "data.path=<folder>")  # fmt: skip
    for key in ("size", "train_samples", "val_samples", "num_classes"):
        _positive(f"data.image.{key}", im[key])
    if not 0 < im.crop_scale <= 1:
        raise ValueError(f"data.image.crop_scale={im.crop_scale} must be within (0, 1]")
    for key in ("mean", "std"):
        v = im[key]
        if v is not None and (len(v) != 3 or (key == "std" and min(v) <= 0)):
            raise ValueError(f"data.image.{key}={list(v)}: give 3 values, one per RGB channel"
                             f"{' (all > 0)' if key == 'std' else ''}, or null")  # fmt: skip
    if im.verify not in ("header", "full", "off"):
        raise ValueError(f"data.image.verify={im.verify!r}: choose header, full or off")
    if m.bn_momentum not in ("as_is", "per_cycle"):
        raise ValueError(f"model.bn_momentum={m.bn_momentum!r}: choose as_is or per_cycle")
    if m.config is not None:
        raise ValueError("model.config is the causal-LM architecture setting; with task=image set "
                         "model.image={model_type: ..., ...} or model.pretrained")  # fmt: skip
    if m.pretrained and not (Path(m.pretrained).expanduser() / "config.json").is_file():
        raise ValueError(f"model.pretrained={m.pretrained}: no config.json there; task=image "
                         "loads a local save_pretrained folder (nothing downloads)")  # fmt: skip
    if data.name == "shapes":
        from gradcycle.vision.data import PATTERNS

        if not 2 <= im.num_classes <= len(PATTERNS):
            raise ValueError(f"data.image.num_classes={im.num_classes}: data=shapes generates "
                             f"2..{len(PATTERNS)} classes")  # fmt: skip
        labels = im.num_classes
    else:
        labels = check_folder(cfg)
    model = check_model(cfg, labels)
    mbs = cfg.train.micro_batch_size
    if isinstance(mbs, int):
        from gradcycle.vision.batchnorm import check_guard, has_batchnorm

        if has_batchnorm(model):
            check_guard(m, mbs, int(os.environ.get("WORLD_SIZE", 1)))


def check_model(cfg, labels: int):
    """Build on meta; the checks that need the model. Returns the meta model."""
    from gradcycle.vision.model import build_model, vision_blocks
    from gradcycle.weights import init

    m = cfg.model
    try:
        model = build_model(m, labels, "meta", image_size=cfg.data.image.size)
    except (ValueError, TypeError, OSError) as e:
        what = (
            f"model.pretrained={m.pretrained}" if m.pretrained else f"model.image={dict(m.image)}"
        )
        raise ValueError(f"{what}: not an image classifier transformers builds ({e})") from None
    config = model.config
    source = "model.pretrained's config.json" if m.pretrained else "model.image.num_labels"
    if config.num_labels != labels:
        raise ValueError(
            f"{source} says {config.num_labels} labels but the data has {labels} classes "
            f"(data={cfg.data.name}): train on data with {config.num_labels} classes, or "
            + ("fine-tune from a model with that many labels" if m.pretrained
               else "drop model.image.num_labels (it then follows the data)")
        )  # fmt: skip
    size = getattr(config, "image_size", None)
    if isinstance(size, int) and size != cfg.data.image.size and _has_positions(config):
        raise ValueError(
            f"data.image.size={cfg.data.image.size} but the model's position embeddings are for "
            f"image_size={size}: set data.image.size={size}"
            + ("" if m.pretrained else " or model.image.image_size")
        )
    if not m.pretrained:
        try:
            init.init_plan(model)
        except ValueError as e:
            raise ValueError(f"model.image: {e}") from None
    needs_blocks = (
        cfg.backend.name in ("fsdp", "hsdp") or cfg.activation_checkpointing.mode != "none"
    )
    if needs_blocks and vision_blocks(model) is None:
        raise ValueError(f"{type(model).__name__}: cannot find its repeated blocks, which "
                         "backend=fsdp|hsdp and activation checkpointing need; use "
                         "backend=ddp|zero1|zero2|zero3 without activation checkpointing")  # fmt: skip
    return model


def _has_positions(config) -> bool:
    return getattr(config, "model_type", "") in ("vit", "deit", "beit", "dinov2")


def check_folder(cfg) -> int:
    """data=imagefolder: returns the class count; ValueError naming the file/folder and fix."""
    from gradcycle.vision.data import EXTENSIONS, folder_classes, folder_files

    im = cfg.data.image
    if not cfg.data.path:
        raise ValueError("data=imagefolder needs data.path=<folder of class folders>")
    root = Path(cfg.data.path).expanduser()
    if not root.is_dir():
        raise ValueError(f"data.path={cfg.data.path}: no such folder (data=imagefolder wants "
                         "<path>/<class>/<image> or <path>/train/<class>/<image>)")  # fmt: skip
    train, val, classes = folder_classes(root)
    if len(classes) < 2:
        raise ValueError(f"data.path={cfg.data.path}: {len(classes)} class folder(s) in {train}; "
                         "image classification needs at least 2 (<path>/<class>/<image>)")  # fmt: skip
    files = []
    for split_dir in (train, val) if val is not None else (train,):
        here = folder_files(split_dir, classes)
        for label, name in enumerate(classes):
            if split_dir == train and not any(lab == label for _, lab in here):
                raise ValueError(
                    f"{split_dir / name}: no images ({', '.join(EXTENSIONS)}) in this class "
                    "folder; add images or remove the folder"
                )  # fmt: skip
        files += here
    if im.verify != "off":
        check_images([f for f, _ in files], im.verify == "full", im.convert_rgb)
    return len(classes)


def check_images(paths: list[str], decode: bool, convert_rgb: bool) -> None:
    """Open every image (header; PNG chunk CRCs through PIL's verify(); or a full decode)."""
    from PIL import Image

    modes: dict[str, str] = {}
    for path in paths:
        try:
            with Image.open(path) as img:
                mode = img.mode
                img.verify() if not decode else img.load()
        except Exception as e:  # PIL raises OSError, SyntaxError, struct.error, ... on bad files
            raise ValueError(f"{path}: unreadable or truncated image ({type(e).__name__}: {e}); "
                             "replace or delete the file (data.image.verify=off skips this "
                             "check)") from None  # fmt: skip
        modes.setdefault(mode, path)
    if not convert_rgb and set(modes) - {"RGB"}:
        other = sorted(set(modes) - {"RGB"})
        raise ValueError(
            f"the images are not all RGB: mode {other[0]} in {modes[other[0]]}"
            f"{' beside RGB' if 'RGB' in modes else ''} (modes found: {', '.join(sorted(modes))}); "
            "set data.image.convert_rgb=true to convert every image to RGB when it is read, or "
            "convert the folder"
        )
