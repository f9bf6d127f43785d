"""OpenAI chat completions (POST /v1/chat/completions): request and response bodies.

The conversation is rendered by the base model's own chat template (the tokenizer's `chat_template`), so
an instruct model and its adapters are prompted the way they were trained; a base without one is refused.
Only text content is taken: tool calls, images and audio are refused by field, never ignored.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.schemas import MAX_TOP_LOGPROBS, SYSTEM_FINGERPRINT, GenerationRequest, Usage

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


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1, max_length=1024)
    max_completion_tokens: int | None = Field(None, ge=0, le=8192, description="null: up to the model's context")
    max_tokens: int | None = Field(None, ge=0, le=8192, description="The older name of max_completion_tokens")
    logprobs: bool = Field(False, description="Each generated token's logprob")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS,
                                     description="With logprobs: the n likeliest tokens at each step")

    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def logprobs_wanted(self) -> int | None:
        """The engine's setting: None, or how many likeliest tokens to report beside each token's logprob."""
        return (self.top_logprobs or 0) if self.logprobs else None


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
    system_fingerprint: str | None = Field(None, description=SYSTEM_FINGERPRINT)
    choices: list[ChatChoice]
    usage: Usage
