"""Fine-tuning data: the loss is on the answer only, and exact across micro-batches and ranks.

In process: the loss mask decodes to exactly the completion + EOS / the assistant turns (both
train_on values, the packaged template and a tokenizer's own), packing keeps examples apart and
unpacked rows pad with -100, every bad input stops with one message naming the field (exit 2,
nothing touched), K=4 x micro 2 equals K=1 x micro 8 on chat data whose target counts vary > 20x
(and mean-of-micro-batch-means does not), data=stdlib_sft trains. One spawn: 2 ranks against 1
process on the same data, unpacked and packed.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY, JobResults, compose, rank_train, read_metrics, train_steps
from multiproc import run_on_ranks

from gradcycle.cli import main
from gradcycle.data import IGNORE_INDEX
from gradcycle.data.loader import GlobalOrder, MicroBatches, collate, to_device
from gradcycle.data.masking import attention_inputs
from gradcycle.data.reader import open_dataset
from gradcycle.data.sft import TEMPLATES
from gradcycle.model import build_model
from gradcycle.trainer import count_targets, token_loss

SIMPLE = str(TEMPLATES / "simple.jinja")
CONF = str(ROOT / "conf")
CACHE = Path(os.environ["GRADCYCLE_CACHE"])
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "theta", "kappa", "lambda", "sigma",
         "omega", "river", "stone", "cloud", "light", "paper", "window", "garden", "number"]  # fmt: skip


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _write(name: str, rows: list[dict]) -> Path:
    path = CACHE / name
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.replace(path)
    return path


def _chats() -> list[dict]:
    """Answers of 1 to 60 words (a few to ~100 target tokens), a third with two assistant turns."""
    rng, rows = random.Random(0), []
    for i in range(240):
        n = (1, 2, 60, 3, 40, 1, 25, 5)[i % 8]
        msgs = [{"role": "system", "content": "be brief"}] if i % 5 == 0 else []
        msgs += [{"role": "user", "content": _text(rng, 3 + i % 7)},
                 {"role": "assistant", "content": _text(rng, n)}]  # fmt: skip
        if i % 3 == 0:
            msgs += [{"role": "user", "content": _text(rng, 4)},
                     {"role": "assistant", "content": _text(rng, 1 + i % 4)}]  # fmt: skip
        rows.append({"messages": msgs})
    return rows


CHAT_DATA = _write("chat.jsonl", _chats())
PAIRS = _write("pairs.jsonl", [{"prompt": f"Q{i}: " + _text(random.Random(i), 2 + i % 5) + "\nA:",
                                "completion": " " + _text(random.Random(-i), 1 + i % 9)}
                               for i in range(120)])  # fmt: skip
CHAT = ["data=files", f"data.path={CHAT_DATA}", "data.format=chat", f"data.chat_template={SIMPLE}",
        "data.packing=false", "data.seq_len=128"]  # fmt: skip
PACKED = ["data.packing=true", "data.document_mask=true"]
STEPS = [*CHAT, "train.global_batch_size=8", "train.max_steps=3", "optim=sgd"]


def _examples(overrides: list[str], packing: bool = False):
    cfg = compose([*TINY, *overrides, f"data.packing={packing}", f"data.document_mask={packing}"])
    data = open_dataset(cfg, progress=False)
    return data, data.samples("train", cfg.data)


def _spans(mask: np.ndarray) -> list[tuple[int, int]]:
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


def _train_rows(path: Path, data) -> list[dict]:
    """The train split's examples in order (the val split is every 50th, data.val_fraction)."""
    from gradcycle.data.prepare import is_val

    rows = [json.loads(line) for line in path.read_text().splitlines()]
    fraction = data.manifest["val_fraction"]
    return [r for i, r in enumerate(rows) if not is_val(i, fraction)]


