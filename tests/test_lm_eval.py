"""eval.lm_eval_tasks: the LM Evaluation Harness on a checkpoint, checked against the same model's
log-likelihoods and greedy answers computed here with plain transformers. The tasks are this
folder's own (tests/lm_eval_tasks: task YAMLs over local JSON files); the comparison runs them on
its four checkpoints in tests/test_compare.py."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from rlsr_ray.evaluation.harness import condense
from rlsr_ray.evaluation.lm_eval_tasks import paired

TASKS = Path(__file__).resolve().parent / "lm_eval_tasks"
# float32 sums of a few tokens' log-softmax, batched with padding by the harness and one by one
# here: each term is exact to ~1e-6 relative of a |log p| of ~10, so a sum differs by well under this.
LL_TOL = 1e-3


@pytest.fixture(scope="module")
def harness(tiny_policy):
    """The harness's results for both tasks on the tiny model, as the eval's actor gets them
    (in this process: no Ray needed for the harness itself). The environment holds a rank of a
    distributed launch, as an actor inherits it from a driver started beside an in-process learner:
    the harness must still run as the one process it is."""
    from actors.lm_eval_actor import LmEvalActor
    from rlsr_ray.evaluation.lm_eval_tasks import model_args

    with pytest.MonkeyPatch.context() as mp:
        for key, value in dict(LOCAL_RANK="0", RANK="0", WORLD_SIZE="2").items():
            mp.setenv(key, value)
        actor = LmEvalActor("cpu", 2, str(TASKS))
        mc = actor.evaluate(model_args(tiny_policy, "float32"), ["rlsr_mc"], None, None, 4, 0)
        gen = actor.evaluate(model_args(tiny_policy, "float32"), ["rlsr_gen"], None, None, 1, 0)
    return mc, gen


def _loglikelihood(model, tok, context: str, continuation: str) -> float:
    """log P(continuation | context), summed over the continuation's tokens: the harness's
    definition (the pair encoded whole, the context's tokens cut off the front)."""
    import torch

    whole = tok.encode(context + continuation)
    n = len(tok.encode(context))
    ids = torch.tensor([whole])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), -1)
    return float(sum(logp[i - 1, whole[i]] for i in range(n, len(whole))))


def test_multiple_choice_accuracy_is_that_of_the_models_own_loglikelihoods(harness, tiny_policy):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    mc, _ = harness
    model = AutoModelForCausalLM.from_pretrained(tiny_policy, dtype="float32").eval()
    tok = AutoTokenizer.from_pretrained(tiny_policy)
    docs = json.loads((TASKS / "rlsr_mc.json").read_text())
    acc, acc_norm = [], []
    for doc in docs:
        context = f"Question: {doc['question']}\nAnswer:"
        lls = [_loglikelihood(model, tok, context, " " + c) for c in doc["choices"]]
        best = sorted(lls, reverse=True)
        assert best[0] - best[1] > 2 * LL_TOL, (doc, lls)  # no near-tie: the argmax is the model's, not rounding's
        acc.append(float(max(range(len(lls)), key=lls.__getitem__) == doc["label"]))
        norm = [ll / len(c) for ll, c in zip(lls, doc["choices"])]
        acc_norm.append(float(max(range(len(norm)), key=norm.__getitem__) == doc["label"]))
    assert mc["scores"]["rlsr_mc"]["acc"] == {i: a for i, a in enumerate(acc)}
    assert mc["scores"]["rlsr_mc"]["acc_norm"] == {i: a for i, a in enumerate(acc_norm)}
    got = mc["tasks"]["rlsr_mc"]
    n = len(docs)
    assert got["samples"] == n and got["num_fewshot"] == 0
    assert got["metrics"]["acc"]["value"] == pytest.approx(sum(acc) / n, abs=1e-12)
    mean = sum(acc) / n  # the harness's stderr of a mean: sample std / sqrt(n)
    se = math.sqrt(sum((a - mean) ** 2 for a in acc) / (n - 1) / n)
    assert got["metrics"]["acc"]["stderr"] == pytest.approx(se, rel=1e-9)
    assert 0 < sum(acc) < n  # the check can tell a right choice from a wrong one


def test_generation_answers_are_the_models_greedy_answers(harness, tiny_policy):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, gen = harness
    model = AutoModelForCausalLM.from_pretrained(tiny_policy, dtype="float32").eval()
    tok = AutoTokenizer.from_pretrained(tiny_policy)
    docs = json.loads((TASKS / "rlsr_gen.json").read_text())
    found = json.loads(json.dumps(gen))  # what the eval writes: plain JSON
    for i, doc in enumerate(docs):
        ids = torch.tensor([tok.encode(f"Q: {doc['question']}\nA:")])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                 pad_token_id=tok.eos_token_id)
        answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split("\n")[0]
        match = float(answer.strip().lower() == doc["answer"].lower())
        assert found["scores"]["rlsr_gen"]["exact_match"][str(i)] == match, (i, answer)
    assert found["tasks"]["rlsr_gen"]["metrics"]["exact_match"]["value"] == \
        pytest.approx(sum(found["scores"]["rlsr_gen"]["exact_match"].values()) / len(docs))


def test_summary_parts_and_paired_differences_by_document():
    result = {"results": {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": 0.25, "em,strict": 1.0,
                                "em_stderr,strict": "N/A"}},
              "n-shot": {"t": 5}, "versions": {"t": 1.0}, "n-samples": {"t": {"original": 9, "effective": 4}},
              "samples": {"t": [{"doc_id": d, "metrics": ["acc"], "filter": "none", "acc": a}
                                for d, a in [(0, 1.0), (1, 0.0), (2, 1.0), (3, 0.0)]]}}
    c = condense(result)
    assert c["tasks"]["t"] == {"metrics": {"acc": {"value": 0.5, "stderr": 0.25}, "em,strict": {"value": 1.0,
                                                                                                  "stderr": None}},
                               "num_fewshot": 5, "samples": 4, "version": 1.0}
    other = {"t": {"acc": {0: 1.0, 1: 1.0, 2: 1.0, 3: 0.0}}}
    d = paired({"x": other, "y": c["scores"]}, [("x", "y")])["x_vs_y"]["tasks"]["t"]["acc"]
    assert (d["n"], d["delta_mean"]) == (4, 0.25)  # document 1 flipped to right


def test_an_unknown_task_is_one_line_before_any_model_loads(tmp_path):
    done = subprocess.run([sys.executable, "-m", "rlsr_ray.eval", "tiny-random", "--preset=tiny",
                           "--eval.lm_eval_tasks=rlsr_mc,rlsr_mcq", f"--eval.lm_eval_include_path={TASKS}",
                           f"--eval.output_dir={tmp_path / 'eval'}"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last == (f"rlsr_ray: error: eval.lm_eval_tasks: 'rlsr_mcq' is not a task of lm-eval 0.4.13 nor under "
                    f"eval.lm_eval_include_path={TASKS}; did you mean rlsr_mc, rlsr_gen?"), last
    assert "Loading weights" not in done.stderr and not (tmp_path / "eval").exists()
