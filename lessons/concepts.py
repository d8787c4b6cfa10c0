"""The concepts the course teaches, by id, from `concepts.yaml` beside this module."""

from functools import cache
from pathlib import Path

import yaml

CONCEPTS_PATH = Path(__file__).resolve().parent / "concepts.yaml"


@cache
def concepts() -> dict[str, str]:
    """Each concept's id and what it is, in the course's order."""
    data = yaml.safe_load(CONCEPTS_PATH.read_text(encoding="utf-8"))
    return {str(key): str(value) for key, value in data.items()}
