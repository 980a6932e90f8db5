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
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.kind = status, param, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": None}}


@dataclass(frozen=True)
class ChatRequest:
    messages: list[dict[str, str]]  # role + content, chat-template order
    max_tokens: int
    temperature: float  # 0 = greedy
    top_p: float
    seed: int | None


def _number(body: dict, key: str, default: float, low: float, high: float, integer: bool = False) -> Any:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise ApiError(400, f"'{key}' must be {'an integer' if integer else 'a number'}, got {value!r}", key)
    if not low <= value <= high:
        raise ApiError(400, f"'{key}' must be between {low} and {high}, got {value!r}", key)
    return value


def parse_chat_request(raw: bytes, served_model: str, max_tokens_limit: int) -> ChatRequest:
    """The request body -> ChatRequest, or ApiError (400 bad field, 404 unknown model)."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    model = body.get("model", served_model)
    if model != served_model:
        raise ApiError(404, f"model {model!r} is not served here; this server has {served_model!r}", "model",
                       "model_not_found")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ApiError(400, f"messages[{i}] must be {{\"role\": one of {list(ROLES)}, \"content\": a string}}",
                           f"messages[{i}]")
    if body.get("stream"):
        raise ApiError(400, "streaming is not supported; send \"stream\": false", "stream")
    if body.get("n", 1) != 1:
        raise ApiError(400, "only n=1 is supported", "n")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ApiError(400, f"'seed' must be an integer, got {seed!r}", "seed")
    return ChatRequest(
        messages=[{"role": m["role"], "content": m["content"]} for m in messages],
        max_tokens=_number(body, "max_tokens", min(256, max_tokens_limit), 1, max_tokens_limit, integer=True),
        temperature=float(_number(body, "temperature", 1.0, 0.0, 2.0)),
        top_p=float(_number(body, "top_p", 1.0, 1e-6, 1.0)),
        seed=seed,
    )


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
