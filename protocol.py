"""The Chat Completions request, checked: what serve.py accepts of a client's JSON body, and the
one-line 400 it answers for anything else (BadRequest). parse_request turns a body into a
Request: the prompt's token ids (data.template.render, the template training uses; a system
message replaces the paper's system text) and every sampling setting, each field checked against
its bounds, and the fields this server cannot honour refused by name rather than ignored (ONLY,
FIELDS).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from data.template import render
from tokenizer import Tokenizer

MAX_TOKENS = 512  # the default reply length (the official demo's max_new_tokens); a request may ask for more
MAX_STOP = 4  # as OpenAI's API: at most 4 stop sequences ...
MAX_STOP_CHARS = 2048  # ... of at most this many characters each: the order of a reply's length at most
MAX_N = 8
CONTROL_CHARACTERS = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}
MIN_TEMPERATURE = 1e-4  # above 0 and below this, logits / temperature overflows float32: 0 is greedy
# Accepted only at these values: anything else asks for behaviour this server does not have.
MAX_TOP_LOGPROBS = 20  # as OpenAI's API
ONLY = {
    "presence_penalty": (0, 0.0, None),
    "frequency_penalty": (0, 0.0, None),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "parallel_tool_calls": (None, False, True),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "web_search_options": (None,),
}
# Fields read (or harmless: who the caller is, what to store of the exchange); any other is refused,
# naming it, rather than ignored ("max_token" for "max_tokens" would otherwise run to the default).
FIELDS = {
    "model",
    "messages",
    "temperature",
    "top_p",
    "max_tokens",
    "max_completion_tokens",
    "stop",
    "n",
    "seed",
    "stream",
    "stream_options",
    "response_format",
    "user",
    "metadata",
    "store",
    "logprobs",
    "top_logprobs",
    *ONLY,
}


class BadRequest(Exception):
    def __init__(
        self,
        message: str,
        param: str | None = None,
        status: int = 400,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.param, self.status, self.code, self.kind = param, status, code, kind

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


# -- a request, checked ------------------------------------------------------------------------------


@dataclass
class Request:
    ids: list[int]  # the rendered prompt
    max_tokens: int
    n: int = 1
    stop: list[str] = field(default_factory=list)
    temperature: float = 1.0
    top_p: float | None = None
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    rounds_dropped: int = 0
    logprobs: bool = False
    top_logprobs: int = 0


def _number(body, name, lo, hi, default, kind=float):
    value = body.get(name, default)
    if value is None:
        return default
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)  # NaN and Infinity: JSON extensions Python's json accepts
        or (kind is int and value != int(value))
    ):
        raise BadRequest(f"'{name}' must be {'an integer' if kind is int else 'a number'}, got {value!r}", name)
    if not lo <= value <= hi:
        raise BadRequest(f"'{name}' must be between {lo} and {hi}, got {value!r}", name)
    return kind(value)


def _text(content, where: str) -> str:
    """A message's content: a string, or a list of text parts (newer clients send those)."""
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
    ):
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise BadRequest(f"{where}.content must be a string or a list of text parts", where + ".content")
    try:
        content.encode("utf-8")  # JSON's \ud800 escapes decode to lone surrogates, which no tokenizer takes
    except UnicodeEncodeError as e:
        raise BadRequest(
            f"{where}.content is not valid Unicode text (a lone surrogate at character {e.start})", where + ".content"
        ) from None
    return content


def parse_messages(messages) -> tuple[str | None, list[dict]]:
    """A request's `messages` -> (the system prompt or None, the turns): user and assistant
    alternating from the user's, ending with the user's; or BadRequest naming the message."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list", "messages")
    system, turns = None, []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise BadRequest(f"{where} must be an object", where)
        role = m.get("role")
        if role in ("system", "developer"):
            if turns or system is not None:
                raise BadRequest(f"{where}: a system message may only come first", where + ".role")
            system = _text(m.get("content"), where)
            continue
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if role != expected:
            raise BadRequest(
                f"{where}.role is {role!r}; the conversation must alternate user and assistant "
                f"turns starting with the user's, so {expected!r} was expected",
                where + ".role",
            )
        turns.append({"role": role, "content": _text(m.get("content"), where)})
    if not turns or turns[-1]["role"] != "user":
        raise BadRequest("the last message must be the user's: the model answers it", "messages")
    return system, turns


def parse_request(body, tok: Tokenizer, context: int, default_max_tokens: int = MAX_TOKENS) -> Request:
    """The JSON body of a chat completion -> Request, or BadRequest naming the field."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    for name in body:
        if name not in FIELDS:
            raise BadRequest(f"unknown field {name!r}", name, code="unknown_parameter")
    for name, allowed in ONLY.items():
        if name in body and body[name] not in allowed:
            raise BadRequest(f"'{name}' is not supported by this server", name)
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise BadRequest("only response_format {'type': 'text'} is supported", "response_format")
    system, turns = parse_messages(body.get("messages"))

    n = _number(body, "n", 1, MAX_N, 1, int)
    temperature = _number(body, "temperature", 0, 2, 1.0)
    if 0 < temperature < MIN_TEMPERATURE:
        raise BadRequest(
            f"'temperature' must be 0 (greedy) or at least {MIN_TEMPERATURE}, got {temperature!r}", "temperature"
        )
    top_p = _number(body, "top_p", 0, 1, None)
    if top_p is not None and float(torch.tensor(top_p, dtype=torch.float32)) == 0:  # as sampling sees it
        raise BadRequest(f"'top_p' must be greater than 0 in float32, got {top_p!r}", "top_p")
    seed = _number(body, "seed", -(2**63), 2**63 - 1, None, int)
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if (
        not isinstance(stop, list)
        or len(stop) > MAX_STOP
        or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop)
    ):
        raise BadRequest(
            f"'stop' must be a non-empty string of at most {MAX_STOP_CHARS} characters or a list of at "
            f"most {MAX_STOP} of them",
            "stop",
        )
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or (options and not stream):
        raise BadRequest("'stream_options' is an object, and only for stream: true", "stream_options")
    logprobs = body.get("logprobs") or False
    if not isinstance(logprobs, bool):
        raise BadRequest("'logprobs' must be true or false", "logprobs")
    top_logprobs = _number(body, "top_logprobs", 0, MAX_TOP_LOGPROBS, 0, int)
    if top_logprobs and not logprobs:
        raise BadRequest("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, name, 1, context, None, int)

    kw = {} if system is None else {"system": system}
    try:
        # With no max_tokens the reply gets what the prompt leaves, up to the default.
        rendered = render(tok, turns, max_len=context - (max_tokens or 1), generation_prompt=True, **kw)
    except ValueError as e:
        raise BadRequest(
            f"the prompt does not fit the model's context of {context} tokens with max_tokens {max_tokens or 1}: {e}",
            "messages",
            code="context_length_exceeded",
        ) from None
    if max_tokens is None:
        max_tokens = min(default_max_tokens, context - len(rendered.ids))
    return Request(
        rendered.ids,
        max_tokens,
        n,
        stop,
        temperature,
        top_p,
        seed,
        stream,
        bool(options.get("include_usage")),
        rendered.rounds_dropped,
        logprobs,
        top_logprobs,
    )
