"""`python -m rlsr_ray.eval CHECKPOINT [CHECKPOINT ...] [--preset=NAME] [--section.key=value ...]`

Each checkpoint answers the same held-out prompts (greedy by default) through the rollout pool,
and every answer is scored against the human reference: similarity under the reward's embedding
model, ROUGE-L and chrF (metrics the reward never saw), the copy penalty, length, and whether it
was cut at the token limit. Checkpoints are compared with the first one prompt by prompt (mean
delta ± SE), and, with a judge configured (eval.judge), by pairwise win rate.

With eval.lm_eval_tasks, each checkpoint also runs those tasks of the LM Evaluation Harness
(rlsr_ray/evaluation/lm_eval_tasks.py).

Writes under eval.output_dir: outputs/NAME.jsonl (per prompt), model_outputs/NAME.json (AlpacaEval's
format, for `alpaca_eval` with a judge of your own), judgements/X_vs_Y.jsonl, lm_eval/NAME.json (the
harness's per-document scores) and eval_summary.json.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from rlsr_ray.config import Config, ConfigError, load_config, pool_device

log = logging.getLogger("rlsr_ray")

USAGE = """usage: python -m rlsr_ray.eval CHECKPOINT [CHECKPOINT ...] [--preset=NAME] [--section.key=value ...]

CHECKPOINT: an HF folder (a run's checkpoints/step_N, an SFT run's final), a built-in model name,
or NAME=PATH to label it. The first is the baseline the others are compared with. The preset
({presets}, default 'default') gives data, pools and model settings. Keys: eval.data_path,
eval.max_new_tokens, eval.temperature, eval.output_dir, eval.judge, eval.judge_model,
eval.judge_prompt, eval.judge_api_key_env, eval.judge_timeout_s; the LM Evaluation Harness:
eval.lm_eval_tasks=TASK[,TASK...], eval.lm_eval_include_path, eval.lm_eval_limit,
eval.lm_eval_num_fewshot, eval.lm_eval_batch_size."""

# Per-answer metrics averaged in the summary and compared pairwise.
METRICS = ("similarity", "rouge_l", "chrf", "copy_penalized", "tokens", "cut")


@dataclass(frozen=True)
class Prompts:
    """The evaluation prompts: the text a judge reads and the reference each answer is scored by."""
    messages: list[list[dict[str, str]]]
    instructions: list[str]  # data.instruction_text: what the judge reads
    references: list[str]
    extras: list[str]  # data.Example.extra: what reward terms read beside the text


def load_prompts(cfg: Config) -> Prompts:
    from rlsr_ray import data

    if cfg.eval.data_path:
        examples = data.load_examples(cfg.eval.data_path)
    else:
        _, examples = data.split_heldout(data.load_examples(cfg.data.path), cfg.data.heldout_size,
                                         cfg.data.shuffle_seed)
        if not examples:
            raise data.DataError("data.heldout_size is 0: nothing is held out to evaluate on "
                                 "(set data.heldout_size or eval.data_path)")
    msgs = [list(ex.messages) for ex in examples]
    return Prompts(msgs, [data.instruction_text(m) for m in msgs], [ex.reference for ex in examples],
                   [ex.extra for ex in examples])


def eval_prompts(cfg: Config, prompts: Prompts, policy_path: str) -> pa.Table:
    """PROMPTS rows in this checkpoint's chat template. Overlong prompts keep their end rather
    than being dropped, so every checkpoint answers every prompt."""
    from rlsr_ray.contract import batch
    from rlsr_ray import data
    from rlsr_ray.modeling.policy import load_tokenizer

    tok, d = load_tokenizer(policy_path), cfg.data
    ids = []
    for m in prompts.messages:
        m = ([{"role": "system", "content": d.system_prompt}] if d.system_prompt else []) + m
        ids.append(data.chat_prompt_ids(tok, m)[-d.max_prompt_tokens:])
    table = pa.table({"group_id": pa.array(range(len(ids)), pa.int64()),
                      "prompt_ids": pa.array(ids, pa.list_(pa.int32())),
                      "reference_text": pa.array(prompts.references, pa.string()),
                      "prompt_text": pa.array(prompts.instructions, pa.string()),
                      "data_json": pa.array(prompts.extras, pa.string())})
    return batch.check(table, batch.PROMPTS, "eval prompts")


def with_text_metrics(rows: list[dict[str, Any]], references: list[str]) -> list[dict[str, Any]]:
    from rlsr_ray.algo.text_metrics import chrf, rouge_l

    for r, ref in zip(rows, references):
        r["rouge_l"], r["chrf"], r["cut"] = rouge_l(r["output"], ref), chrf(r["output"], ref), r["finish_reason"] == "length"
    return rows


def means(rows: list[dict[str, Any]]) -> dict[str, float]:
    return {m: float(np.mean([float(r[m]) for r in rows])) for m in METRICS}


def deltas(base: list[dict[str, Any]], other: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per metric: other - base, paired by prompt, ± SE (the statistic of a run's summary)."""
    from rlsr_ray.driver.heldout import paired_delta

    return {m: paired_delta([float(r[m]) for r in base], [float(r[m]) for r in other]) for m in METRICS}


