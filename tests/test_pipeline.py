"""The step as references: row selections, dynamic-sampling arithmetic, and learners that build
their mini-batches from pieces of tables left in the object store, with row counts that vary."""
from __future__ import annotations


import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from rlsr_ray.contract import batch
from rlsr_ray.algo.grpo import informative_groups
from rlsr_ray.plan.resources import minibatch_rows
from rlsr_ray.contract.selection import contiguous, gather, pieces, runs, used


def test_pieces_cover_ranges_across_table_boundaries():
    sizes = [3, 0, 4, 2]  # rows 0-2 | (empty) | 3-6 | 7-8
    assert pieces(sizes, [(0, 9)]) == [(0, 0, 3), (2, 0, 4), (3, 0, 2)]
    assert pieces(sizes, [(2, 3)]) == [(0, 2, 1), (2, 0, 2)]
    assert pieces(sizes, [(3, 1), (4, 2)]) == [(2, 0, 3)]  # adjacent ranges merge
    assert pieces(sizes, [(8, 1), (0, 1)]) == [(3, 1, 1), (0, 0, 1)]  # order kept
    with pytest.raises(ValueError, match="outside the 9 rows"):
        pieces(sizes, [(8, 2)])


def test_used_sends_each_consumer_only_its_tables_renumbered():
    tables, sels = used([[(3, 0, 2), (1, 1, 1)], [(3, 2, 1)]])
    assert tables == [1, 3]
    assert sels == [[(1, 0, 2), (0, 1, 1)], [(1, 2, 1)]]


def test_gather_and_runs_give_back_the_chosen_rows():
    whole = pa.table({"x": list(range(10))})
    parts = [whole.slice(0, 4), whole.slice(4, 1), whole.slice(5, 5)]
    chosen = np.array([1, 2, 3, 4, 5, 8, 9])
    assert runs(chosen) == [(1, 5), (8, 2)]
    got = gather(parts, pieces([4, 1, 5], runs(chosen)), whole.schema)
    assert got.column("x").to_pylist() == chosen.tolist()
    assert len(gather(parts, [], whole.schema)) == 0
    assert contiguous(7, 3) == [(0, 3), (3, 2), (5, 2)]


def test_minibatch_rows_keep_whole_groups_and_a_row_per_learner():
    assert minibatch_rows(4, 2, 2, 1) == [(0, 4), (4, 4)]  # full step
    assert minibatch_rows(3, 2, 2, 1) == [(0, 4), (4, 2)]  # a dropped group: last one smaller
    assert minibatch_rows(5, 1, 2, 2) == [(0, 2), (2, 3)]  # 1 row left for 2 learners: merged
    assert minibatch_rows(1, 1, 2, 2) == []  # fewer rows than learners: nothing to train on


def test_informative_groups_drop_near_ties_relative_to_the_reward_scale():
    gids = np.array([7, 7, 3, 3, 5, 5, 9, 4, 4])
    rewards = np.array([0.500, 0.502,  # spread 0.002 < 0.01 * 0.502: dropped
                        0.50, 0.60,  # kept
                        -1.0, -1.0,  # both copy-penalised: no signal
                        0.9,  # a group of one
                        0.001, 0.0])  # spread 0.001 > 0.01 * 0.001: kept (relative)
    assert informative_groups(rewards, gids, 0.01).tolist() == [False, True, False, False, True]
    assert informative_groups(rewards, gids, 0.0).tolist() == [True, True, False, False, True]


# -- learners that read pieces -----------------------------------------------------------------

@pytest.fixture(scope="module")
def train12(tiny_policy, tiny_tokenizer, minilm_path):
    """12 TRAIN rows: 4 prompts x 4 samples without the last sample of each group (groups of 3,
    so mini-batches split unevenly over two learners)."""
    from actors.reward import RewardActor
    from actors.rollout import RolloutActor
    from rlsr_ray import data
    from rlsr_ray.algo.terms import paper
    from test_actors import _train_table

    tok = data.tokenize(data.load_examples(None)[:4], tiny_tokenizer, 128, "drop")
    prompts = data.prompts_table(tok, [0, 1, 2, 3], first_group_id=0)
    full = _train_table(tiny_policy, RolloutActor(tiny_policy, generate_batch_size=16),
                        RewardActor(paper(minilm_path)), prompts)
    return full.filter(pc.less(full.column("sample_idx"), 3))


