import numpy as np
import pyarrow as pa
import pytest

from rlsr_ray.contract import batch


def rollouts(n=4, bad_logprob_row=None):
    rows = {
        "group_id": [i // 2 for i in range(n)], "sample_idx": [i % 2 for i in range(n)],
        "prompt_ids": [[1, 2, 3]] * n, "reference_text": ["ref"] * n, "prompt_text": ["q"] * n,
        "data_json": ["{}"] * n, "response_ids": [[5, 6]] * n, "response_text": ["ab"] * n,
        "rollout_logprobs": [[-0.1, -0.2]] * n, "finish_reason": ["stop"] * n, "policy_version": [0] * n,
    }
    if bad_logprob_row is not None:
        rows["rollout_logprobs"][bad_logprob_row] = [-0.1]
    return pa.Table.from_pydict(rows, schema=batch.ROLLOUTS)


def test_valid_table_passes_and_keeps_schema():
    t = batch.check(rollouts(), batch.ROLLOUTS, "x")
    assert t.schema.equals(batch.ROLLOUTS)


@pytest.mark.parametrize("mutate, message", [
    (lambda t: t.drop_columns(["response_ids"]), "missing column"),
    (lambda t: t.append_column("extra", pa.array([1] * len(t))), "unexpected column"),
    (lambda t: t.set_column(t.schema.get_field_index("policy_version"), "policy_version",
                            pa.array([0.5] * len(t))), "has type double"),
    (lambda t: t.set_column(t.schema.get_field_index("response_text"), "response_text",
                            pa.array(["a", None, "b", "c"])), "null"),
    (lambda t: t.set_column(t.schema.get_field_index("finish_reason"), "finish_reason",
                            pa.array(["stop", "eos", "stop", "stop"])), "finish_reason"),
    (lambda t: t.set_column(t.schema.get_field_index("sample_idx"), "sample_idx",
                            pa.array([0, 0, 0, 1], pa.int32())), "duplicate"),
    (lambda t: t.set_column(t.schema.get_field_index("prompt_ids"), "prompt_ids",
                            pa.array([[1], [], [1], [1]], pa.list_(pa.int32()))), "empty prompt_ids"),
])
def test_malformed_tables_are_rejected(mutate, message):
    with pytest.raises(batch.BatchError, match=message):
        batch.check(mutate(rollouts()), batch.ROLLOUTS, "rollouts")


def test_logprob_length_mismatch_names_row():
    with pytest.raises(batch.BatchError, match="row 2: len\\(rollout_logprobs\\)"):
        batch.check(rollouts(bad_logprob_row=2), batch.ROLLOUTS, "rollouts")


def test_nan_advantage_rejected():
    t = rollouts(2)
    extra = {"reward": pa.array([0.1, 0.2], pa.float32()),
             "ref_logprobs": pa.array([[-0.1, -0.2]] * 2, pa.list_(pa.float32())),
             "advantage": pa.array([np.nan, 0.0], pa.float32())}
    for name, col in extra.items():
        t = t.append_column(name, col)
    with pytest.raises(batch.BatchError, match="NaN"):
        batch.check(t, batch.TRAIN, "train")


def test_not_a_table_rejected():
    with pytest.raises(batch.BatchError, match="expected a pyarrow.Table"):
        batch.check({"group_id": [0]}, batch.PROMPTS, "prompts")


def test_join_pairs_rows_by_key_whatever_the_order():
    left = rollouts()
    ref = pa.table({"group_id": pa.array([1, 0, 1, 0], pa.int64()), "sample_idx": pa.array([1, 1, 0, 0], pa.int32()),
                    "ref_logprobs": pa.array([[-4.0, -4.0], [-2.0, -2.0], [-3.0, -3.0], [-1.0, -1.0]],
                                             pa.list_(pa.float32()))})
    joined = batch.join(left, ref, "j")
    assert joined.column("ref_logprobs").to_pylist() == [[-1, -1], [-2, -2], [-3, -3], [-4, -4]]
    assert joined.column("prompt_ids").to_pylist() == left.column("prompt_ids").to_pylist()


def test_join_rejects_missing_partner():
    left = rollouts()
    right = pa.table({"group_id": pa.array([0, 0, 1, 9], pa.int64()), "sample_idx": pa.array([0, 1, 0, 1], pa.int32()),
                      "ref_logprobs": pa.array([[0.0, 0.0]] * 4, pa.list_(pa.float32()))})
    with pytest.raises(batch.BatchError, match="key mismatch"):
        batch.join(left, right, "j")


def test_split_is_contiguous_and_complete():
    t = rollouts(7)
    parts = batch.split(t, 3)
    assert [len(p) for p in parts] == [3, 2, 2]
    assert pa.concat_tables(parts).equals(t)


def test_nonfinite_rewards_name_the_reason():
    from rlsr_ray.driver.step import nonfinite_reason

    def rewards(values):
        n = len(values)
        return pa.table({"group_id": pa.array(range(n), pa.int64()), "sample_idx": pa.array([0] * n, pa.int32()),
                         "reward": pa.array(values, pa.float32()), "similarity": pa.array([0.5] * n, pa.float32())})

    assert nonfinite_reason(rewards([0.1, 0.2])) is None
    assert nonfinite_reason(rewards([0.1, np.nan, np.inf])) == "2 non-finite value(s) in reward"


def test_sequence_tokens_counts_prompt_and_response_tokens_of_every_table():
    t = rollouts(3)  # every row: 3 prompt + 2 response tokens
    assert batch.sequence_tokens([t, t.slice(0, 1), t.slice(0, 0)]) == 4 * (3 + 2)
    assert batch.sequence_tokens([]) == 0
