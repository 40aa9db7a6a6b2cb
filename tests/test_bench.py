"""Every benchmark script runs: its smoke mode (smallest size) prints a table of finite numbers.

The scripts are discovered, not listed: every `bench/*.py` (underscore modules are shared code,
not scripts) runs as `python bench/X.py --smoke`, every `bench/*.sh` as
`SMOKE=1 PYTHON=<this interpreter> bash bench/X.sh <out>` and must also write `<out>/X.jsonl`.
A new script without a smoke mode fails its own case here. Passing means more than exit code 0: the output must hold a table
with numbers, none of them nan or inf, and no row that failed, errored or was skipped.

Each script is one subprocess and one test case; they run two at a time (the CI machine's two
cores; BENCH_SMOKE_JOBS overrides), all started when the first case asks, so one slow script
does not serialise the rest.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
SCRIPTS = sorted(
    p.name for p in [*BENCH.glob("*.py"), *BENCH.glob("*.sh")] if not p.name.startswith("_")
)
TIMEOUT_S = 600

# A number as the tables print it: 12, -0.5, 1,024, 6.2e-05, 31.1% (not a name like h64-L2).
NUMBER = re.compile(r"(?<![\w.])[-+]?\d[\d,]*(?:\.\d+)?(?:e[-+]?\d+)?(?![\w.])", re.I)
# nan/inf in any spelling, a row that failed or errored, a traceback, a skipped configuration.
BAD = re.compile(
    r"\b(?:nan|inf|infinity|failed|timed out|skip|skipped|traceback)\b|\w+(?:Error|Exception)\b",
    re.I,
)
# A table's header rule: dashes under the columns, or a markdown |---|---| line.
RULE = re.compile(r"^\s*(?:-{1,}\s{2,})+-+\s*$|^\s*\|(?:\s*:?-{3,}:?\s*\|)+\s*$")
# What a script's output must also contain, beyond the table.
EXPECT = {
    "overhead.py": [r"^ratio gradcycle/bare=\d+\.\d+ gradcycle/accelerate=\d+\.\d+$"],
}


def _command(name: str, out: Path) -> tuple[list[str], dict]:
    if name.endswith(".sh"):  # PYTHON: the scripts' interpreter is this one (its venv)
        return ["bash", str(BENCH / name), str(out)], {"SMOKE": "1", "PYTHON": sys.executable}
    return [sys.executable, str(BENCH / name), "--smoke"], {}


def _run(name: str) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"gradcycle-bench-{name}-"))
    cmd, env = _command(name, out)
    t0 = time.perf_counter()
    # Its own session: a timeout ends the script's ranks and workers too, not only the script.
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        code, stderr = "timeout", f"no exit within {TIMEOUT_S}s\n{stderr}"
    return {"code": code, "stdout": stdout, "stderr": stderr, "out": out,
            "wall_s": time.perf_counter() - t0}  # fmt: skip


@pytest.fixture(scope="session")
def smoke_runs(request):
    """name -> Future of its run: every selected script, started together on the first request."""
    selected = [
        item.callspec.params["script"]
        for item in request.session.items
        if getattr(item, "originalname", None) == "test_smoke" and hasattr(item, "callspec")
    ]
    jobs = int(os.environ.get("BENCH_SMOKE_JOBS", min(2, os.cpu_count() or 1)))
    pool = ThreadPoolExecutor(max_workers=max(1, jobs))
    # The longest first, so the short ones fill in beside them.
    order = sorted(selected, key=lambda n: n not in ("overhead.py", "startup.py", "gpu.sh"))
    futures = {name: pool.submit(_run, name) for name in order}
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


def table_rows(text: str) -> list[str]:
    """The body rows of every table in `text`: the lines after a header rule up to a blank one;
    without any rule, the lines that carry two or more numbers."""
    lines = text.splitlines()
    rows, in_table = [], False
    for line in lines:
        if RULE.match(line):
            in_table = True
        elif not line.strip():
            in_table = False
        elif in_table:
            rows.append(line)
    if not any(RULE.match(line) for line in lines):
        rows = [line for line in lines if len(NUMBER.findall(line)) >= 2]
    return rows


def check_output(text: str) -> list[str]:
    """What is wrong with a smoke run's printed output (empty: nothing)."""
    problems = [
        f"bad value or row: {line.strip()!r}" for line in text.splitlines() if BAD.search(line)
    ]
    rows = table_rows(text)
    if not rows:
        problems.append("no table with numbers in the output")
    numbered = 0
    for row in rows:
        numbers = [float(n.replace(",", "")) for n in NUMBER.findall(row)]
        numbered += bool(numbers)
        if not all(math.isfinite(n) for n in numbers):
            problems.append(f"non-finite number in row: {row.strip()!r}")
    if rows and not numbered:
        problems.append("no number in any table row")
    return problems


