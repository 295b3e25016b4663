"""Read a ROS2 bag (rosbag2, sqlite3 or mcap) or a ROS1 bag into a canonical :class:`Episode` with ``rosbags``.

No ROS install is needed. Which topic is which stream comes from ``data.topics``; every stream is
synchronised to the ticks of the action topic (the control rate) by a zero-order hold. For rigs unlike the
simulator: the TCP pose composed from /tf (``data.tcp_source``, ``data.tf``; ``vlaops.io.tf``), a team's own
message types (``data.custom_msgs``, ``data.fields``), the instruction from a sidecar file or a default
(``data.default_instruction``), and one long bag cut into episodes (``data.split``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import itertools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from rosbags.highlevel import AnyReader
from rosbags.typesys import Stores, get_types_from_msg, get_typestore
from rosbags.typesys.base import Nodetype
from rosbags.typesys.store import Typestore

from vlaops.errors import RecordingError
from vlaops.io.calvin_spec import SCENE_OBS_DIM
from vlaops.io.episode import Episode
from vlaops.io.geometry import quat_to_euler
from vlaops.io.images import decode_compressed, same_shapes
from vlaops.io.settings import ReaderSettings
from vlaops.io.sync import SyncError, common_start, hold_last
from vlaops.io.tf import TfTree

SOURCE_FORMAT = "rosbag2"
ROS1_SOURCE_FORMAT = "rosbag1"

IMAGE_TYPES = ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage")
# a mobile base's action (io/mobile_base.py); in an arm's bag, a sign it was read with the wrong embodiment
CMD_VEL_TYPES = ("geometry_msgs/msg/Twist", "geometry_msgs/msg/TwistStamped")
ARRAY_TYPES = ("std_msgs/msg/Float64MultiArray", "std_msgs/msg/Float32MultiArray")
EXPECTED_TYPES: dict[str, tuple[str, ...]] = {
    "rgb_static": IMAGE_TYPES,
    "rgb_gripper": IMAGE_TYPES,
    "joint_states": ("sensor_msgs/msg/JointState",),
    "tcp_pose": ("geometry_msgs/msg/PoseStamped",),
    "scene_obs": ARRAY_TYPES,
    "action": ARRAY_TYPES,
    "instruction": ("std_msgs/msg/String",),
    "task": ("std_msgs/msg/String",),
}


TF_TYPE = "tf2_msgs/msg/TFMessage"
TF_STREAMS = {"tf": "data.tf.topic", "tf_static": "data.tf.static_topic"}  # read when data.tcp_source is 'tf'


@functools.cache
def typestore(name: str, custom_msgs: tuple[tuple[str, str], ...] = ()) -> Typestore:
    """The message definitions for bags recorded without them: data.typestore (e.g. 'ros2_humble') plus the
    team's own types, data.custom_msgs as sorted (type name, .msg text) pairs.

    A .msg text that does not parse, names a type no store defines, or redefines a standard type is a
    ValueError naming its ``data.custom_msgs`` key: DataConfig calls this when the config is loaded, so
    it fails before any recording is opened."""
    store = get_typestore(Stores(name))
    if custom_msgs:
        types = custom_types(custom_msgs, store)
        try:
            store.register(types)
        except Exception as exc:  # rosbags' TypesysError: a type already present with another definition
            raise ValueError(
                f"data.custom_msgs: {' '.join(str(exc).split())} (data.typestore '{name}' defines it)"
            ) from None
    return store


def _referenced(desc: tuple[Any, Any]) -> str | None:
    """The message type a field of a parse tree refers to (through arrays and sequences); None: a base type."""
    node, detail = desc
    if node == Nodetype.NAME:
        return detail
    if node in (Nodetype.ARRAY, Nodetype.SEQUENCE):
        return _referenced(detail[0])
    return None


def custom_types(custom_msgs: tuple[tuple[str, str], ...], store: Typestore) -> dict[str, Any]:
    """data.custom_msgs parsed with rosbags (``get_types_from_msg``): {type name: parse tree}."""
    types: dict[str, Any] = {}
    for type_name, text in custom_msgs:
        key = f"data.custom_msgs['{type_name}']"
        if not re.fullmatch(r"[A-Za-z]\w*/msg/[A-Za-z]\w*", type_name):
            raise ValueError(f"{key}: a message type is named <package>/msg/<Name>, got {type_name!r}")
        try:
            types.update(get_types_from_msg(text, type_name))
        except Exception as exc:  # rosbags' TypesysError, with the unparsed rest of the text on its last line
            lines = [line for line in str(exc).splitlines() if line.strip()]
            raise ValueError(f"{key}: not a valid .msg definition (cannot parse {lines[-1].strip()!r})") from None
    for type_name, (_consts, fields) in types.items():
        for field_name, desc in fields:
            ref = _referenced(desc)
            if ref is not None and ref not in types and ref not in store.types:
                raise ValueError(
                    f"data.custom_msgs['{type_name}']: field '{field_name}' has type {ref}, which neither "
                    "data.custom_msgs nor data.typestore defines"
                )
    return types


def _custom_msgs(cfg: ReaderSettings) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(dict(cfg.custom_msgs).items()))


def _register_custom(reader: AnyReader, cfg: ReaderSettings) -> None:
    """Add data.custom_msgs (and the types they use) to an open reader's typestore where the bag lacks them.

    AnyReader takes every definition from the bag when the bag has any, and the default typestore only
    when it has none; a recorder that lacked the team's package writes the standard types' definitions
    but an empty one for its own, so those are added here, before any message is read."""
    if not cfg.custom_msgs:
        return
    defaults = typestore(cfg.typestore, _custom_msgs(cfg)).fielddefs
    todo, missing = [name for name, _ in _custom_msgs(cfg)], {}
    while todo:
        name = todo.pop()
        if name in missing or name in reader.typestore.types or name not in defaults:
            continue
        missing[name] = defaults[name]
        todo.extend(ref for _field, desc in defaults[name][1] if (ref := _referenced(desc)))
    if missing:
        reader.typestore.register(missing)


STORAGE_SUFFIXES = (".db3", ".mcap")
ROS1_SUFFIX = ".bag"  # ROS1 bags carry their message definitions; rosbags reads them without ROS


def bag_paths(path: Path) -> list[Path] | None:
    """What ``AnyReader`` opens for the recording at ``path``, or None when it is not a rosbag2 recording.

    A directory with ``metadata.yaml`` is opened as a bag. Without it (the recorder writes it on close, so a
    crashed recorder leaves only the database), or for a lone ``.db3`` / ``.mcap`` file, the storage files
    are opened themselves: ``rosbags`` then reads topics, types and counts from the database's own
    ``topics`` / ``messages`` tables (an mcap from its channels), and the message definitions from the
    database where it has them (sqlite3 schema 4+, mcap), else from ``data.typestore``. A directory of split
    files (``<name>_0.db3``, ``<name>_1.db3`` ...) is read as one recording. A ROS1 ``.bag`` file is read
    the same way (its types are normalised to the ROS2 names, so ``data.topics`` and the streams are the same)."""
    if path.is_file():  # a lone rosbag2 storage file, or a ROS1 .bag (AnyReader reads both)
        return [path] if path.suffix in (*STORAGE_SUFFIXES, ROS1_SUFFIX) else None
    if not path.is_dir():
        return None
    if (path / "metadata.yaml").is_file():
        return [path]
    files = [p for p in path.iterdir() if p.is_file() and p.suffix in STORAGE_SUFFIXES]
    if not files or len({p.suffix for p in files}) > 1:
        return None
    return sorted(files, key=lambda p: (_split_index(p), p.name))  # _10 after _9, not after _1


def _split_index(path: Path) -> int:
    tail = path.stem.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def is_rosbag2(path: Path) -> bool:
    return bag_paths(path) is not None


def episode_id(path: Path) -> str:
    """A bag directory's name, or a lone storage file's name without its suffix."""
    return path.name if path.is_dir() else path.stem


def source_sha256(path: Path) -> str:
    """Content hash of a recording (file or directory), stable across machines."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


