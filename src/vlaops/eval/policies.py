"""Every policy one evaluation plays on the same chains, under its label: the trained policy, each of its
ablations (``eval.ablations``) and each reference policy (``eval.references``).

They are built as worker factories (``vlaops.eval.runner``) in the order of the summary table, before a
single chain is played, so a missing input (the training split the blind baseline is fitted on, an
unknown task) fails the stage at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlaops.eval.metrics import POLICY, ablation_label, reference_label
from vlaops.eval.reference import blind_policy
from vlaops.eval.runner import AblatedFactory, ExpertFactory, FixedFactory, RuntimeFactory


def policies_to_play(
    policy: RuntimeFactory,
    ablations: Sequence[str],
    references: Sequence[str],
    instructions: dict[str, str],
    train_dir: Path,
    trust_pickles: bool,
    blind_by_task: bool = False,
) -> dict[str, Any]:
    """{label: worker factory}: ``policy`` first, then its ablations (a swap draws from ``instructions``),
    then the references (the blind baseline fitted on the demonstrations at ``train_dir``; with
    ``blind_by_task`` it looks instructions up by their task, as CALVIN's evaluation phrasings are not the
    training annotations')."""
    factories: dict[str, Any] = {POLICY: policy}
    for mode in ablations:
        factories[ablation_label(mode)] = AblatedFactory(policy, mode, instructions)
    for name in references:
        if name == "expert":
            factories[reference_label(name)] = ExpertFactory()
        elif name == "blind":
            by_task = instructions if blind_by_task else None
            factories[reference_label(name)] = FixedFactory(blind_policy(train_dir, trust_pickles, by_task))
    return factories
