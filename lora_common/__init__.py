"""What the service and lora-train share, in one place each instead of a copy in both.

    names.py          the adapter name rule: NAME_PATTERN, RESERVED_NAMES, name_problem
    base_loading.py   loading a local Hugging Face checkpoint for a task (generate, classify, embed)

It sits beside `adapters/` rather than inside it because base loading needs transformers (the core library
is torch + safetensors), and beside `service/` because lora-train must not import FastAPI. It imports
neither `service/` nor `lora_train/` (tests/lora_train/test_train_dependencies.py).
"""
