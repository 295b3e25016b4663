"""The TCP pose from a recording's transform tree: tf2_msgs/TFMessage on /tf (and latched on /tf_static).

An arm driver publishes its joints' transforms on /tf (robot_state_publisher) and the fixed ones (the
flange to the tool, a camera mount) once on /tf_static; it often publishes no pose of the tool itself.
The TCP pose in the base frame is then the chain base -> ... -> common ancestor -> ... -> tool, as tf2's
``lookupTransform(base, tool, t)`` composes it. At each control tick every moving transform of the chain
is the newest one published at or before the tick, no older than data.sync_tolerance_s: the zero-order
hold of every other stream (``vlaops.io.sync``), so a tf that stops is an error, not a frozen pose.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vlaops.errors import RecordingError
from vlaops.io.geometry import quat_to_euler
from vlaops.io.sync import SyncError, hold_last


def quat_to_matrix(quat_xyzw: np.ndarray) -> np.ndarray:
    """(..., 4) quaternions (x, y, z, w), normalised here -> (..., 3, 3) rotation matrices."""
    q = np.asarray(quat_xyzw, dtype=np.float64)
    x, y, z, w = np.moveaxis(q / np.linalg.norm(q, axis=-1, keepdims=True), -1, 0)
    return np.stack(
        [
            np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], axis=-1),
            np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], axis=-1),
            np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], axis=-1),
        ],
        axis=-2,
    )


def matrix_to_quat(rot: np.ndarray) -> np.ndarray:
    """(..., 3, 3) rotation matrices -> (..., 4) quaternions (x, y, z, w), w >= 0.

    Shepperd's method: the largest of w, x, y, z is computed from the trace first, so no branch divides
    by a value near zero."""
    r = np.asarray(rot, dtype=np.float64)
    m00, m11, m22 = r[..., 0, 0], r[..., 1, 1], r[..., 2, 2]
    cands = np.stack([1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22], axis=-1)
    k = np.argmax(cands, axis=-1)
    s = np.sqrt(np.maximum(np.take_along_axis(cands, k[..., None], -1)[..., 0], 1e-300)) * 2  # 4 * the largest
    q = np.empty(r.shape[:-2] + (4,))
    d = {  # (x, y, z, w) for each choice of the largest component
        0: (
            (r[..., 2, 1] - r[..., 1, 2]) / s,
            (r[..., 0, 2] - r[..., 2, 0]) / s,
            (r[..., 1, 0] - r[..., 0, 1]) / s,
            s / 4,
        ),
        1: (
            s / 4,
            (r[..., 0, 1] + r[..., 1, 0]) / s,
            (r[..., 0, 2] + r[..., 2, 0]) / s,
            (r[..., 2, 1] - r[..., 1, 2]) / s,
        ),
        2: (
            (r[..., 0, 1] + r[..., 1, 0]) / s,
            s / 4,
            (r[..., 1, 2] + r[..., 2, 1]) / s,
            (r[..., 0, 2] - r[..., 2, 0]) / s,
        ),
        3: (
            (r[..., 0, 2] + r[..., 2, 0]) / s,
            (r[..., 1, 2] + r[..., 2, 1]) / s,
            s / 4,
            (r[..., 1, 0] - r[..., 0, 1]) / s,
        ),
    }
    for case, comps in d.items():
        q = np.where((k == case)[..., None], np.stack(comps, axis=-1), q)
    return q * np.where(q[..., 3:] < 0, -1.0, 1.0)


def _homogeneous(xyz: np.ndarray, quat: np.ndarray) -> np.ndarray:
    """(..., 3) translations and (..., 4) quaternions -> (..., 4, 4) transforms."""
    out = np.zeros(np.shape(xyz)[:-1] + (4, 4))
    out[..., :3, :3] = quat_to_matrix(quat)
    out[..., :3, 3] = xyz
    out[..., 3, 3] = 1.0
    return out


def _inverse(t: np.ndarray) -> np.ndarray:
    """(..., 4, 4) rigid transforms -> their inverses (R^T, -R^T p)."""
    out = np.zeros_like(t)
    rt = np.swapaxes(t[..., :3, :3], -1, -2)
    out[..., :3, :3] = rt
    out[..., :3, 3] = -(rt @ t[..., :3, 3:])[..., 0]
    out[..., 3, 3] = 1.0
    return out


@dataclass
class _Edge:
    """One transform of the tree, parent <- child (a TransformStamped's frame_id and child_frame_id)."""

    parent: str
    child: str
    static: bool
    stamps: list[float] = field(default_factory=list)
    xyz: list[tuple[float, float, float]] = field(default_factory=list)
    quat: list[tuple[float, float, float, float]] = field(default_factory=list)


class TfTree:
    """The transforms of one recording (or one episode's window of it), as tf2's buffer holds them."""

    def __init__(self, topic: str, static_topic: str | None, where: str) -> None:
        self.topic, self.static_topic, self.where = topic, static_topic, where
        self.edges: dict[str, _Edge] = {}  # by child frame: in a tf tree every frame has one parent

    def add(self, msg: Any, static: bool, log_time_ns: int) -> None:
        """Every TransformStamped of one tf2_msgs/TFMessage. A static transform replaces the one before it
        (a latched topic is republished); a moving one is kept with its stamp."""
        for tr in msg.transforms:
            parent, child = tr.header.frame_id.lstrip("/"), tr.child_frame_id.lstrip("/")  # tf2 drops a leading '/'
            stamp = tr.header.stamp.sec + tr.header.stamp.nanosec * 1e-9 or log_time_ns * 1e-9
            edge = self.edges.setdefault(child, _Edge(parent, child, static))
            if edge.parent != parent:
                raise RecordingError(
                    self.where,
                    f"frame '{child}' has two parents on {self._topics()}: '{edge.parent}' and '{parent}' "
                    "(a tf tree gives every frame one parent)",
                    check="tf_conflict",
                    stream=self.topic,
                )
            t, r = tr.transform.translation, tr.transform.rotation
            if static:
                edge.static, edge.stamps, edge.xyz, edge.quat = True, [], [], []
            edge.stamps.append(stamp)
            edge.xyz.append((t.x, t.y, t.z))
            edge.quat.append((r.x, r.y, r.z, r.w))

    def _topics(self) -> str:
        return " / ".join(f"'{t}'" for t in (self.topic, self.static_topic) if t)

    def _up(self, frame: str) -> list[_Edge]:
        """The edges from ``frame`` up to its tree's root."""
        path: list[_Edge] = []
        seen = {frame}
        while frame in self.edges:
            edge = self.edges[frame]
            if edge.parent in seen:
                raise RecordingError(
                    self.where,
                    f"the transforms on {self._topics()} form a loop through frame '{edge.parent}'",
                    check="tf_conflict",
                    stream=self.topic,
                )
            path.append(edge)
            frame = edge.parent
            seen.add(frame)
        return path

    def chain(self, base: str, tool: str) -> tuple[list[_Edge], list[_Edge]]:
        """The edges from the common ancestor down to ``base`` and down to ``tool`` (each listed upward).

        A frame in no transform, or two frames in different trees, is a RecordingError naming them."""
        frames = set(self.edges) | {e.parent for e in self.edges.values()}
        for frame, key in ((base, "base_frame"), (tool, "tool_frame")):
            if frame not in frames:
                raise RecordingError(
                    self.where,
                    f"frame '{frame}' (data.tf.{key}) is in no transform published on {self._topics()}; "
                    f"frames present: {sorted(frames)}",
                    check="missing_tf_frame",
                    stream=self.topic,
                )
        up_base, up_tool = self._up(base), self._up(tool)
        base_line = [base, *(e.parent for e in up_base)]
        tool_line = [tool, *(e.parent for e in up_tool)]
        common = next((f for f in tool_line if f in base_line), None)
        if common is None:
            raise RecordingError(
                self.where,
                f"no chain of transforms from '{base}' (data.tf.base_frame) to '{tool}' (data.tf.tool_frame) "
                f"on {self._topics()}: '{base}' is under '{base_line[-1]}', '{tool}' under '{tool_line[-1]}'",
                check="no_tf_chain",
                stream=self.topic,
            )
        return up_base[: base_line.index(common)], up_tool[: tool_line.index(common)]

    def first_stamp(self, base: str, tool: str) -> float | None:
        """When every moving transform of the chain has been published once (None: all static)."""
        down_base, down_tool = self.chain(base, tool)
        firsts = [min(e.stamps) for e in (*down_base, *down_tool) if not e.static]
        return max(firsts) if firsts else None

    def pose_at(self, base: str, tool: str, ticks: np.ndarray, tolerance: float, monotonic: bool) -> np.ndarray:
        """The pose of ``tool`` in ``base`` at each tick: (T,) seconds -> (T, 6) xyz (m) + euler xyz (rad)."""
        down_base, down_tool = self.chain(base, tool)

        def root_from(edges: list[_Edge]) -> np.ndarray:  # (T, 4, 4): common ancestor <- frame
            out = np.broadcast_to(np.eye(4), (len(ticks), 4, 4))
            for edge in edges:  # listed upward: frame -> parent -> ... -> common
                out = self._held(edge, ticks, tolerance, monotonic) @ out
            return out

        pose = _inverse(root_from(down_base)) @ root_from(down_tool)  # (T, 4, 4): base <- tool
        return np.concatenate([pose[:, :3, 3], quat_to_euler(matrix_to_quat(pose[:, :3, :3]))], axis=1)

    def _held(self, edge: _Edge, ticks: np.ndarray, tolerance: float, monotonic: bool) -> np.ndarray:
        """(T, 4, 4) parent <- child at each tick: the static transform, or the newest moving one."""
        if edge.static:
            return np.broadcast_to(_homogeneous(np.array(edge.xyz[-1]), np.array(edge.quat[-1])), (len(ticks), 4, 4))
        name = f"{self.topic} '{edge.parent}' -> '{edge.child}'"
        stamps = np.asarray(edge.stamps)
        back = np.flatnonzero(np.diff(stamps) < 0)
        if monotonic and back.size:
            i = int(back[0]) + 1
            raise RecordingError(
                self.where,
                f"topic '{self.topic}': transform '{edge.parent}' -> '{edge.child}' {i} is stamped "
                f"{stamps[i] - stamps[i - 1]:.3f} s before the one before it (stamps go back in time; "
                "data.checks.monotonic_stamps)",
                check="non_monotonic_stamps",
                stream=self.topic,
            )
        order = np.argsort(stamps, kind="stable")
        try:
            idx = order[hold_last(stamps[order], ticks, tolerance, name)]
        except SyncError as exc:
            raise RecordingError(self.where, str(exc), check="out_of_sync", stream=self.topic) from exc
        return _homogeneous(np.asarray(edge.xyz)[idx], np.asarray(edge.quat)[idx])
