"""``vlaops serve``: a closed-loop episode over HTTP on 127.0.0.1 acts exactly as ``PolicyRuntime`` in
process; bad requests are 4xx naming the field and leave the other sessions working; sessions are bounded."""

from __future__ import annotations

import base64
import json
import threading
from pathlib import Path

import numpy as np
import pytest

from vlaops.serve.app import PolicyServer, create_app, running_server
from vlaops.serve.client import PolicyClient, ServeError
from vlaops.serve.codec import decode_image, encode_image
from vlaops.serve.config import ServeConfig
from vlaops.serve.sessions import SessionStore, UnknownSession

RNG = np.random.default_rng(0)
STATIC = RNG.integers(0, 256, (200, 200, 3), dtype=np.uint8)
GRIPPER = RNG.integers(0, 256, (84, 84, 3), dtype=np.uint8)
INSTRUCTION = "lift the blue block"


@pytest.fixture(scope="module")
def runtime(tiny_policy_dir: Path):
    from vlaops.model import PolicyRuntime

    return PolicyRuntime.load(tiny_policy_dir)


@pytest.fixture(scope="module")
def url(runtime, tiny_policy_dir: Path):
    server = PolicyServer(runtime, ServeConfig(port=0, max_sessions=8), tiny_policy_dir)
    with running_server(create_app(server), ServeConfig(port=0)) as base:
        yield base


def local_twin(runtime):
    """A second in-process runtime over the same weights: the reference the served actions must equal."""
    from vlaops.model import PolicyRuntime

    return PolicyRuntime(runtime.model, runtime.processor, runtime.normalizer, runtime.device)


class Twin:
    """Steps the served policy and the in-process one on every observation; records both actions."""

    def __init__(self, client: PolicyClient, local) -> None:
        self.client, self.local, self.pairs = client, local, []

    def reset(self) -> None:
        self.client.reset()
        self.local.reset()

    def step(self, obs: dict, instruction: str) -> np.ndarray:
        served = self.client.step(obs, instruction)
        self.pairs.append((served, self.local.step(obs, instruction)))
        return served  # the simulator executes the served action


# ---- the wire format ------------------------------------------------------------------------------
@pytest.mark.parametrize("encoding", ["raw", "png"])
def test_images_travel_exactly(encoding):
    payload = json.loads(json.dumps(encode_image(STATIC, encoding)))
    back = decode_image(payload)
    assert back.dtype == np.uint8 and np.array_equal(back, STATIC)


@pytest.mark.parametrize(
    "payload, message",
    [
        ({"encoding": "raw", "data": "AAAA"}, "'shape' is required"),
        ({"encoding": "raw", "shape": [2, 2, 3], "data": "AAAA"}, "holds 3 bytes"),
        ({"encoding": "raw", "shape": [2, 2, 3], "data": "not base64!"}, "not valid base64"),
        ({"encoding": "png", "data": base64.b64encode(b"GIF89a....").decode()}, "not a readable PNG"),
        ({"encoding": "jpeg", "data": ""}, "'encoding' must be one of"),
    ],
)
def test_bad_images_say_what_is_wrong(payload, message):
    with pytest.raises(ValueError, match=message):
        decode_image(payload)


# ---- closed loop over HTTP ------------------------------------------------------------------------
def test_closed_loop_episode_over_http_equals_in_process_steps(url, runtime):
    """Two seeded chains in the simulator through the evaluation harness, every action served over HTTP
    and executed; the in-process runtime on the same observations gives the same actions, bit for bit."""
    from vlaops.config import load_config
    from vlaops.eval.chains import run_chain
    from vlaops.sim.env import TabletopEnv
    from vlaops.sim.tasks import get_task

    sim = load_config(["sim.tasks=[lift_blue,place_blue]"], Path(__file__).parents[1] / "conf").sim
    with PolicyClient(url) as client, TabletopEnv(sim, render=True) as env:
        twin = Twin(client, local_twin(runtime))
        for seed in (1, 2):  # each chain's subtasks reset the policy: a new window on the server too
            result = run_chain(env, twin, seed, ["lift_blue", "place_blue"], get_task, max_steps=5)
            assert result.steps  # the first subtask ran
    window = runtime.cfg.window_size
    assert len(twin.pairs) >= 2 * 5 > window  # past the window fill, twice
    for served, local in twin.pairs:
        assert served.shape == (7,) and served.dtype == np.float64
        assert np.array_equal(served, local)
    assert len({tuple(s) for s, _ in twin.pairs}) > 1  # the policy reacts to what it sees


