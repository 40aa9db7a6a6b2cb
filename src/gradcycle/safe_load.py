"""Loading checkpoints without executing code from them.

A checkpoint may come from elsewhere; unpickling arbitrary classes would run code. So:
- DCP's `.metadata` is a pickle: it is read by an unpickler that admits only the DCP metadata
  classes, torch dtypes/sizes/layouts and paths;
- DCP's non-tensor items (optimizer hyperparameters) go through torch.load(weights_only=True)
  instead of DCP's default weights_only=False; its tensors already use weights_only=True;
- `weights_only_loads()` makes every torch.load inside it weights_only=True (DeepSpeed's
  checkpoint engine and zero_to_fp32 pass weights_only=False), admitting only the few DeepSpeed
  classes its checkpoints hold.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import pathlib
import pickle
import sys
import warnings
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

_DCP_MODULES = {"torch.distributed.checkpoint.metadata"}
_ALLOWED = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module in _DCP_MODULES and isinstance(getattr(dcp_metadata, name, None), type):
            return getattr(dcp_metadata, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) in _ALLOWED:
            if module == "pathlib":
                return getattr(pathlib, name)
            return pickle.Unpickler.find_class(self, module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from checkpoint metadata")


class SafeFileSystemReader(FileSystemReader):
    def read_metadata(self, *args, **kwargs) -> dcp_metadata.Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = _MetadataUnpickler(io.BytesIO(f.read())).load()
        if not isinstance(metadata, dcp_metadata.Metadata):
            raise pickle.UnpicklingError(f"{path} holds a {type(metadata).__name__}, not Metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        from torch.distributed.checkpoint._traverse import set_element

        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def dcp_reader(path) -> SafeFileSystemReader:
    return SafeFileSystemReader(str(path))


@contextlib.contextmanager
def quiet_single_process():
    """DCP warns on every world-1 save/load that it assumes a single process: it is one."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def dcp_load(state_dict: dict, path, no_dist: bool = False) -> None:
    """dcp.load through the safe reader and planner (collective unless no_dist)."""
    import torch.distributed.checkpoint as dcp

    with quiet_single_process():
        dcp.load(state_dict, storage_reader=dcp_reader(path), planner=SafeLoadPlanner(),
                 no_dist=no_dist)  # fmt: skip


def _deepspeed_safe_globals() -> list:
    """The non-tensor classes DeepSpeed writes into its checkpoints (loss scaler, stage enum)."""
    found = []
    for module, names in (
        ("deepspeed.runtime.fp16.loss_scaler", ("LossScaler", "DynamicLossScaler")),
        ("deepspeed.runtime.zero.config", ("ZeroStageEnum",)),
        ("deepspeed.utils.tensor_fragment", ("fragment_address",)),
    ):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        found += [getattr(mod, n) for n in names if hasattr(mod, n)]
    return found


def unreadable_file(state_dir: Path, fmt: str) -> Path | None:
    """After a failed load: the first file whose records do not deserialise, else None."""
    if fmt == "dcp":
        for info in dcp_reader(state_dir).read_metadata().storage_data.values():
            path = state_dir / info.relative_path
            with open(path, "rb") as f:
                f.seek(info.offset)
                blob = f.read(info.length)
            try:
                torch.load(io.BytesIO(blob), weights_only=True)
            except Exception:
                return path
        return None
    for path in sorted(state_dir.rglob("*.pt")):
        try:
            torch.load(path, weights_only=True, map_location="cpu")
        except Exception:
            return path
    return None


@contextlib.contextmanager
def weights_only_loads():
    """Every torch.load in this block runs with weights_only=True (whatever its caller asked)."""
    original = torch.load

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    extra = _deepspeed_safe_globals() if _deepspeed_imported() else []
    torch.load = load
    try:
        with torch.serialization.safe_globals(extra):
            yield
    finally:
        torch.load = original


def _deepspeed_imported() -> bool:
    return "deepspeed" in sys.modules
