"""bench/_gpu_env.py and bench/gpu.sh's install step, with a recording fake pip: where everything
imports nothing is installed; a missing module is installed offline from the wheel folder with
torch pinned to the machine's own version and never asked for; a torch that changes is an error;
no run starts before the imports work. And bench/_gpu_table.py's rows and table."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import _gpu_env as gpu_env  # noqa: E402
import _gpu_table as gpu_table  # noqa: E402

FAKE_PIP = """
import json, os, shutil, sys
from pathlib import Path
log = Path(os.environ["FAKE_PIP_LOG"])
args = sys.argv[1:]
cons = Path(args[args.index("-c") + 1]).read_text()
log.write_text(json.dumps({"args": args, "constraints": cons,
                           "config_file": os.environ.get("PIP_CONFIG_FILE"),
                           "find_links_env": os.environ.get("PIP_FIND_LINKS")}))
plant = os.environ.get("FAKE_PIP_PLANT_TORCH")  # a pip that replaces torch
if plant:
    Path(plant, "torch").mkdir(parents=True)
    Path(plant, "torch", "__init__.py").write_text("__version__ = '0.0.replaced'\\n")
"""


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A fake pip that records its call, a stub dir first on PYTHONPATH, a one-wheel folder."""
    (tmp_path / "fake_pip.py").write_text(FAKE_PIP)
    stubs, wheels = tmp_path / "stubs", tmp_path / "wheels"
    stubs.mkdir()
    wheels.mkdir()
    (wheels / "tqdm-4.70.1-py3-none-any.whl").write_text("")  # never opened: pip is fake
    monkeypatch.setenv("GRADCYCLE_PIP", f"{sys.executable} {tmp_path / 'fake_pip.py'}")
    monkeypatch.setenv("FAKE_PIP_LOG", str(tmp_path / "pip.json"))
    monkeypatch.setenv("PIP_FIND_LINKS", "/somewhere/else")  # must not reach pip
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(stubs), os.environ.get("PYTHONPATH", "")])
    )
    return tmp_path, stubs, wheels


def test_installs_nothing_where_everything_imports(fake):
    tmp, _, wheels = fake
    state = gpu_env.ensure(wheels)
    assert not (tmp / "pip.json").exists()  # pip never ran
    assert state["torch"][0] == torch.__version__
    assert state["errors"] == {}


def test_a_torch_that_changes_is_an_error(fake, monkeypatch):
    tmp, stubs, wheels = fake
    (stubs / "tqdm.py").write_text("raise ImportError('not on this machine')\n")
    monkeypatch.setenv("FAKE_PIP_PLANT_TORCH", str(stubs))
    with pytest.raises(SystemExit, match="torch CHANGED during the install"):
        gpu_env.ensure(wheels)


def test_gpu_sh_installs_offline_without_torch_and_stops_before_any_run(fake):
    """One module missing (tqdm): gpu.sh asks pip for exactly it, offline, from the wheel
    folder, torch pinned to the installed version; the fake pip installs nothing, so the import
    check fails and gpu.sh exits 1 before its first run."""
    tmp, stubs, wheels = fake
    (stubs / "tqdm.py").write_text("raise ImportError('not on this machine')\n")
    out = tmp / "out"
    env = {**os.environ, "SMOKE": "1", "GPU_WHEELS": str(wheels), "GPU_WORK": str(tmp / "work"),
           "PYTHON": sys.executable}  # fmt: skip
    res = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), str(out)], env=env,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 1, res.stdout + res.stderr
    assert "import tqdm: ImportError: not on this machine" in res.stdout
    assert "the install or import check failed" in res.stdout
    assert (out / "gpu.jsonl").read_text() == ""  # no run started
    assert not (tmp / "work" / "runs").exists() or not any((tmp / "work" / "runs").iterdir())
    call = json.loads((tmp / "pip.json").read_text())
    args = call["args"]
    assert args[:4] == ["install", "--no-index", "--find-links", str(wheels)]
    # tqdm's importers fail too; all are installed here, so asked for by name: versions kept
    assert "tqdm" in args[6:] and set(args[6:]) <= {d for _, d in gpu_env.NEEDED}
    assert not [a for a in args if a.lower().startswith("torch")]
    torch_lines = [x for x in call["constraints"].splitlines() if x.lower().startswith("torch")]
    assert torch_lines == [f"torch=={torch.__version__}"]
    # pins only for what is not installed (numpy is: its pin stays out), never a downgrade
    for line in call["constraints"].splitlines()[1:]:
        with pytest.raises(importlib.metadata.PackageNotFoundError):
            importlib.metadata.version(line.split("==")[0])
    assert "numpy==" not in call["constraints"]
    assert call["config_file"] == os.devnull and call["find_links_env"] is None