def check_jsonl(path: Path) -> list[str]:
    """Records a .sh script wrote: at least one, each a JSON object of finite numbers."""
    if not path.is_file():
        return [f"{path.name} was not written"]
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    problems = [] if records else [f"{path.name} holds no records"]

    def walk(value, where):
        if isinstance(value, float) and not math.isfinite(value):
            problems.append(f"{path.name}: {where} = {value}")
        elif isinstance(value, str) and BAD.search(value):
            problems.append(f"{path.name}: {where} = {value!r}")
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{where}.{k}")
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, f"{where}[{i}]")

    for i, record in enumerate(records):
        if not any(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in record.values()
        ):
            problems.append(f"{path.name}: record {i} has no number: {record}")
        walk(record, f"record {i}")
    return problems


def test_checks_catch_the_broken_overhead_table():
    """The output check fails the table issue 24 found (every baseline row failed, nan ratio)
    and passes the fixed one."""
    broken = """world  backend        impl  wall ms/step  loss@1  note
-----  -------  ----------  ------------  --------  ----
1            -   gradcycle         313.9  7.703395
1            -        bare           n/a            AttributeError: 'Workload' object has no attribute 'model'
ratio gradcycle/bare=nan gradcycle/accelerate=nan"""
    fixed = """world  backend        impl  wall ms/step  loss@1  note
-----  -------  ----------  ------------  --------  ----
1            -   gradcycle         313.9  7.703395
1            -        bare         340.1  7.703395
2         fsdp  accelerate           n/a            not run: accelerate runs MULTI_CPU here, not FSDP
ratio gradcycle/bare=0.923 gradcycle/accelerate=0.911"""
    problems = check_output(broken)
    assert any("AttributeError" in p for p in problems) and any("=nan" in p for p in problems)
    assert check_output(fixed) == []
    assert check_output("done\n") == ["no table with numbers in the output"]
    assert check_output("a  b\n-  -\n1  1e999") == ["non-finite number in row: '1  1e999'"]
    md = "| backend | tokens/s |\n|---|---|\n| fsdp | failed |\n| zero3 | 1,234 |"
    assert len(check_output(md)) == 1  # the failed row
    assert check_output("a  b\n-  -\nx  y") == ["no number in any table row"]


def test_every_script_is_covered():
    assert "overhead.py" in SCRIPTS and "gpu.sh" in SCRIPTS and "_common.py" not in SCRIPTS


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_smoke(script, smoke_runs):
    r = smoke_runs[script].result() if script in smoke_runs else _run(script)
    try:
        _check_run(script, r)
    finally:
        shutil.rmtree(r["out"], ignore_errors=True)


def _check_run(script: str, r: dict) -> None:
    print(f"{script}: {r['wall_s']:.1f}s wall")
    head = f"{script} --smoke (exit {r['code']}, {r['wall_s']:.0f}s)"
    tail = f"\n--- stdout ---\n{r['stdout'][-3000:]}\n--- stderr ---\n{r['stderr'][-3000:]}"
    assert r["code"] == 0, f"{head} did not exit 0{tail}"
    problems = check_output(r["stdout"])
    for pattern in EXPECT.get(script, []):
        if not re.search(pattern, r["stdout"], re.M):
            problems.append(f"no line matching {pattern!r}")
    if script.endswith(".sh"):
        problems += check_jsonl(r["out"] / f"{Path(script).stem}.jsonl")
    assert not problems, f"{head}:\n" + "\n".join(problems) + tail
