"""Export a checkpoint as a Hugging Face model directory, in one process, on CPU.

    python -m gradcycle.export <checkpoint> <out_dir> [--dtype fp32|bf16|fp16]

<checkpoint> is a step_<N> directory, a run's checkpoints/ directory or the run dir itself (then
the checkpoint `latest` names). The shards are consolidated whatever world size wrote them: DCP
checkpoints (ddp/fsdp/hsdp) are read without a process group, DeepSpeed ZeRO-1/2/3 partitions
through DeepSpeed's zero_to_fp32. The result is what `save_pretrained` writes (safetensors +
config.json) plus the run's tokenizer, loadable with AutoModelForCausalLM.from_pretrained.
Weights are the fp32 master copy unless --dtype says otherwise. Nothing is written at <out_dir>
unless the export succeeds (it is assembled next to it and renamed).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

from gradcycle.checkpoint_index import check_files, read_meta, resolve
from gradcycle.safe_load import dcp_load, dcp_reader, weights_only_loads

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def dcp_model_state(state_dir: Path) -> dict[str, torch.Tensor]:
    """The model's full tensors from a DCP checkpoint (any number of shards), no process group."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = dcp_reader(state_dir).read_metadata()
    model = {
        key[len("model.") :]: torch.empty(item.size, dtype=item.properties.dtype)
        for key, item in metadata.state_dict_metadata.items()
        if key.startswith("model.") and isinstance(item, TensorStorageMetadata)
    }
    if not model:
        raise ValueError(f"{state_dir / '.metadata'}: no model tensors in this checkpoint")
    dcp_load({"model": model}, state_dir, no_dist=True)
    return model


def zero_model_state(state_dir: Path) -> dict[str, torch.Tensor]:
    """fp32 weights consolidated from DeepSpeed ZeRO partitions (any stage, any world size)."""
    from gradcycle.backends.deepspeed import import_deepspeed

    import_deepspeed(torch.device("cpu"))
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tags = [p.name for p in state_dir.iterdir() if p.is_dir()]
    if len(tags) != 1:
        raise ValueError(f"{state_dir}: expected one DeepSpeed checkpoint tag dir, found {tags}")
    with weights_only_loads():
        sd = get_fp32_state_dict_from_zero_checkpoint(str(state_dir), tag=tags[0])
    return dict(sd)


def export(checkpoint: str | Path, out_dir: str | Path, dtype: str = "fp32",
           trust_remote_code: bool = False) -> Path:  # fmt: skip
    """Write the HF model directory; raises ValueError naming the file on bad input."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    step_dir = resolve(checkpoint)
    meta = read_meta(step_dir)
    check_files(step_dir, meta)
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not empty: choose a new output directory")
    hf_dir = step_dir / "hf"
    if not (hf_dir / "config.json").is_file():
        raise ValueError(f"{hf_dir / 'config.json'} is missing: the checkpoint has no HF config")
    if meta.get("trust_remote_code") and not trust_remote_code:
        raise ValueError(
            f"{step_dir} was trained with model.trust_remote_code=true: pass --trust-remote-code "
            "to run the model's own code for the export"
        )

    state_dir = step_dir / "state"
    sd = dcp_model_state(state_dir) if meta["format"] == "dcp" else zero_model_state(state_dir)
    config = AutoConfig.from_pretrained(str(hf_dir), trust_remote_code=trust_remote_code)
    config.use_cache = True  # training turns the KV cache off; generation wants it back
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    expected = model.state_dict()
    tied = {k for k in expected if k not in sd and _is_tied(model, k)}
    missing = sorted(set(expected) - set(sd) - tied)
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{state_dir}: the weights do not match {hf_dir / 'config.json'}: missing "
            f"{missing[:5]}, unexpected {unexpected[:5]}"
        )
    for key, value in sd.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ValueError(
                f"{state_dir}: {key} has shape {list(value.shape)}, the config expects "
                f"{list(expected[key].shape)}"
            )
    model.load_state_dict({k: v.to(DTYPES[dtype]) for k, v in sd.items()}, strict=False,
                          assign=True)  # fmt: skip
    model.tie_weights()
    config.dtype = DTYPES[dtype]

    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    for f in hf_dir.iterdir():  # the tokenizer files (config.json was rewritten above)
        if f.is_file() and f.name not in ("config.json", "generation_config.json"):
            shutil.copy2(f, tmp / f.name)
    if out.exists():
        out.rmdir()  # empty, checked above
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out)
    return out


def _is_tied(model, key: str) -> bool:
    """lm_head.weight of a tied-embedding model is the embedding matrix: saved once or not at all."""
    out_emb = model.get_output_embeddings()
    return (bool(getattr(model.config, "tie_word_embeddings", False)) and out_emb is not None
            and key.startswith("lm_head."))  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gradcycle.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("checkpoint")
    parser.add_argument("out_dir")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--trust-remote-code", action="store_true")
    args = parser.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out_dir, args.dtype, args.trust_remote_code)
    except ValueError as e:
        print(f"gradcycle.export: error: {e}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
