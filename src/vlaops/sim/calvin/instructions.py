"""The instruction CALVIN gives for each of its 34 tasks during evaluation.

CALVIN's evaluation (evaluate_policy.py ``rollout``) instructs each subtask with the first of the task's
validation annotations, calvin_models/conf/annotations/new_playtable_validation.yaml in mees/calvin. That
file is not part of calvin_env, so its task -> instruction map is kept here as data,
``calvin_instructions.json``, with its source and licence (MIT, Copyright (c) 2021 Oier Mees);
``scripts/calvin_sequences.py --calvin DIR`` writes it from a checkout.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import cache
from importlib import resources
from typing import Any

INSTRUCTIONS_FILE = "calvin_instructions.json"
LICENCE = "MIT License, Copyright (c) 2021 Oier Mees (mees/calvin LICENSE)"


def instructions_document(instructions: Mapping[str, str], source: str) -> dict[str, Any]:
    return {"source": source, "licence": LICENCE, "instructions": dict(instructions)}


@cache
def instructions() -> dict[str, str]:
    """{task name: CALVIN's validation instruction}, for all 34 tasks."""
    text = resources.files(__package__).joinpath(INSTRUCTIONS_FILE).read_text()
    return dict(json.loads(text)["instructions"])
