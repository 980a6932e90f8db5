"""`python -m rlsr_ray.serve` on CPU with the tiny policy, driven by a real HTTP client."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from listeners import LOOPBACK, own_ray_env, session_listeners
from test_e2e import _free_port

pytestmark = pytest.mark.slow

CHAT = {"messages": [{"role": "user", "content": "Name a color."}], "max_tokens": 6, "temperature": 0.7}


@pytest.fixture(scope="module")
def server(tiny_policy, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "rlsr_ray.serve", tiny_policy, f"--port={port}", "--name=tiny"],
                            env=own_ray_env(), stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 180
    try:
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            try:
                if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield url, proc, log
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # the server's own orderly stop (Ctrl-C does the same)
            try:
                assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)  # whatever of its Ray is left


def test_models_and_a_chat_completion(server):
    url, _, _ = server
    assert httpx.get(f"{url}/models").json()["data"][0]["id"] == "tiny"
    r = httpx.post(f"{url}/chat/completions", json={**CHAT, "model": "tiny"}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["finish_reason"] in ("stop", "length")
    assert 1 <= body["usage"]["completion_tokens"] <= 6 and body["usage"]["prompt_tokens"] > 0


def test_concurrent_requests_all_answered(server):
    url, _, _ = server
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda i: httpx.post(f"{url}/chat/completions", json={**CHAT, "seed": i}, timeout=120),
                                range(4)))
    assert [r.status_code for r in replies] == [200] * 4


@pytest.mark.parametrize("content, status, param", [
    (b"{not json", 400, None),
    (b'{"model": "tiny"}', 400, "messages"),
    (b'{"messages": [{"role": "user", "content": 5}]}', 400, "messages[0]"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000000}', 400, "max_tokens"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}', 400, "temperature"),
    (b'{"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}', 404, "model"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}', 400, "tools"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}}', 400,
     "response_format"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "logprobs": true}', 400, "logprobs"),
    (b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}', 400,
     "messages[0].content[0]"),
    # The tiny model has 2,048 positions: the messages alone fill them.
    (('{"messages": [{"role": "user", "content": "' + "word " * 2100 + '"}], "max_tokens": 8}').encode(), 400,
     "messages"),
])
def test_malformed_requests_get_a_4xx_and_the_server_goes_on(server, content, status, param):
    url, proc, _ = server
    r = httpx.post(f"{url}/chat/completions", content=content, headers={"content-type": "application/json"})
    assert r.status_code == status and r.json()["error"]["param"] == param, r.text
    assert httpx.post(f"{url}/chat/completions", json=CHAT, timeout=60).status_code == 200
    assert proc.poll() is None


def test_stop_max_completion_tokens_and_content_parts_are_honoured(server):
    url, _, _ = server
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Name a "}, {"type": "text", "text": "color."}]}],
             "temperature": 0, "max_completion_tokens": 12}
    plain = httpx.post(f"{url}/chat/completions", json=parts, timeout=60)
    assert plain.status_code == 200, plain.text
    text = plain.json()["choices"][0]["message"]["content"]
    assert 1 <= plain.json()["usage"]["completion_tokens"] <= 12 and len(text) >= 4
    stop = text[2:4]  # greedy: the same answer again, now cut before the first occurrence of this
    cut = httpx.post(f"{url}/chat/completions", json={**parts, "stop": [stop]}, timeout=60).json()
    assert cut["choices"][0]["message"]["content"] == text[:text.find(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"


def test_listens_on_loopback_only(server):
    _, proc, _ = server
    listeners = session_listeners(proc.pid)
    assert len(listeners) >= 3, listeners
    assert [(a, pid) for a, pid in listeners if a not in LOOPBACK] == []


def test_bad_checkpoint_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rlsr_ray.serve", str(tmp_path / "nope")], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "neither an HF model folder (no config.json) nor a PEFT adapter folder" in proc.stderr


def test_the_eval_judge_talks_to_this_server(server):
    """rlsr_ray.evaluation.eval's endpoint judge against a real OpenAI-compatible server (this project's).
    The tiny random policy is no judge: what is checked is the protocol, not its votes."""
    from rlsr_ray.evaluation import judge as J

    url, _, _ = server
    jd = J.EndpointJudge(url, "tiny", timeout_s=60, max_tokens=4)
    rows = J.pairwise(jd, J.load_template(None), ["Name a color."], ["Blue."], ["Seven."])
    assert all(v in J.CHOICES or v is None for v in (rows[0]["x_first"], rows[0]["x_second"]))
    with pytest.raises(J.JudgeError, match=r"/v1/chat/completions: HTTP 400: .*max_tokens"):
        J.EndpointJudge(url, "tiny", max_tokens=0).ask("A or B?")  # the server's OpenAI error body
    with pytest.raises(J.JudgeError, match=r"HTTP 404"):
        J.EndpointJudge(url.removesuffix("/v1"), "tiny").ask("A or B?")
