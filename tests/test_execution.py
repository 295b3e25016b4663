"""How the predicted chunk is executed (``eval.execute``, ``serve.execute``, the MLflow model's params): the
executor on scripted chunk streams, the runtime on the tiny policy, and the served and MLflow-logged policy
acting as the runtime does under the same setting."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config

from vlaops.config import load_config
from vlaops.errors import VlaopsError
from vlaops.model.execution import ChunkExecutor, Execution

ROOT = Path(__file__).resolve().parents[1]
INSTRUCTION = "lift the blue block"


def frames(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {
            "rgb_static": rng.integers(0, 256, (200, 200, 3), dtype=np.uint8),  # CALVIN's sizes
            "rgb_gripper": rng.integers(0, 256, (84, 84, 3), dtype=np.uint8),
        }
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def runtime(tiny_policy_dir: Path):
    from vlaops.model import PolicyRuntime

    return PolicyRuntime.load(tiny_policy_dir)


# ---- the executor on scripted chunks ----------------------------------------------------------------
def scripted(t: int, c: int = 3) -> np.ndarray:
    """The chunk 'predicted' at step t: (C, 2), row a = [10 t + a, a gripper probability]."""
    return np.array([[10.0 * t + a, (0.9, 0.2, 0.4)[(t + a) % 3]] for a in range(c)])


def test_first_runs_each_chunks_first_row():
    ex = ChunkExecutor(Execution("first"), 3)
    for t in range(5):
        assert ex.needs_chunk()
        assert np.array_equal(ex.step(scripted(t)), scripted(t)[0])


def test_chunk_runs_k_rows_in_order_then_predicts_again():
    ex = ChunkExecutor(Execution("chunk", chunk_steps=2), 3)
    rows, asked = [], []
    for t in range(6):
        asked.append(ex.needs_chunk())
        rows.append(ex.step(scripted(t) if asked[-1] else None))
    assert asked == [True, False, True, False, True, False]
    assert [r[0] for r in rows] == [0.0, 1.0, 20.0, 21.0, 40.0, 41.0]  # rows 0, 1 of the chunks of steps 0, 2, 4
    ex.step(scripted(6))
    ex.reset()  # a new subtask: the row left of step 6's chunk is dropped
    assert ex.needs_chunk()
    whole = ChunkExecutor(Execution("chunk"), 3)  # chunk_steps None: the whole chunk
    assert [whole.step(scripted(t) if whole.needs_chunk() else None)[0] for t in range(4)] == [0.0, 1.0, 2.0, 30.0]
    with pytest.raises(ValueError, match="exactly when"):
        whole.step(scripted(4))  # rows 1 and 2 of step 3's chunk are still to run: no prediction is asked for


def test_ensemble_is_acts_weighted_mean_oldest_first():
    """C = 3, m = 0.5: the action at t is sum_i w_i p_i / sum_i w_i over the predictions p_i for t, in the
    order they were made, w_i = exp(-0.5 i) (ACT: i = 0 the oldest); written out by hand."""
    ex = ChunkExecutor(Execution("ensemble", ensemble_coeff=0.5), 3)
    e1, e2 = math.exp(-0.5), math.exp(-1.0)
    expected = [
        [0.0, 0.9],  # t=0: only the chunk of step 0, its row 0
        [(1 * 1.0 + e1 * 10.0) / (1 + e1), (1 * 0.2 + e1 * 0.2) / (1 + e1)],  # c0[1], c1[0]
        [(2.0 + e1 * 11.0 + e2 * 20.0) / (1 + e1 + e2), (0.4 + e1 * 0.4 + e2 * 0.4) / (1 + e1 + e2)],
        # t=3: c0 is 3 steps old (past its chunk): c1[2], c2[1], c3[0]
        [(12.0 + e1 * 21.0 + e2 * 30.0) / (1 + e1 + e2), (0.9 + e1 * 0.9 + e2 * 0.9) / (1 + e1 + e2)],
    ]
    for t, want in enumerate(expected):
        got = ex.step(scripted(t))
        assert got.dtype == np.float64
        np.testing.assert_allclose(got, want, rtol=1e-12)
    ex.reset()
    np.testing.assert_array_equal(ex.step(scripted(7)), scripted(7)[0])  # a new subtask: no old chunk left
    plain = ChunkExecutor(Execution("ensemble", ensemble_coeff=0.0), 3)
    for t in range(3):
        got = plain.step(scripted(t))
    np.testing.assert_allclose(got, np.mean([scripted(0)[2], scripted(1)[1], scripted(2)[0]], axis=0))


def test_the_ensembled_gripper_probability_is_thresholded_as_one_prediction(runtime):
    """The gripper's probabilities are averaged, then thresholded at the normaliser's 0.5: 0.9 and 0.2 with
    equal weight give 0.55 -> open (+1), where a vote on the thresholded actions would tie."""
    ex = ChunkExecutor(Execution("ensemble", ensemble_coeff=0.0), runtime.cfg.fwd_pred_next_n)
    c = runtime.cfg.fwd_pred_next_n
    arm = np.zeros((c, 6))
    ex.step(np.concatenate([arm, np.full((c, 1), 0.9)], axis=1))
    row = ex.step(np.concatenate([arm, np.full((c, 1), 0.2)], axis=1))
    assert row[-1] == pytest.approx(0.55)
    assert runtime.decide(row)[-1] == 1.0
    assert runtime.decide(row + np.r_[np.zeros(6), -0.1])[-1] == -1.0  # 0.45: closed


# ---- the settings: one line naming the key ------------------------------------------------------------
@pytest.mark.parametrize(
    "override, message",
    [
        ("eval.execute=last", "eval.execute must be one of first, chunk, ensemble, got 'last'"),
        ("eval.chunk_steps=0", "eval.chunk_steps must be an integer >= 1"),
        ("eval.ensemble_coeff=-0.1", "eval.ensemble_coeff must be a finite number >= 0"),
        ("serve.execute=act", "serve.execute must be one of first, chunk, ensemble, got 'act'"),
        ("serve.chunk_steps=-2", "serve.chunk_steps must be an integer >= 1"),
        ("serve.ensemble_coeff=-1", "serve.ensemble_coeff must be a finite number >= 0"),
    ],
)
def test_bad_settings_are_one_line_naming_the_key(tmp_path, override, message):
    with pytest.raises(VlaopsError, match=message) as err:
        tiny_config(tmp_path, override)
    assert "\n" not in str(err.value)


def test_chunk_steps_past_the_policys_chunk_is_named_at_load(tiny_policy_dir, runtime, tmp_path):
    from vlaops.model import PolicyRuntime

    c = runtime.cfg.fwd_pred_next_n
    execution = tiny_config(tmp_path, "eval.execute=chunk", f"eval.chunk_steps={c + 1}").eval.execution()
    with pytest.raises(
        VlaopsError, match=rf"^eval\.chunk_steps must be in 1\.\.{c} .*fwd_pred_next_n={c}.*got {c + 1}$"
    ):
        PolicyRuntime.load(tiny_policy_dir, execution=execution)
    assert Execution("first", chunk_steps=c + 1).steps(c) == 1  # only chunk mode reads it


# ---- the runtime on the tiny policy -------------------------------------------------------------------
def test_first_is_todays_step_bit_for_bit(runtime):
    """``first`` (the default) is what the runtime did before executions existed: encode the frame, pad or
    append it to the history, the first action of the chunk at the newest frame (``action_from_features``)."""
    policy, reference = runtime.with_execution(Execution("first")), runtime.with_execution(None)
    history: list = []
    for i, obs in enumerate(frames(9)):
        instruction = INSTRUCTION if i < 6 else "push the red block to the left"  # a new task forgets the history
        if i == 6:
            history = []
        feat = reference.encode(obs, instruction)
        if not history and reference.cfg.pad_history:
            history = [feat] * (reference.window_size - 1)
        history = [*history, feat][-reference.window_size :]
        today = reference.action_from_features(torch.stack(history, dim=1))
        action = policy.step(obs, instruction)
        assert action.dtype == np.float64 and np.array_equal(action, today)


def test_chunk_of_one_is_first_bit_for_bit(runtime):
    first, one = runtime.with_execution(Execution("first")), runtime.with_execution(Execution("chunk", 1))
    for obs in frames(6, seed=1):
        assert np.array_equal(first.step(obs, INSTRUCTION), one.step(obs, INSTRUCTION))


def test_chunk_calls_the_model_once_per_k_steps_and_keeps_every_frame(runtime):
    """k = 3: one backbone call (over the frames since the last prediction) and one head call per 3 steps;
    the actions are the chunk's rows in order; the next prediction's window holds every frame that passed,
    as a runtime that predicts every step holds it."""
    k, c = 3, runtime.cfg.fwd_pred_next_n
    assert k < c
    policy, every = runtime.with_execution(Execution("chunk", k)), runtime.with_execution(Execution("first"))
    calls = {"backbone": [], "head": []}
    hooks = [
        runtime.model.backbone.register_forward_hook(lambda m, args, out: calls["backbone"].append(out.shape[0])),
        runtime.model.head.register_forward_hook(lambda m, args, out: calls["head"].append(1)),
    ]
    try:
        actions, chunks = [], []
        for t, obs in enumerate(frames(2 * k + 1, seed=2)):
            heads, backbones = len(calls["head"]), len(calls["backbone"])
            actions.append(policy.step(obs, INSTRUCTION))
            assert len(calls["head"]) - heads == (1 if t % k == 0 else 0)
            # one backbone call per prediction, over this frame and the k - 1 that passed since the last one
            assert calls["backbone"][backbones:] == ([] if t % k else [1] if t == 0 else [k])
            if t % k == 0:
                window = torch.stack(list(policy._features), dim=1)
                chunks.append(policy.chunk_from_features(window))  # the chunk it predicted (the head is deterministic)
            every.step(obs, INSTRUCTION)  # a runtime that predicts every step, on the same frames
            if t % k == 0:
                assert len(every._features) == len(policy._features)
                for a, b in zip(every._features, policy._features, strict=True):
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # the same frames, batched or one by one
    finally:
        for h in hooks:
            h.remove()
    for t, action in enumerate(actions):
        assert np.array_equal(action, policy.decide(chunks[t // k][t % k]))
    policy.reset()
    assert policy.executor.needs_chunk() and not policy._pending and not policy._features


def test_a_new_instruction_drops_the_chunk_left(runtime):
    policy, fresh = runtime.with_execution(Execution("chunk", 3)), runtime.with_execution(Execution("chunk", 3))
    obs = frames(3, seed=3)
    policy.step(obs[0], INSTRUCTION)
    policy.step(obs[1], INSTRUCTION)
    other = "push the red block to the left"
    assert np.array_equal(policy.step(obs[2], other), fresh.step(obs[2], other))


def test_ensemble_runtime_is_the_executor_over_the_chunks_predicted_each_step(runtime):
    m = 0.3
    policy, every = runtime.with_execution(Execution("ensemble", ensemble_coeff=m)), runtime.with_execution(None)
    executor = ChunkExecutor(Execution("ensemble", ensemble_coeff=m), runtime.cfg.fwd_pred_next_n)
    distinct = 0
    for obs in frames(runtime.cfg.fwd_pred_next_n + 3, seed=4):
        first = every.step(obs, INSTRUCTION)
        chunk = every.chunk_from_features(torch.stack(list(every._features), dim=1))
        want = every.decide(executor.step(chunk))
        got = policy.step(obs, INSTRUCTION)
        assert np.array_equal(got, want)
        distinct += not np.array_equal(got, first)
    assert distinct  # the ensemble is not the first action


# ---- serve and the MLflow model act as the runtime ----------------------------------------------------
@pytest.mark.parametrize("setting", [("chunk", 3, 0.01), ("ensemble", None, 0.5)])
def test_served_policy_acts_as_the_runtime_under_the_same_setting(runtime, tiny_policy_dir, setting):
    from vlaops.serve.app import PolicyServer, create_app, running_server
    from vlaops.serve.client import PolicyClient
    from vlaops.serve.config import ServeConfig

    mode, k, m = setting
    cfg = ServeConfig(port=0, execute=mode, chunk_steps=k, ensemble_coeff=m)
    local = runtime.with_execution(Execution(mode, k, m))
    with running_server(create_app(PolicyServer(runtime, cfg, tiny_policy_dir)), ServeConfig(port=0)) as url:
        with PolicyClient(url) as client:
            assert client.health()["execute"] == Execution(mode, k, m).describe(runtime.cfg.fwd_pred_next_n)
            for episode in range(2):  # the reset forgets the session's chunks as the runtime's does
                client.reset()
                local.reset()
                for obs in frames(5, seed=10 + episode):
                    assert np.array_equal(client.step(obs, INSTRUCTION), local.step(obs, INSTRUCTION))


def test_serve_rejects_chunk_steps_past_the_policys_chunk(runtime, tiny_policy_dir):
    from vlaops.serve.app import PolicyServer
    from vlaops.serve.config import ServeConfig

    c = runtime.cfg.fwd_pred_next_n
    with pytest.raises(VlaopsError, match=rf"^serve\.chunk_steps must be in 1\.\.{c} "):
        PolicyServer(runtime, ServeConfig(execute="chunk", chunk_steps=c + 1), tiny_policy_dir)


def test_mlflow_model_takes_the_setting_as_a_param(runtime, tiny_policy_dir, tmp_path):
    """The export logged as train logs it (pyfunc from code); predict with params acts as the runtime with
    the same setting, bit for bit; no params is the runtime's default (first); a bad param is one line."""
    import mlflow
    import pandas as pd

    from vlaops import tracking
    from vlaops.model import mlflow_model

    cfg = tiny_config(tmp_path, "tracking.registered_model=execution-test")
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    try:
        with tracking.run(cfg.tracking) as ml:
            sig = mlflow_model.signature(True, mlflow_model.ARM_ACTION_COLUMNS)
            tracking.log_policy_model(ml, cfg.tracking, tiny_policy_dir, sig, None)
            run_id = tracking.active_run_id(ml)
        model = mlflow.pyfunc.load_model(f"runs:/{run_id}/{tracking.MODEL_NAME}")
    finally:  # MLflow's URIs are process-global: leave them as they were
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])
    obs = frames(5, seed=20)
    table = pd.DataFrame(
        [
            {
                "instruction": INSTRUCTION,
                "rgb_static": mlflow_model.png_bytes(o["rgb_static"]),
                "rgb_gripper": mlflow_model.png_bytes(o["rgb_gripper"]),
            }
            for o in obs
        ]
    )
    for params, execution in [
        (None, Execution()),
        ({"execute": "chunk", "chunk_steps": 2}, Execution("chunk", 2)),
        ({"execute": "ensemble", "ensemble_coeff": 0.5}, Execution("ensemble", ensemble_coeff=0.5)),
    ]:
        local = runtime.with_execution(execution)
        direct = np.stack([local.step(o, INSTRUCTION) for o in obs])
        np.testing.assert_array_equal(model.predict(table, params=params).to_numpy(), direct)
    with pytest.raises(Exception, match=r"params\.execute must be one of first, chunk, ensemble, got 'later'"):
        model.predict(table, params={"execute": "later"})
    with pytest.raises(Exception, match=r"params\.chunk_steps must be in 1\.\."):
        model.predict(table, params={"execute": "chunk", "chunk_steps": 99})


