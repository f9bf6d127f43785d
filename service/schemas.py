"""Request and response bodies. They are the OpenAPI schema, so every route declares them.

Families: adapters (`AdapterInfo`, `AdapterList`, `ComposeRequest`), state (`StateResponse`), the
OpenAI-compatible inference bodies (`CompletionRequest`, `EmbeddingRequest`, ...) and `ErrorResponse`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from adapters import Footprint
from service.storage import FILENAMES, NAME_PATTERN, AdapterRecord

__all__ = [
    "ErrorDetail", "ErrorResponse", "FootprintInfo", "AdapterInfo", "AdapterList", "DeletedAdapter", "ComposeItem",
    "ComposeRequest", "ComposeResponse", "StateResponse", "CompletionRequest", "CompletionLogprobs",
    "CompletionChoice", "Usage", "CompletionResponse", "EmbeddingRequest", "Embedding", "EmbeddingResponse",
    "ClassifyRequest", "LabelScore", "Classification", "ClassifyResponse", "ModelCard", "ModelList", "Health",
    "StreamOptions", "GenerationRequest", "SYSTEM_FINGERPRINT", "only_neutral", "EmbeddingInfo", "MAX_TOP_LOGPROBS",
]

MAX_INPUTS = 2048  # texts per embeddings/classify request, as OpenAI allows
MAX_TOP_LOGPROBS = 20  # alternatives per generated token, as OpenAI allows (chat top_logprobs, completions logprobs)
Texts = str | Annotated[list[str], Field(min_length=1, max_length=MAX_INPUTS)]


SYSTEM_FINGERPRINT = ("Which weights answered: '<adapter>@v<version>:<sha256[:12]>', the version the request "
                      "resolved when it arrived, or 'base'")


# ------------------------------------------------------------------------------------- errors
class ErrorDetail(BaseModel):
    """OpenAI's error object (message, type, param, code), plus `key`, kept for older clients."""

    message: str
    type: str = Field(examples=["adapter_mismatch_error"])
    param: str | None = Field(None, description="The offending request field, tensor key or config field, if any")
    code: str = Field(examples=["model_not_found"], description="A short, stable machine-readable code")
    key: str | None = Field(None, description="The offending tensor key, config field or request field, if any")


class ErrorResponse(BaseModel):
    error: ErrorDetail


# ------------------------------------------------------------------------------------- adapters
class FootprintInfo(BaseModel):
    adapter_parameters: int
    adapter_bytes: int = Field(description="Bytes of the stored files")
    base_parameters: int
    base_bytes: int
    parameter_ratio: float
    bytes_ratio: float = Field(description="adapter_bytes / base_bytes")


class AdapterInfo(BaseModel):
    object: Literal["adapter"] = "adapter"
    name: str
    version: int = Field(description="1 on the first upload; +1 on each overwrite")
    sha256: str = Field(description="Of the canonical stored files: identical adapters share one copy")
    bytes: int = Field(description="Size of the stored files")
    rank: int = Field(description="The largest rank of any module")
    targets: list[str] = Field(description="Module paths that carry LoRA matrices")
    num_parameters: int
    task_type: str | None
    created_at: str
    files: list[str]
    footprint: FootprintInfo
    meta: dict[str, Any] = Field(default_factory=dict, description="How the adapter was made (compose inputs)")

    @classmethod
    def of(cls, record: AdapterRecord, base_parameters: int, base_bytes: int, **extra: Any) -> AdapterInfo:
        footprint = Footprint(record.num_parameters, record.bytes, base_parameters, base_bytes)
        return cls(**record.as_dict(), files=list(FILENAMES), footprint=FootprintInfo(**footprint.as_dict()), **extra)


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterInfo]
    total: int
    has_more: bool
    next: str | None = Field(description="Pass as ?after= to get the next page; null on the last page")


class DeletedAdapter(BaseModel):
    object: Literal["adapter.deleted"] = "adapter.deleted"
    name: str
    version: int
    deleted: bool = True


class ComposeItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    weight: float = 1.0


class ComposeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME_PATTERN, description="Name of the adapter to create")
    adapters: list[ComposeItem] = Field(min_length=1, max_length=64)
    rank: int | None = Field(None, ge=1, description="null: the exact sum (ranks add up); k: its best rank-k SVD")
    overwrite: bool = False


class ComposeResponse(AdapterInfo):
    relative_error: float | None = Field(description="‖ΔW − ΔW_k‖ / ‖ΔW‖ over all modules; null when exact")
    ranks: dict[str, int]


# ------------------------------------------------------------------------------------- state
class StateResponse(BaseModel):
    model_config = ConfigDict(extra="allow")
    merged_adapter: str | None = Field(description="The merged adapter's name (`merged` has its version and sha256)")
    pinned: bool = Field(False, description="True after an explicit merge, until an explicit unmerge")
    mode: Literal["merged", "unmerged"]
    merge_policy: dict[str, Any]
    resident_adapters: list[str] = Field(description="Names of the adapters resident on the device")
    resident: list[dict[str, Any]] = Field(default_factory=list, description="Each resident adapter's name, version "
                                                                            "and sha256 (residency is by content)")
    merge_kernel: Literal["fused", "addmm"] = Field(
        description="What merges run on: the one-pass fused CPU kernel (float32 or bfloat16 weights, rank <= 32) "
                    "or torch.addmm")
    fingerprint: str | None = Field(None, description="sha256 of every base weight a merge can change, as they are "
                                                      "now; null unless asked for (GET /v1/state?fingerprints=true)")
    pristine_fingerprint: str | None = Field(None, description="The same over the pristine weights; equal when "
                                                               "unmerged; null unless asked for")
    store: dict[str, Any] | None = Field(None, description="Where adapters are stored (`location`, URLs without "
                                                         "passwords) and the shared index's `name_cache`, else null")


