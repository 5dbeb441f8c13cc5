"""Request models of the OpenAI-compatible API (pydantic), validated strictly: wrong types are errors,
not silently coerced; unknown fields are ignored.

Responses are built as plain dicts in :mod:`server.app` (their shapes are OpenAI's, field for field).
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_N = 16
MAX_STOP = 16
MAX_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 20


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class TextPart(_Model):
    type: Literal["text"]
    text: str


class ContentPart(_Model):
    """Any content part; only ``text`` parts are understood (others are rejected with a clear message)."""

    model_config = ConfigDict(extra="allow", strict=True)
    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _text_only(self):
        if self.type != "text":
            raise ValueError(f"content part type {self.type!r} is not supported: this model reads text parts only")
        if self.text is None:
            raise ValueError("a text content part needs a 'text' string")
        return self


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _content_present(self):
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs 'content'")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text or "" for p in self.content)


class StreamOptions(_Model):
    include_usage: bool = False


class HisaOptions(_Model):
    """The ``hisa`` extension object (OpenAI clients send it with ``extra_body={"hisa": {...}}``).

    enabled:    False runs this request with dense attention.
    top_k / top_blocks / block_size-independent knobs: per-request HISA budget.
    progress:   True adds prefill progress chunks to a stream (``choices: []`` and ``hisa_progress``).
    """

    enabled: bool | None = None
    top_k: Annotated[int, Field(ge=1, le=1 << 20)] | None = None
    top_blocks: Annotated[int, Field(ge=2, le=1 << 20)] | None = None
    min_context: Annotated[int, Field(ge=0, le=1 << 24)] | None = None
    progress: bool = False

    def overrides(self) -> dict:
        out = {}
        for name in ("enabled", "top_k", "top_blocks", "min_context"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out


Stop = Union[str, list[str], None]


class _SamplingFields(_Model):
    model: str | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    seed: Annotated[int, Field(ge=-(1 << 63), lt=1 << 64)] | None = None
    stop: Stop = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0, le=10.0)] | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool = False
    hisa: HisaOptions | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v):
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else v
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences are allowed, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return stops

    @model_validator(mode="after")
    def _check_stream_options(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when 'stream' is true")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict | None = None

    @model_validator(mode="after")
    def _check_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires 'logprobs': true")
        return self

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# tried in this order, first match wins: a long token-id prompt validates on its first try (in pydantic's default
# "smart" mode every member was tried, 32k ids took ~4x longer to validate)
PromptInput = Annotated[
    Union[
        str,
        Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)],
        Annotated[list[Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]], Field(min_length=1)],
        Annotated[list[str], Field(min_length=1)],
    ],
    Field(union_mode="left_to_right"),
]


class CompletionRequest(_SamplingFields):
    prompt: PromptInput
    logprobs: Annotated[int, Field(ge=0, le=MAX_COMPLETION_LOGPROBS)] | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: Annotated[int, Field(ge=1)] | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.suffix:
            raise ValueError("'suffix' is not supported by this model")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of different from n is not supported")
        if self.echo and self.logprobs is not None:
            raise ValueError("'echo' together with 'logprobs' (prompt logprobs) is not supported")
        return self

    def token_limit(self) -> int | None:
        return self.max_tokens if self.max_tokens is not None else 16  # OpenAI's default for completions

    def prompts(self) -> list:
        """The prompt(s) as a list of str or list[int]."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [p]
        return list(p)


class TokenizeRequest(_Model):
    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        return self


class DetokenizeRequest(_Model):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]
