"""Request bodies of the OpenAI API subset blockspec serves (strict types: a wrong type is a 400).

Unknown fields are ignored, as vLLM does, except the ones in UNSUPPORTED, which are refused when set to anything
but their no-op value (silently ignoring `tools`, `echo` or `min_p` would return a wrong answer).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from blockspec.engine.sampling import SamplingParams

UNSUPPORTED = ("echo", "best_of", "suffix", "logit_bias", "presence_penalty", "frequency_penalty", "tools", "functions",
               "response_format",
               # vLLM's extensions that change the answer
               "min_tokens", "repetition_penalty", "min_p", "skip_special_tokens", "include_stop_str_in_output",
               "allowed_token_ids", "bad_words", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
               "structured_outputs", "use_beam_search", "truncate_prompt_tokens")
# the no-op value of those whose no-op is not null, false, 0 or empty (vLLM's and OpenAI's defaults)
NO_OP = {"best_of": 1, "repetition_penalty": 1, "skip_special_tokens": True}


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)
    include_usage: bool = False


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True)
    role: str
    # OpenAI's text content parts are joined into one string, a newline between parts (as vLLM joins them); an
    # assistant turn's null (e.g. beside tool calls, which OpenAI and vLLM accept) is empty text
    content: str | list[TextPart] | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _only_an_assistant_may_have_no_content(self) -> "ChatMessage":
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role[:20]!r} message needs content (only an assistant's may be null)")
        return self

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)


class CommonFields(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    model: str | None = None  # None: the served model
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1)  # vLLM extension; 0 or -1 = off
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM extension
    stop_token_ids: list[int] | None = None  # vLLM extension: tokens that end the answer besides EOS
    block_size: int | None = Field(None, ge=1)  # blockspec extension: this request's draft block
    user: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data: Any) -> Any:
        """OpenAI's optional fields are nullable, and clients send `"temperature": null` or `"n": null` for
        "unset": a null field takes its default (a null required field is then missing)."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k not in cls.model_fields}
        return data

    @property
    def num_logprobs(self) -> int | None:
        """How many alternatives each token's log-probability entry lists (None: no log-probabilities)."""
        return None

    def unsupported(self) -> list[str]:
        """The UNSUPPORTED fields this request sets to something other than a no-op value."""
        extra = self.model_extra or {}
        no_op = (None, False, 0, [], {})
        return [k for k in UNSUPPORTED if extra.get(k) not in ((None, NO_OP[k]) if k in NO_OP else no_op)]


class ChatCompletionRequest(CommonFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    chat_template_kwargs: dict[str, Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=SamplingParams.MAX_LOGPROBS)

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(CommonFields):
    prompt: str | list[int] | list[str] | list[list[int]]  # text, token ids, or a list holding one of either
    logprobs: int | None = Field(None, ge=0, le=SamplingParams.MAX_LOGPROBS)  # the alternatives listed per token

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs
