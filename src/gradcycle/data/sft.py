"""Fine-tuning examples -> (tokens, loss mask): data.format=prompt_completion|chat, data=stdlib_sft.

An example is rendered to one text and tokenised as a whole (what the model sees at inference),
and the mask marks the tokens that are targets: those whose first character lies in a target span
of the text.
  prompt_completion  text = prompt + completion, target = the completion; EOS is appended as a
                     target token (the model learns to stop)
  chat               text = the chat template applied to `messages`; target = every assistant
                     turn (data.train_on=all) or the last one (last). The spans are found by
                     rendering prefixes: turn i's span runs from the end of messages[:i] rendered
                     with the generation prompt (so the assistant header is context) to the end of
                     messages[:i+1]. This works with any template, not only those with
                     `{% generation %}` blocks (transformers' return_assistant_tokens_mask needs
                     them), and needs the template to be prefix-stable: a conversation's rendering
                     must begin with its prefixes' (a template that rewrites earlier turns later,
                     e.g. dropping past reasoning, is refused by name).
Roles are system, user, assistant and tool (the OpenAI/HF set); any other role is refused here,
whatever the template would do with it.

Prepare's worker processes run `encode` (no torch; the template is rendered by transformers'
own jinja renderer, so the text equals tokenizer.apply_chat_template(..., tokenize=False)). Every
user error is a ValueError naming the example (0-based index in source order), the field and the
fix; an example whose prompt alone fills data.seq_len is skipped and counted (data.on_overlong=skip)
or an error (error).
"""

from __future__ import annotations

import ast
import hashlib
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROLES = ("system", "user", "assistant", "tool")
TEMPLATES = Path(__file__).resolve().parent / "templates"  # simple.jinja: the packaged default


@dataclass(frozen=True)
class Spec:
    """How examples become (tokens, mask): what a prepare worker needs, picklable."""

    format: str  # prompt_completion | chat
    prompt_field: str
    completion_field: str
    messages_field: str
    train_on: str  # all | last
    seq_len: int
    on_overlong: str  # skip | error
    where: str  # names the source in messages
    template: str | None = None
    template_kwargs: dict = field(default_factory=dict)  # the tokenizer's special tokens

    def describe(self) -> dict:
        """For the prepare request: equal descriptions give equal tokens and masks."""
        out = {"format": self.format, "seq_len": self.seq_len, "on_overlong": self.on_overlong}
        if self.format == "chat":
            sha = hashlib.sha256(self.template.encode()).hexdigest()[:16]
            out.update(messages_field=self.messages_field, train_on=self.train_on,
                       template_sha256=sha, template_kwargs=self.template_kwargs)  # fmt: skip
        else:
            out.update(prompt_field=self.prompt_field, completion_field=self.completion_field)
        return out


def fields(data_cfg) -> tuple[str, ...]:
    """The columns an example of data.format reads."""
    if data_cfg.format == "prompt_completion":
        return (data_cfg.prompt_field, data_cfg.completion_field)
    if data_cfg.format == "chat":
        return (data_cfg.messages_field,)
    return (data_cfg.text_field,)


def spec_from_config(cfg, tokenizer, where: str) -> Spec | None:
    """None for data.format=text; else the Spec, the chat template resolved (or a ValueError)."""
    d = cfg.data
    if d.format == "text":
        return None
    template = None
    if d.format == "chat":
        template = _template(d.chat_template, tokenizer, d.tokenizer or cfg.model.pretrained)
    kwargs = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
    return Spec(d.format, d.prompt_field, d.completion_field, d.messages_field, d.train_on,
                d.seq_len, d.on_overlong, where, template, kwargs)  # fmt: skip


def _template(path: str | None, tokenizer, name: str | None) -> str:
    if path is not None:
        return Path(path).expanduser().read_text(encoding="utf-8")
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates: the default one
        own = own.get("default")
    if not own:
        which = f"the tokenizer {name!r}" if name else "the locally trained tokenizer"
        raise ValueError(
            f"data.format=chat: {which} has no chat template: set data.chat_template=<jinja "
            f"file> (e.g. {TEMPLATES / 'simple.jinja'}) or use a tokenizer that has one"
        )
    return own


