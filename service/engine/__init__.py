"""The serving engine, apart from the HTTP handlers. See INTERFACE.md.

    Engine (engine.py: async facade)  ──►  Scheduler (scheduler.py: the loop thread)  ──►  WeightOwner
                                                                                          (weights.py: the only
                                                                                           writer of weights)
Adapters are identified by content: AdapterRef(name, version, sha256) (identity.py).
"""

from service.base_model import LoadedBase, load_base_model
from service.engine.config import EngineConfig
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
from service.engine.identity import AdapterRef, system_fingerprint
from service.engine.requests import ClassifyResult, CompletionChunk, CompletionRequest, CompletionResult, EmbedResult

__all__ = ["AdapterChangedError", "AdapterRef", "BadRequestError", "ClassifyResult", "CompletionChunk",
           "CompletionRequest", "CompletionResult", "EmbedResult", "Engine", "EngineBusyError", "EngineConfig",
           "EngineError", "InternalEngineError", "LoadedBase", "NonFiniteOutputError", "UnknownAdapterError",
           "WrongTaskError", "load_base_model", "system_fingerprint"]