def test_install_plan_pins_what_is_missing_and_keeps_torch():
    state = {"errors": {"deepspeed": "ModuleNotFoundError", "hydra": "ModuleNotFoundError",
                        "transformers": "ImportError: tokenizers"},
             "dists": ["torch", "numpy", "transformers", "tokenizers"],
             "torch": ["2.11.0+cu130", "/opt/torch/.venv/lib/python3.12/site-packages/torch"]}  # fmt: skip
    reqs, constraints = gpu_env.install_plan(state)
    assert reqs == ["deepspeed==0.19.8", "hydra-core==1.3.8", "transformers"]
    assert constraints[0] == "torch==2.11.0+cu130"
    assert [c for c in constraints if c.lower().startswith("torch")] == constraints[:1]
    assert "deepspeed==0.19.8" in constraints and "omegaconf==2.3.1" in constraints
    assert not [c for c in constraints if c.split("==")[0].lower() in ("numpy", "transformers")]


def test_target_plan_without_writable_site_packages(tmp_path):
    """--target ignores what is installed, so the plan is the folder minus what is installed:
    each distribution once (a cp311 and a cp312 wheel), pinned, never torch."""
    for name in ("pydantic_core-2.50.5-cp311-cp311-manylinux2014_x86_64.whl",
                 "pydantic_core-2.50.5-cp312-cp312-manylinux2014_x86_64.whl",
                 "deepspeed-0.19.8-py3-none-any.whl", "numpy-2.4.6-cp312-cp312-linux_x86_64.whl",
                 "torch-2.13.0-cp312-cp312-linux_x86_64.whl"):  # fmt: skip
        (tmp_path / name).write_text("")
    state = {"dists": ["numpy", "torch"], "errors": {}, "torch": ["2.11.0", "/x"]}
    assert gpu_env.target_plan(state, tmp_path) == ["deepspeed==0.19.8", "pydantic_core==2.50.5"]


def test_gpu_table_rows_and_table(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    steps = [{"step": i, "loss": 5.0 - i, "tokens": 1000, "step_time_s": t, "tokens_per_s": 1000 / t,
              "mfu": 0.1 * i, "hfu": 0.1 * i, "peak_mem_bytes": i * 2**30, "micro_batch_size": 8}
             for i, t in zip(range(1, 5), (9.0, 3.0, 2.0, 4.0))]  # fmt: skip
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps))
    out = tmp_path / "out"
    out.mkdir()
    ok = gpu_table.row(out, "fsdp_full_k8", "ok", 12.3, str(run))
    gpu_table.row(out, "zero3_none_k1", "skipped: budget", 0)
    assert ok["step_time_s"] == 3.0  # median of steps 3 and 4: the first two are warm-up
    assert ok["peak_mem_gib"] == 4.0 and ok["steps"] == 4 and ok["accumulation_steps"] == 8
    rows = [json.loads(x) for x in (out / "gpu.jsonl").read_text().splitlines()]
    assert [r["status"] for r in rows] == ["ok", "skipped: budget"]
    tagged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["run"] for r in tagged] == ["fsdp_full_k8"] * 4
    text = gpu_table.table(out)
    assert text == (out / "gpu_table.md").read_text().strip()
    lines = text.splitlines()
    assert len(lines) == 4
    assert lines[2] == "| fsdp | full | 8 | ok | 4 | 1000 | 3.00 | 375 | 35.0% | 35.0% | 4.0 |"
    assert lines[3] == "| zero3 | none | 1 | skipped: budget | 0 |" + "  |" * 6