def parse_checkpoints(args: list[str]) -> list[tuple[str, str]]:
    """NAME=PATH or PATH; a name defaults to the folder's name, made unique with its parent's."""
    out: list[tuple[str, str]] = []
    for a in args:
        name, sep, path = a.partition("=")
        if not sep:
            p = Path(a.rstrip("/"))
            name, path = p.name, a
            if any(n == name for n, _ in out) or name.startswith("step_") or name == "final":
                name = f"{p.parent.name}_{p.name}" if p.parent.name else p.name
        if not name or any(c in name for c in "/\\") or any(n == name for n, _ in out):
            raise ConfigError(f"checkpoint label {name!r} is empty, has a slash or is used twice; use NAME=PATH")
        out.append((name, path))
    if not out:
        raise ConfigError("name at least one checkpoint to evaluate")
    return out


def generate_all(cfg: Config, checkpoints: list[tuple[str, str]], prompts: Prompts) -> dict[str, list[dict]]:
    """Each checkpoint's answers, one rollout pool at a time; one reward pool scores them all."""
    from actors.sampling import SamplingSpec
    from rlsr_ray.driver.heldout import answers
    from rlsr_ray.driver.pipeline import Pools
    from rlsr_ray.driver.pools import reward_pool, rollout_pool
    from rlsr_ray.modeling.models import resolve_policy, resolve_reward_terms

    paths = [(name, resolve_policy(path, cfg.model.cache_dir)) for name, path in checkpoints]
    reward_terms = resolve_reward_terms(cfg)
    e = cfg.eval
    spec = SamplingSpec(n=1, max_new_tokens=e.max_new_tokens, temperature=e.temperature, top_p=1.0,
                        seed=cfg.run.seed)
    reward = reward_pool(cfg, reward_terms)
    results = {}
    try:
        for name, path in paths:
            t0 = time.perf_counter()
            rollout = rollout_pool(cfg, path, adapters=False)
            try:
                # Answers need only the rollout and reward roles: no reference log-probs, no learners.
                rows = answers(Pools(rollout, reward, None, None), eval_prompts(cfg, prompts, path), spec)
            finally:
                rollout.shutdown()
            results[name] = with_text_metrics(rows, prompts.references)
            log.info("eval: %s answered %d prompts in %.1f s", name, len(rows), time.perf_counter() - t0)
    finally:
        reward.shutdown()
    return results


