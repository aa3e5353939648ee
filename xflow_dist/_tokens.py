"""A tokenizer-free token estimate: about four UTF-8 bytes per token, plus OpenAI's chat framing.

It is a heuristic, not a tokenizer: good enough to reserve budget before a call (the provider's
``usage`` settles the real count afterwards) and exact by definition for the simulator, which uses it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

__all__ = ["estimate_messages_tokens", "estimate_text_tokens"]

#: OpenAI's chat format: every reply is primed with a few tokens, and every message has framing tokens.
REPLY_PRIMING_TOKENS = 3
MESSAGE_FRAMING_TOKENS = 4


def estimate_text_tokens(text: str) -> int:
    """``ceil(utf-8 bytes / 4)``, at least 1."""
    if not isinstance(text, str):
        raise ValueError(f"text must be a string, not {type(text).__name__}")
    return max(1, math.ceil(len(text.encode("utf-8")) / 4))


def _content_text(content: object) -> str | None:
    """The text of a message's content: the string itself, or its text parts joined; None if it has none."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        texts: list[str] = []
        for part in content:
            if not isinstance(part, Mapping):
                raise ValueError(f"a content part must be an object, not {type(part).__name__}")
            if part.get("type") == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise ValueError("a text content part needs a string 'text'")
                texts.append(text)
        return "".join(texts) if texts else None
    raise ValueError(f"message content must be a string, a list of parts or null, not {type(content).__name__}")


def estimate_messages_tokens(messages: Iterable[Mapping[str, object]]) -> int:
    """Prompt tokens of an OpenAI chat request: 3 of priming, then per message 4 plus its text's estimate.

    Only content counts: a string, or the text parts of a list joined (images and other parts count 0);
    a message without text (``content`` null, as for tool calls) costs its 4 framing tokens only.
    """
    total = REPLY_PRIMING_TOKENS
    for message in messages:
        if not isinstance(message, Mapping):
            raise ValueError(f"a message must be an object, not {type(message).__name__}")
        text = _content_text(message.get("content"))
        total += MESSAGE_FRAMING_TOKENS + (estimate_text_tokens(text) if text is not None else 0)
    return total