# ------------------------------------------------------------------------------------- OpenAI-compatible inference
# OpenAI parameters this service does not implement: accepted at their neutral value (clients send some
# of them by default), refused otherwise, so that a request is never answered as if it had been honoured.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "echo": (False,), "best_of": (None, 1), "suffix": (None, ""), "logit_bias": (None, {}),
    "presence_penalty": (0,), "frequency_penalty": (0,),
}


def only_neutral(name: str, value: Any) -> Any:
    """`value` if it is the neutral value of OpenAI parameter `name`, which this service does not implement."""
    neutral = _NEUTRAL[name]
    if value not in neutral:
        raise ValueError(f"{name}={value!r} is not supported by this service "
                         f"(accepted only as {' or '.join(repr(n) for n in neutral)})")
    return value


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class GenerationRequest(BaseModel):
    """What completions and chat completions share: the adapter, sampling, stop strings, streaming, and the
    OpenAI parameters accepted only at their neutral value."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="An adapter name, or 'base'")
    temperature: float = Field(1.0, ge=0, le=2, allow_inf_nan=False, description="0 is greedy")
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: str | Annotated[list[str], Field(max_length=4)] | None = Field(None, description="Up to 4 stop strings")
    stream: bool = False
    stream_options: StreamOptions | None = Field(None, description="With stream=true: include_usage adds a last "
                                                                   "event with the token counts")
    n: Literal[1] = 1
    user: str | None = None
    logit_bias: dict[str, float] | None = Field(None, description="Not supported: only null or {}")
    presence_penalty: float = Field(0, description="Not supported: only 0")
    frequency_penalty: float = Field(0, description="Not supported: only 0")

    @field_validator("logit_bias", "presence_penalty", "frequency_penalty")
    @classmethod
    def _only_neutral(cls, value: Any, info: ValidationInfo) -> Any:
        return only_neutral(info.field_name, value)

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(GenerationRequest):
    prompt: Texts = Field(description="A prompt, or a list of prompts (one choice each)")
    max_tokens: int = Field(16, ge=0, le=8192, description="null means the default, 16 (as OpenAI's)")
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS,
                                 description="Each sampled token's logprob, and the `logprobs` most likely tokens "
                                             "at each position (top_logprobs)")
    echo: bool = Field(False, description="Not supported: only false")
    best_of: int | None = Field(None, description="Not supported: only 1")
    suffix: str | None = Field(None, description="Not supported: only null")

    @field_validator("echo", "best_of", "suffix")
    @classmethod
    def _only_neutral_here(cls, value: Any, info: ValidationInfo) -> Any:
        return only_neutral(info.field_name, value)

    @field_validator("max_tokens", mode="before")
    @classmethod
    def _default_max_tokens(cls, value: Any) -> Any:
        return 16 if value is None else value


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None = None  # per token: the n most likely tokens' text -> logprob
    text_offset: list[int]


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int

    @classmethod
    def of(cls, prompt: int, completion: int = 0) -> Usage:
        return cls(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = Field(None, description=SYSTEM_FINGERPRINT)
    choices: list[CompletionChoice]
    usage: Usage | None = None


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="An adapter name, or 'base'")
    input: Texts
    encoding_format: Literal["float", "base64"] = Field("float", description="base64: little-endian float32")
    dimensions: int | None = Field(None, ge=1, description="Only the model's own width (no truncation)")
    user: str | None = None
    # Not OpenAI's: sentence-transformers' encode(prompt=..., prompt_name=...). Neither: the default prompt.
    prompt_name: str | None = Field(None, description="One of the model's prompts (GET /v1/models/base)")
    prompt: str | None = Field(None, description="Text prepended to every input; overrides prompt_name")


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    system_fingerprint: str | None = Field(None, description=SYSTEM_FINGERPRINT)
    usage: Usage


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="An adapter name, or 'base'")
    input: Texts


class LabelScore(BaseModel):
    label: str
    score: float


class Classification(BaseModel):
    index: int
    label: str = Field(description="The most likely label")
    score: float
    scores: list[LabelScore] = Field(description="Every label, best first")


class ClassifyResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Classification]
    model: str
    system_fingerprint: str | None = Field(None, description=SYSTEM_FINGERPRINT)
    usage: Usage


class EmbeddingInfo(BaseModel):
    """How /v1/embeddings computes vectors on this base, from its sentence-transformers files."""

    pooling: list[str] = Field(description="Pooling modes, concatenated in this order (cls, mean, lasttoken, ...)")
    max_length: int = Field(description="Tokens per input, special tokens included; longer inputs are truncated")
    normalize: bool = Field(description="L2-normalised after pooling")
    dimensions: int
    lower_case: bool = Field(description="Inputs are lower-cased before tokenizing (do_lower_case)")
    include_prompt: bool = Field(description="False: prompt tokens are left out of the pooling")
    prompts: dict[str, str] = Field(description="Named prompts, for the request's prompt_name")
    default_prompt_name: str | None = Field(description="Applied when a request names no prompt")
    similarity_fn_name: str = Field(description="How the model's vectors are meant to be compared")
    source: Literal["sentence-transformers", "defaults"] = Field(
        description="Whether the checkpoint has modules.json, or these are the service's defaults")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "lora-service"
    root: str = Field(description="The base model")
    parent: str | None = Field(description="'base' for an adapter, null for the base itself")
    embedding: EmbeddingInfo | None = Field(None, description="On an embedding base: how inputs are embedded")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok", "ready", "not ready"]
