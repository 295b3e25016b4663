"""Plausibility checks: a readable episode can still be wrong, and one wrong episode spoils the rest.

A commanded action of 1e30 or a joint far past its limit passes every shape check, then dominates the
action statistics (``statistics.yaml``, ``act_min_bound`` / ``act_max_bound``) and the normalisation every
other episode is trained with. Ingest runs :func:`check_episode` on each episode after
``Episode.validate`` (shapes, dtypes, finite values) and before writing it; the bounds are
``data.checks`` (:class:`vlaops.data.config.CheckConfig`). Checks that need the raw messages (stamps going
back in time, a frame size changing mid-stream) run in the readers, which still have them.
"""

from __future__ import annotations

import numpy as np

from vlaops.data.config import CheckConfig
from vlaops.errors import RecordingError
from vlaops.io.episode import Episode


def check_episode(episode: Episode, checks: CheckConfig, where: str) -> None:
    """Raise a :class:`RecordingError` naming the key, the frame and the ``data.checks`` bound that failed.

    ``where`` is the recording as the user named it. An arm episode: robot_obs (T, 15), action_abs (T, 7).
    """
    if episode.embodiment != "arm" or episode.robot_obs is None or episode.action_abs is None:
        return
    obs, act = episode.robot_obs, episode.action_abs

    def fail(key: str, reason: str, check: str) -> RecordingError:
        return RecordingError(where, f"key '{key}': {reason}", check=check, stream=key, episode=episode.episode_id)

    with np.errstate(over="ignore", invalid="ignore"):  # 1e30 - 1e30 and friends: compared, not used
        for bound, name, unit, dims, check in (
            (checks.max_abs_position_m, "max_abs_position_m", "m", slice(0, 3), "position_bound"),
            (checks.max_abs_angle_rad, "max_abs_angle_rad", "rad", slice(3, 6), "angle_bound"),
        ):
            if bound is None:
                continue
            for key, values in (("obs/robot_obs", obs[:, dims]), ("action/abs", act[:, dims])):
                bad = np.argwhere(np.abs(values) > bound)
                if bad.size:
                    t, axis = (int(v) for v in bad[0])
                    dim = dims.start + axis
                    raise fail(
                        f"{key}[:, {dim}]",
                        f"{values[t, axis]:.4g} {unit} at frame {t}, beyond data.checks.{name}={bound}",
                        check,
                    )
        if checks.max_target_speed_m_s is not None and len(act) > 1:
            speed = np.linalg.norm(np.diff(act[:, :3], axis=0), axis=1) * episode.control_hz  # (T-1,) m/s
            t = int(np.argmax(speed))
            if speed[t] > checks.max_target_speed_m_s:
                raise fail(
                    "action/abs[:, 0:3]",
                    f"the target position jumps {speed[t]:.4g} m/s between frames {t} and "
                    f"{t + 1}, beyond data.checks.max_target_speed_m_s={checks.max_target_speed_m_s}",
                    "action_jump",
                )
        if checks.max_target_offset_m is not None:
            offset = np.linalg.norm(act[:, :3] - obs[:, :3], axis=1)  # (T,) m
            t = int(np.argmax(offset))
            if offset[t] > checks.max_target_offset_m:
                raise fail(
                    "action/abs[:, 0:3]",
                    f"the target position is {offset[t]:.4g} m from the TCP at frame {t}, "
                    f"beyond data.checks.max_target_offset_m={checks.max_target_offset_m}",
                    "action_offset",
                )
    if checks.joint_min is not None and checks.joint_max is not None:
        joints = obs[:, 7:14]  # (T, 7): CALVIN's robot_obs order, io/calvin_spec.py
        lo = np.asarray(checks.joint_min) - checks.joint_margin_rad
        hi = np.asarray(checks.joint_max) + checks.joint_margin_rad
        bad = np.argwhere((joints < lo) | (joints > hi))
        if bad.size:
            t, j = (int(v) for v in bad[0])
            raise fail(
                f"obs/robot_obs[:, {7 + j}]",
                f"joint {j + 1} is {joints[t, j]:.4g} rad at frame {t}, outside "
                f"data.checks.joint_min/joint_max [{checks.joint_min[j]}, {checks.joint_max[j]}] "
                f"(+- joint_margin_rad {checks.joint_margin_rad})",
                "joint_limits",
            )
