"""Pairwise judging, AlpacaEval-style: a language model says which of two responses is better.

Every pair is asked in both orders (X shown as A, then as B), so a judge that always prefers one
position gives exactly 50 %. Each order scores X 1 (X preferred), 0 (the other) or 0.5 (tie);
a prompt's score is the mean over the orders whose reply could be read, and the win rate is the
mean over prompts with its standard error. The judge is an OpenAI-compatible
`/v1/chat/completions` endpoint or a local HF causal LM; the prompt is a file the user can replace.
"""
from __future__ import annotations

import http.client
import json
import math
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Protocol

import numpy as np

CHOICES = ("A", "B", "tie")
PLACEHOLDERS = ("{instruction}", "{response_a}", "{response_b}")


class JudgeError(RuntimeError):
    """The judge could not be used: unreachable endpoint, bad reply, bad prompt file."""


def load_template(path: str | None) -> str:
    """The judge prompt: the user's file, or the shipped one. Placeholders are checked here so a
    bad file fails before any checkpoint is evaluated."""
    if path is None:
        return resources.files("rlsr_ray").joinpath("prompts/judge_pairwise.txt").read_text()
    try:
        text = Path(path).expanduser().read_text()
    except OSError as e:
        raise JudgeError(f"eval.judge_prompt: cannot read {path}: {e.strerror}") from None
    missing = [p for p in PLACEHOLDERS if p not in text]
    if missing:
        raise JudgeError(f"eval.judge_prompt: {path} lacks the placeholder(s) {', '.join(missing)}")
    return text


_PLACEHOLDER = re.compile(r"\{(instruction|response_a|response_b)\}")


def fill(template: str, instruction: str, response_a: str, response_b: str) -> str:
    # One pass over the template, not format() or chained replace(): instructions and answers may
    # hold braces, even a placeholder's name, of their own.
    values = {"instruction": instruction, "response_a": response_a, "response_b": response_b}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


_VERDICT = re.compile(r"^\W*(?:response\s+)?(A|B|tie)\b", re.IGNORECASE)


def parse_verdict(reply: str) -> str | None:
    """'A', 'B' or 'tie' from a reply that starts with one of them (markdown and quotes allowed,
    'Response A' too); None when the reply says something else."""
    m = _VERDICT.match(reply.strip())
    if not m:
        return None
    word = m.group(1)
    return "tie" if word.lower() == "tie" else word.upper()


class Judge(Protocol):
    name: str

    def verdicts(self, prompts: list[str]) -> list[str | None]:
        """One verdict per filled prompt: 'A', 'B', 'tie', or None (reply not readable)."""
        ...


RETRY_STATUS = {429, 500, 502, 503, 504}  # rate limits and a server's passing trouble