def chars(example) -> int:
    """About the size of an example in characters (prepare's batching and MB/s)."""
    if isinstance(example, str):
        return len(example)
    return sum(len(str(v)) for v in example.values())


def training_text(example, spec_fields: tuple[str, ...]) -> str:
    """The text of an example for training the local BPE (nothing rendered)."""
    parts = []
    for f in spec_fields:
        value = example.get(f)
        if isinstance(value, str):
            parts.append(value)
        elif isinstance(value, list):
            parts += [m["content"] for m in value if isinstance(m, dict)
                      and isinstance(m.get("content"), str)]  # fmt: skip
    return "\n".join(parts)


# ---------------------------------------------------------------- rendering (prepare's workers)
class _Bad(ValueError):
    pass


def _string(example: dict, key: str, field_name: str, index: int, spec: Spec) -> str:
    value = example.get(key)
    if value is None:
        present = sorted(k for k, v in example.items() if v is not None)
        raise _Bad(f"{spec.where}, example {index}: no {field_name}={key} (its fields: "
                   f"{present}): set {field_name} to the column that holds it")  # fmt: skip
    if not isinstance(value, str):
        raise _Bad(f"{spec.where}, example {index}: {field_name}={key} is a "
                   f"{type(value).__name__}, not a string: fix the data")  # fmt: skip
    return value


def segments(example: dict, index: int, spec: Spec) -> tuple[str, list[tuple[int, int]], bool]:
    """(text, target character spans, append EOS as a target) of one example."""
    if spec.format == "prompt_completion":
        prompt = _string(example, spec.prompt_field, "data.prompt_field", index, spec)
        completion = _string(example, spec.completion_field, "data.completion_field", index, spec)
        if not completion.strip():
            raise _Bad(f"{spec.where}, example {index}: data.completion_field="
                       f"{spec.completion_field} is empty: nothing to train on; drop the example "
                       "or fill in its completion")  # fmt: skip
        return prompt + completion, [(len(prompt), len(prompt) + len(completion))], True
    messages = _messages(example, index, spec)
    full = _render(messages, False, index, spec)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if spec.train_on == "last":
        turns = turns[-1:]
    spans, pos = [], 0
    for i in turns:
        before = _render(messages[:i], True, index, spec) if i else ""
        upto = _render(messages[: i + 1], False, index, spec)
        if not (full.startswith(upto) and upto.startswith(before) and len(before) >= pos):
            raise _Bad(
                f"{spec.where}, example {index}: the chat template is not prefix-stable (rendering "
                f"messages[:{i + 1}] is not the start of the whole conversation's rendering), so "
                "the assistant tokens cannot be found: use data.chat_template=<a jinja file that "
                "renders each message independently of the later ones>"
            )
        spans.append((len(before), len(upto)))
        pos = len(upto)
    return full, spans, False


def _messages(example: dict, index: int, spec: Spec) -> list[dict]:
    key, where = spec.messages_field, f"{spec.where}, example {index}"
    messages = example.get(key)
    if messages is None:
        present = sorted(k for k, v in example.items() if v is not None)
        raise _Bad(f"{where}: no data.messages_field={key} (its fields: {present}): set "
                   "data.messages_field to the column of [{role, content}, ...] lists")  # fmt: skip
    if not isinstance(messages, list) or not messages:
        raise _Bad(f"{where}: data.messages_field={key} must be a non-empty list of "
                   "{role, content} messages")  # fmt: skip
    out = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _Bad(f"{where}: {key}[{j}] is a {type(m).__name__}, not a {{role, content}} dict")
        m = {k: v for k, v in m.items() if v is not None}  # datasets fills absent keys with None
        if m.get("role") not in ROLES:
            raise _Bad(f"{where}: {key}[{j}] has role {m.get('role')!r}, which the chat template "
                       f"does not know: roles must be one of {', '.join(ROLES)}")  # fmt: skip
        if not isinstance(m.get("content"), str):
            got = type(m.get("content")).__name__
            raise _Bad(f"{where}: {key}[{j}].content is a {got}, not a string: give every "
                       "message's content as text")  # fmt: skip
        if m["role"] == "assistant" and not m["content"].strip():
            raise _Bad(f"{where}: {key}[{j}] is an assistant turn with empty content: nothing to "
                       "train on; drop the turn or fill it in")  # fmt: skip
        out.append(m)
    if not any(m["role"] == "assistant" for m in out):
        raise _Bad(f"{where}: {key} holds no assistant turn: nothing to train on (the loss is on "
                   "assistant turns only)")  # fmt: skip
    return out


