"""Instruction data -> prompt batches: loaders, held-out split, tokenisation, a deterministic cursor.

Accepted rows (JSONL or Parquet), each becoming (chat messages up to the last user turn, reference):
  {"prompt": str, "response": str}
  {"instruction": str, "input": str (optional), "output": str}
  {"messages": [{"role": ..., "content": ...}, ...]}  (the last assistant turn is the reference)
A bad row fails with one line naming the file, the row (1-based) and the field.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from rlsr_ray.contract import batch

BUILTIN = "builtin"


class DataError(ValueError):
    """Bad input data; the message names file, row and field."""


@dataclass(frozen=True)
class Example:
    messages: tuple[dict[str, str], ...]  # conversation ending with a user turn
    reference: str  # the human reference answer
    extra: str = "{}"  # the row's other fields as a JSON object: reward terms read them


def instruction_text(messages) -> str:
    """The prompt as text (a judge's instruction, a reward term's prompt): the user's message, or
    the whole conversation."""
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in messages)


def _extra(rec: dict[str, Any], used: tuple[str, ...]) -> str:
    return json.dumps({k: v for k, v in rec.items() if k not in used}, default=str)


def _text(src: str, row: int, rec: dict[str, Any], name: str, required: bool = True) -> str:
    value = rec.get(name)
    if value is None:
        if required:
            raise DataError(f"{src}:{row}: missing field {name!r}")
        return ""
    if not isinstance(value, str):
        raise DataError(f"{src}:{row}: field {name!r} must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise DataError(f"{src}:{row}: field {name!r} is empty")
    return value


def parse_record(rec: Any, src: str, row: int) -> Example:
    if not isinstance(rec, dict):
        raise DataError(f"{src}:{row}: expected a JSON object, got {type(rec).__name__}")
    if "messages" in rec:
        ex = _parse_messages(rec["messages"], src, row)
        return Example(ex.messages, ex.reference, _extra(rec, ("messages",)))
    if "instruction" in rec:
        instruction = _text(src, row, rec, "instruction")
        extra = _text(src, row, rec, "input", required=False)
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return Example(({"role": "user", "content": prompt},), _text(src, row, rec, "output"),
                       _extra(rec, ("instruction", "input", "output")))
    if "prompt" in rec:
        prompt = _text(src, row, rec, "prompt")
        return Example(({"role": "user", "content": prompt},), _text(src, row, rec, "response"),
                       _extra(rec, ("prompt", "response")))
    raise DataError(
        f"{src}:{row}: unrecognised row with fields {sorted(rec)}; expected prompt/response, "
        "instruction/input/output or messages"
    )


def _parse_messages(msgs: Any, src: str, row: int) -> Example:
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{src}:{row}: field 'messages' must be a non-empty list")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{src}:{row}: messages[{i}] must have string 'role' and 'content'")
    last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
    if last is None:
        raise DataError(f"{src}:{row}: field 'messages' has no assistant turn to use as reference")
    if not msgs[last]["content"].strip():
        raise DataError(f"{src}:{row}: messages[{last}] (the reference) is empty")
    context = tuple({"role": m["role"], "content": m["content"]} for m in msgs[:last])
    if not any(m["role"] == "user" for m in context):
        raise DataError(f"{src}:{row}: no user turn before the last assistant turn")
    return Example(context, msgs[last]["content"])


def _iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    with open(path, "rb") as f:
        for row, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{row}: not valid UTF-8 (byte {e.start})") from None
            if not line.strip():
                continue
            try:
                yield row, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{row}: malformed JSON: {e.msg} at column {e.colno}") from None


def _iter_parquet(path: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: cannot read Parquet: {str(e).splitlines()[0]}") from None
    for row, rec in enumerate(table.to_pylist(), start=1):
        yield row, rec


def load_examples(path: str | None) -> list[Example]:
    """Read every row of a JSONL/Parquet file (or the built-in set when path is None)."""
    if path is None or path == BUILTIN:
        res = resources.files("rlsr_ray") / "data" / "instructions.jsonl"
        with resources.as_file(res) as p:
            return load_examples(str(p))
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{p}: no such data file")
    if p.suffix == ".parquet":
        rows = _iter_parquet(p)
    elif p.suffix in (".jsonl", ".json"):
        rows = _iter_jsonl(p)
    else:
        raise DataError(f"{p}: unknown data format {p.suffix!r}; use .jsonl or .parquet")
    examples = [parse_record(rec, str(p), row) for row, rec in rows]
    if not examples:
        raise DataError(f"{p}: the dataset is empty")
    return examples


def split_heldout(examples: list[Example], heldout_size: int, seed: int) -> tuple[list[Example], list[Example]]:
    """Deterministic shuffle, then the last `heldout_size` examples are held out."""
    if heldout_size >= len(examples):
        raise DataError(
            f"data.heldout_size={heldout_size} leaves no training data ({len(examples)} examples)"
        )
    order = np.random.default_rng(seed).permutation(len(examples))
    shuffled = [examples[i] for i in order]
    cut = len(examples) - heldout_size
    return shuffled[:cut], shuffled[cut:]


@dataclass
class Tokenized:
    prompt_ids: list[list[int]]
    references: list[str]
    truncated: int  # prompts cut to max_prompt_tokens
    dropped: int  # prompts dropped for length
    prompt_texts: list[str]  # instruction_text of each kept prompt
    extras: list[str]  # Example.extra of each kept prompt


def chat_prompt_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """The chat template applied to `messages`, ready for the assistant's turn."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def tokenize(examples: list[Example], tokenizer: Any, max_prompt_tokens: int, overflow: str,
             system_prompt: str | None = None) -> Tokenized:
    ids_out, refs, texts, extras, truncated, dropped = [], [], [], [], 0, 0
    for ex in examples:
        msgs = list(ex.messages)
        if system_prompt:
            msgs = [{"role": "system", "content": system_prompt}] + msgs
        ids = chat_prompt_ids(tokenizer, msgs)
        if len(ids) > max_prompt_tokens:
            if overflow == "drop":
                dropped += 1
                continue
            # Keep the end: it holds the question and the assistant header the model continues.
            ids = ids[-max_prompt_tokens:]
            truncated += 1
        ids_out.append(ids)
        refs.append(ex.reference)
        texts.append(instruction_text(ex.messages))
        extras.append(ex.extra)
    if not ids_out:
        raise DataError(f"every prompt is longer than data.max_prompt_tokens={max_prompt_tokens}")
    return Tokenized(ids_out, refs, truncated, dropped, texts, extras)


