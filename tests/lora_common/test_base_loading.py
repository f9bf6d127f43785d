"""lora_common/base_loading.py: the loader the service and lora-train share (both are tested end to end in
their own folders; here, the small decisions on their own)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lora_common.base_loading import (
    BaseModelError,
    checkpoint_dir,
    default_base_model,
    detect_task,
    load_pretrained,
    resolve_device,
    resolve_dtype,
)


def test_checkpoint_dir_is_the_packaged_minilm_by_default_and_needs_a_config(tmp_path):
    assert checkpoint_dir(None) == Path(default_base_model()) and (checkpoint_dir(None) / "config.json").is_file()
    with pytest.raises(BaseModelError, match=r"'.*empty' is not a transformers checkpoint directory"):
        checkpoint_dir(tmp_path / "empty")


@pytest.mark.parametrize(("architectures", "task"), [
    (["GPT2LMHeadModel"], "generate"), (["LlamaForCausalLM"], "generate"),
    (["BertForSequenceClassification"], "classify"), (["BertModel"], "embed"), (None, "embed"),
])
def test_detect_task_from_the_declared_architecture(architectures, task):
    assert detect_task(SimpleNamespace(architectures=architectures)) == task


def test_device_and_dtype_names():
    assert resolve_device("cpu") == torch.device("cpu") and resolve_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(BaseModelError, match="dtype must be one of"):
        resolve_dtype("float8")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(BaseModelError, match="CUDA is not available"):
            resolve_device("cuda")


def test_an_unknown_task_is_refused_before_loading(tmp_path):
    with pytest.raises(BaseModelError, match="task must be one of"):
        load_pretrained(tmp_path, "translate")
