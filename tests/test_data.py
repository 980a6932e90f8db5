import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlsr_ray import data


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_three_row_formats(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "Q1", "response": "A1"},
        {"instruction": "Translate", "input": "hola", "output": "hello"},
        {"instruction": "Say hi", "output": "hi"},
        {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"},
                      {"role": "assistant", "content": "A"}, {"role": "user", "content": "U2"},
                      {"role": "assistant", "content": "FINAL"}]},
    ])
    ex = data.load_examples(p)
    assert ex[0].messages == ({"role": "user", "content": "Q1"},) and ex[0].reference == "A1"
    assert ex[1].messages[0]["content"] == "Translate\n\nhola" and ex[1].reference == "hello"
    assert ex[2].messages[0]["content"] == "Say hi"
    assert [m["content"] for m in ex[3].messages] == ["S", "U1", "A", "U2"] and ex[3].reference == "FINAL"


def test_parquet(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"], "response": ["x", "y"]}), path)
    assert [e.reference for e in data.load_examples(str(path))] == ["x", "y"]


@pytest.mark.parametrize("content, message", [
    (b'{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": \n', "d.jsonl:2: malformed JSON"),
    (b'{"prompt": "a"}\n', "d.jsonl:1: missing field 'response'"),
    (b'{"prompt": "a", "response": "  "}\n', "d.jsonl:1: field 'response' is empty"),
    (b'{"prompt": 3, "response": "b"}\n', "d.jsonl:1: field 'prompt' must be a string"),
    (b'{"prompt": "a", "response": "b"}\n{"prompt": "\xff\xfe", "response": "b"}\n', "d.jsonl:2: not valid UTF-8"),
    (b'[1, 2]\n', "d.jsonl:1: expected a JSON object"),
    (b'{"question": "a"}\n', "d.jsonl:1: unrecognised row"),
    (b'{"messages": [{"role": "user", "content": "a"}]}\n', "no assistant turn"),
    (b'{"messages": []}\n', "non-empty list"),
    (b'{"messages": [{"role": "user"}]}\n', "messages\\[0\\]"),
    (b'\n\n', "the dataset is empty"),
])
def test_bad_rows_name_file_row_field(tmp_path, content, message):
    path = tmp_path / "d.jsonl"
    path.write_bytes(content)
    with pytest.raises(data.DataError, match=message) as e:
        data.load_examples(str(path))
    assert "\n" not in str(e.value)


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(data.DataError, match="no such data file"):
        data.load_examples(str(tmp_path / "nope.jsonl"))
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(data.DataError, match="unknown data format"):
        data.load_examples(str(tmp_path / "d.csv"))


def test_builtin_dataset_is_varied_and_splits_deterministically():
    ex = data.load_examples(None)
    assert len(ex) >= 150
    assert len({e.messages[0]["content"] for e in ex}) == len(ex)
    a = data.split_heldout(ex, 60, seed=0)
    b = data.split_heldout(ex, 60, seed=0)
    assert a == b and len(a[1]) == 60
    assert not {e.messages[0]["content"] for e in a[0]} & {e.messages[0]["content"] for e in a[1]}
    with pytest.raises(data.DataError, match="leaves no training data"):
        data.split_heldout(ex, len(ex), 0)


def test_tokenize_truncates_or_drops(tiny_tokenizer):
    ex = [data.Example(({"role": "user", "content": "word " * 200},), "r"),
          data.Example(({"role": "user", "content": "short"},), "r2")]
    kept = data.tokenize(ex, tiny_tokenizer, 64, "truncate")
    assert kept.truncated == 1 and kept.dropped == 0 and max(len(p) for p in kept.prompt_ids) == 64
    # The generation header survives truncation: the prompt still ends where the answer begins.
    full = data.tokenize(ex[1:], tiny_tokenizer, 64, "drop").prompt_ids[0]
    assert kept.prompt_ids[0][-3:] == full[-3:]
    dropped = data.tokenize(ex, tiny_tokenizer, 64, "drop")
    assert dropped.dropped == 1 and dropped.references == ["r2"]
    with pytest.raises(data.DataError, match="longer than data.max_prompt_tokens"):
        data.tokenize(ex[:1], tiny_tokenizer, 64, "drop")


def test_cursor_is_deterministic_and_resumable():
    c1 = data.PromptCursor(10, seed=3)
    first = [c1.next_indices(4) for _ in range(6)]  # crosses epoch boundaries
    flat = [i for chunk in first[:5] for i in chunk]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    c2 = data.PromptCursor(10, seed=3)
    for _ in range(3):
        c2.next_indices(4)
    resumed = data.PromptCursor(10, seed=3, **c2.state())
    assert [resumed.next_indices(4) for _ in range(3)] == first[3:]


def test_prompts_table_matches_contract(tiny_tokenizer):
    tok = data.tokenize(data.load_examples(None)[:5], tiny_tokenizer, 256, "drop")
    t = data.prompts_table(tok, [4, 0], first_group_id=10)
    assert t.column("group_id").to_pylist() == [10, 11]
    assert t.column("reference_text").to_pylist() == [tok.references[4], tok.references[0]]


def test_a_rows_other_fields_and_prompt_text_reach_the_prompts_table(tmp_path, tiny_tokenizer):
    """Reward terms read the prompt's text and the data row's other fields (docs/rewards.md)."""
    import json

    path = tmp_path / "d.jsonl"
    rows = [{"instruction": "Name a colour.", "input": "", "output": "Red.", "category": "open", "level": 2},
            {"prompt": "2+2?", "response": "4", "answer": 4},
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    tok = data.tokenize(data.load_examples(str(path)), tiny_tokenizer, 256, "drop")
    t = data.prompts_table(tok, [0, 1, 2], first_group_id=0)
    assert t.column("prompt_text").to_pylist() == ["Name a colour.", "2+2?", "Hi"]
    assert [json.loads(x) for x in t.column("data_json").to_pylist()] == [
        {"category": "open", "level": 2}, {"answer": 4}, {}]
