"""LoRA core: layers, injection, PEFT-format adapters, exact merge/unmerge/switch, exact composition.

Depends on torch and safetensors only (transformers is imported lazily, to recognise GPT-2's Conv1D).
It never imports the service or the trainer (`lora_train`): tests/adapters/test_dependencies.py.
"""

from adapters.compose import ComposeResult, compose
from adapters.config import ALL_LINEAR, LoraConfig
from adapters.errors import (
    AdapterError,
    AdapterFormatError,
    AdapterMismatchError,
    AdapterTooLargeError,
    MergeError,
    TargetNotFoundError,
    UnknownAdapterError,
    UnsupportedAdapterError,
)
from adapters.footprint import Footprint, footprint, model_footprint
from adapters.layer import LoraLinear
from adapters.model import LoraModel
from adapters.serialization import (
    load_peft_dir,
    load_single_file,
    save_peft_dir,
    save_single_file,
    single_file_from_bytes,
    to_peft_bytes,
    to_single_file_bytes,
    weights_from_bytes,
)
from adapters.tutorial import LinearWithLoRA, LoRALayer, replace_linear_with_lora, to_lora_weights
from adapters.validation import validate_adapter
from adapters.weights import LoraWeights

__all__ = [
    "ALL_LINEAR", "AdapterError", "AdapterFormatError", "AdapterMismatchError", "AdapterTooLargeError",
    "ComposeResult", "Footprint", "LinearWithLoRA", "LoRALayer", "LoraConfig", "LoraLinear", "LoraModel",
    "LoraWeights", "MergeError", "TargetNotFoundError", "UnknownAdapterError", "UnsupportedAdapterError", "compose",
    "footprint", "load_peft_dir", "load_single_file", "model_footprint", "replace_linear_with_lora", "save_peft_dir",
    "save_single_file", "single_file_from_bytes", "to_lora_weights", "to_peft_bytes", "to_single_file_bytes",
    "validate_adapter", "weights_from_bytes",
]
