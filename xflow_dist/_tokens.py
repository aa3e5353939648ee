"""Token estimates: tiktoken when it is installed and has the model's encoding, else a heuristic.

The heuristic (about four UTF-8 bytes per token, plus OpenAI's chat framing) is not a tokenizer:
good enough to reserve budget before a call (the provider's ``usage`` settles the real count
afterwards) and exact by definition for the simulator, which uses it. tiktoken fetches its
encodings from the network on first use (or from ``TIKTOKEN_CACHE_DIR``); where it cannot, the
heuristic stands in, so an offline machine never fails a call over an estimate.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from functools import lru_cache

__all__ = ["TokenCounter", "count_tokens", "estimate_messages_tokens", "estimate_text_tokens", "tiktoken_counter"]

_log = logging.getLogger("xflow_dist.tokens")

#: ``count(text)``: the tokens of one text, for one model.
TokenCounter = Callable[[str], int]

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


def estimate_messages_tokens(
    messages: Iterable[Mapping[str, object]], count: TokenCounter = estimate_text_tokens
) -> int:
    """Prompt tokens of an OpenAI chat request: 3 of priming, then per message 4 plus its text's estimate.

    Only content counts: a string, or the text parts of a list joined (images and other parts count 0);
    a message without text (``content`` null, as for tool calls) costs its 4 framing tokens only.
    """
    total = REPLY_PRIMING_TOKENS
    for message in messages:
        if not isinstance(message, Mapping):
            raise ValueError(f"a message must be an object, not {type(message).__name__}")
        text = _content_text(message.get("content"))
        total += MESSAGE_FRAMING_TOKENS + (count(text) if text is not None else 0)
    return total


_tiktoken_failed = False


@lru_cache(maxsize=64)
def tiktoken_counter(model: str | None) -> TokenCounter | None:
    """tiktoken's count for ``model`` (``o200k_base`` for models it does not know), or None when
    tiktoken is missing or cannot load an encoding (offline, say). Looked up once per model; after
    one failure to load, never tried again, so an offline process pays for it (and warns) once."""
    global _tiktoken_failed
    if _tiktoken_failed:
        return None
    try:
        import tiktoken
    except ImportError:
        return None
    try:
        try:
            encoding = tiktoken.encoding_for_model(model) if model else tiktoken.get_encoding("o200k_base")
        except KeyError:
            encoding = tiktoken.get_encoding("o200k_base")
    except Exception as exc:  # tiktoken fetches encodings over the network: any failure means "not here"
        _tiktoken_failed = True
        _log.warning("tiktoken cannot load an encoding for %r (%s); estimating 4 bytes a token", model, exc)
        return None

    def count(text: str) -> int:
        return max(1, len(encoding.encode(text, disallowed_special=())))

    return count


def count_tokens(text: str, model: str | None = None) -> int:
    """Tokens of ``text`` for ``model``: tiktoken's count where it can, else the heuristic."""
    count = tiktoken_counter(model)
    return count(text) if count is not None else estimate_text_tokens(text)
