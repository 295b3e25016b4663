"""The instructions CALVIN gives for each of its 34 tasks: in evaluation, and in its training data.

CALVIN's evaluation (evaluate_policy.py ``rollout``) instructs each subtask with the first of the task's
validation annotations, calvin_models/conf/annotations/new_playtable_validation.yaml in mees/calvin; its
training episodes were annotated with the other file, new_playtable.yaml (about ten phrasings a task,
none of them the validation one). Neither file is part of calvin_env, so both maps are kept here as data,
``calvin_instructions.json``, with their source and licence (MIT, Copyright (c) 2021 Oier Mees);
``scripts/calvin_sequences.py --calvin DIR`` writes it from a checkout.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from functools import cache
from importlib import resources
from typing import Any

INSTRUCTIONS_FILE = "calvin_instructions.json"
LICENCE = "MIT License, Copyright (c) 2021 Oier Mees (mees/calvin LICENSE)"


def instructions_document(
    instructions: Mapping[str, str], training: Mapping[str, Sequence[str]], source: str
) -> dict[str, Any]:
    return {
        "source": source,
        "licence": LICENCE,
        "instructions": dict(instructions),
        "training": {task: list(texts) for task, texts in training.items()},
    }


@cache
def _document() -> dict[str, Any]:
    return json.loads(resources.files(__package__).joinpath(INSTRUCTIONS_FILE).read_text())


def instructions() -> dict[str, str]:
    """{task name: CALVIN's validation instruction}, for all 34 tasks."""
    return dict(_document()["instructions"])


def training_instructions() -> dict[str, list[str]]:
    """{task name: CALVIN's training annotations} (new_playtable.yaml), for all 34 tasks: what the
    collect stage instructs a recorded CALVIN demonstration with, as CALVIN's own data was annotated."""
    return {task: list(texts) for task, texts in _document()["training"].items()}
