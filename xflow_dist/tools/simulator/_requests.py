"""What a request asks for (chat or embeddings) and what its reply holds, deterministically from the seed."""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..._tokens import estimate_messages_tokens

#: OpenAI's upper bound for ``n``.
_MAX_N = 128
#: Four-byte words: a reply of k of them estimates to exactly k tokens.
_WORDS = (" the", " and", " for", " you", " not", " are", " but", " all", " can", " was", " one", " may")


class _BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True)
class _Chat:
    model: str
    prompt_tokens: int
    max_tokens: int
    n: int
    stream: bool
    include_usage: bool


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _BadRequest(f"the body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise _BadRequest("the body must be a JSON object")
    return body


def _positive_int(body: Mapping[str, Any], key: str, default: int, maximum: int | None = None) -> int:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (maximum is not None and value > maximum):
        bound = f" and at most {maximum}" if maximum is not None else ""
        raise _BadRequest(f"{key} must be an integer of at least 1{bound}, not {value!r}", key)
    return value


def _model(body: Mapping[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _BadRequest("you must provide a model parameter", "model")
    return model


def _parse_chat(body: Mapping[str, Any], default_max_tokens: int) -> _Chat:
    model = _model(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _BadRequest("messages must be a non-empty array", "messages")
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise _BadRequest("every message must be an object with a string role", "messages")
    try:
        prompt = estimate_messages_tokens(messages)
    except ValueError as exc:
        raise _BadRequest(str(exc), "messages") from exc
    if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
        raise _BadRequest("give max_tokens or max_completion_tokens, not both", "max_tokens")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _positive_int(body, key, default_max_tokens)
    n = _positive_int(body, "n", 1, _MAX_N)
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _BadRequest("stream must be a boolean", "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise _BadRequest("stream_options must be an object", "stream_options")
        if not stream:
            raise _BadRequest("stream_options is only allowed when stream is true", "stream_options")
        include_usage = options.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise _BadRequest("stream_options.include_usage must be a boolean", "stream_options.include_usage")
    return _Chat(model, prompt, max_tokens, n, stream, include_usage)


def _parse_embedding_inputs(body: Mapping[str, Any]) -> list[str]:
    value = body.get("input")
    inputs = [value] if isinstance(value, str) else value
    if not isinstance(inputs, list) or not inputs or not all(isinstance(text, str) and text for text in inputs):
        raise _BadRequest("input must be a non-empty string or a non-empty array of non-empty strings", "input")
    return inputs


def _unit_floats(seed: bytes, count: int) -> list[float]:
    """``count`` deterministic floats in [0, 1) drawn from ``seed``."""
    out: list[float] = []
    block = 0
    while len(out) < count:
        digest = hashlib.blake2b(seed + struct.pack(">Q", block), digest_size=64).digest()
        out.extend(value / 2**64 for value in struct.unpack(">8Q", digest))
        block += 1
    return out[:count]


def _reply_text(tokens: int, offset: int) -> str:
    return "".join(_WORDS[(offset + i) % len(_WORDS)] for i in range(tokens))


def _split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]