# ---------------------------------------------------------------- the mask is the answer
def test_prompt_completion_mask_is_the_completion_and_eos():
    data, samples = _examples(["data=files", f"data.path={PAIRS}", "data.format=prompt_completion"])
    tok, rows = data.tokenizer, _train_rows(PAIRS, data)
    assert len(samples) == len(rows) and data.masked
    for i, row in enumerate(rows):
        ids, _, mask = samples[i]
        assert _spans(mask) == [(_spans(mask)[0][0], len(ids))]  # one span, to the end
        assert tok.decode(ids[mask == 1]) == row["completion"] + tok.eos_token
        assert tok.decode(ids[mask == 0]) == row["prompt"]
    host = collate([samples[0], samples[1]], data.pad_id)
    for r in range(2):  # labels: -100 on the prompt and the padding, the tokens elsewhere
        ids, _, mask = samples[r]
        labels = host.rows[1, r]
        assert (labels[: len(ids)][mask == 0] == IGNORE_INDEX).all()
        assert (labels[: len(ids)][mask == 1] == ids[mask == 1]).all()
        assert (labels[len(ids) :] == IGNORE_INDEX).all()


LLAMA3_LIKE = (
    "{{ bos_token }}{% for m in messages %}<|start|>{{ m['role'] }}<|sep|>\n\n{{ m['content'] }}"
    "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}<|start|>assistant<|sep|>\n\n"
    "{% endif %}"
)


@pytest.fixture(scope="module")
def own_template(tmp_path_factory) -> str:
    """A tokenizer folder with a chat template of its own (the local BPE, saved with one)."""
    data, _ = _examples(CHAT)
    out = tmp_path_factory.mktemp("tok") / "with-template"
    tok = data.tokenizer
    tok.chat_template, tok.bos_token = LLAMA3_LIKE, tok.eos_token
    tok.save_pretrained(str(out))
    return str(out)


@pytest.mark.parametrize("train_on", ["all", "last"])
@pytest.mark.parametrize("template", ["packaged", "tokenizer's own"])
def test_chat_mask_is_exactly_the_assistant_turns(train_on, template, own_template):
    which = [f"data.chat_template={SIMPLE}"]
    if template != "packaged":
        which = ["data.chat_template=null", f"data.tokenizer={own_template}"]
    data, samples = _examples([*CHAT, "data.seq_len=512", *which, f"data.train_on={train_on}"])
    tok, rows = data.tokenizer, _train_rows(CHAT_DATA, data)
    assert (tok.chat_template == LLAMA3_LIKE) == (template != "packaged")  # saved with the data
    for i, row in enumerate(rows):
        ids, _, mask = samples[i]
        answers = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        answers = answers[-1:] if train_on == "last" else answers
        decoded = [tok.decode(ids[a:b]) for a, b in _spans(mask)]
        assert decoded == [a + tok.eos_token for a in answers], (i, decoded)
        # and the whole example is the template's rendering (what inference sees)
        assert tok.decode(ids) == tok.apply_chat_template(row["messages"], tokenize=False)


# ---------------------------------------------------------------- packing
def test_packed_examples_stay_whole_and_apart_unpacked_rows_pad():
    data, rows = _examples(CHAT, packing=True)
    _, single = _examples(CHAT)
    T, n_docs = 128, len(single)
    assert len(rows) < 0.7 * n_docs  # rows hold several examples
    joined, starts_seen = [], 0
    for r in range(len(rows)):
        ids, starts, mask = rows[r]
        assert len(ids) <= T and starts[0] == 0
        bounds = [*starts.tolist(), len(ids)]
        for a, b in zip(bounds, bounds[1:], strict=False):  # whole examples, in order
            doc_ids, _, doc_mask = single[starts_seen]
            assert np.array_equal(ids[a:b], doc_ids) and np.array_equal(mask[a:b], doc_mask)
            starts_seen += 1
        joined.append(len(ids))
    assert starts_seen == n_docs
    host = collate([rows[0], rows[1]], data.pad_id, document_mask=True)
    batch = to_device(host, torch.device("cpu"), document_mask=True)
    attend = attention_inputs(batch, "sdpa")["attention_mask"][:, 0]  # (b, T, T): may attend
    for r in range(2):
        ids, starts, mask = rows[r]
        doc = np.searchsorted(starts, np.arange(len(ids)), side="right")  # example of each token
        same = torch.as_tensor(doc[:, None] == doc[None, :])
        n = len(ids)
        assert not (attend[r, :n, :n] & ~same).any()  # no token sees another example
        assert batch["position_ids"][r, torch.as_tensor(starts)].eq(0).all()
        labels = batch["labels"][r]
        assert labels[n:].eq(IGNORE_INDEX).all() and labels[torch.as_tensor(starts)].eq(
            IGNORE_INDEX).all()  # fmt: skip
    unpacked = collate([single[0], single[2]], data.pad_id)  # lengths differ: one is padded
    n0, n2 = len(single[0][0]), len(single[2][0])
    short, n = (1, n2) if n2 < n0 else (0, n0)
    assert (unpacked.rows[1, short, n:] == IGNORE_INDEX).all() and n < unpacked.rows.shape[2]
    assert (unpacked.rows[0, short, n:] == data.pad_id).all()