@dataclass
class _Stream:
    topic: str
    stamps: list[float] = field(default_factory=list)  # in the bag's (log time) order
    values: list[Any] = field(default_factory=list)

    def arrays(self, where: str, monotonic: bool) -> tuple[np.ndarray, list[Any]]:
        """(M,) stamps sorted, and the values in that order.

        monotonic: a stamp earlier than the one before it (a clock that jumped back, a driver that
        restamped) is an error (data.checks.monotonic_stamps); else the messages are sorted by stamp."""
        stamps = np.asarray(self.stamps, dtype=np.float64)
        back = np.flatnonzero(np.diff(stamps) < 0)
        if monotonic and back.size:
            i = int(back[0]) + 1
            raise RecordingError(
                where,
                f"topic '{self.topic}': message {i} is stamped {stamps[i] - stamps[i - 1]:.3f} s before the one "
                f"before it (stamps go back in time; data.checks.monotonic_stamps)",
                check="non_monotonic_stamps",
                stream=self.topic,
            )
        order = np.argsort(stamps, kind="stable")
        return stamps[order], [self.values[i] for i in order]


def _stamp(msg: Any, log_time_ns: int) -> float:
    """Capture time: the header stamp when the message has one, else the bag's log time."""
    header = getattr(msg, "header", None)
    if header is not None and (header.stamp.sec or header.stamp.nanosec):
        return header.stamp.sec + header.stamp.nanosec * 1e-9
    return log_time_ns * 1e-9


