"""The chat API's request checks and response bodies, without a server."""
from __future__ import annotations

import json

import pytest

from rlsr_ray.serving.chat_api import ApiError, chat_response, models_response, parse_chat_request

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


def test_fields_clients_rely_on_are_honoured():
    r = parse({**GOOD, "max_completion_tokens": 9, "stop": ["\n\n", "END"], "logprobs": False,
               "response_format": {"type": "text"}, "presence_penalty": 0, "user": "u1"})
    assert r.max_tokens == 9 and r.stop == ("\n\n", "END")
    assert parse({**GOOD, "stop": "###"}).stop == ("###",) and parse(GOOD).stop == ()
    parts = {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi "},
                                                                     {"type": "text", "text": "there"}]}]}
    assert parse(parts).messages == [{"role": "user", "content": "Hi there"}]


@pytest.mark.parametrize("extra, param, words", [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "not supported"),
    ({"response_format": {"type": "json_object"}}, "response_format", "not supported"),
    ({"logprobs": True}, "logprobs", "not supported"),
    ({"frequency_penalty": 0.5}, "frequency_penalty", "not supported"),
    ({"functions": []}, "functions", "not supported"),
    ({"max_tokens": 5, "max_completion_tokens": 6}, "max_completion_tokens", "disagree"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({"stop": 5}, "stop", "a non-empty string"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0]", "'image_url'"),
])
def test_unsupported_fields_are_refused_not_dropped(extra, param, words):
    with pytest.raises(ApiError) as e:
        parse({**GOOD, **extra})
    assert e.value.status == 400 and e.value.param == param and words in str(e.value)


def test_stop_strings_and_the_context_error_body():
    from rlsr_ray.serving.chat_api import context_error, cut_at_stop

    assert cut_at_stop("a, b. c. d", (". ", ", ")) == ("a", True)
    assert cut_at_stop("abc", ("x",)) == ("abc", False)
    err = context_error(2000, 100, 2048).body()["error"]
    assert err["code"] == "context_length_exceeded" and err["type"] == "invalid_request_error"
    assert "context is 2048 tokens; the messages take 2000" in err["message"]
