"""The data layer at growing corpus sizes: prepare throughput, memory per rank, data wait.

    python bench/data.py [--sizes 10,100,1000] [--dir /tmp/gradcycle-bench-data] [--steps 20]
    python bench/data.py --smoke     # a 0.3 MB corpus, a 512-token vocabulary, 4 steps: seconds

Per corpus (jsonl of stdlib-derived documents, generated locally: every stdlib source file, its
lines shuffled once per pass, until the size is reached):
  prepare MB per CPU s       `python -m gradcycle.prepare` at prepare.num_proc=1 and 2: MB of text
                            through its pipeline (read, tokenise, write; its own summary line,
                            without interpreter start-up) per CPU second of the main process and
                            its tokenising processes, beside a bare `encode_batch_fast` loop of
                            the same tokenizer over the same documents (its CPU seconds). CPU
                            time, not wall time: other jobs on a shared machine do not move it
  encoder share np=1        of prepare's CPU seconds, the share spent inside the encoder call:
                            the pipeline's rate relative to the bare encoder measured in the same
                            process at the same time (a contention-free "np=1 / bare")
  prepare wall MB/s np=2    the same pipeline's wall-clock rate with 2 tokenising processes
  prepare peak USS          of the prepare process tree (main + tokenising processes)
  USS per rank at step N    `train.py data=tokens` on the prepared shards (1 rank, 2 DataLoader
                            workers): the largest USS of the process tree (rank + workers) while
                            it trains N steps
  first step                wall seconds from launching train.py to its first step record
  data wait                 sum of data_wait_s / sum of step_time_s over steps 2..N
Nothing is asserted: the numbers are the result (targets: memory per rank grows <= 50 MB from
the smallest to the largest corpus, prepare >= 0.9x the bare loop per process, wait < 1%).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, table

PY = sys.executable
MODEL = ["model=tiny", "data.seq_len=256", "train.global_batch_size=16", "train.micro_batch_size=4",
         "train.eval_every=0", "checkpoint.at_end=false", "logging.progress=false",
         "data.num_workers=2"]  # fmt: skip
# --smoke: the CI model and a small vocabulary (given last, so these win)
SMOKE = ["experiment=cpu_smoke", "data.seq_len=64", "train.global_batch_size=8",
         "train.micro_batch_size=2", "train.eval_every=0"]  # fmt: skip


def make_corpus(path: Path, mb: float) -> Path:
    """jsonl of stdlib files, each pass with every file's lines in another order."""
    if path.is_file():
        return path
    sys.path.insert(0, str(ROOT / "src"))
    from gradcycle.data.sources import stdlib_files

    texts = [Path(f).read_text(encoding="utf-8") for f in stdlib_files()]
    target, size, rng = int(mb * 10**6), 0, random.Random(0)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        while size < target:
            for text in texts:
                lines = text.splitlines(keepends=True)
                rng.shuffle(lines)
                row = json.dumps({"text": "".join(lines)}) + "\n"
                f.write(row)
                size += len(row.encode())
                if size >= target:
                    break
    tmp.replace(path)
    return path


def tree_uss(pid: int) -> int:
    import psutil

    try:
        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_full_info().uss
        except psutil.Error:
            pass
    return total


def watched(cmd: list[str], env: dict, until=None, log: Path | None = None):
    """Run cmd; poll its process tree's USS every 0.2 s. Returns (wall s, peak USS, stamps) where
    stamps[name] is when until(name) first held."""
    t0 = time.perf_counter()
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    peak, stamps = 0, {}
    while proc.poll() is None:
        peak = max(peak, tree_uss(proc.pid))
        if until is not None:
            for name, hit in until().items():
                if hit and name not in stamps:
                    stamps[name] = time.perf_counter() - t0
        time.sleep(0.2)
    if until is not None:  # what happened after the last poll: stamped at exit (within 0.2 s)
        for name, hit in until().items():
            if hit and name not in stamps:
                stamps[name] = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])}... exited {proc.returncode} (see {log})")
    return time.perf_counter() - t0, peak, stamps


def _pipeline_rates(log: Path) -> tuple[float, float, float]:
    """prepare's own summary line: MB per CPU s, wall MB/s and the encoder's % of the CPU time, of
    text through read -> tokenise -> write, without start-up."""
    text = log.read_text() if log.is_file() else ""
    patterns = (r"([0-9.]+) MB per CPU s", r"\(([0-9.]+) MB/s", r"([0-9]+)% of it in the encoder")
    found = [re.search(pattern, text) for pattern in patterns]
    return tuple(float(f.group(1)) if f else float("nan") for f in found)


