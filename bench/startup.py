"""Start-up of a large model on CPU ranks: peak RSS per rank, time to the first step, bytes read.

Each configuration launches W real ranks (one process each, as torchrun would) running
gradcycle's trainer for one SGD step on a Llama with llama-7b widths (hidden 4096, MLP 11008,
32 heads, vocabulary 32000) and `--layers` decoder layers (2: 0.67B parameters, 2.7 GB fp32), with
random init and with `model.pretrained=` a save_pretrained directory of it (fp32 safetensors,
written once by this script). Per rank it reports:
- start-up peak: the peak RSS from process start until the backend is built (VmHWM);
- run peak: the peak RSS over the whole run, the first step included (its gradients too);
- disk read: bytes this rank read from disk (/proc/self/io read_bytes; the safetensors files
  are evicted from the page cache before each run, so every byte really comes from the disk;
  ranks on one machine share the page cache, so a page one rank's readahead fetched counts for
  that rank only);
- requested: the bytes the loader asked the files for (the FSDP backend's own count);
- build: seconds inside build_backend (build, shard, allocate, init or load);
- start-up / first step: seconds from the launch until the backend is built / step 1 ends.
`--before REV` runs the same configurations on the source tree of git revision REV (extracted
with `git archive`; its own conf/), for a before/after table:

    python bench/startup.py --before afa6b82                  # fsdp, W=1 and 2, both sources
    python bench/startup.py --layers 4 --worlds 2 --sources random
    python bench/startup.py --smoke     # widths 64/128, 1 layer, pretrained, W=2, temporary --work

Timings move with other load on the machine; the memory columns do not. Needs Linux /proc.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, table

LLAMA_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_heads": 32, "vocab_size": 32000}
SMOKE = {"hidden_size": 64, "intermediate_size": 128, "num_heads": 4, "vocab_size": 512}
RUN = ["experiment=cpu_smoke", "data.max_documents=200", "data.seq_len=64", "optim=sgd",
       "train.max_steps=1", "train.micro_batch_size=1", "train.eval_every=0",
       "checkpoint.at_end=false", "logging.progress=false", "backend.dist_timeout_s=1800"]  # fmt: skip


def _kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _read_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def worker(spec: dict) -> None:
    """One rank: the trainer of the tree on PYTHONPATH, timed and measured."""
    from gradcycle import trainer
    from gradcycle.cli import compose

    built = {}
    build = trainer.build_backend

    def measured_build(*args, **kwargs):
        start = time.time()
        backend = build(*args, **kwargs)
        built.update(peak=_kb("VmHWM"), at=time.time(), build_s=time.time() - start,
                     requested=getattr(backend, "bytes_read", None))  # fmt: skip
        return backend

    trainer.build_backend = measured_build
    cfg = compose(spec["overrides"], spec["conf"])
    trainer.run(cfg)
    out = {"startup_peak": built["peak"], "run_peak": _kb("VmHWM"), "read": _read_bytes(),
           "startup_s": built["at"] - spec["t0"], "first_step_s": time.time() - spec["t0"],
           "build_s": built["build_s"], "requested": built["requested"],
           "package": str(Path(trainer.__file__).parent)}  # fmt: skip
    Path(spec["out"]).write_text(json.dumps(out))


def _evict(path: Path) -> None:
    """Drop the files' pages from the page cache, so the next reads hit the disk (and count)."""
    for f in path.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def launch(tree: Path, world: int, overrides: list[str], work: Path) -> list[dict]:
    from multiproc import free_port

    port, t0 = str(free_port()), time.time()
    procs, outs = [], []
    for rank in range(world):
        out = work / f"rank{rank}.json"
        out.unlink(missing_ok=True)
        spec = {"overrides": overrides, "conf": str(tree / "conf"), "out": str(out), "t0": t0}
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": str(tree / "src")}  # fmt: skip
        log = open(work / f"rank{rank}.log", "w")
        cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
        outs.append(out)
    codes = [p.wait() for p in procs]
    if any(codes):
        tail = (work / f"rank{codes.index(next(c for c in codes if c))}.log").read_text()
        raise RuntimeError(f"ranks exited {codes}:\n{tail[-3000:]}")
    return [json.loads(o.read_text()) for o in outs]


def _tree(rev: str, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src", "conf"],
                             check=True, capture_output=True).stdout  # fmt: skip
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def _model(widths: dict) -> list[str]:
    return [*(f"model.{k}={v}" for k, v in widths.items()), "model.max_position_embeddings=4096"]