class PromptCursor:
    """Deterministic walk over `size` training prompts (their indices): a fresh seeded
    permutation each epoch.

    Its state is two integers (epoch, position), so a run can save and resume it exactly.
    """

    def __init__(self, size: int, seed: int, epoch: int = 0, position: int = 0):
        self.size, self.seed, self.epoch, self.position = size, seed, epoch, position
        self._order = self._permutation(epoch)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.size)

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def next_indices(self, n: int) -> list[int]:
        out = []
        while len(out) < n:
            if self.position >= len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._permutation(self.epoch)
            out.append(int(self._order[self.position]))
            self.position += 1
        return out


def prompts_table(data: Tokenized, indices: list[int], first_group_id: int) -> pa.Table:
    """PROMPTS rows for the given examples, group ids counting up from first_group_id."""
    table = pa.table(
        {
            "group_id": pa.array(range(first_group_id, first_group_id + len(indices)), pa.int64()),
            "prompt_ids": pa.array([data.prompt_ids[i] for i in indices], pa.list_(pa.int32())),
            "reference_text": pa.array([data.references[i] for i in indices], pa.string()),
            "prompt_text": pa.array([data.prompt_texts[i] for i in indices], pa.string()),
            "data_json": pa.array([data.extras[i] for i in indices], pa.string()),
        }
    )
    return batch.check(table, batch.PROMPTS, "prompts")