@dataclass
class EndpointJudge:
    """Any OpenAI-compatible server: vLLM's, a hosted API, or `python -m rlsr_ray.serve`."""
    url: str  # base URL ending in /v1, or the full .../chat/completions URL
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    timeout_s: float = 60.0
    max_tokens: int = 8
    retries: int = 4  # further tries of a request that hit RETRY_STATUS, a timeout or a dropped connection
    backoff_s: float = 2.0  # first wait; doubled each try, or the server's Retry-After

    @property
    def name(self) -> str:
        return f"{self.model} at {self.url}"

    def _endpoint(self) -> str:
        u = self.url.rstrip("/")
        return u if u.endswith("/chat/completions") else u + "/chat/completions"

    def ask(self, prompt: str) -> str:
        """The reply's text. Hours of evaluation hang on thousands of these calls, so passing
        failures are retried with backoff; a refused connection or another 4xx is not (it will
        not get better) and stops the command in one line."""
        for attempt in range(self.retries + 1):
            try:
                return self._ask_once(prompt)
            except _Passing as e:
                if attempt == self.retries:
                    raise JudgeError(f"judge endpoint {self._endpoint()}: {e.what} after {self.retries + 1} tries") from None
                time.sleep(e.retry_after_s if e.retry_after_s is not None else self.backoff_s * 2 ** attempt)
        raise AssertionError("unreachable")

    def _ask_once(self, prompt: str) -> str:
        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": prompt}],
                           "temperature": 0.0, "max_tokens": self.max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(self._endpoint(), data=body, headers=headers, method="POST")
        where = f"judge endpoint {self._endpoint()}"
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")
            try:
                detail = json.loads(detail)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                detail = detail.strip().splitlines()[0][:200] if detail.strip() else e.reason
            if e.code in RETRY_STATUS:
                raise _Passing(f"HTTP {e.code}: {detail}", _seconds(e.headers.get("Retry-After"))) from None
            raise JudgeError(f"{where}: HTTP {e.code}: {detail}") from None
        except (TimeoutError, ConnectionResetError, http.client.RemoteDisconnected) as e:
            raise _Passing(f"no reply ({type(e).__name__})") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            if isinstance(reason, (TimeoutError, ConnectionResetError)):
                raise _Passing(f"no reply ({type(reason).__name__})") from None
            raise JudgeError(f"{where}: cannot connect ({reason}); check eval.judge") from None
        try:
            return json.loads(raw)["choices"][0]["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError):
            raise JudgeError(f"{where}: the reply is not an OpenAI chat completion: {raw[:200]!r}") from None

    def verdicts(self, prompts: list[str]) -> list[str | None]:
        return [parse_verdict(self.ask(p)) for p in prompts]


class _Passing(Exception):
    """A failure worth another try."""

    def __init__(self, what: str, retry_after_s: float | None = None):
        self.what, self.retry_after_s = what, retry_after_s


def _seconds(retry_after: str | None) -> float | None:
    """Retry-After in seconds (the HTTP-date form is ignored), at most a minute."""
    try:
        return min(max(float(retry_after), 0.0), 60.0) if retry_after else None
    except ValueError:
        return None


class LocalJudge:
    """A local HF causal LM asked the same prompt through its chat template; its verdict is the
    choice whose first token it finds most likely next, so every reply is readable."""

    TOO_SMALL = 1_000_000_000  # parameters; below this, votes test the plumbing, not quality

    def __init__(self, path: str, device: str = "cpu", batch_size: int = 4):
        from rlsr_ray.modeling.policy import load_tokenizer

        self.name, self.device, self.batch_size = path, device, batch_size
        self.tok = load_tokenizer(path)
        first = [self.tok(c, add_special_tokens=False)["input_ids"][0] for c in CHOICES]
        if len(set(first)) != len(CHOICES):
            raise JudgeError(f"eval.judge: {path}'s tokenizer starts 'A', 'B' and 'tie' with the same token")
        self.choice_ids = first

    @cached_property
    def model(self):
        """Loaded at the first verdict: a judge checked before training or generation holds no
        weights while those run."""
        from rlsr_ray.modeling.policy import load_causal_lm

        model = load_causal_lm(self.name, self.device)
        model.eval()
        return model

    @cached_property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def verdicts(self, prompts: list[str]) -> list[str | None]:
        import torch

        from rlsr_ray.data import chat_prompt_ids

        out: list[str | None] = []
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        for i in range(0, len(prompts), self.batch_size):
            ids = [chat_prompt_ids(self.tok, [{"role": "user", "content": p}]) for p in prompts[i:i + self.batch_size]]
            width = max(len(x) for x in ids)
            # Left padding: every row's next token is at the last position.
            inp = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=self.device)
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=self.device)
            with torch.no_grad():
                logits = self.model(input_ids=inp, attention_mask=mask).logits[:, -1, :]
            picks = logits[:, self.choice_ids].argmax(dim=-1).tolist()
            out.extend(CHOICES[k] for k in picks)
        return out


def make_judge(spec: str, model: str, api_key_env: str, timeout_s: float, cache_dir: str,
               device: str = "cpu", retries: int = 4) -> Judge | None:
    """eval.judge: 'none', an http(s) URL (eval.judge_model names the model), or a local HF model
    (a path or a built-in name)."""
    if spec in ("", "none"):
        return None
    if spec.startswith(("http://", "https://")):
        if not model:
            raise JudgeError("eval.judge_model: name the endpoint's model (the 'model' field of each request)")
        return EndpointJudge(spec, model, api_key_env, timeout_s, retries=retries)
    from rlsr_ray.modeling.models import resolve_policy

    return LocalJudge(resolve_policy(spec, cache_dir), device)


def order_score(verdict: str | None, x_is_a: bool) -> float | None:
    """X's score from one verdict: 1 preferred, 0 not, 0.5 tie, None unreadable."""
    if verdict is None:
        return None
    if verdict == "tie":
        return 0.5
    return 1.0 if (verdict == "A") == x_is_a else 0.0


def pairwise(judge: Judge, template: str, instructions: list[str], outs_x: list[str], outs_y: list[str]
             ) -> list[dict]:
    """Per prompt: the verdict with X shown first and with X shown second, and X's score."""
    if not (len(instructions) == len(outs_x) == len(outs_y)):
        raise ValueError("pairwise needs instructions and both outputs of one length")
    prompts = [fill(template, i, x, y) for i, x, y in zip(instructions, outs_x, outs_y)]
    prompts += [fill(template, i, y, x) for i, x, y in zip(instructions, outs_x, outs_y)]
    v = judge.verdicts(prompts)
    n = len(instructions)
    rows = []
    for k in range(n):
        scores = [s for s in (order_score(v[k], True), order_score(v[n + k], False)) if s is not None]
        rows.append({"x_first": v[k], "x_second": v[n + k],
                     "score": float(np.mean(scores)) if scores else None})
    return rows


