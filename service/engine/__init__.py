"""The serving engine: batching loop, merge policy, adapter cache tiers, generation. See INTERFACE.md."""

from service.base_model import LoadedBase, load_base_model
from service.engine.engine import Engine
from service.engine.errors import (
    AdapterChangedError,
    BadRequestError,
    EngineBusyError,
    EngineError,
    InternalEngineError,
    NonFiniteOutputError,
    UnknownAdapterError,
    WrongTaskError,
)
from service.engine.requests import ClassifyResult, CompletionChunk, CompletionRequest, CompletionResult, EmbedResult

__all__ = ["AdapterChangedError", "BadRequestError", "ClassifyResult", "CompletionChunk", "CompletionRequest",
           "CompletionResult", "EmbedResult", "Engine", "EngineBusyError", "EngineError", "InternalEngineError",
           "LoadedBase", "NonFiniteOutputError", "UnknownAdapterError", "WrongTaskError", "load_base_model"]