def _n_params(widths: dict, layers: int) -> int:
    """Embedding and head, per layer attention (4 h^2: as many KV heads as heads), MLP, 2 norms."""
    h, i, v = widths["hidden_size"], widths["intermediate_size"], widths["vocab_size"]
    return 2 * v * h + layers * (4 * h**2 + 3 * h * i + 2 * h) + h


def _pretrained(widths: dict, layers: int, dest: Path, run: list[str]) -> Path:
    """The benchmark model saved once as fp32 safetensors (HF's default sharding)."""
    if (dest / "config.json").is_file():
        return dest
    import torch

    from gradcycle.cli import compose
    from gradcycle.data.reader import open_dataset
    from gradcycle.model import build_model

    cfg = compose([*run, *_model(widths), f"model.num_layers={layers}"], str(ROOT / "conf"))
    model = build_model(cfg.model, widths["vocab_size"], "cpu", seed=cfg.seed, dtype=torch.float32)
    model.save_pretrained(str(dest))
    del model
    # A pretrained run reads its tokenizer from the same directory: the one random runs train.
    open_dataset(cfg).tokenizer.save_pretrained(str(dest))
    return dest


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--worlds", default="1,2")
    parser.add_argument("--sources", default="random,pretrained")
    parser.add_argument("--backends", default="fsdp")
    parser.add_argument("--before", default=None, help="git revision for the 'before' rows")
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "gradcycle-startup"))
    parser.add_argument("--smoke", action="store_true", help="smallest size (checks the script)")
    args = parser.parse_args()
    widths = LLAMA_7B
    if args.smoke:
        # pretrained: the path with this script's own code (the save, the page-cache eviction)
        widths, args.layers, args.worlds, args.sources = SMOKE, 1, "2", "pretrained"
        args.work = tempfile.mkdtemp(prefix="gradcycle-startup-")
        try:
            return measure(args, widths, ["data.max_documents=300"])  # the tests' token cache
        finally:
            shutil.rmtree(args.work, ignore_errors=True)
    return measure(args, widths)


def measure(args, widths: dict, extra: list[str] = ()) -> None:
    run = [*RUN, *extra]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("GRADCYCLE_CACHE", str(work / "cache"))
    trees = {"after": ROOT}
    if args.before:
        trees = {f"before ({args.before})": _tree(args.before, work / "before"), **trees}
    sources = args.sources.split(",")
    pre = (
        _pretrained(widths, args.layers, work / f"pretrained-{args.layers}", run)
        if "pretrained" in sources
        else None
    )
    n_params = _n_params(widths, args.layers)
    rows = []
    for backend in args.backends.split(","):
        for source in sources:
            for world in map(int, args.worlds.split(",")):
                for version, tree in trees.items():
                    extra = [f"model.pretrained={pre}"] if source == "pretrained" else []
                    overrides = [*run, *_model(widths), f"model.num_layers={args.layers}",
                                 f"backend={backend}", f"train.global_batch_size={world}",
                                 f"run_dir={work / 'run'}", *extra]  # fmt: skip
                    if pre is not None:
                        _evict(pre)
                    for rank, r in enumerate(launch(tree, world, overrides, work)):
                        shard = 4 * n_params / world
                        asked = "-" if r["requested"] is None else _gib(r["requested"])
                        rows.append([version, backend, source, world, rank, _gib(shard),
                                     _gib(r["startup_peak"]), _gib(r["run_peak"]), _gib(r["read"]),
                                     asked if source == "pretrained" else "-",
                                     f"{r['build_s']:.1f}", f"{r['startup_s']:.1f}",
                                     f"{r['first_step_s']:.1f}"])  # fmt: skip
                    print(f"done: {version} {backend} {source} W={world}", file=sys.stderr)
                    (work / "rows.json").write_text(json.dumps(rows))  # kept if a later run fails
    print(
        f"hidden {widths['hidden_size']}, MLP {widths['intermediate_size']}, vocabulary "
        f"{widths['vocab_size']}, {args.layers} layers: {n_params / 1e9:.4g}B parameters, "
        f"{4 * n_params / 2**30:.2f} GiB fp32; one SGD step, micro-batch 1 x 64 tokens"
    )
    print(table(["code", "backend", "init", "W", "rank", "shard GiB", "start-up peak GiB",
                 "run peak GiB", "disk read GiB", "requested GiB", "build s", "start-up s",
                 "first step s"], rows))  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(json.loads(sys.argv[2]))
    else:
        main()