def bare_encode_mb_s(corpus: Path, tokenizer_dir: Path) -> float:
    """MB of text per CPU second of `encode_batch_fast` alone, in batches like prepare's (one
    thread: TOKENIZERS_PARALLELISM=false, as in prepare's processes)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    spent, total, batch, chars = 0.0, 0, [], 0

    def flush():
        nonlocal spent, batch, chars
        t = time.process_time()
        encode(batch, add_special_tokens=False)
        spent += time.process_time() - t
        batch, chars = [], 0

    with open(corpus) as f:
        for line in f:
            text = json.loads(line)["text"]
            total += len(text.encode())
            batch.append(text)
            chars += len(text)
            if chars >= 1 << 20:
                flush()
    if batch:
        flush()
    return total / 1e6 / spent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10,100,1000", help="corpus sizes in MB")
    ap.add_argument("--dir", default="/tmp/gradcycle-bench-data")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--smoke", action="store_true", help="smallest size, in a temporary --dir")
    args = ap.parse_args()
    if args.smoke:
        args.sizes, args.steps, args.dir = "0.3", 4, tempfile.mkdtemp(prefix="gradcycle-data-")
        try:
            return measure_sizes(args, ["data.vocab_size=512"], SMOKE)
        finally:
            shutil.rmtree(args.dir, ignore_errors=True)
    return measure_sizes(args, [], [])


def measure_sizes(args, prepare_extra: list[str], train_extra: list[str]) -> int:
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "GRADCYCLE_CACHE": str(root / "cache"), "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    tokenizer = None
    rows = []
    for mb in (float(s) for s in args.sizes.split(",")):
        corpus = make_corpus(root / f"corpus-{mb:g}mb.jsonl", mb)
        text_mb = corpus.stat().st_size / 1e6
        data = ["data=files", f"data.path={corpus}", *prepare_extra]
        if tokenizer is not None:  # one tokenizer for every size (trained on the first corpus)
            data.append(f"data.tokenizer={tokenizer}")
        rates, walls, shares, peaks = {}, {}, {}, {}
        for n in (1, 2):
            out, log = root / f"prepared-{mb:g}mb-np{n}", root / f"prepare-{mb:g}-np{n}.log"
            peaks[n] = float("nan")  # a rerun reuses what is prepared: its rates, not its peak
            if not (out / "manifest.json").is_file():
                cmd = [PY, "-m", "gradcycle.prepare", *data, f"prepare.out={out}",
                       f"prepare.num_proc={n}"]  # fmt: skip
                _, peaks[n], _ = watched(cmd, env, log=log)
            rates[n], walls[n], shares[n] = _pipeline_rates(log)
        prepared = root / f"prepared-{mb:g}mb-np1"
        tokenizer = tokenizer or prepared / "tokenizer"
        bare = bare_encode_mb_s(corpus, prepared / "tokenizer")

        run = root / f"run-{mb:g}mb"
        metrics = run / "metrics.jsonl"
        if metrics.exists():
            metrics.unlink()

        def progress(metrics=metrics):
            n = len(metrics.read_text().splitlines()) if metrics.exists() else 0
            return {"first": n >= 1, "last": n >= args.steps}

        cmd = [PY, "train.py", *MODEL, *train_extra, "data=tokens", f"data.path={prepared}",
               f"train.max_steps={args.steps}", f"run_dir={run}", "resume=none"]  # fmt: skip
        _, uss, stamps = watched(cmd, env, progress, log=root / f"train-{mb:g}.log")
        recs = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
        steady = [r for r in recs if "loss" in r][1:]
        wait = sum(r["data_wait_s"] for r in steady) / sum(r["step_time_s"] for r in steady)
        header = [*HEADER[:8], f"USS per rank (step {args.steps})", *HEADER[9:]]
        size = f"{text_mb:,.0f} MB" if text_mb >= 10 else f"{text_mb:.1f} MB"
        rows.append([size, f"{rates[1]:.2f}", f"{rates[2]:.2f}", f"{bare:.2f}",
                     f"{rates[1] / bare:.2f}x", f"{shares[1]:.0f}%", f"{walls[2]:.2f}",
                     f"{max(peaks.values()) / 2**20:,.0f} MB",
                     f"{uss / 2**20:,.0f} MB", f"{stamps.get('first', float('nan')):.1f} s",
                     f"{wait:.2%}"])  # fmt: skip
        print(table(header, rows[-1:]), flush=True)
    print()
    print(table(header, rows))
    return 0


HEADER = ["corpus", "prepare MB/CPU-s np=1", "np=2", "bare encode MB/CPU-s", "np=1 / bare",
          "encoder share np=1", "wall MB/s np=2", "prepare peak USS", "USS per rank",
          "first step", "data wait"]  # fmt: skip

if __name__ == "__main__":
    sys.exit(main())