def decode_image(msg: Any, where: str, topic: str) -> np.ndarray:
    """sensor_msgs Image (rgb8/bgr8/rgba8/bgra8/mono8) or CompressedImage -> (H, W, 3) uint8."""

    def fail(reason: str) -> RecordingError:
        return RecordingError(where, f"topic '{topic}': {reason}", check="undecodable_image", stream=topic)

    if hasattr(msg, "format"):  # CompressedImage
        try:
            return decode_compressed(bytes(msg.data))
        except (OSError, ValueError) as exc:  # PIL's UnidentifiedImageError and truncated files are OSErrors
            raise fail(f"cannot decode the compressed image (format '{msg.format}': {exc})") from None
    channels = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1}
    enc = msg.encoding.lower()
    if enc not in channels:
        raise fail(f"image encoding '{msg.encoding}', expected one of {sorted(channels)}")
    c = channels[enc]
    data = np.asarray(msg.data, dtype=np.uint8)
    if data.size != msg.step * msg.height or msg.step < msg.width * c:
        raise fail(f"image data of {data.size} bytes does not match {msg.height}x{msg.step}")
    img = data.reshape(msg.height, msg.step)[:, : msg.width * c].reshape(msg.height, msg.width, c)
    if enc.startswith("bgr"):
        img = img[..., [2, 1, 0]]
    elif enc == "mono8":
        img = np.repeat(img, 3, axis=-1)
    return np.ascontiguousarray(img[..., :3])


def _custom_data(path: Path) -> dict[str, str]:
    """The bag's ``custom_data`` (rosbag2 metadata v6+): recorders put episode facts such as the task there."""
    try:
        # libyaml's parser where PyYAML has it: the pure-Python one cost ~5 ms a bag, 4 % of ingesting a 40-frame one
        info = (
            yaml.load((path / "metadata.yaml").read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}
        )
        return dict(info.get("rosbag2_bagfile_information", {}).get("custom_data") or {})
    except (OSError, yaml.YAMLError, AttributeError, TypeError, ValueError):
        return {}  # a malformed metadata.yaml is reported by the reader itself


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


SIDECAR_NAME = "instruction.json"


def sidecar_paths(path: Path) -> list[Path]:
    """The instruction sidecars of the recording at ``path`` that exist: ``<recording>.json`` beside it
    (``bag_0003.json``, ``run.json`` for ``run.db3``) and, in a bag directory, ``instruction.json``.

    Ingest does not read them as recordings of their own."""
    candidates = [path.parent / f"{episode_id(path)}.json"]
    if path.is_dir():
        candidates.append(path / SIDECAR_NAME)
    return [p for p in candidates if p.is_file()]


