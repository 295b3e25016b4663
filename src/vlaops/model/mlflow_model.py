"""The exported policy as an MLflow model (pyfunc), logged by train and registered under a name.

Logged from this file as code (MLflow's models-from-code: the file is copied into the model and run at
load), not as a cloudpickle of an object: loading a vlaops model runs no pickle. Its one artifact is the
export directory (weights, configs, processor, normaliser), so the model holds everything
:class:`~vlaops.model.runtime.PolicyRuntime` loads, and nothing else.

A pyfunc call is stateless and a policy is not (its window of frames). One call is therefore one episode
so far: rows in time order, the runtime reset before the first, and the action of every row returned.
``predict`` on an episode gives what ``PolicyRuntime.step`` gives stepping through it. Images travel as
PNG bytes (lossless, so the actions are the same bit for bit).

Which action of the predicted chunks runs is a predict param, as ``eval.execute`` (``vlaops.model.execution``):
``execute`` (first | chunk | ensemble), ``chunk_steps`` and ``ensemble_coeff``, each defaulting to the
runtime's default (first); a bad value is one line naming ``params.<key>``.

    import mlflow
    model = mlflow.pyfunc.load_model("models:/vlaops-policy/1")
    model.predict(pd.DataFrame({"instruction": [...], "rgb_static": [png, ...], "rgb_gripper": [png, ...]}))
    model.predict(frames, params={"execute": "chunk", "chunk_steps": 5})
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

POLICY_ARTIFACT = "policy"  # the export directory, under the model's artifacts
ARM_ACTION_COLUMNS = ("x", "y", "z", "roll", "pitch", "yaw", "gripper")  # relative action, CALVIN units
EXECUTION_PARAMS = ("execute", "chunk_steps", "ensemble_coeff")  # predict params: vlaops.model.execution


def png_bytes(img: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes (lossless)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(img, dtype=np.uint8)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _pixels(value: Any, column: str, row: int) -> np.ndarray:
    from PIL import Image

    if not isinstance(value, (bytes, bytearray)):
        raise ValueError(f"row {row}, column {column!r}: expected PNG bytes, got {type(value).__name__}")
    with Image.open(io.BytesIO(value)) as img:
        return np.array(img.convert("RGB"), dtype=np.uint8)


def action_columns(action_dim: int, action_names: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """The output columns: an arm's 7, or a mobile base's names."""
    if action_names is not None:
        return tuple(action_names)
    return ARM_ACTION_COLUMNS if action_dim == len(ARM_ACTION_COLUMNS) else tuple(f"a{i}" for i in range(action_dim))


def execution_from_params(params: dict[str, Any] | None) -> Any:
    """A predict call's ``params`` -> its ``Execution``; a param left out takes the runtime's default."""
    from vlaops.model.execution import Execution

    default = Execution()
    params = params or {}
    unknown = sorted(set(params) - set(EXECUTION_PARAMS))
    if unknown:
        raise ValueError(f"params: unknown key(s) {unknown}; known: {', '.join(EXECUTION_PARAMS)}")
    steps = params.get("chunk_steps", default.chunk_steps)
    return Execution(
        mode=str(params.get("execute", default.mode)),
        chunk_steps=None if steps is None else int(steps),
        ensemble_coeff=float(params.get("ensemble_coeff", default.ensemble_coeff)),
        key_prefix="params.",
    )


def predict_episode(runtime: Any, frames: Any, params: dict[str, Any] | None = None) -> Any:
    """``frames`` (a pandas DataFrame: ``instruction``, ``rgb_static`` and, for a policy with a gripper
    camera, ``rgb_gripper``; rows in time order) -> one action per row (DataFrame), from a fresh runtime over
    ``runtime``'s weights that runs its chunks as ``params`` say (``execution_from_params``)."""
    import pandas as pd

    from vlaops.io.episode import BASE_ACTION_NAMES

    missing = [
        c
        for c in ("instruction", "rgb_static", *(("rgb_gripper",) if runtime.cfg.use_hand_rgb else ()))
        if c not in frames
    ]
    if missing:
        raise ValueError(
            f"input lacks column(s) {missing}; expected instruction, rgb_static"
            f"{', rgb_gripper' if runtime.cfg.use_hand_rgb else ''} (PNG bytes), one row per frame in time order"
        )
    runtime = runtime.with_execution(execution_from_params(params))  # a fresh history and chunks, this call's own
    actions = []
    for i, row in enumerate(frames.to_dict("records")):
        obs = {"rgb_static": _pixels(row["rgb_static"], "rgb_static", i)}
        if runtime.cfg.use_hand_rgb:
            obs["rgb_gripper"] = _pixels(row["rgb_gripper"], "rgb_gripper", i)
        actions.append(runtime.step(obs, str(row["instruction"])))
    out = np.stack(actions) if actions else np.zeros((0, 7))
    names = action_columns(out.shape[1], tuple(BASE_ACTION_NAMES) if runtime.cfg.action_classes else None)
    return pd.DataFrame(out, columns=list(names))


def signature(use_hand_rgb: bool, columns: tuple[str, ...]) -> Any:
    """Inputs, outputs and the execution params (MLflow passes a predict call only the params declared here)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    from vlaops.model.execution import Execution

    inputs = [ColSpec("string", "instruction"), ColSpec("binary", "rgb_static")]
    if use_hand_rgb:
        inputs.append(ColSpec("binary", "rgb_gripper"))
    default = Execution()
    params = ParamSchema(
        [
            ParamSpec("execute", "string", default.mode),
            ParamSpec("chunk_steps", "long", default.chunk_steps),
            ParamSpec("ensemble_coeff", "double", default.ensemble_coeff),
        ]
    )
    return ModelSignature(inputs=Schema(inputs), outputs=Schema([ColSpec("double", c) for c in columns]), params=params)


def _python_model() -> Any:
    import mlflow.pyfunc

    class PolicyModel(mlflow.pyfunc.PythonModel):
        """PolicyRuntime behind MLflow's pyfunc interface (see the module docstring)."""

        def load_context(self, context: Any) -> None:
            from vlaops.model.runtime import PolicyRuntime

            self.runtime = PolicyRuntime.load(context.artifacts[POLICY_ARTIFACT])

        def predict(self, context, model_input, params=None):  # no type hints: MLflow reads them as a schema
            return predict_episode(self.runtime, model_input, params)

    return PolicyModel()


def input_example(split: Any, use_hand_rgb: bool, frames: int = 2) -> Any:
    """The first ``frames`` frames of a CALVIN split's first annotated span, as ``predict`` takes them."""
    import pandas as pd

    ann = split.annotations[0]
    keys = ("rgb_static", "rgb_gripper") if use_hand_rgb else ("rgb_static",)
    rows = []
    for i in range(ann.start, min(ann.end, ann.start + frames - 1) + 1):
        frame = split.load_frame(i, keys)
        rows.append({"instruction": ann.instruction, **{k: png_bytes(frame[k]) for k in keys}})
    return pd.DataFrame(rows)


if __name__ != "vlaops.model.mlflow_model":  # run by MLflow as the model's code (models-from-code)
    import mlflow.models

    mlflow.models.set_model(_python_model())
