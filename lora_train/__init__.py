"""`lora-train`: fine-tune a LoRA adapter on a user's data, in our (PEFT-compatible) format, and publish it.

    data.py     JSONL/CSV rows, checked up front; bad rows listed with their line numbers
    tasks.py    tokenisation, batching and the loss of each task (classify, generate, embed)
    modes.py    the base model for a task (lora_common's loader); what trains (lora, last-layers, full)
    trainer.py  the seeded AdamW loop with a progress bar and per-epoch evaluation
    report.py   footprint lines, training_report.json, the --compare table
    upload.py   PUT the adapter into a running lora-service
    cli.py      the `lora-train` command (also `python -m lora_train`)

Only the LoRA matrices (and a classification head, stored through `modules_to_save`) train; the base
weights stay bit-identical, which every LoRA run checks by fingerprint. Needs transformers, tqdm and
pydantic-settings (and httpx for --upload), which is why it is a package of its own: the core `adapters`
package stays torch + safetensors. It never imports the service (tests/lora_train/test_train_dependencies.py).
"""

from lora_train.data import DataError, Dataset, load_rows
from lora_train.trainer import TrainArgs, TrainResult, train

__all__ = ["DataError", "Dataset", "TrainArgs", "TrainResult", "load_rows", "train"]
