"""The chat API's request checks and response bodies, without a server."""
from __future__ import annotations

import json

import pytest

from rlsr_ray.chat_api import ApiError, chat_response, models_response, parse_chat_request

GOOD = {"model": "m", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}


def parse(body, limit=64):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return parse_chat_request(raw, "m", limit)


def test_a_good_request_with_defaults_and_with_every_field():
    r = parse(GOOD)
    assert r.messages == GOOD["messages"] and r.max_tokens == 64 and r.temperature == 1.0 and r.seed is None
    r = parse({**GOOD, "max_tokens": 5, "temperature": 0, "top_p": 0.5, "seed": 7, "stream": False, "n": 1})
    assert (r.max_tokens, r.temperature, r.top_p, r.seed) == (5, 0.0, 0.5, 7)
    assert parse({"messages": GOOD["messages"]}).messages  # model may be left out


@pytest.mark.parametrize("body, status, param, words", [
    (b"{not json", 400, None, "not valid JSON"),
    (b"[1, 2]", 400, None, "JSON object"),
    ({"model": "m"}, 400, "messages", "non-empty list"),
    ({"model": "m", "messages": []}, 400, "messages", "non-empty list"),
    ({"model": "m", "messages": "hi"}, 400, "messages", "non-empty list"),
    ({"model": "m", "messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0]", "role"),
    ({"model": "m", "messages": [{"role": "user", "content": 3}]}, 400, "messages[0]", "content"),
    ({**GOOD, "max_tokens": 10**6}, 400, "max_tokens", "between 1 and 64"),
    ({**GOOD, "max_tokens": 0}, 400, "max_tokens", "between 1 and 64"),
    ({**GOOD, "max_tokens": "5"}, 400, "max_tokens", "an integer"),
    ({**GOOD, "temperature": -1}, 400, "temperature", "between"),
    ({**GOOD, "temperature": True}, 400, "temperature", "a number"),
    ({**GOOD, "top_p": 0}, 400, "top_p", "between"),
    ({**GOOD, "seed": 1.5}, 400, "seed", "an integer"),
    ({**GOOD, "stream": True}, 400, "stream", "streaming"),
    ({**GOOD, "n": 2}, 400, "n", "n=1"),
    ({**GOOD, "model": "other"}, 404, "model", "not served here"),
])
def test_bad_requests_name_the_field(body, status, param, words):
    with pytest.raises(ApiError) as e:
        parse(body)
    assert e.value.status == status and e.value.param == param and words in str(e.value)
    err = e.value.body()["error"]
    assert err["message"] == str(e.value) and err["param"] == param and "\n" not in err["message"]


def test_response_bodies_follow_openai():
    r = chat_response("m", "Hello.", "stop", 12, 3)
    assert r["object"] == "chat.completion" and r["model"] == "m" and r["id"].startswith("chatcmpl-")
    assert r["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "Hello."}, "finish_reason": "stop"}]
    assert r["usage"] == {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}
    assert models_response("m")["data"][0]["id"] == "m"