# ---------------------------------------------------------------- exact token weighting
@pytest.fixture(scope="module")
def references(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sft-ref")
    return {"unpacked": train_steps(tmp / "u", [*STEPS, "train.micro_batch_size=8"]),
            "packed": train_steps(tmp / "p", [*STEPS, *PACKED, "train.micro_batch_size=8"])}  # fmt: skip


def test_k4_micro2_equals_k1_micro8_and_mean_of_means_does_not(tmp_path, references):
    big = references["unpacked"]  # K=1 x micro 8, one process
    acc = train_steps(tmp_path / "k4", [*STEPS, "train.micro_batch_size=2"])
    for a, b in zip(acc, big, strict=True):
        assert a["tokens"] == b["tokens"]
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(b["loss"]), (a["loss"], b["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5 * b["grad_norm"]

    cfg = compose([*TINY, *STEPS])
    data = open_dataset(cfg, progress=False)
    train = data.samples("train", cfg.data)
    order = GlobalOrder(len(train), cfg.seed)

    def cycle(micro: int) -> list[dict]:  # global batch 0 on one rank, cut into micro-batches
        batches = MicroBatches(train, order, 8, 0, 1, micro, data.pad_id)
        return [to_device(h, torch.device("cpu")) for h in batches.cycle(0)]

    full, micro = cycle(8)[0], cycle(2)
    targets = (full["labels"][:, 1:] != IGNORE_INDEX).sum(1)
    assert targets.max() >= 20 * targets.min(), targets.tolist()  # the answers are that ragged
    torch.manual_seed(0)
    model = build_model(cfg.model, len(data.tokenizer))

    def grad(batches, norms) -> torch.Tensor:
        for mb, n in zip(batches, norms, strict=True):
            token_loss(model, mb, n).backward()
        g = torch.cat([p.grad.flatten() for p in model.parameters()])
        model.zero_grad(set_to_none=True)
        return g

    reference = grad([full], [count_targets([full])])
    exact = grad(micro, [count_targets(micro)] * len(micro))
    mean_of_means = grad(micro, [count_targets([mb]) * len(micro) for mb in micro])
    rel = lambda g: float((g - reference).norm() / reference.norm())  # noqa: E731
    assert rel(exact) < 1e-5
    assert rel(mean_of_means) > 1e-2, rel(mean_of_means)  # another objective, not rounding


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, references):  # references first: the data is prepared once
    tmp = tmp_path_factory.mktemp("sft-ranks")
    configs = {("unpacked", 1): ["train.micro_batch_size=4"],
               ("unpacked", 4): ["train.micro_batch_size=1"],
               ("packed", 2): [*PACKED, "train.micro_batch_size=2"]}  # fmt: skip
    jobs = [(str(tmp / f"{a}-{k}"), [*STEPS, *o]) for (a, k), o in configs.items()]
    return JobResults(zip(configs, run_on_ranks(rank_train, 2, args=(jobs,))[0], strict=True))


@pytest.mark.parametrize("name, k", [("unpacked", 1), ("unpacked", 4), ("packed", 2)])
def test_two_ranks_equal_one_process(two_ranks, references, name, k):
    for a, b in zip(two_ranks[(name, k)], references[name], strict=True):
        assert a["accumulation_steps"] == k and a["world_size"] == 2
        assert a["tokens"] == b["tokens"]
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(b["loss"]), (a["loss"], b["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5 * b["grad_norm"]


# ---------------------------------------------------------------- data=stdlib_sft
def test_stdlib_sft_fine_tunes_out_of_the_box(tmp_path, capsys):
    records = train_steps(tmp_path / "run", ["data=stdlib_sft", "data.max_documents=1500",
                                             "train.max_steps=30", "optim.warmup_steps=5"])  # fmt: skip
    losses = [r["loss"] for r in records]
    assert len(losses) == 30 and sum(losses[-5:]) < 0.85 * sum(losses[:5]), losses
    cfg = compose([*TINY, "data=stdlib_sft", "data.max_documents=1500"])
    data = open_dataset(cfg, progress=False)
    sft = data.manifest["sft"]
    assert sft["format"] == "prompt_completion" and sft["skipped_overlong"]["train"] > 0
    assert data.manifest["splits"]["train"]["documents"] + sum(sft["skipped_overlong"].values()) \
        + data.manifest["splits"]["val"]["documents"] == 1500  # fmt: skip


def test_text_data_is_written_as_before():
    cfg = compose(TINY)
    m = open_dataset(cfg, progress=False).manifest
    assert set(m["arrays"]) == {"tokens", "docs"} and "sft" not in m and "sft" not in m["request"]
    assert "format" not in m["request"]["source"]


# ---------------------------------------------------------------- bad input
def _run_dir(tmp_path) -> Path:
    d = tmp_path / "run"
    d.mkdir()
    (d / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    return d


def _rows(tmp_path, name: str, rows: list[dict]) -> str:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _chat(*turns) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


GOOD = [{"prompt": "p" * (1 + i % 5), "completion": "c" * (1 + i % 3)} for i in range(30)]
OK_CHAT = [_chat(("user", "hi there"), ("assistant", "hello")) for _ in range(30)]
UNSTABLE = ("{% for m in messages %}{% if loop.last and m['role'] == 'assistant' %}[final]"
            "{% endif %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")  # fmt: skip
BAD = {  # name: (rows, extra overrides, words the message must hold)
    "missing field": (GOOD[:7] + [{"completion": "x"}] + GOOD, ["data.format=prompt_completion"],
                      ["example 7", "data.prompt_field=prompt"]),
    "missing column": ([{"question": "q", "completion": "c"}] * 30,
                       ["data.format=prompt_completion"], ["data.prompt_field='prompt'", "question"]),
    "empty completion": (GOOD[:3] + [{"prompt": "p", "completion": "  "}] + GOOD,
                         ["data.format=prompt_completion"], ["example 3", "data.completion_field",
                                                             "empty"]),
    "non-string content": (OK_CHAT[:5] + [{"messages": [{"role": "user", "content": ["a", "b"]},
                                                         {"role": "assistant", "content": "x"}]}],
                           ["data.format=chat", f"data.chat_template={SIMPLE}"],
                           ["example 5", "messages[0].content", "not a string"]),
    "unknown role": (OK_CHAT[:2] + [_chat(("user", "q"), ("bot", "a"))] + OK_CHAT,
                     ["data.format=chat", f"data.chat_template={SIMPLE}"],
                     ["example 2", "role 'bot'", "system, user, assistant, tool"]),
    "no assistant turn": (OK_CHAT[:1] + [_chat(("user", "q"))] + OK_CHAT,
                          ["data.format=chat", f"data.chat_template={SIMPLE}"],
                          ["example 1", "no assistant turn"]),
    "overlong, on_overlong=error": (GOOD[:4] + [{"prompt": "word " * 200, "completion": "c"}] + GOOD,
                                    ["data.format=prompt_completion", "data.on_overlong=error"],
                                    ["example 4", "data.seq_len=64", "data.on_overlong=skip"]),
    "not prefix-stable": ([_chat(("user", "a"), ("assistant", "b"), ("user", "c"),
                                 ("assistant", "d"))] * 30,
                          ["data.format=chat", "data.chat_template=TEMPLATE"],
                          ["example 0", "not prefix-stable", "data.chat_template"]),
    "no chat template": (OK_CHAT, ["data.format=chat", "data.tokenizer=TOKENIZER"],
                         ["has no chat template", "data.chat_template=<jinja"]),
    "format": (GOOD, ["data.format=alpaca"], ["data.format='alpaca'", "prompt_completion"]),
    "train_on": (OK_CHAT, ["data.format=chat", f"data.chat_template={SIMPLE}",
                           "data.train_on=first"], ["data.train_on='first'", "last"]),
    "on_overlong": (GOOD, ["data.format=prompt_completion", "data.on_overlong=drop"],
                    ["data.on_overlong='drop'", "skip"]),
    "template path": (OK_CHAT, ["data.format=chat", "data.chat_template=/no/such.jinja"],
                      ["data.chat_template='/no/such.jinja'", "no such file"]),
    "empty field": (GOOD, ["data.format=prompt_completion", "data.prompt_field="],
                    ["data.prompt_field is empty"]),
    "local BPE, chat": (OK_CHAT, ["data.format=chat"], ["no chat template", "data.chat_template"]),
    "packed, no document mask": (GOOD, ["data.format=prompt_completion", "data.packing=true",
                                        "data.document_mask=false"], ["data.document_mask=true"]),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_names_the_field(case, tmp_path, capsys):
    rows, extra, words = BAD[case]
    if "data.chat_template=TEMPLATE" in extra:
        (tmp_path / "unstable.jinja").write_text(UNSTABLE)
        extra = [e.replace("TEMPLATE", str(tmp_path / "unstable.jinja")) for e in extra]
    if "data.tokenizer=TOKENIZER" in extra:  # a tokenizer folder without a chat template
        data, _ = _examples(CHAT)
        data.tokenizer.chat_template = None
        data.tokenizer.save_pretrained(str(tmp_path / "tok"))
        extra = [e.replace("TOKENIZER", str(tmp_path / "tok")) for e in extra]
    run_dir, cache = _run_dir(tmp_path), tmp_path / "cache"
    path = _rows(tmp_path, "data.jsonl", rows)
    code = main([*TINY, f"run_dir={run_dir}", "data=files", f"data.path={path}",
                 f"data.cache_dir={cache}", "data.packing=false", *extra], CONF)  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("gradcycle: error: ") and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)
    assert [p.name for p in run_dir.iterdir()] == ["metrics.jsonl"]
    assert read_metrics(run_dir) == [{"step": 1, "loss": 1.0}]
    assert not list(cache.glob("prepared/*/*"))  # nothing half-prepared left in the cache


def test_overlong_prompts_are_skipped_and_counted(tmp_path, capsys):
    rows = GOOD[:4] + [{"prompt": "word " * 200, "completion": "c"}] + GOOD
    path = _rows(tmp_path, "data.jsonl", rows)
    cfg = compose([*TINY, "data=files", f"data.path={path}", "data.format=prompt_completion",
                   "data.packing=false", f"data.cache_dir={tmp_path / 'cache'}"])  # fmt: skip
    m = open_dataset(cfg).manifest
    assert m["sft"]["skipped_overlong"] == {"train": 1, "val": 0}
    assert m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"] == len(rows) - 1
    assert "skipped 1 examples whose prompt alone fills data.seq_len" in capsys.readouterr().err


def test_chat_prepare_is_byte_identical_for_one_and_two_processes(tmp_path, monkeypatch):
    """The mask travels through the process pool like the tokens: small tokenising tasks, so
    two processes really take turns, and the output equals the one-process output byte for byte."""
    from gradcycle.data import prepare

    monkeypatch.setattr(prepare, "BATCH_CHARS", 2000)  # ~10 tasks for the 240 conversations
    outputs = {}
    for n in (1, 2):
        out = tmp_path / f"np{n}"
        assert prepare.main([*TINY, *CHAT, f"prepare.out={out}", f"prepare.num_proc={n}"]) == 0
        outputs[n] = {p.name: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert outputs[1] == outputs[2]
    manifest = json.loads(outputs[1]["manifest.json"])
    assert "mask" in manifest["splits"]["train"]["shards"][0]["files"]
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["val"]["documents"] == 240