def win_rate(rows: list[dict], len_x: list[int] | None = None, len_y: list[int] | None = None) -> dict:
    """X's win rate in percent ± SE over prompts with a readable verdict; with lengths, also the
    length-controlled rate (see length_controlled)."""
    scores = np.array([r["score"] for r in rows if r["score"] is not None], np.float64)
    first = [order_score(r["x_first"], True) for r in rows]
    second = [order_score(r["x_second"], False) for r in rows]
    both = [(a, b) for a, b in zip(first, second) if a is not None and b is not None]
    out = {"n": int(scores.size), "unreadable_prompts": len(rows) - int(scores.size),
           "wins": int((scores == 1.0).sum()), "losses": int((scores == 0.0).sum()),
           "ties_or_split": int(((scores > 0) & (scores < 1)).sum()),
           # A judge reading content gives the same answer in both orders.
           "order_agreement": float(np.mean([a == b for a, b in both])) if both else float("nan"),
           "win_rate": float(100 * scores.mean()) if scores.size else float("nan"),
           "se": float(100 * scores.std(ddof=1) / math.sqrt(scores.size)) if scores.size > 1 else float("nan")}
    if len_x is not None and len_y is not None:
        keep = [k for k, r in enumerate(rows) if r["score"] is not None]
        diff = np.array([len_x[k] - len_y[k] for k in keep], np.float64)
        out.update(length_controlled(scores, diff))
    return out


def length_controlled(scores: np.ndarray, length_diff: np.ndarray, ridge: float = 1e-3) -> dict:
    """AlpacaEval's length control without its instruction-difficulty term: fit
    score ~ sigmoid(b0 + b1 * tanh(length_diff / std(length_diff))) by (fractional-target)
    logistic regression and report sigmoid(b0), the win rate when both lengths are equal.

    Its SE is the delta method on a sandwich (robust) variance of b0: scores of 0, ½ and 1 are
    not Bernoulli draws, so the fit's own Fisher information would misstate it. Where length
    separates the verdicts (the longer answer always wins), the maximum-likelihood slope is
    infinite and sigmoid(b0) depends only on where the iterations stop: the rate is then n/a
    (NaN) and `lc_separated` says why. A tiny ridge on the slope alone keeps near-separated fits
    finite without biasing the intercept."""
    n = scores.size
    if n < 3:
        return {"lc_win_rate": float("nan"), "lc_se": float("nan")}
    if scores.min() == scores.max():  # every prompt the same verdict: length cannot explain any of it
        return {"lc_win_rate": float(100 * scores[0]), "lc_se": float("nan"), "lc_length_coef": 0.0}
    sd = length_diff.std()
    z = np.tanh(length_diff / sd) if sd > 0 else np.zeros(n)
    if sd > 0 and separated(z, scores):
        return {"lc_win_rate": float("nan"), "lc_se": float("nan"), "lc_length_coef": float("nan"),
                "lc_separated": True}
    x = np.stack([np.ones(n), z], axis=1)
    b = np.zeros(2)
    penalty = np.diag([0.0, ridge])
    for _ in range(100):
        p = 1 / (1 + np.exp(-x @ b))
        grad = x.T @ (scores - p) - penalty @ b
        hess = (x * (p * (1 - p))[:, None]).T @ x + penalty
        step = np.linalg.solve(hess, grad)
        b += step
        if np.abs(step).max() < 1e-10:
            break
    p = 1 / (1 + np.exp(-x @ b))
    bread = np.linalg.inv((x * (p * (1 - p))[:, None]).T @ x + penalty)
    meat = (x * ((scores - p) ** 2)[:, None]).T @ x
    var_b0 = float((bread @ meat @ bread)[0, 0])
    p0 = 1 / (1 + math.exp(-b[0]))
    return {"lc_win_rate": 100 * p0, "lc_se": 100 * p0 * (1 - p0) * math.sqrt(max(var_b0, 0.0)),
            "lc_length_coef": float(b[1]), "lc_separated": False}


def separated(z: np.ndarray, scores: np.ndarray) -> bool:
    """Whether some threshold c on z has every win (score 1) at or above it, every loss (0) at or
    below it and every tie or split verdict exactly on it (or the same with z mirrored): then the
    likelihood keeps growing as the slope goes to infinity."""
    for zz in (z, -z):
        below = zz[scores < 1]  # losses and ties must sit at or under c
        above = zz[scores > 0]  # wins and ties at or over it
        if below.size and above.size and below.max() <= above.min():
            return True
    return False