def _render(messages: list[dict], generation_prompt: bool, index: int, spec: Spec) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        rendered, _ = render_jinja_template(conversations=[messages], chat_template=spec.template,
                                            add_generation_prompt=generation_prompt,
                                            **spec.template_kwargs)  # fmt: skip
    except Exception as e:  # jinja's TemplateError, or raise_exception() in the template
        raise _Bad(f"{spec.where}, example {index}: the chat template failed on messages"
                   f"[:{len(messages)}]: {e}") from None  # fmt: skip
    return rendered[0]


def encode(examples: list, first: int, tok, eos: int, spec: Spec) -> list:
    """(ids, mask) per example (int64, uint8), or None for an example skipped as overlong."""
    parts = [segments(ex, first + i, spec) for i, ex in enumerate(examples)]
    encodings = tok.encode_batch([text for text, _, _ in parts], add_special_tokens=False)
    out = []
    for i, ((_, spans, add_eos), enc) in enumerate(zip(parts, encodings, strict=True)):
        ids = np.asarray(enc.ids, np.int64)
        starts = np.asarray([o[0] for o in enc.offsets], np.int64).reshape(-1)
        mask = np.zeros(len(ids), np.uint8)
        for lo, hi in spans:
            mask[(starts >= lo) & (starts < hi)] = 1
        if add_eos:
            ids, mask = np.append(ids, eos), np.append(mask, 1).astype(np.uint8)
        hits = np.flatnonzero(mask)
        prompt = int(hits[0]) if len(hits) else len(ids)
        if prompt >= spec.seq_len:
            if spec.on_overlong == "error":
                raise ValueError(
                    f"{spec.where}, example {first + i}: its prompt alone is {prompt} tokens, "
                    f"data.seq_len={spec.seq_len} leaves no target token: shorten it, raise "
                    "data.seq_len, or set data.on_overlong=skip (skipped and counted)"
                )
            out.append(None)
            continue
        out.append((ids, mask))
    return out


def encode_examples(examples: list, first: int, tok, eos: int, dtype, spec: Spec, split_of) -> dict:
    """prepare's worker task for examples first..: per split (tokens, lengths, mask), the
    examples skipped as overlong per split, and the characters read."""
    docs = encode(examples, first, tok, eos, spec)
    out = {"bytes": sum(map(chars, examples)), "skipped": {}}
    for split in ("train", "val"):
        mine = [split_of(first + i) == split for i in range(len(docs))]
        keep = [d for d, m in zip(docs, mine, strict=True) if m and d is not None]
        out["skipped"][split] = sum(d is None for d, m in zip(docs, mine, strict=True) if m)
        lengths = np.fromiter((len(d[0]) for d in keep), np.int64, len(keep))
        tokens = np.concatenate([d[0] for d in keep] or [np.zeros(0, np.int64)]).astype(dtype)
        mask = np.concatenate([d[1] for d in keep] or [np.zeros(0, np.uint8)]).astype(np.uint8)
        out[split] = (tokens, lengths, mask)
    return out


# ---------------------------------------------------------------- data=stdlib_sft
def stdlib_examples(files, prompt_field: str, completion_field: str):
    """Prompt/completion pairs from the standard library's own sources: prompt = a function's
    def line(s) and the opening quotes of its docstring, completion = the docstring (cleaned) and
    the closing quotes. In file order, then ast.walk's order: the same for the same sources."""
    for path in files:
        try:
            text = Path(path).read_text(encoding="utf-8")
            tree = ast.parse(text)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a few stdlib files are deliberately not valid Python 3
        lines = text.splitlines(keepends=True)
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node)
            header = "".join(lines[node.lineno - 1 : node.body[0].lineno - 1])
            if not doc or not doc.strip() or not header.strip():
                continue  # no docstring, or `def f(): "doc"` on one line
            yield {prompt_field: textwrap.dedent(header) + '    """',
                   completion_field: doc + '"""'}  # fmt: skip
