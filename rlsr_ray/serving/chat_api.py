"""The OpenAI-compatible chat API's data: request checks and response bodies (pure, no server).

Every bad request becomes an `ApiError` with an HTTP status and OpenAI's error body, naming the
field, so the server answers 4xx and stays up.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant")


class ApiError(ValueError):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.kind, self.code = status, param, kind, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class ChatRequest:
    messages: list[dict[str, str]]  # role + content, chat-template order
    max_tokens: int
    temperature: float  # 0 = greedy
    top_p: float
    seed: int | None
    stop: tuple[str, ...] = ()  # the answer ends before the first of these (not included)


def _number(body: dict, key: str, default: float, low: float, high: float, integer: bool = False) -> Any:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise ApiError(400, f"'{key}' must be {'an integer' if integer else 'a number'}, got {value!r}", key)
    if not low <= value <= high:
        raise ApiError(400, f"'{key}' must be between {low} and {high}, got {value!r}", key)
    return value


# Fields a request may carry: what this server acts on, and what it may ignore because the value
# asked for is what it does anyway. Any other field is refused with a 400, as OpenAI refuses an
# unrecognised argument: silently dropping `tools` or `response_format` would answer something
# the client did not ask for.
HANDLED = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop",
           "n", "stream", "user"}
NEUTRAL = {"logprobs": (None, False), "top_logprobs": (None, 0), "presence_penalty": (None, 0),
           "frequency_penalty": (None, 0), "response_format": (None, {"type": "text"}), "stream_options": (None,),
           "tools": (None, []), "tool_choice": (None, "none"), "parallel_tool_calls": (None,), "logit_bias": (None, {})}
MAX_STOP = 4  # OpenAI's limit


def parse_chat_request(raw: bytes, served_model: str, max_tokens_limit: int) -> ChatRequest:
    """The request body -> ChatRequest, or ApiError (400 bad or unsupported field, 404 unknown model)."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    for key, value in body.items():
        if key not in HANDLED and value not in NEUTRAL.get(key, ()):
            raise ApiError(400, f"'{key}' is not supported by this server", key)
    model = body.get("model", served_model)
    if model != served_model:
        raise ApiError(404, f"model {model!r} is not served here; this server has {served_model!r}", "model",
                       "model_not_found")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
    if body.get("stream"):
        raise ApiError(400, "streaming is not supported; send \"stream\": false", "stream")
    if body.get("n", 1) != 1:
        raise ApiError(400, "only n=1 is supported", "n")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ApiError(400, f"'seed' must be an integer, got {seed!r}", "seed")
    return ChatRequest(
        messages=[{"role": m["role"], "content": _text(m, i)} for i, m in enumerate(_checked(messages))],
        max_tokens=_max_tokens(body, max_tokens_limit),
        temperature=float(_number(body, "temperature", 1.0, 0.0, 2.0)),
        top_p=float(_number(body, "top_p", 1.0, 1e-6, 1.0)),
        seed=seed,
        stop=_stop(body.get("stop")),
    )


def _checked(messages: list) -> list[dict]:
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), (str, list)):
            raise ApiError(400, f"messages[{i}] must be {{\"role\": one of {list(ROLES)}, \"content\": a string or "
                                "a list of text parts}}", f"messages[{i}]")
    return messages


def _text(message: dict, i: int) -> str:
    """A message's text: a string, or OpenAI's content parts, of which only text ones are served."""
    content = message["content"]
    if isinstance(content, str):
        return content
    texts = []
    for k, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ApiError(400, f"messages[{i}].content[{k}]: only {{\"type\": \"text\", \"text\": ...}} parts are "
                                f"supported, got {kind!r}", f"messages[{i}].content[{k}]")
        texts.append(part["text"])
    return "".join(texts)


def _max_tokens(body: dict, limit: int) -> int:
    """max_completion_tokens (OpenAI's current name) or max_tokens (its older one)."""
    new, old = body.get("max_completion_tokens"), body.get("max_tokens")
    if new is not None and old is not None and new != old:
        raise ApiError(400, f"'max_completion_tokens' ({new!r}) and 'max_tokens' ({old!r}) disagree; send one",
                       "max_completion_tokens")
    key = "max_completion_tokens" if new is not None else "max_tokens"
    return _number(body, key, min(256, limit), 1, limit, integer=True)


def _stop(value: Any) -> tuple[str, ...]:
    """`stop`: absent, one string, or a list of up to MAX_STOP non-empty strings."""
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(x, str) and x for x in stops) or len(stops) > MAX_STOP:
        raise ApiError(400, f"'stop' must be a non-empty string or a list of at most {MAX_STOP} of them, got {value!r}",
                       "stop")
    return tuple(stops)


def cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """The text up to the first stop string, and whether one was found."""
    ends = [i for i in (text.find(x) for x in stops) if i >= 0]
    return (text[:min(ends)], True) if ends else (text, False)


def context_error(prompt_tokens: int, max_tokens: int, context: int) -> ApiError:
    return ApiError(400, f"this model's context is {context} tokens; the messages take {prompt_tokens} and "
                         f"max_tokens asks for {max_tokens} more", "messages", code="context_length_exceeded")


def chat_response(model: str, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int
                  ) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


def models_response(model: str) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": 0, "owned_by": "rlsr_ray"}]}