def test_evaluate_runs_the_chains_as_eval_execute_says_and_records_it(tiny_policy_dir, calvin_dir, tmp_path):
    """The evaluate stage with eval.execute=chunk: its chains, its ablation and its video run the chunks so,
    and metrics.json and the MLflow run record the mode and the values in force; a chunk_steps past the
    policy's chunk stops it in one line before a chain is played."""
    import dataclasses
    import json

    import mlflow
    from conftest import CONF, SHRINK_MODEL, path_overrides

    from vlaops.model import load_policy_model, save_policy
    from vlaops.stages import evaluate
    from vlaops.tracking import tracking_uri

    # the tiny policy without its read-outs (training-only heads): the bags' robot state does not vary as
    # the offline metrics' read-out targets need
    policy, processor, normalizer = load_policy_model(tiny_policy_dir)
    policy.aux_heads = None
    policy_dir = save_policy(
        tmp_path / "policy", policy, processor, normalizer, dataclasses.replace(policy.cfg, aux_weight=0.0)
    )
    over = [
        *path_overrides(tmp_path),
        *SHRINK_MODEL,
        f"paths.model_dir={policy_dir}",
        "sim.tasks=[lift_blue,place_blue]",
        "eval.num_chains=2",
        "eval.chain_length=2",
        "eval.max_steps_per_subtask=4",
        "eval.offline_batches=1",
        "eval.num_workers=1",
        "eval.videos=1",
        "eval.plot_episodes=1",
        "eval.ablations=[blank_images]",
        "eval.references=[]",
        "eval.execute=chunk",
        "eval.chunk_steps=3",
    ]
    stage_cfg = load_config(over, CONF)
    evaluate.run(stage_cfg)
    metrics = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    assert metrics["execute"] == {"mode": "chunk", "chunk_steps": 3, "ensemble_coeff": None}
    assert metrics["ablation/blank_images"]["avg_len"] >= 0
    client = mlflow.MlflowClient(tracking_uri(stage_cfg.tracking))
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert (run.data.tags["eval.execute"], run.data.tags["eval.chunk_steps"]) == ("chunk", "3")
    with pytest.raises(VlaopsError, match=r"eval\.chunk_steps must be in 1\.\.4 "):  # before a chain is played
        evaluate.run(load_config([*over, "eval.chunk_steps=5"], CONF))
