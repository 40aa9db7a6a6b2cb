"""The names tensors are saved under in a checkpoint folder vs the model's parameter names.

transformers 5 loads a folder whose keys differ from the module tree through its checkpoint
conversion mapping (`conversion_mapping.get_model_conversion_mapping`: per-architecture renames
such as GPT-NeoX's `embed_out.` -> `lm_head.` or EXAONE's `transformer.h.` -> `model.layers.`,
the `legacy` LayerNorm.gamma/beta renames, the base-model prefix added or stripped), and
`save_pretrained` writes the reverse. The slice reader and the export call the same functions
(`rename_source_key`), so a file key feeds the parameter `from_pretrained` would fill with it.
Converters that change the tensors themselves (MoE experts stacked from per-expert tensors,
fused projections split) cannot be read as row slices: the reader names them and refuses.

The mapping is looked up by the model's class name, which FSDP2 changes (`FSDPGPTNeoXForCausalLM`):
`remember()` stores it on the plain model when it is built.
"""

from __future__ import annotations

from torch import nn

_ATTR = "_gradcycle_conversions"


def _api():
    """transformers' conversion functions, or None on a transformers without them."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            PrefixChange,
            WeightConverter,
            WeightRenaming,
            rename_source_key,
        )
    except ImportError:
        return None
    return (
        get_model_conversion_mapping,
        rename_source_key,
        WeightRenaming,
        WeightConverter,
        PrefixChange,
    )


def remember(model: nn.Module) -> None:
    """Store from_pretrained's transforms for `model` (call before any wrapper renames its class)."""
    api = _api()
    if api is not None and hasattr(model, "base_model_prefix"):
        model.__dict__[_ATTR] = api[0](model)  # as from_pretrained: no key_mapping, no quantizer


def _transforms(model: nn.Module) -> list:
    if _ATTR not in model.__dict__:
        remember(model)
    return model.__dict__.get(_ATTR) or []


def state_names(model: nn.Module) -> set[str]:
    """Every parameter name (tied weights under each name) and persistent buffer name."""
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    for mname, module in model.named_modules():
        for bname, buf in module._buffers.items():
            if buf is not None and bname not in module._non_persistent_buffers_set:
                names.add(f"{mname}.{bname}" if mname else bname)
    return names


def file_keys(model: nn.Module, keys) -> tuple[dict[str, str], list[str]]:
    """(model name -> the file key from_pretrained loads into it, file keys that need a converter)."""
    api = _api()
    targets = dict.fromkeys(state_names(model), True)
    if api is None:
        return {k: k for k in keys if k in targets}, []
    _, rename, renaming_cls, converter_cls, _ = api
    transforms = _transforms(model)
    renamings = [t for t in transforms if isinstance(t, renaming_cls)]
    converters = [t for t in transforms if isinstance(t, converter_cls)]
    prefix = getattr(model, "base_model_prefix", None)
    out: dict[str, str] = {}
    converted = []
    for key in sorted(keys):
        # exactly convert_and_load_state_dict_in_model's two tries
        name, pattern = rename(key, renamings, converters, prefix, targets)
        if name not in targets and key in targets:
            name, pattern = rename(key, [], [], prefix, targets)
        if pattern is not None:
            converted.append(key)
        elif name in targets:
            out.setdefault(name, key)
    return out, converted


def saved_keys(model: nn.Module, names) -> dict[str, str]:
    """model name -> the key save_pretrained writes for it (transformers' reversed renames, as
    revert_weight_conversion applies them to a model built from a config). A tensor a converter
    would split keeps its model name, which from_pretrained loads as it is."""
    api = _api()
    if api is None:
        return {n: n for n in names}
    get_mapping, rename, renaming_cls, converter_cls, prefix_change = api
    forward = [t for t in get_mapping(model, add_legacy=False) if not isinstance(t, prefix_change)]
    reverse = [t.reverse_transform() for t in forward[::-1]]
    renamings = [t for t in reverse if isinstance(t, renaming_cls)]
    converters = [t for t in reverse if isinstance(t, converter_cls)]
    out = {}
    for name in names:
        saved, pattern = rename(name, renamings, converters, reverse=True)
        out[name] = name if pattern is not None else saved
    return out
