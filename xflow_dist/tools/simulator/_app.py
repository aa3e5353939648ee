"""The aiohttp application: admits through the ledger, answers with the headers, replies after the latency."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import json
import math
import struct
import time
from collections.abc import Callable, Mapping
from typing import Any

from ..._tokens import estimate_text_tokens

try:
    from aiohttp import web
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("xflow_dist.tools.simulator needs aiohttp: pip install 'xflow-dist[demo]'") from exc

from ..._durations import format_duration
from ..._exceptions import ConfigurationError
from ._headers import _ceil_ms, _limit, _ms_text, _remaining, rate_limit_headers
from ._ledger import ProviderLedger
from ._limits import Admission, Levels, SimulatorConfig
from ._requests import (
    _BadRequest,
    _Chat,
    _json_object,
    _model,
    _parse_chat,
    _parse_embedding_inputs,
    _positive_int,
    _reply_text,
    _split,
    _unit_floats,
)

#: Distinct request bodies whose repeat counters are remembered (oldest forgotten first).
_MAX_REPEAT_KEYS = 65_536
#: Largest request body accepted (aiohttp's default of 1 MiB is below a long-context prompt).
_MAX_BODY = 32 * 1024 * 1024


class _Simulator:
    """The app's state: config, ledger, repeat counters; all touched only on the server's event loop."""

    def __init__(self, config: SimulatorConfig, clock: Callable[[], float], wall_clock: Callable[[], float]) -> None:
        self.clock = clock
        self.wall_clock = wall_clock
        self.config = config
        self.ledger = self._fresh_ledger()
        self.repeats: collections.OrderedDict[bytes, int] = collections.OrderedDict()
        self.next_id = 0

    def _fresh_ledger(self) -> ProviderLedger:
        c = self.config
        return ProviderLedger(rpm=c.rpm, tpm=c.tpm, max_concurrency=c.max_concurrency, clock=self.clock)

    def reset(self, limits: Mapping[str, Any]) -> dict[str, Any]:
        unknown = set(limits) - {"rpm", "tpm", "max_concurrency"}
        if unknown:
            raise ConfigurationError(f"reset accepts rpm, tpm and max_concurrency, not {sorted(unknown)}")
        self.config = dataclasses.replace(self.config, **dict(limits))
        self.ledger = self._fresh_ledger()
        self.repeats.clear()
        return self.ledger.stats()

    def _headers(self, ledger: ProviderLedger, levels: Levels) -> dict[str, str]:
        return rate_limit_headers(self.config.headers, ledger, levels, self.wall_clock())

    def _draw_completions(self, raw: bytes, max_tokens: int, n: int) -> tuple[bytes, int, list[int]]:
        key = hashlib.sha256(raw).digest()
        repeat = self.repeats.get(key, 0)
        low, high = self.config.completion_ratio
        seed = struct.pack(">qQ", self.config.seed & (2**63 - 1), repeat) + key
        counts = [max(1, min(max_tokens, round(max_tokens * (low + (high - low) * u)))) for u in _unit_floats(seed, n)]
        return key, repeat, counts

    def _remember(self, key: bytes, repeat: int) -> None:
        self.repeats[key] = repeat + 1
        self.repeats.move_to_end(key)
        while len(self.repeats) > _MAX_REPEAT_KEYS:
            self.repeats.popitem(last=False)

    def _error(
        self, status: int, message: str, kind: str, param: str | None, code: str | None, headers: Mapping[str, str]
    ) -> web.Response:
        body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
        return web.json_response(body, status=status, headers=dict(headers))

    def _bad_request(self, exc: _BadRequest) -> web.Response:
        ledger = self.ledger
        headers = self._headers(ledger, ledger.levels())
        return self._error(400, str(exc), "invalid_request_error", exc.param, None, headers)

    def _too_many(self, ledger: ProviderLedger, admission: Admission, model: str) -> web.Response:
        headers = self._headers(ledger, admission.levels)
        wait = admission.retry_after
        used = math.floor(ledger.tpm) - _remaining(admission.levels.tokens)
        tail = f" Please try again in {format_duration(_ceil_ms(wait))}." if wait is not None else ""
        if admission.reason == "too_large":
            message = (
                f"Request too large for {model} on tokens per min (TPM): Limit {_limit(ledger.tpm)}, "
                f"Requested {admission.cost}. The input or output tokens must be reduced in order to run successfully."
            )
        elif admission.reason == "tokens":
            message = (
                f"Rate limit reached for {model} on tokens per min (TPM): Limit {_limit(ledger.tpm)}, "
                f"Used {used}, Requested {admission.cost}.{tail}"
            )
        elif admission.reason == "requests":
            used_requests = math.floor(ledger.rpm) - _remaining(admission.levels.requests)
            message = (
                f"Rate limit reached for {model} on requests per min (RPM): Limit {_limit(ledger.rpm)}, "
                f"Used {used_requests}, Requested 1.{tail}"
            )
        else:
            message = f"Too many concurrent requests for {model}: Limit {ledger.max_concurrency} in flight.{tail}"
        if wait is not None:
            headers["retry-after"] = str(math.ceil(round(wait, 9)))
            headers["retry-after-ms"] = _ms_text(wait)
        kind = "tokens" if admission.reason in ("tokens", "too_large") else "requests"
        return self._error(429, message, kind, None, "rate_limit_exceeded", headers)

    def _new_id(self, prefix: str) -> str:
        self.next_id += 1
        return f"{prefix}-sim{self.next_id:08d}"

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            chat = _parse_chat(_json_object(raw), self.config.default_max_tokens)
        except _BadRequest as exc:
            return self._bad_request(exc)
        key, repeat, counts = self._draw_completions(raw, chat.max_tokens, chat.n)
        completion = sum(counts)
        config = self.config
        latency = config.latency_base + config.latency_per_token * completion
        ledger = self.ledger
        admission = ledger.try_admit(chat.prompt_tokens, chat.max_tokens * chat.n, hold=latency)
        if not admission.admitted or admission.ticket is None:
            return self._too_many(ledger, admission, chat.model)
        self._remember(key, repeat)
        headers = self._headers(ledger, admission.levels)
        ident = self._new_id("chatcmpl")
        created = int(self.wall_clock())
        offset = key[0]
        try:
            if chat.stream:
                try:
                    return await self._stream(request, chat, counts, offset, ident, created, headers)
                except ConnectionResetError:  # the client left mid-stream; nobody is there to answer
                    return web.Response(status=499)
            await asyncio.sleep(latency)
            choices = [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": _reply_text(count, offset + i), "refusal": None},
                    "logprobs": None,
                    "finish_reason": "length" if count >= chat.max_tokens else "stop",
                }
                for i, count in enumerate(counts)
            ]
            body = {
                "id": ident,
                "object": "chat.completion",
                "created": created,
                "model": chat.model,
                "choices": choices,
                "usage": {
                    "prompt_tokens": chat.prompt_tokens,
                    "completion_tokens": completion,
                    "total_tokens": chat.prompt_tokens + completion,
                },
                "system_fingerprint": "xflow-simulator",
            }
            return web.json_response(body, headers=headers)
        finally:
            # Also on cancellation or a dropped client: the provider produced the tokens anyway.
            ledger.complete(admission.ticket, completion)

    async def _stream(
        self,
        request: web.Request,
        chat: _Chat,
        counts: list[int],
        offset: int,
        ident: str,
        created: int,
        headers: dict[str, str],
    ) -> web.StreamResponse:
        config = self.config
        response = web.StreamResponse(
            headers={**headers, "content-type": "text/event-stream", "cache-control": "no-cache"}
        )
        await response.prepare(request)

        async def send(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> None:
            chunk: dict[str, Any] = {
                "id": ident,
                "object": "chat.completion.chunk",
                "created": created,
                "model": chat.model,
                "system_fingerprint": "xflow-simulator",
                "choices": choices,
            }
            if chat.include_usage:
                chunk["usage"] = usage
            await response.write(f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n".encode())

        def delta(index: int, content: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            return {"index": index, "delta": content, "logprobs": None, "finish_reason": finish}

        await asyncio.sleep(config.latency_base)
        await send([delta(i, {"role": "assistant", "content": ""}) for i in range(chat.n)])
        steps = max(1, min(16, max(counts)))
        pieces = [_split(count, steps) for count in counts]
        produced = [0] * chat.n
        step_sleep = config.latency_per_token * sum(counts) / steps
        for step in range(steps):
            await asyncio.sleep(step_sleep)
            choices = []
            for i, parts in enumerate(pieces):
                if parts[step]:
                    text = _reply_text(parts[step], offset + i + produced[i])
                    produced[i] += parts[step]
                    choices.append(delta(i, {"content": text}))
            if choices:
                await send(choices)
        await send([delta(i, {}, "length" if c >= chat.max_tokens else "stop") for i, c in enumerate(counts)])
        if chat.include_usage:
            total = sum(counts)
            usage = {
                "prompt_tokens": chat.prompt_tokens,
                "completion_tokens": total,
                "total_tokens": chat.prompt_tokens + total,
            }
            await send([], usage)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = _json_object(raw)
            model = _model(body)
            inputs = _parse_embedding_inputs(body)
            dimensions = _positive_int(body, "dimensions", 8, 4096)
        except _BadRequest as exc:
            return self._bad_request(exc)
        prompt = sum(estimate_text_tokens(text) for text in inputs)
        ledger = self.ledger
        latency = self.config.latency_base
        admission = ledger.try_admit(prompt, 0, hold=latency)
        if not admission.admitted or admission.ticket is None:
            return self._too_many(ledger, admission, model)
        headers = self._headers(ledger, admission.levels)
        try:
            await asyncio.sleep(latency)
            data = []
            for index, text in enumerate(inputs):
                raw_vector = [2 * u - 1 for u in _unit_floats(hashlib.sha256(text.encode()).digest(), dimensions)]
                norm = math.sqrt(sum(x * x for x in raw_vector)) or 1.0
                data.append({"object": "embedding", "index": index, "embedding": [x / norm for x in raw_vector]})
            payload = {
                "object": "list",
                "data": data,
                "model": model,
                "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
            }
            return web.json_response(payload, headers=headers)
        finally:
            ledger.complete(admission.ticket, 0)

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.ledger.stats())

    async def reset_handler(self, request: web.Request) -> web.Response:
        raw = await request.read()
        try:
            limits = _json_object(raw) if raw.strip() else {}
            return web.json_response(self.reset(limits))
        except _BadRequest as exc:
            return self._bad_request(exc)
        except ConfigurationError as exc:
            return self._bad_request(_BadRequest(str(exc)))


_SIMULATOR: web.AppKey[_Simulator] = web.AppKey("xflow_simulator", _Simulator)


def create_app(
    config: SimulatorConfig | None = None,
    *,
    clock: Callable[[], float] = time.monotonic,
    wall_clock: Callable[[], float] = time.time,
) -> web.Application:
    """The simulator as an aiohttp application; ``clock`` drives the buckets, ``wall_clock`` dates replies."""
    sim = _Simulator(config or SimulatorConfig(), clock, wall_clock)
    app = web.Application(client_max_size=_MAX_BODY)
    app[_SIMULATOR] = sim
    app.router.add_post("/v1/chat/completions", sim.chat_completions)
    app.router.add_post("/v1/embeddings", sim.embeddings)
    app.router.add_get("/stats", sim.stats)
    app.router.add_post("/reset", sim.reset_handler)
    return app


# --------------------------------------------------------------------------------------------------------------
# Serving