def test_png_and_nested_observations_give_the_same_actions(url, runtime):
    local = local_twin(runtime)
    with PolicyClient(url, encoding="png") as client:
        for i in range(3):
            obs = {"rgb_obs": {"rgb_static": np.roll(STATIC, i, axis=0), "rgb_gripper": GRIPPER}}  # CALVIN's nesting
            assert np.array_equal(client.step(obs, INSTRUCTION), local.step(obs, INSTRUCTION))


def test_sessions_keep_their_own_windows_under_concurrent_steps(url, runtime):
    """Two robots step at once on different frames: each gets what its own in-process runtime gives."""
    streams = {
        k: [{"rgb_static": np.roll(STATIC, 7 * i + k, axis=1), "rgb_gripper": GRIPPER} for i in range(6)]
        for k in range(2)
    }
    instructions = {0: INSTRUCTION, 1: "push the red block to the left"}
    served: dict[int, list[np.ndarray]] = {}

    def robot(k: int) -> None:
        with PolicyClient(url) as client:
            served[k] = [client.step(obs, instructions[k]) for obs in streams[k]]

    threads = [threading.Thread(target=robot, args=(k,)) for k in streams]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k, frames in streams.items():
        local = local_twin(runtime)
        expected = [local.step(obs, instructions[k]) for obs in frames]
        assert len(served[k]) == len(expected)
        assert all(np.array_equal(a, b) for a, b in zip(served[k], expected))


def test_health_states_the_policy_and_the_expected_cameras(url, runtime, tiny_policy_dir):
    facts = PolicyClient(url).health()
    assert facts["status"] == "ok" and facts["model_dir"] == str(tiny_policy_dir)
    assert facts["window_size"] == runtime.cfg.window_size and facts["use_hand_rgb"] is True
    assert facts["cameras"] == {"rgb_static": [200, 200, 3], "rgb_gripper": [84, 84, 3]}
    assert facts["max_sessions"] == 8


# ---- bad input ------------------------------------------------------------------------------------
def _body(**changes) -> dict:
    body = {"instruction": INSTRUCTION, "rgb_static": encode_image(STATIC), "rgb_gripper": encode_image(GRIPPER)}
    body.update(changes)
    return {k: v for k, v in body.items() if v is not None}


BAD_REQUESTS = [
    # (what is wrong, body or raw bytes, status, field the answer names, words of its message)
    ("missing camera", _body(rgb_gripper=None), 422, "rgb_gripper", "missing"),
    ("missing static camera", _body(rgb_static=None), 422, "rgb_static", "Field required"),
    (
        "wrong image size",
        _body(rgb_static=encode_image(STATIC[:100, :100])),
        422,
        "rgb_static",
        "expected shape [200, 200, 3]",
    ),
    ("gripper image size", _body(rgb_gripper=encode_image(STATIC)), 422, "rgb_gripper", "got [200, 200, 3]"),
    ("bad base64", _body(rgb_static={"shape": [200, 200, 3], "data": "%%%"}), 422, "rgb_static", "not valid base64"),
    (
        "misspelt camera",
        {**_body(rgb_gripper=None), "rgb_griper": encode_image(GRIPPER)},
        422,
        "rgb_griper",
        "Extra inputs",
    ),
    ("no instruction", _body(instruction=""), 422, "instruction", "at least 1 character"),
    ("malformed JSON", b'{"instruction": "lift", "rgb_static": ', 400, "body", "not valid JSON"),
    ("not an object", b"[1, 2]", 422, "body", "valid dictionary"),
]


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_is_4xx_naming_the_field_and_others_keep_working(url, runtime, case):
    _, body, status, field, words = case
    with PolicyClient(url) as good, PolicyClient(url) as bad:
        local = local_twin(runtime)
        obs = {"rgb_static": STATIC, "rgb_gripper": GRIPPER}
        assert np.array_equal(good.step(obs, INSTRUCTION), local.step(obs, INSTRUCTION))
        bad.open()
        path = f"/sessions/{bad.session_id}/step"
        if isinstance(body, bytes):  # bytes the client would never send: straight onto the connection
            import http.client

            conn = http.client.HTTPConnection(bad.host, bad.port, timeout=30)
            conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            answer = json.loads(response.read())
            conn.close()
            got_status, got_field, message = response.status, answer["field"], answer["error"]
        else:
            with pytest.raises(ServeError) as info:
                bad.request("POST", path, body)
            got_status, got_field, message = info.value.status, info.value.field, str(info.value)
        assert (got_status, got_field) == (status, field)
        assert field in message and words in message
        # the bad session is unharmed too, and the good one continues its window where it was
        assert bad.step(obs, INSTRUCTION).shape == (7,)
        obs2 = {"rgb_static": np.roll(STATIC, 3, axis=0), "rgb_gripper": GRIPPER}
        assert np.array_equal(good.step(obs2, INSTRUCTION), local.step(obs2, INSTRUCTION))


