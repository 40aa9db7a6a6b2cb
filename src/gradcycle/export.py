"""Export a checkpoint as a Hugging Face model directory, in one process, on CPU, tensor by tensor.

    python -m gradcycle.export <checkpoint> <out_dir> [--dtype fp32|bf16|fp16]
                               [--max-shard-size 5GB]

<checkpoint> is a step_<N> directory, a run's checkpoints/ directory or the run dir itself (then
the checkpoint `latest` names). The shards are consolidated whatever world size wrote them, one
tensor at a time, so the process holds one tensor (never the state dict): DCP checkpoints
(ddp/fsdp/hsdp) are read without a process group, one tensor's chunks per read; DeepSpeed ZeRO-1/2/3
partitions are memory-mapped and each parameter is assembled from its pieces in every rank's
partition. The output is what `save_pretrained` writes: `model.safetensors`, or
`model-0000i-of-0000n.safetensors` + `model.safetensors.index.json` when the weights exceed
`--max-shard-size` (default 5GB, save_pretrained's units: 1GB = 10^9 bytes), config.json, the
run's tokenizer; AutoModelForCausalLM.from_pretrained loads it. Weights are the fp32 master copy
unless --dtype says otherwise. Nothing is written at <out_dir> unless the export succeeds (it is
assembled next to it and renamed).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

from gradcycle.checkpoint_index import check_files, read_meta, resolve
from gradcycle.safe_load import SafeFileSystemReader, weights_only_loads
from gradcycle.weights import names, zero_source
from gradcycle.weights.safetensors_out import Entry, parse_size, write_sharded

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_MAX_SHARD_SIZE = "5GB"


def dcp_model_state(state_dir: Path) -> dict[str, torch.Tensor]:
    """The model's full tensors from a DCP checkpoint, all at once (for tests and small models)."""
    return {name: fetch() for name, (_, _, fetch) in dcp_source(state_dir).items()}


class _MetadataOnce(SafeFileSystemReader):
    """One tensor per dcp.load: read (and check) the metadata file once, not once per tensor."""

    _metadata = None

    def read_metadata(self, *args, **kwargs):
        if self._metadata is None:
            self._metadata = super().read_metadata(*args, **kwargs)
        return self._metadata


def dcp_source(state_dir: Path) -> dict[str, tuple]:
    """name -> (shape, dtype, fetch()) for the model tensors of a DCP checkpoint (any shards)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from gradcycle.safe_load import SafeLoadPlanner, quiet_single_process

    reader = _MetadataOnce(str(state_dir))
    metadata = reader.read_metadata()

    def fetch(name: str, size, dtype) -> torch.Tensor:
        box = {"model": {name: torch.empty(size, dtype=dtype)}}
        with quiet_single_process():
            dcp.load(box, storage_reader=reader, planner=SafeLoadPlanner(), no_dist=True)
        return box["model"][name]

    out = {}
    for key, item in metadata.state_dict_metadata.items():
        if key.startswith("model.") and isinstance(item, TensorStorageMetadata):
            name, size, dtype = key[len("model.") :], item.size, item.properties.dtype
            out[name] = (tuple(size), dtype, lambda n=name, s=size, d=dtype: fetch(n, s, d))
    if not out:
        raise ValueError(f"{state_dir / '.metadata'}: no model tensors in this checkpoint")
    return out


def export(checkpoint: str | Path, out_dir: str | Path, dtype: str = "fp32",
           trust_remote_code: bool = False,
           max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE) -> Path:  # fmt: skip
    """Write the HF model directory; raises ValueError naming the file on bad input."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    max_bytes = parse_size(max_shard_size)
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
    with weights_only_loads():
        source = dcp_source(state_dir) if meta["format"] == "dcp" else zero_source.load(state_dir)
        config = AutoConfig.from_pretrained(str(hf_dir), trust_remote_code=trust_remote_code)
        config.use_cache = True  # training turns the KV cache off; generation wants it back
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        entries = _entries(model, source, state_dir, hf_dir, DTYPES[dtype])
        config.dtype = DTYPES[dtype]

        tmp = out.with_name(f".tmp-{out.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write_sharded(tmp, entries, max_bytes)
    config.save_pretrained(str(tmp))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(str(tmp))
    for f in hf_dir.iterdir():  # the tokenizer files (config.json was rewritten above)
        if f.is_file() and f.name not in ("config.json", "generation_config.json"):
            shutil.copy2(f, tmp / f.name)
    if out.exists():
        out.rmdir()  # empty, checked above
    tmp.rename(out)
    return out


def _entries(model, source: dict, state_dir: Path, hf_dir: Path, dtype) -> list[Entry]:
    """What the HF directory holds, in the model's order: every state-dict tensor once (a tied
    weight under its first name, fetched from whichever name the checkpoint has), under the key
    save_pretrained writes for it (GPT-NeoX's head: embed_out.weight), shapes checked against
    config.json before any data is read."""
    aliases: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
    groups = list(aliases.values())
    params = {n for group in groups for n in group}
    groups += [[name] for name in model.state_dict() if name not in params]  # persistent buffers
    saved = names.saved_keys(model, [group[0] for group in groups])  # save_pretrained's keys
    entries, missing = [], []
    for group in groups:
        found = next((n for n in group if n in source), None)
        if found is None:
            missing.append(group[0])
            continue
        shape, src_dtype, fetch = source[found]
        want = tuple(model.get_parameter(group[0]).shape if group[0] in params
                     else model.get_buffer(group[0]).shape)  # fmt: skip
        if tuple(shape) != want:
            raise ValueError(
                f"{state_dir}: {found} has shape {list(shape)}, the config expects {list(want)}"
            )
        written = dtype if src_dtype.is_floating_point else src_dtype
        entries.append(Entry(saved[group[0]], want, written, fetch))
    unexpected = sorted(set(source) - {n for group in groups for n in group})
    if missing or unexpected:
        raise ValueError(
            f"{state_dir}: the weights do not match {hf_dir / 'config.json'}: missing "
            f"{missing[:5]}, unexpected {unexpected[:5]}"
        )
    return entries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gradcycle.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("checkpoint")
    parser.add_argument("out_dir")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE,
                        help="largest safetensors file (default %(default)s; 1GB = 10^9 bytes)")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out_dir, args.dtype, args.trust_remote_code,
                     args.max_shard_size)  # fmt: skip
    except ValueError as e:
        print(f"gradcycle.export: error: {e}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