def make_judge(cfg: Config):
    """The configured judge, checked before any answer is generated (None: no judge)."""
    from rlsr_ray.evaluation import judge as J

    e = cfg.eval
    J.load_template(e.judge_prompt)
    jd = J.make_judge(e.judge, e.judge_model, e.judge_api_key_env, e.judge_timeout_s, cfg.model.cache_dir,
                      pool_device(cfg.pools.reward), e.judge_retries)
    if isinstance(jd, J.EndpointJudge):  # an unreachable, refusing or unreadable endpoint fails here
        reply = jd.ask(PING)
        if J.parse_verdict(reply) is None:
            raise J.JudgeError(f"judge endpoint {jd.url}: asked to reply with the single letter A, {e.judge_model} "
                               f"replied {reply[:80]!r}: its verdicts could not be read; check eval.judge_model")
    return jd


PING = "Reply with the single letter A."


def judge_pairs(cfg: Config, jd, pairs: list[tuple[str, str]], prompts: Prompts, results: dict[str, list[dict]],
                out: Path) -> dict[str, Any]:
    """Win rate of X over Y for each pair, or why there is none."""
    from rlsr_ray.evaluation import judge as J

    e = cfg.eval
    template = J.load_template(e.judge_prompt)
    if jd is None:
        return {"configured": False,
                "note": "no judge configured (eval.judge): no win rates; the metrics above are against the references"}
    (out / "judgements").mkdir(parents=True, exist_ok=True)
    rates = {}
    for x, y in pairs:
        t0 = time.perf_counter()
        ox, oy = [r["output"] for r in results[x]], [r["output"] for r in results[y]]
        rows = J.pairwise(jd, template, prompts.instructions, ox, oy)
        with open(out / "judgements" / f"{x}_vs_{y}.jsonl", "w") as f:
            for k, r in enumerate(rows):
                f.write(json.dumps({"index": k, **r}) + "\n")
        rates[f"{x}_vs_{y}"] = {"x": x, "y": y, **J.win_rate(rows, [len(s) for s in ox], [len(s) for s in oy])}
        log.info("eval: judged %s vs %s on %d prompts in %.1f s", x, y, len(rows), time.perf_counter() - t0)
    small = isinstance(jd, J.LocalJudge) and jd.parameters < J.LocalJudge.TOO_SMALL
    vetted = e.judge_vetted and not small
    # Votes of a judge nobody has checked against human preference are not a win rate: they go
    # under "votes", and only a judge the user marks vetted fills "win_rates".
    info = {"configured": True, "judge": jd.name, "prompt": e.judge_prompt or "rlsr_ray/prompts/judge_pairwise.txt",
            "vetted": vetted, ("win_rates" if vetted else "votes"): rates}
    if small:
        info["caution"] = (f"the judge has {jd.parameters / 1e6:.0f}M parameters: too small to judge answers; "
                           "these votes check the plumbing and are not a win rate")
    elif not vetted:
        info["caution"] = ("the judge is not marked vetted (eval.judge_vetted=true): these are its votes, not a "
                           "win rate, until it is shown to agree with human preference")
    return info


def write_outputs(out: Path, prompts: Prompts, results: dict[str, list[dict]]) -> None:
    (out / "outputs").mkdir(parents=True, exist_ok=True)
    (out / "model_outputs").mkdir(parents=True, exist_ok=True)
    for name, rows in results.items():
        with open(out / "outputs" / f"{name}.jsonl", "w") as f:
            for k, r in enumerate(rows):
                f.write(json.dumps({"index": k, "instruction": prompts.instructions[k],
                                    "reference": prompts.references[k], **r}) + "\n")
        # AlpacaEval's model_outputs.json: instruction, output, generator per row.
        alpaca = [{"instruction": i, "output": r["output"], "generator": name, "dataset": "rlsr_ray"}
                  for i, r in zip(prompts.instructions, rows)]
        (out / "model_outputs" / f"{name}.json").write_text(json.dumps(alpaca, indent=1))


