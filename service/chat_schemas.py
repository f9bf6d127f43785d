"""OpenAI chat completions (POST /v1/chat/completions): request and response bodies.

The conversation is rendered by the base model's own chat template (the tokenizer's `chat_template`), so
an instruct model and its adapters are prompted the way they were trained; a base without one is refused.
Only text content is taken: tool calls, images and audio are refused by field, never ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from service.schemas import StreamOptions, Usage, only_neutral

__all__ = ["ChatMessage", "ChatCompletionRequest", "ChatCompletionResponse", "ChatChoice", "ChatLogprobs",
           "ChatTokenLogprob", "ChatTopLogprob", "ChatResponseMessage"]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | Annotated[list[TextPart], Field(min_length=1)]
    name: str | None = None

    def as_template_input(self) -> dict[str, str]:
        """What the chat template reads: role, content as one string, and the name when given (templates that
        support names render it)."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": self.role, "content": text, **({"name": self.name} if self.name is not None else {})}


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="An adapter name, or 'base'")
    messages: list[ChatMessage] = Field(min_length=1, max_length=1024)
    max_completion_tokens: int | None = Field(None, ge=0, le=8192, description="null: up to the model's context")
    max_tokens: int | None = Field(None, ge=0, le=8192, description="The older name of max_completion_tokens")
    temperature: float = Field(1.0, ge=0, le=2, allow_inf_nan=False, description="0 is greedy")
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: str | Annotated[list[str], Field(max_length=4)] | None = Field(None, description="Up to 4 stop strings")
    logprobs: bool = Field(False, description="Each generated token's logprob")
    top_logprobs: int | None = Field(None, ge=0, le=5, description="With logprobs: the n likeliest tokens at each step")
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    user: str | None = None
    logit_bias: dict[str, float] | None = Field(None, description="Not supported: only null or {}")
    presence_penalty: float = Field(0, description="Not supported: only 0")
    frequency_penalty: float = Field(0, description="Not supported: only 0")

    @field_validator("logit_bias", "presence_penalty", "frequency_penalty")
    @classmethod
    def _only_neutral(cls, value: Any, info: ValidationInfo) -> Any:
        return only_neutral(info.field_name, value)

    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def logprobs_wanted(self) -> int | None:
        """The engine's setting: None, or how many likeliest tokens to report beside each token's logprob."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
