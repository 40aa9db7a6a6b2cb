"""Random initialisation that every backend and world size draws identically, shard by shard.

What to draw is the architecture's own: its `_init_weights` (HF's per-model rules: Linear,
Conv1D and Embedding weights ~ normal(0, initializer_range), GPT-2's residual `c_proj` scaled by
1/sqrt(2 n_layer), an Embedding's padding row 0, LayerNorm/RMSNorm weights 1 (Gemma's 0, as its
norm computes 1 + weight), biases 0, ...) runs once over meta-device stand-ins of the parameters
with transformers' init functions *recording* what they would write instead of writing it
(`init_plan`). Nothing is drawn there, and it works on any layout (plain, FSDP2 shards, ZeRO-3
partitions): a stand-in has the parameter's full shape. A parameter the rules leave unset, or set
by a draw that is not elementwise independent (orthogonal, eye, ...), fails with its module type
and name before anything is drawn.

The values come from torch's CPU generator, seeded per block of BLOCK consecutive elements of the
full tensor from (seed, parameter name, block index). A rank draws only the blocks that overlap
its own range (`pieces.Piece`), so:
- the weights are the same bit for bit on ddp, fsdp, hsdp and zero1-3, on any world size and on
  CPU or GPU (the draw is always on the CPU, in fp32, then cast to the storage dtype); a
  Conv1D's [in, out] weight is drawn in its stored layout, so its row shards are cut like any other;
- a rank allocates its shards plus one block (4 MiB), and draws ~1/W of the values: start-up
  time falls with the world size instead of one rank drawing the whole model.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from gradcycle.weights.pieces import pieces

BLOCK = 1 << 20  # elements per generator block (4 MiB in fp32)


@dataclass(frozen=True)
class Op:
    """One write of `_init_weights` into elements [lo, hi) of a parameter's flat full tensor."""

    kind: str  # normal | trunc_normal | uniform | constant | unsupported
    args: tuple  # normal (mean, std); trunc_normal (mean, std, a, b); uniform (a, b); constant (v,)
    lo: int
    hi: int


def block_seed(seed: int, name: str, block: int) -> int:
    digest = hashlib.sha256(f"{seed}/{name}/{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _sample(block: torch.Tensor, op: Op, gen: torch.Generator) -> None:
    if op.kind == "normal":
        block.normal_(op.args[0], op.args[1], generator=gen)
    elif op.kind == "uniform":
        block.uniform_(op.args[0], op.args[1], generator=gen)
    else:  # trunc_normal: torch's own (uniform, then the inverse CDF), elementwise
        torch.nn.init.trunc_normal_(block, *op.args, generator=gen)


def fill_random(out: torch.Tensor, seed: int, key: str, start: int, op: Op) -> None:
    """out = elements [start, start + len(out)) of the draw `op` makes over [op.lo, op.hi)."""
    end = start + out.numel()
    gen = torch.Generator(device="cpu")
    pos = start
    while pos < end:
        first = op.lo + (pos - op.lo) // BLOCK * BLOCK
        length = min(BLOCK, op.hi - first)
        gen.manual_seed(block_seed(seed, key, (first - op.lo) // BLOCK))
        block = torch.empty(length, dtype=torch.float32)
        _sample(block, op, gen)
        stop = min(end, first + length)
        out[pos - start : stop - start].copy_(block[pos - first : stop - first])
        pos = stop


# -- recording what _init_weights does ---------------------------------------------------------
def _full_shape(param) -> tuple[int, ...]:
    return tuple(getattr(param, "ds_shape", None) or param.shape)  # ZeRO-3: the unpartitioned shape


class _Recorder:
    """transformers.initialization's functions, recording writes into stand-ins and running the
    real function on anything else the `allowed` set names (buffers)."""

    def __init__(self, standins: dict[int, str], allowed: set[int]):
        self.standins, self.allowed = standins, allowed
        self.ops: dict[str, list[Op]] = {}
        self.written: set[int] = set()

    def _target(self, t: torch.Tensor):
        """(name, lo, hi, numel) of the stand-in `t` is or views; None for any other tensor."""
        base = t if id(t) in self.standins else getattr(t, "_base", None)
        if base is None or id(base) not in self.standins:
            return None
        if base is not t and not t.is_contiguous():
            return self.standins[id(base)], None, None, base.numel()  # not one flat range
        lo = t.storage_offset() - base.storage_offset()
        return self.standins[id(base)], lo, lo + t.numel(), base.numel()

    def record(self, t, kind: str, args: tuple, real) -> torch.Tensor:
        target = self._target(t)
        if target is None:
            base = getattr(t, "_base", None)
            owner = id(t) if id(t) in self.allowed else id(base) if base is not None else None
            if owner in self.allowed:
                self.written.add(owner)
                real()
            return t
        name, lo, hi, numel = target
        if lo is None:
            kind, args, lo, hi = "unsupported", (f"{kind} on a strided slice",), 0, 0
        ops = self.ops.setdefault(name, [])
        if (lo, hi) == (0, numel):
            ops.clear()  # the whole tensor: what came before is overwritten
        ops.append(Op(kind, args, lo, hi))
        return t

    def functions(self, hf_init) -> dict:
        """A recording stand-in for each of transformers.initialization's functions."""
        originals = {name: getattr(hf_init, name) for name in dir(hf_init)
                     if name.endswith("_") and not name.startswith("_")}  # fmt: skip

        def make(name):
            rule = _RULES.get(name)

            def fn(tensor, *args, **kwargs):
                kwargs.pop("generator", None)
                real = lambda: originals[name](tensor, *args, **kwargs)  # noqa: E731
                if rule is None:
                    return self.record(tensor, "unsupported", (name,), real)
                return self.record(tensor, rule[0], rule[1](tensor, *args, **kwargs), real)

            return fn

        # Compositions (lecun_normal_, default_flax_embed_init_) call the recorded primitives.
        skip = {"lecun_normal_", "default_flax_embed_init_"}
        return {name: make(name) for name in originals if name not in skip}


def _xavier_std(t, gain=1.0) -> float:
    fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(t)
    return gain * math.sqrt(2.0 / (fan_in + fan_out))


def _normal(t, mean=0.0, std=1.0):
    return float(mean), float(std)


def _trunc_normal(t, mean=0.0, std=1.0, a=-2.0, b=2.0):
    return float(mean), float(std), float(a), float(b)


def _uniform(t, a=0.0, b=1.0):
    return float(a), float(b)


def _xavier_uniform(t, gain=1.0):
    bound = math.sqrt(3) * _xavier_std(t, gain)
    return -bound, bound


# transformers.initialization's function -> (Op kind, its arguments); the rest is unsupported
_RULES = {
    "normal_": ("normal", _normal),
    "trunc_normal_": ("trunc_normal", _trunc_normal),
    "uniform_": ("uniform", _uniform),
    "xavier_uniform_": ("uniform", _xavier_uniform),
    "xavier_normal_": ("normal", lambda t, gain=1.0: (0.0, _xavier_std(t, gain))),
    "zeros_": ("constant", lambda t: (0.0,)),
    "ones_": ("constant", lambda t: (1.0,)),
    "constant_": ("constant", lambda t, val: (float(val),)),
}
SUPPORTED = ", ".join(_RULES)


@contextlib.contextmanager
def _standins(model: nn.Module):
    """Every (module, parameter) gets its own meta stand-in of the full shape while inside (tied
    weights too: each name records what HF's init writes under it, before tying)."""
    names: dict[int, str] = {}
    swapped = []
    for mname, module in model.named_modules():
        for attr, param in list(module._parameters.items()):
            if param is None:
                continue
            standin = nn.Parameter(torch.empty(_full_shape(param), dtype=param.dtype,
                                               device="meta"), requires_grad=False)  # fmt: skip
            names[id(standin)] = f"{mname}.{attr}" if mname else attr
            swapped.append((module, attr, param, standin))
            module._parameters[attr] = standin
    try:
        yield names
    finally:
        for module, attr, param, _ in swapped:
            module._parameters[attr] = param


def _apply_init(module: nn.Module, fn) -> None:
    """transformers' smart_apply: children first, each sub-model with its own _init_weights."""
    from transformers import PreTrainedModel

    for child in module.children():
        _apply_init(child, child._init_weights if isinstance(child, PreTrainedModel) else fn)
    fn(module)


@torch.no_grad()
def _replay(model: nn.Module, allowed: set[int]) -> _Recorder:
    import transformers.initialization as hf_init

    if not hasattr(model, "_init_weights"):
        raise ValueError(f"{type(model).__name__} has no _init_weights (not a transformers "
                         "model): gradcycle initialises transformers models only")  # fmt: skip
    with _standins(model) as names:
        recorder = _Recorder(names, allowed)
        replaced = recorder.functions(hf_init)
        originals = {name: getattr(hf_init, name) for name in replaced}
        for name, fn in replaced.items():
            setattr(hf_init, name, fn)
        try:
            with hf_init.guard_torch_init_functions():  # torch.nn.init.* -> the recorders too
                _apply_init(model, model._init_weights)
        finally:
            for name, fn in originals.items():
                setattr(hf_init, name, fn)
    return recorder


def _owner(model: nn.Module, name: str) -> str:
    owner, _, attr = name.rpartition(".")
    return f"{type(model.get_submodule(owner)).__name__}.{attr}"


def init_plan(model: nn.Module, allowed: set[int] | None = None) -> dict[str, list[Op]]:
    """name -> the writes _init_weights makes to it, for every parameter (tied: its first name);
    writes into the buffers `allowed` names run for real. Raises ValueError naming each
    parameter gradcycle cannot draw shard by shard, before anything is drawn."""
    ops = _replay(model, allowed or set()).ops
    problems = []
    for name, param in model.named_parameters():
        got = ops.get(name)
        bad = [o.args[0] for o in got or [] if o.kind == "unsupported"]
        if bad:
            why = f"_init_weights uses {bad[0]}, which is not drawn element by element"
        elif not got or (got[0].lo, got[0].hi) != (0, math.prod(_full_shape(param))):
            what = "only part of it" if got else "nothing"
            why = (f"{type(model).__name__}._init_weights sets {what} (a module type "
                   "transformers' init does not know, or written by tensor methods gradcycle "
                   "cannot see)")  # fmt: skip
        else:
            continue
        problems.append(f"{name} ({_owner(model, name)}): {why}")
    if problems:
        more = f" (and {len(problems) - 4} more)" if len(problems) > 4 else ""
        raise ValueError(
            f"cannot initialise {type(model).__name__} shard by shard: {'; '.join(problems[:4])}"
            f"{more}. gradcycle replays the architecture's _init_weights through transformers' "
            f"{SUPPORTED}; start from model.pretrained=<dir> instead, or use an architecture "
            "whose init uses only those"
        )
    return ops


def _buffers(model: nn.Module, persistent: bool) -> dict[int, str]:
    out = {}
    for mname, module in model.named_modules():
        for bname, buf in module._buffers.items():
            if buf is not None and (bname in module._non_persistent_buffers_set) != persistent:
                out[id(buf)] = f"{mname}.{bname}" if mname else bname
    return out


@torch.no_grad()
def init_parameters(model: nn.Module, seed: int) -> None:
    """Initialise this rank's part of every parameter in place (any backend's layout), and the
    persistent buffers (whole on every rank) with the architecture's own values."""
    plan = init_plan(model, allowed=set(_buffers(model, persistent=True)))
    for piece in pieces(model):
        end = piece.start + piece.out.numel()
        for k, op in enumerate(plan[piece.name]):
            lo, hi = max(op.lo, piece.start), min(op.hi, end)
            if lo >= hi:
                continue
            out = piece.out[lo - piece.start : hi - piece.start]
            if op.kind == "constant":
                out.fill_(op.args[0])
            else:  # the first whole-tensor draw keys on the name alone (as it always has)
                key = piece.name if k == 0 and op.lo == 0 else f"{piece.name}#{k}"
                fill_random(out, seed, key, lo, op)


@torch.no_grad()
def recompute_buffers(model: nn.Module) -> None:
    """Non-persistent buffers (rotary inverse frequencies, Gemma's embedding scale) of a model
    built on the meta device and then allocated: recomputed here by the model's own init, on this
    rank alone (parameters untouched); nothing is broadcast."""
    transient = _buffers(model, persistent=False)
    if not transient:
        return
    written = _replay(model, allowed=set(transient)).written
    missed = sorted(name for key, name in transient.items() if key not in written)
    if missed:
        raise ValueError(
            f"{type(model).__name__}: buffers {missed[:4]} are outside the state dict and its "
            "_init_weights does not set them: gradcycle cannot recompute them after a "
            "meta-device build"
        )