def evaluate(cfg: Config, checkpoints: list[tuple[str, str]], pairs: list[tuple[str, str]] | None = None
             ) -> dict[str, Any]:
    """Evaluate the checkpoints and compare each pair (X, Y): X - Y per metric and X's win rate
    over Y. Default pairs: every checkpoint against the first."""
    from rlsr_ray.driver.ray_session import connect_ray
    from rlsr_ray.evaluation import lm_eval_tasks
    from rlsr_ray.modeling.models import ModelError, resolve_policy

    t0 = time.perf_counter()
    names = [n for n, _ in checkpoints]
    pairs = pairs if pairs is not None else [(n, names[0]) for n in names[1:]]
    out = Path(cfg.eval.output_dir).expanduser()
    prompts = load_prompts(cfg)
    for name, path in checkpoints:  # a wrong path fails before anything starts
        try:
            resolve_policy(path, cfg.model.cache_dir)
        except ModelError as e:
            raise ModelError(f"checkpoint {name}: {str(e).removeprefix('model.policy: ')}") from None
    jd = make_judge(cfg)
    lm_eval_tasks.check_tasks(cfg)  # a task the harness does not know: one line, before any model loads
    remote = cfg.reward_service.enabled or cfg.pools.rollout.num_actors > 0 or cfg.pools.reward.num_actors > 0
    started = connect_ray(cfg) if remote else False
    try:
        results = generate_all(cfg, checkpoints, prompts)
        harness = lm_eval_tasks.run_all(cfg, checkpoints, pairs, out) if cfg.eval.lm_eval_tasks else None
    finally:
        if started:
            import ray

            ray.shutdown()
    out.mkdir(parents=True, exist_ok=True)
    write_outputs(out, prompts, results)
    summary: dict[str, Any] = {
        "prompts": len(prompts.instructions),
        "source": cfg.eval.data_path or f"held-out split of {cfg.data.path or 'the built-in dataset'}",
        "max_new_tokens": cfg.eval.max_new_tokens, "temperature": cfg.eval.temperature,
        "checkpoints": {n: {"path": p, **means(results[n])} for n, p in checkpoints},
        "deltas": {f"{x}_vs_{y}": {"x": x, "y": y, **deltas(results[y], results[x])} for x, y in pairs},
    }
    if harness is not None:  # the LM Evaluation Harness's tasks (eval.lm_eval_tasks)
        summary["lm_eval"] = harness
    # Written before judging too: an endpoint that fails for good then loses no metric.
    summary["judge"] = {"configured": jd is not None, "pending": jd is not None}
    summary["total_s"] = time.perf_counter() - t0
    (out / "eval_summary.json").write_text(json.dumps(summary, indent=1))
    summary["judge"] = judge_pairs(cfg, jd, pairs, prompts, results, out)
    summary["total_s"] = time.perf_counter() - t0
    (out / "eval_summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def split_args(argv: list[str]) -> tuple[list[str], str, list[str]]:
    """(checkpoints, preset, overrides) from the command line."""
    checkpoints = [a for a in argv if not a.startswith("--")]
    preset = "default"
    overrides = []
    for a in argv:
        if a.startswith("--preset="):
            preset = a.split("=", 1)[1]
        elif a.startswith("--"):
            overrides.append(a)
    return checkpoints, preset, overrides


def main(argv: list[str] | None = None) -> int:
    from rlsr_ray.algo.terms import RewardTermError
    from rlsr_ray.cli import command
    from rlsr_ray.data import DataError
    from rlsr_ray.evaluation.judge import JudgeError
    from rlsr_ray.evaluation.harness import LmEvalError
    from rlsr_ray.modeling.models import ModelError

    def work(args: list[str]) -> dict[str, Any]:
        ckpts, preset, overrides = split_args(args)
        return evaluate(load_config(preset, overrides), parse_checkpoints(ckpts))

    return command(argv, USAGE, work, (ConfigError, DataError, ModelError, JudgeError, RewardTermError, LmEvalError))


if __name__ == "__main__":
    sys.exit(main())
