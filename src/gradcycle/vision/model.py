"""Image classifiers: transformers' AutoModelForImageClassification, built like the causal LM.

model.image (a dict: `model_type` and that architecture's config fields) builds a random init;
model.pretrained (a save_pretrained folder) loads weights. The build follows gradcycle.model's
rules, so every backend gets what it expects: "meta" builds shapes only (fsdp, hsdp shard and
fill them); any other device builds on meta and draws the seeded, world-size-independent init
(gradcycle.weights.init, the architecture's own `_init_weights` replayed) on the device; under
ZeRO-3 the parameters are partitioned as they are created and each rank fills its own.

The number of labels comes from the data (data.image.num_classes, or the imagefolder's class
folders); the resolution from data.image.size.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# Where the repeated blocks live under the backbone (the FSDP unit and the activation-
# checkpointing unit): ViT/DeiT/DINOv2 layers, ResNet/ConvNeXt/RegNet/BiT stages, Swin layers
BLOCKS = ("layers", "encoder.layer", "encoder.layers", "encoder.stages")


def image_config(model_cfg, num_labels: int, image_size: int):
    """The HF config: model.pretrained's own, or model.image's (random init)."""
    from transformers import AutoConfig

    if model_cfg.pretrained:
        config = AutoConfig.from_pretrained(str(Path(model_cfg.pretrained).expanduser()),
                                            trust_remote_code=model_cfg.trust_remote_code)  # fmt: skip
    else:
        from omegaconf import DictConfig, OmegaConf

        image = model_cfg.image
        fields = OmegaConf.to_container(image) if isinstance(image, DictConfig) else dict(image)
        model_type = fields.pop("model_type", None)
        if not model_type:
            raise ValueError("task=image needs model.image.model_type (e.g. resnet, vit, "
                             "convnext) or model.pretrained=<save_pretrained folder>")  # fmt: skip
        try:
            config = AutoConfig.for_model(model_type, **fields)
        except (ValueError, KeyError) as e:
            raise ValueError(f"model.image.model_type={model_type}: {e}") from None
        if "num_labels" not in fields:
            config.num_labels = num_labels
        if hasattr(config, "image_size") and "image_size" not in fields:
            config.image_size = image_size
    return config


def _from_config(config, model_cfg, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForImageClassification

    from gradcycle.weights import names

    kwargs = {"attn_implementation": "sdpa"} if _has_attention(config) else {}
    model = AutoModelForImageClassification.from_config(
        config, trust_remote_code=model_cfg.trust_remote_code, dtype=dtype, **kwargs
    )
    names.remember(model)  # the checkpoint key mapping, before FSDP2 renames the class
    return model


def _has_attention(config) -> bool:
    return getattr(config, "model_type", "") in ("vit", "deit", "dinov2", "beit", "swin")


def build_model(model_cfg, num_labels: int, device: str | torch.device = "cpu",
                seed: int | None = None, dtype: torch.dtype = torch.float32,
                image_size: int = 224) -> nn.Module:  # fmt: skip
    """gradcycle.model.build_model for image classifiers (same device and seed semantics)."""
    from transformers import AutoModelForImageClassification, initialization
    from transformers.integrations import is_deepspeed_zero3_enabled

    from gradcycle.model import _no_zero3_hf_init
    from gradcycle.weights import init, names, pretrained

    seed = torch.initial_seed() if seed is None else seed
    zero3 = is_deepspeed_zero3_enabled()
    if model_cfg.pretrained and str(device) != "meta" and not zero3:
        model = AutoModelForImageClassification.from_pretrained(
            str(Path(model_cfg.pretrained).expanduser()), dtype=dtype,
            trust_remote_code=model_cfg.trust_remote_code,
        )  # fmt: skip
        names.remember(model)
        return model.train().to(device)  # from_pretrained leaves eval mode (BatchNorm!)
    config = image_config(model_cfg, num_labels, image_size)
    if str(device) == "meta" or not zero3:
        with torch.device("meta"), _without_zero3():
            model = _from_config(config, model_cfg, dtype)
        if str(device) == "meta":
            return model
        model.to_empty(device=device)
        init.init_parameters(model, seed)
        init.recompute_buffers(model)
        return model
    with torch.device(device), initialization.no_init_weights(), _no_zero3_hf_init():
        model = _from_config(config, model_cfg, dtype)
    if model_cfg.pretrained:
        pretrained.load_into(model, Path(model_cfg.pretrained).expanduser())
    else:
        init.init_parameters(model, seed)
    return model


@contextlib.contextmanager
def _without_zero3():
    """A meta build (planner, FLOP count) inside a ZeRO-3 run: plain shapes, not zero.Init
    partitions (transformers builds under zero.Init while a HfDeepSpeedConfig is alive)."""
    from transformers.integrations import deepspeed as hf_ds

    saved = getattr(hf_ds, "_hf_deepspeed_config_weak_ref", None)
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


def vision_blocks(model: nn.Module) -> nn.ModuleList | None:
    """The repeated blocks of an image classifier's backbone (gradcycle.model.decoder_layers
    asks), or None."""
    backbone = getattr(model, "base_model", None)
    if backbone is None or backbone is model or not hasattr(model, "classifier"):
        return None
    for path in BLOCKS:
        try:
            found = backbone.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(found, nn.ModuleList):
            return found
    return None


def image_loss(model, batch: dict, norm, **_ignored) -> torch.Tensor:
    """Summed cross-entropy over the micro-batch's images / the cycle's image count: the image
    analogue of trainer.token_loss (the `loss.*` settings concern LM logits and do not apply)."""
    logits = model(pixel_values=batch["pixel_values"]).logits
    return F.cross_entropy(logits.float(), batch["labels"], reduction="sum") / norm


def eval_sums(model, batch: dict, **_ignored) -> torch.Tensor:
    """[summed cross-entropy, correct predictions] of an eval micro-batch."""
    logits = model(pixel_values=batch["pixel_values"]).logits.float()
    loss = F.cross_entropy(logits, batch["labels"], reduction="sum")
    correct = (logits.argmax(-1) == batch["labels"]).sum().to(loss.dtype)
    return torch.stack([loss, correct])