def _generation(ray, table: pa.Table, cuts: list[int]):
    from actors.sampling import SamplingSpec
    from rlsr_ray.driver.pipeline import Generation
    from rlsr_ray.contract.selection import rollout_summary

    tables = [table.slice(a, b - a) for a, b in zip([0, *cuts], [*cuts, len(table)])]
    return Generation(0, None, SamplingSpec(3, 8, 1.0, 1.0, 0), 0, [ray.put(t) for t in tables],
                      [rollout_summary(t) for t in tables], done=True)


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [0, 3])
def test_learners_assemble_variable_minibatches_from_pieces(local_ray, tiny_policy, train12, zero_stage):
    """Two rounds (a refill) of 2 groups of 3, in tables of odd sizes, reference tables cut
    elsewhere, one group dropped: two learners reading pieces make the update one learner makes
    on the same TRAIN rows. The 3-row mini-batch splits 2/1, so rank 1 makes a padding pass."""
    from actors.learner import LearnerActor
    from actors.pool import Pool
    from rlsr_ray.config import PoolConfig, load_config
    from rlsr_ray.driver.step import Rounds, build_train_table, learner_parts, scores_table
    from rlsr_ray.driver.pipeline import Scored
    from rlsr_ray.plan.resources import step_plan
    from test_actors import assert_same_update, learner, settings

    rollouts = train12.select(batch.ROLLOUTS.names)
    rewards = train12.select(batch.REWARDS.names)
    ref = train12.select(batch.REF_LOGPROBS.names)
    rounds_rows = [(0, 6), (6, 6)]  # round 0: groups 0, 1; round 1: groups 2, 3
    gens = [_generation(local_ray, rollouts.slice(a, n), cuts) for (a, n), cuts in zip(rounds_rows, [[1, 5], [2]])]
    scored = [Scored(rewards.slice(a, n), [local_ray.put(t) for t in batch.split(ref.slice(a, n), k)],
                     [len(t) for t in batch.split(ref.slice(a, n), k)]) for (a, n), k in zip(rounds_rows, [2, 3])]
    kept = np.array([0, 1, 2, 6, 7, 8, 9, 10, 11])  # group 1 dropped
    rounds = Rounds(gens, scored, kept)
    cfg = load_config("tiny", ["--rollout.samples_per_prompt=3", "--train.micro_batch_size=1",
                               "--pools.learner.num_actors=2", "--train.mini_batch_prompts=2",
                               f"--train.zero_stage={zero_stage}"])
    args = learner_parts(rounds, scores_table(rounds, True), step_plan(cfg), cfg)
    assert [[(len(p.scores), p.micro_steps) for p in a[0]] for a in args] == [[(3, 3), (2, 2)], [(3, 3), (1, 2)]]

    s = settings(micro_batch_size=1, micro_steps=1, lr=1.0, optimizer="sgd", zero_stage=zero_stage)
    expected = build_train_table(rollouts.take(kept), rewards.take(kept), ref.take(kept), True)
    mbs = [expected.slice(0, 6), expected.slice(6, 3)]
    norms = [float(sum(len(x) for x in t.column("response_ids").to_pylist())) for t in mbs]
    assert [p.normaliser for p in args[0][0]] == norms
    one = learner(tiny_policy, s)
    before = {k: v.copy() for k, v in one.export_weights().items()}
    one.train_step(mbs, norms, [6, 3])
    single = {k: v - before[k] for k, v in one.export_weights().items()}

    group = Pool("learner", LearnerActor, PoolConfig(num_actors=2, num_cpus=0.5),
                 dict(policy_path=tiny_policy, settings=s, world_size=2), ray_restarts=False, call_timeout_s=300)
    try:
        group.call("setup", [(group.call("rendezvous", [()] * 2)[0],)] * 2)
        w0 = group.call("export_weights", [()] * 2)[0]
        stats = group.call("train_parts", args)
        w1 = group.call("export_weights", [()] * 2)[0]
    finally:
        group.shutdown()
    assert sum(st["tokens"] for st in stats) == sum(norms)  # the padding pass counts nothing
    assert_same_update(single, {k: w1[k] - w0[k] for k in w0})