def read_sidecar(path: Path) -> dict[str, str]:
    """{'instruction', 'task'} (either or both) from the recording's sidecar; {} when it has none.

    An instruction written down after the recording, for rigs that publish none. A sidecar that is not
    such a JSON object is a RecordingError naming it (check ``bad_sidecar``)."""
    found = sidecar_paths(path)
    if not found:
        return {}
    names = [str(p.relative_to(path.parent)) for p in found]
    if len(found) > 1:
        raise RecordingError(
            str(path),
            f"two instruction sidecars, '{names[0]}' and '{names[1]}': keep one",
            check="bad_sidecar",
            stream=names[0],
        )

    def bad(reason: str) -> RecordingError:
        return RecordingError(str(path), f"sidecar '{names[0]}': {reason}", check="bad_sidecar", stream=names[0])

    try:
        data = json.loads(found[0].read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad(f"not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise bad(f'holds a {type(data).__name__}, expected an object {{"instruction": ..., "task": ...}}')
    picked = {k: data[k] for k in ("instruction", "task") if k in data}
    if not picked:
        raise bad(f"has neither 'instruction' nor 'task' (keys: {sorted(data)})")
    for k, v in picked.items():
        if not isinstance(v, str) or not v.strip():
            raise bad(f"'{k}' must be a non-empty string, got {v!r}")
    return {k: v.strip() for k, v in picked.items()}


# streams read per episode of a cut bag, by log-time range; the instruction, task and tf topics (small
# messages, and the newest instruction or static transform may be far before an episode) are read whole
WINDOWED = ("rgb_static", "rgb_gripper", "joint_states", "tcp_pose", "scene_obs", "action")


@dataclass(frozen=True)
class _Segment:
    """One episode of a bag cut by data.split: the action ticks stamped in [lo, hi).

    [start_ns, stop_ns) is the log-time range that holds every WINDOWED message the episode reads (the bag
    is indexed once), so each episode's read asks the bag for its own range and a long bag is deserialised
    about twice in all, not once per episode; None: the whole bag."""

    key: str
    lo: float
    hi: float
    start_ns: int | None = None
    stop_ns: int | None = None


_SEGMENTS: dict[tuple[Any, ...], list[_Segment]] = {}  # per process: ingest lists a bag's episodes, then reads each


def _segments(path: Path, cfg: ReaderSettings) -> list[_Segment]:
    """The episodes of a bag cut by data.split.by ('instruction' or 'gap'), from one pass over its action,
    instruction and observation stamps (no image decoded), cached for the reads that follow.

    ``instruction``: each instruction message starts an episode that lasts until the next one (commands
    before the first instruction belong to none). ``gap``: an episode ends where no action message comes
    for more than data.split.gap_s. A bag without the messages to cut by is one episode ``<bag>_000``,
    and reading it says what is missing. Keys are ``<bag>_<index>``, in time order: stable across runs."""
    where = str(path)
    topics = {name: topic for name in (*WINDOWED, "instruction") if (topic := getattr(cfg.topics, name))}
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    cache_key = (
        str(path.resolve()),
        tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files),
        tuple(topics.items()),
        cfg.split.by,
        cfg.split.gap_s,
        cfg.sync_tolerance_s,
        cfg.checks.monotonic_stamps,
        cfg.typestore,
        _custom_msgs(cfg),
    )
    if cache_key in _SEGMENTS:
        return _SEGMENTS[cache_key]
    streams = {name: _Stream(topic) for name, topic in topics.items()}  # values: the messages' log times (ns)
    with contextlib.ExitStack() as stack:
        try:
            reader = AnyReader(bag_paths(path) or [path], default_typestore=typestore(cfg.typestore, _custom_msgs(cfg)))
            reader.open()
            _register_custom(reader, cfg)
        except Exception as exc:  # as in read_rosbag2: whatever stops the bag from opening makes it unreadable
            raise RecordingError(
                where, f"not a readable rosbag2 recording ({type(exc).__name__}: {exc})", check="unreadable"
            ) from exc
        stack.callback(reader.close)
        by_topic = {topic: name for name, topic in topics.items()}
        connections = [c for c in reader.connections if c.topic in by_topic and c.msgtype in reader.typestore.types]
        for conn, log_time, raw in reader.messages(connections=connections) if connections else ():
            try:
                msg = reader.deserialize(raw, conn.msgtype)
            except Exception as exc:
                raise RecordingError(
                    where,
                    f"topic '{conn.topic}': undecodable message ({type(exc).__name__}: {exc})",
                    check="undecodable",
                    stream=conn.topic,
                ) from exc
            streams[by_topic[conn.topic]].stamps.append(_stamp(msg, log_time))
            streams[by_topic[conn.topic]].values.append(log_time)
    empty = _Stream("")
    ticks = streams.get("action", empty).arrays(where, cfg.checks.monotonic_stamps)[0]
    if cfg.split.by == "instruction":
        starts = streams.get("instruction", empty).arrays(where, cfg.checks.monotonic_stamps)[0]
    else:
        starts = (
            ticks[np.concatenate([[0], np.flatnonzero(np.diff(ticks) > cfg.split.gap_s) + 1])] if len(ticks) else ticks
        )
    if not len(starts):
        segments = [_Segment(f"{episode_id(path)}_000", -math.inf, math.inf)]
    else:
        bounds = [*starts.tolist(), math.inf]
        segments = [
            _log_range(_Segment(f"{episode_id(path)}_{i:03d}", bounds[i], bounds[i + 1]), streams, cfg)
            for i in range(len(starts))
        ]
    while len(_SEGMENTS) >= 8:
        del _SEGMENTS[next(iter(_SEGMENTS))]
    _SEGMENTS[cache_key] = segments
    return segments


def _log_range(seg: _Segment, streams: dict[str, _Stream], cfg: ReaderSettings) -> _Segment:
    """``seg`` with the log-time range of the WINDOWED messages its episode keeps (``_in_window``)."""
    logs = [
        log
        for name, stream in streams.items()
        if name in WINDOWED
        for stamp, log in zip(stream.stamps, stream.values)
        if _in_window(name, stamp, seg, cfg.sync_tolerance_s)
    ]
    start, stop = (min(logs), max(logs) + 1) if logs else (0, 0)
    return _Segment(seg.key, seg.lo, seg.hi, start, stop)


def _messages(reader: AnyReader, connections: list[Any], names: dict[str, str], window: _Segment | None) -> Any:
    """(connection, log time, raw) of ``connections``: all of them, or for one episode of a cut bag the
    WINDOWED topics' messages in its log-time range and the others' whole."""
    if window is None or window.start_ns is None:
        return reader.messages(connections=connections) if connections else iter(())
    ranged = [c for c in connections if names[c.topic] in WINDOWED]
    whole = [c for c in connections if names[c.topic] not in WINDOWED]
    parts = []
    if ranged and window.stop_ns > window.start_ns:
        parts.append(reader.messages(connections=ranged, start=window.start_ns, stop=window.stop_ns))
    if whole:
        parts.append(reader.messages(connections=whole))
    return itertools.chain(*parts)


def rosbag2_episodes(path: Path, cfg: ReaderSettings) -> list[str]:
    """A rosbag2 recording holds one episode, or several when data.split.by cuts it."""
    if cfg.split.by == "none":
        return [episode_id(path)]
    return [seg.key for seg in _segments(path, cfg)]


def _window(path: Path, key: str, cfg: ReaderSettings) -> _Segment | None:
    """The segment ``key`` names in a cut bag; None when bags are not cut (the whole bag is the episode)."""
    if cfg.split.by == "none":
        return None
    segments = {seg.key: seg for seg in _segments(path, cfg)}
    if key not in segments:
        raise RecordingError(
            str(path),
            f"no episode '{key}' in the bag (data.split.by '{cfg.split.by}' cuts it into {list(segments)})",
            check="unknown_episode",
            episode=key,
        )
    return segments[key]


def _in_window(name: str, stamp: float, window: _Segment, tolerance: float) -> bool:
    """Whether a message belongs to the episode of ``window``: an action stamped in [lo, hi); an
    observation from lo - data.sync_tolerance_s on (a stream silent at the start of an episode trims its
    first ticks, as at the start of a bag); every instruction and task (picked per episode later)."""
    if name in ("instruction", "task"):
        return True
    if name == "action":
        return window.lo <= stamp < window.hi
    return window.lo - tolerance <= stamp < window.hi


def _at_start(stream: _Stream, window: _Segment, where: str, monotonic: bool) -> Any:
    """A stream's value for the episode of ``window``: the newest message stamped at or before its start,
    else the first one within it; None when there is neither."""
    if not stream.stamps:
        return None
    stamps, values = stream.arrays(where, monotonic)
    before = np.flatnonzero(stamps <= window.lo)
    if before.size:
        return values[int(before[-1])]
    inside = np.flatnonzero(stamps < window.hi)
    return values[int(inside[0])] if inside.size else None


def _expected_types(name: str, cfg: ReaderSettings) -> tuple[str, ...] | None:
    """The message types a stream's topic may have; None: any (data.fields says where its numbers are)."""
    if name in TF_STREAMS:
        return (TF_TYPE,)
    if name in ("action", "joint_states") and getattr(cfg.fields, name):
        return None
    return EXPECTED_TYPES[name]


def _config_key(name: str) -> str:
    return TF_STREAMS.get(name, f"data.topics.{name}")


def embodiment_hint(present: dict[str, str]) -> str:
    """For an arm reading that misses a topic: a pointer to ``data.embodiment`` when the bag holds velocity
    commands (a mobile base's recording read with arm settings), else ''."""
    twists = sorted(f"{t} ({typ})" for t, typ in present.items() if typ in CMD_VEL_TYPES)
    if not twists:
        return ""
    return (
        f"; the bag holds velocity commands on {', '.join(twists)}: a mobile base recording? "
        "set data.embodiment=mobile_base (and data.base)"
    )


def read_rosbag2(path: Path, key: str, cfg: ReaderSettings) -> Episode:
    """Read one rosbag2 recording (or ROS1 bag) into an arm :class:`Episode` synchronised to the action ticks.

    ``key`` is one of ``rosbag2_episodes``: the bag's name, or one episode of a bag cut by data.split (only
    its messages are decoded). Every problem with the data is a :class:`RecordingError` naming the bag,
    the topic and the check."""
    where = str(path)
    window = _window(path, key, cfg)  # this episode's stamps in a bag cut by data.split; None: the whole bag
    sidecar = read_sidecar(path)
    fallback_instruction = sidecar.get("instruction") or cfg.default_instruction
    wanted = {name: topic for name in EXPECTED_TYPES if (topic := getattr(cfg.topics, name))}
    if cfg.tcp_source == "tf":  # the TCP pose is composed from the transform tree, not read from a pose topic
        del wanted["tcp_pose"]
        wanted.update(
            {name: topic for name, topic in (("tf", cfg.tf.topic), ("tf_static", cfg.tf.static_topic)) if topic}
        )
    streams: dict[str, _Stream] = {name: _Stream(topic) for name, topic in wanted.items() if name not in TF_STREAMS}
    tree = TfTree(cfg.tf.topic, cfg.tf.static_topic, where)
    custom = _custom_data(path)
    with contextlib.ExitStack() as stack:
        try:
            reader = AnyReader(bag_paths(path) or [path], default_typestore=typestore(cfg.typestore, _custom_msgs(cfg)))
            reader.open()
            _register_custom(reader, cfg)
        except Exception as exc:  # AnyReaderError, a malformed metadata.yaml, a truncated database: all unreadable
            raise RecordingError(
                where, f"not a readable rosbag2 recording ({type(exc).__name__}: {exc})", check="unreadable"
            ) from exc
        stack.callback(reader.close)
        if reader.message_count == 0:
            raise RecordingError(where, "the bag has no messages", check="empty")
        present = {c.topic: c.msgtype for c in reader.connections}
        for name, topic in wanted.items():
            if topic not in present:
                optional = name in ("rgb_gripper", "scene_obs", "task", "tf_static") or (
                    name == "instruction" and fallback_instruction is not None
                )  # a sidecar or data.default_instruction
                if optional:
                    continue
                raise RecordingError(
                    where,
                    f"mapped topic '{topic}' ({_config_key(name)}) is not in the bag; topics present: {sorted(present)}"
                    f"{embodiment_hint(present)}",  # a base's bag read with arm settings says so
                    check="missing_stream",
                    stream=topic,
                )
            expected = _expected_types(name, cfg)
            if expected is not None and present[topic] not in expected:
                fields_hint = (
                    f" (or set data.fields.{name} for a custom type)" if name in ("action", "joint_states") else ""
                )
                raise RecordingError(
                    where,
                    f"topic '{topic}' ({_config_key(name)}) has type {present[topic]}, "
                    f"expected {' or '.join(expected)}{fields_hint}",
                    check="wrong_type",
                    stream=topic,
                )
            if present[topic] not in reader.typestore.types:
                raise RecordingError(
                    where,
                    f"topic '{topic}' ({_config_key(name)}): the bag holds no definition of {present[topic]} "
                    f"and data.typestore '{cfg.typestore}' has none, nor data.custom_msgs",
                    check="unknown_type",
                    stream=topic,
                )
        by_topic = {topic: name for name, topic in wanted.items()}
        connections = [c for c in reader.connections if c.topic in by_topic]
        for conn, log_time, raw in _messages(reader, connections, by_topic, window):
            name = by_topic[conn.topic]
            try:
                msg = reader.deserialize(raw, conn.msgtype)
            except Exception as exc:  # AnyReaderError, or a struct/index error on a truncated message
                raise RecordingError(
                    where,
                    f"topic '{conn.topic}': undecodable message ({type(exc).__name__}: {exc})",
                    check="undecodable",
                    stream=conn.topic,
                ) from exc
            if name in TF_STREAMS:
                tree.add(msg, name == "tf_static", log_time)
                continue
            stamp = _stamp(msg, log_time)
            if window is not None and not _in_window(name, stamp, window, cfg.sync_tolerance_s):
                continue  # another episode's message: not decoded
            stream = streams[name]
            stream.stamps.append(stamp)
            stream.values.append(_payload(name, msg, where, conn.topic, cfg))
    return _assemble(path, streams, cfg, custom, key=key, window=window, sidecar=sidecar, tree=tree)


def _fields(msg: Any, paths: list[str], where: str, topic: str, key: str) -> np.ndarray:
    """The numbers at ``paths`` (dotted field paths) of a message, concatenated: (N,) float64."""
    parts = []
    for path in paths:
        value = msg
        for attr in path.split("."):
            if not dataclasses.is_dataclass(value) or not hasattr(value, attr):
                fields = dataclasses.fields(value) if dataclasses.is_dataclass(value) else ()
                have = [f.name for f in fields if not f.name.startswith("_")]  # not rosbags' __msgtype__
                raise RecordingError(
                    where,
                    f"topic '{topic}': {msg.__msgtype__} has no field '{path}' ({key}); its fields: {have}",
                    check="missing_field",
                    stream=topic,
                )
            value = getattr(value, attr)
        try:
            parts.append(np.asarray(value, dtype=np.float64).reshape(-1))
        except (TypeError, ValueError):
            raise RecordingError(
                where,
                f"topic '{topic}': field '{path}' ({key}) holds {type(value).__name__}, expected numbers",
                check="wrong_type",
                stream=topic,
            ) from None
    return np.concatenate(parts)


def _payload(name: str, msg: Any, where: str, topic: str, cfg: ReaderSettings) -> Any:
    if name in ("rgb_static", "rgb_gripper"):
        return decode_image(msg, where, topic)
    if name == "action" and cfg.fields.action:
        return _fields(msg, list(cfg.fields.action), where, topic, "data.fields.action")
    if name == "joint_states" and cfg.fields.joint_states:  # the team's own joint message: positions in order
        values = _fields(msg, list(cfg.fields.joint_states), where, topic, "data.fields.joint_states")
        needed = len(cfg.arm_joint_names) + len(cfg.gripper_joint_names)
        if values.shape != (needed,):
            raise RecordingError(
                where,
                f"topic '{topic}': data.fields.joint_states gives {values.size} values, expected {needed} "
                "(data.arm_joint_names, then data.gripper_joint_names)",
                check="wrong_shape",
                stream=topic,
            )
        return values
    if name == "joint_states":
        positions = dict(zip(msg.name, np.asarray(msg.position, dtype=np.float64)))
        needed = [*cfg.arm_joint_names, *cfg.gripper_joint_names]
        missing = [j for j in needed if j not in positions]
        if missing:
            raise RecordingError(
                where,
                f"topic '{topic}': joints {missing} missing (data.arm_joint_names / data.gripper_joint_names); "
                f"message has {list(msg.name)}",
                check="missing_joints",
                stream=topic,
            )
        return np.array([positions[j] for j in needed])
    if name == "tcp_pose":
        p, q = msg.pose.position, msg.pose.orientation
        return np.concatenate([[p.x, p.y, p.z], quat_to_euler(np.array([q.x, q.y, q.z, q.w]))])
    if name in ("scene_obs", "action"):
        return np.asarray(msg.data, dtype=np.float64)
    return str(msg.data)  # instruction, task


def check_rate(ticks: np.ndarray, control_hz: float, where: str, topic: str, named: str) -> None:
    """The stream that sets the control ticks must run at data.control_hz (within 20 %): a wrong rate is
    a wrong recording or a wrong setting, never silently resampled. ``named`` is how the error names it."""
    if len(ticks) > 1:
        step = float(np.median(np.diff(ticks)))
        rate = 1.0 / step if step > 0 else float("inf")
        if abs(rate - control_hz) > 0.2 * control_hz:
            raise RecordingError(
                where,
                f"{named} runs at {rate:.1f} Hz, data.control_hz is {control_hz}",
                check="wrong_rate",
                stream=topic,
            )


def bag_provenance(path: Path) -> dict[str, str]:
    """The Episode fields that say which bag an episode came from, for the arm's and the base's readers."""
    return {
        "source_sha256": source_sha256(path),
        "source_format": ROS1_SOURCE_FORMAT if path.suffix == ROS1_SUFFIX else SOURCE_FORMAT,
    }


def _assemble(
    path: Path,
    streams: dict[str, _Stream],
    cfg: ReaderSettings,
    custom: dict[str, str],
    *,
    key: str,
    window: _Segment | None,
    sidecar: dict[str, str],
    tree: TfTree,
) -> Episode:
    """The streams read from the bag (those of ``window``'s episode in a cut bag) -> the synchronised
    Episode. The TCP pose is the tf chain data.tf.base_frame -> tool_frame when data.tcp_source is 'tf'.
    The instruction: the instruction topic's (in a cut bag, the one in force at the episode's start),
    else the sidecar's, else data.default_instruction."""
    where = str(path)
    fallback_instruction = sidecar.get("instruction") or cfg.default_instruction
    if window is not None and not streams["action"].stamps:
        raise RecordingError(
            where, f"0 synchronised frames, data.min_episode_len is {cfg.min_episode_len}", check="too_short"
        )
    for name in ("rgb_static", "joint_states", "tcp_pose", "action", "instruction"):
        if name not in streams or (name == "instruction" and fallback_instruction is not None):
            continue  # the TCP pose from tf; an instruction from the sidecar or the default
        if not streams[name].stamps:
            topic = getattr(cfg.topics, name)
            raise RecordingError(
                where, f"topic '{topic}' (data.topics.{name}) has no messages", check="missing_stream", stream=topic
            )
    monotonic = cfg.checks.monotonic_stamps
    for stream in streams.values():
        if stream.values and not isinstance(stream.values[0], str):
            same_shapes(stream.values, where, stream.topic, f"topic '{stream.topic}'")
    ticks, actions = streams["action"].arrays(where, monotonic)
    action_abs = np.stack(actions)
    if action_abs.ndim != 2 or action_abs.shape[1] != 7:
        raise RecordingError(
            where,
            f"topic '{cfg.topics.action}' holds arrays of shape {action_abs.shape[1:]}, expected (7,)",
            check="wrong_shape",
            stream=cfg.topics.action,
        )
    check_rate(ticks, cfg.control_hz, where, cfg.topics.action, f"topic '{cfg.topics.action}'")
    obs_names = [
        n
        for n in ("rgb_static", "rgb_gripper", "joint_states", "tcp_pose", "scene_obs")
        if streams.get(n) and streams[n].stamps
    ]
    sorted_streams = {n: streams[n].arrays(where, monotonic) for n in obs_names}
    starts = {n: s[0][0] for n, s in sorted_streams.items()}
    if cfg.tcp_source == "tf" and (first := tree.first_stamp(cfg.tf.base_frame, cfg.tf.tool_frame)) is not None:
        starts["tf"] = first
    start = common_start(starts, ticks)
    ticks, action_abs = ticks[start:], action_abs[start:]
    if len(ticks) < cfg.min_episode_len:
        raise RecordingError(
            where, f"{len(ticks)} synchronised frames, data.min_episode_len is {cfg.min_episode_len}", check="too_short"
        )
    held: dict[str, np.ndarray] = {}
    for name, (stamps, values) in sorted_streams.items():
        topic = getattr(cfg.topics, name)
        try:
            idx = hold_last(stamps, ticks, cfg.sync_tolerance_s, topic)
        except SyncError as exc:
            raise RecordingError(where, str(exc), check="out_of_sync", stream=topic) from exc
        held[name] = np.stack([values[i] for i in idx])
    if cfg.tcp_source == "tf":
        held["tcp_pose"] = tree.pose_at(cfg.tf.base_frame, cfg.tf.tool_frame, ticks, cfg.sync_tolerance_s, monotonic)
    if held.get("scene_obs") is not None and held["scene_obs"].shape[1:] != (SCENE_OBS_DIM,):
        raise RecordingError(
            where,
            f"topic '{cfg.topics.scene_obs}' holds arrays of shape {held['scene_obs'].shape[1:]}, "
            f"expected ({SCENE_OBS_DIM},)",
            check="wrong_shape",
            stream=cfg.topics.scene_obs,
        )
    n_arm = len(cfg.arm_joint_names)
    joints = held["joint_states"]  # (T, 7 + n_fingers)
    gripper_width = joints[:, n_arm:].sum(axis=1, keepdims=True)
    # CALVIN's robot_obs[14] is the gripper action in force when the frame was taken: the previous command.
    prev_gripper = np.concatenate([action_abs[:1, 6], action_abs[:-1, 6]])[:, None]
    robot_obs = np.concatenate([held["tcp_pose"], gripper_width, joints[:, :n_arm], prev_gripper], axis=1)

    def topic_value(name: str) -> str | None:
        stream = streams.get(name)
        if stream is None or not stream.values:
            return None
        return stream.values[0] if window is None else _at_start(stream, window, where, monotonic)

    # topic > sidecar > data.default_instruction: a recorded message says what the operator asked at the time
    instruction = topic_value("instruction")
    if instruction is None:
        instruction = fallback_instruction
    if instruction is None:  # a cut bag's episode before any instruction message, with nothing to fall back on
        raise RecordingError(
            where,
            f"no instruction: no message on '{cfg.topics.instruction}' (data.topics.instruction) at or after the "
            "episode's start, no sidecar, and data.default_instruction is null",
            check="no_instruction",
            stream=cfg.topics.instruction,
        )
    instruction = instruction.strip()
    # the task name: a mapped task topic, else the sidecar's, else the bag's custom_data 'task', else the instruction
    task = topic_value("task") or sidecar.get("task") or custom.get("task") or _slug(instruction)
    return Episode(
        episode_id=episode_id(path) if window is None else key,
        source=str(path) if window is None else f"{path} episode '{key}'",
        **bag_provenance(path),
        embodiment="arm",
        instruction=instruction,
        task=task,
        control_hz=float(cfg.control_hz),
        time=ticks - ticks[0],
        rgb_static=held["rgb_static"],
        rgb_gripper=held.get("rgb_gripper"),
        robot_obs=robot_obs,
        scene_obs=held.get("scene_obs"),
        action_abs=action_abs,
    )