def test_unknown_and_closed_sessions_are_404(url):
    client = PolicyClient(url)
    client.session_id = "0" * 32
    with pytest.raises(ServeError, match="never created") as info:
        client.step({"rgb_static": STATIC, "rgb_gripper": GRIPPER}, INSTRUCTION)
    assert (info.value.status, info.value.field) == (404, "session_id")
    client.open()
    sid = client.session_id
    client.close()
    client.session_id = sid
    with pytest.raises(ServeError, match=r"closed \(DELETE\)"):
        client.step({"rgb_static": STATIC, "rgb_gripper": GRIPPER}, INSTRUCTION)
    with pytest.raises(ServeError, match="404"):
        client.request("POST", f"/sessions/{sid}/reset")


# ---- bounded sessions -----------------------------------------------------------------------------
def test_sessions_are_bounded_by_count_and_idle_time():
    now = [0.0]
    store = SessionStore(lambda: object(), max_sessions=2, idle_s=10.0, clock=lambda: now[0])
    a, b = store.create(), store.create()
    store.get(a.id)  # a is now the most recently used
    c = store.create()  # evicts b, the least recently used
    with pytest.raises(UnknownSession, match="least recently used of serve.max_sessions=2"):
        store.get(b.id)
    assert store.get(a.id) is a and store.get(c.id) is c and len(store) == 2
    now[0] = 5.0
    store.get(c.id)
    now[0] = 12.0  # a idle 12 s, c 7 s
    with pytest.raises(UnknownSession, match="idle"):
        store.get(a.id)
    assert store.get(c.id) is c and len(store) == 1


def test_serve_config_rejects_bad_values():
    with pytest.raises(ValueError, match="serve.max_sessions"):
        ServeConfig(max_sessions=0)
    with pytest.raises(ValueError, match="serve.port"):
        ServeConfig(port=70000)
    with pytest.raises(ValueError, match="serve.device"):
        ServeConfig(device="tpu")


def test_cli_serve_fails_fast_on_a_missing_policy(tmp_path, capsys):
    from vlaops.cli import main

    code = main(["serve", f"paths.model_dir={tmp_path}/absent", "serve.port=0", "serve.device=cpu"])
    assert code == 1
    assert "policy directory not found" in capsys.readouterr().err


@pytest.mark.slow  # heavier integration check: the quick loop (-m 'not slow') stays under 5 minutes
def test_vlaops_serve_command_serves_until_sigterm(tiny_policy_dir, runtime, tmp_path):
    """The real command: ``vlaops serve`` binds serve.host/serve.port itself, answers a step equal to the
    in-process runtime's (another process, the same machine and thread count), and stops cleanly on SIGTERM."""
    import signal
    import socket
    import subprocess
    import sys
    import time

    import torch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vlaops.cli",
            "serve",
            f"paths.model_dir={tiny_policy_dir}",
            "serve.host=127.0.0.1",
            f"serve.port={port}",
            "serve.device=cpu",
        ],
        cwd=Path(__file__).parents[1],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        client = PolicyClient(f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + 900  # a guard against a hang only: under load the start takes long
        while True:  # until it listens (importing torch and loading the policy)
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                facts = client.health()
                break
            except Exception:
                if time.monotonic() > deadline:
                    pytest.fail(f"vlaops serve did not answer: {(tmp_path / 'serve.log').read_text()}")
                time.sleep(0.1)
        assert facts["model_dir"] == str(tiny_policy_dir) and facts["device"] == "cpu"
        obs = {"rgb_static": STATIC, "rgb_gripper": GRIPPER}
        assert np.array_equal(client.step(obs, INSTRUCTION), local_twin(runtime).step(obs, INSTRUCTION))
        client.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    assert code == 0, (tmp_path / "serve.log").read_text()
