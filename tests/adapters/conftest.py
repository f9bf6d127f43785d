"""Makes the shared helpers in `lora_fixtures.py` importable whatever pytest's import mode is."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from lora_fixtures import tokens  # noqa: E402


@pytest.fixture
def ids():
    return tokens()
