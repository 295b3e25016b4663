"""A packed, memory-mapped per-split frame cache: every annotated frame decoded and resized once.

The CALVIN layout stores one compressed ``episode_%07d.npz`` per frame; RoboVLMs' loader (and ours
before this cache) opens, inflates and bicubic-resizes W frames x 2 cameras for every training sample,
so a frame is decoded about W times per epoch. Here each frame of the split's language-annotated spans
is decoded once, resized with :func:`vlaops.data.transforms.resize_uint8` (the runtime's own resize, so
a cached frame equals what the policy computes at evaluation) and packed into two uint8 ``.npy`` arrays
mapped with ``np.load(mmap_mode="c")`` (copy-on-write: never written back): a window is then two
contiguous slices.

On disk, under ``data.cache_dir``::

    <split>-<path hash>-<S>px-<key>/
        frame_ids.npy      (N,) int64, ascending: the global frame id of each row
        rgb_static.npy     (N, 3, S, S) uint8, channels first as resize_uint8 returns them
        rgb_gripper.npy    (N, 3, S, S) uint8
        cache.json         format version, key, image size, frame count; written last

The key hashes the format version, the image size, the frame ids and, per frame, the CRC-32 and size
of its two image members as the npz's zip directory records them: a content fingerprint that reads a
few hundred bytes per frame instead of inflating it, so a rewritten frame or an added episode makes a
new key (and a rebuild), while a `dvc checkout` that only touches mtimes does not. A build writes into a
hidden temporary directory and renames it when complete, under a per-split lock (``fcntl.flock``), so
a crash never leaves a directory that a later run takes as whole and concurrent processes (one per
rank) build once; superseded caches of the same split and size are removed after a build.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from vlaops.data.transforms import resize_uint8
from vlaops.errors import VlaopsError
from vlaops.io.calvin import CalvinSplit
from vlaops.utils.atomic import current_umask
from vlaops.utils.logging import get_logger

log = get_logger(__name__)

CACHE_FORMAT_VERSION = 1
IMAGE_KEYS = ("rgb_static", "rgb_gripper")
FRAME_IDS_FILE = "frame_ids.npy"
META_FILE = "cache.json"  # written last: its presence (with the right key) marks a complete cache
BUILD_BATCH = 64  # frames decoded and resized per step of a build


def annotated_frame_ids(split: CalvinSplit) -> np.ndarray:
    """(N,) int64 ascending: every frame id inside one of the split's language-annotated spans
    (CALVIN's ``info.indx``, inclusive ends), i.e. every frame a training window can read."""
    spans = [np.arange(a.start, a.end + 1, dtype=np.int64) for a in split.annotations]
    if not spans:
        raise VlaopsError(f"{split.dir}: no language-annotated span to cache")
    return np.unique(np.concatenate(spans))


def _image_member_digests(path: Path) -> bytes:
    """CRC-32 and uncompressed size of the image members of one npz, from its zip directory only."""
    try:
        with zipfile.ZipFile(path) as archive:
            infos = [archive.getinfo(f"{k}.npy") for k in IMAGE_KEYS]
    except FileNotFoundError as exc:
        raise VlaopsError(f"{path}: frame file missing") from exc
    except KeyError as exc:
        raise VlaopsError(f"{path}: missing member {exc}; expected {list(IMAGE_KEYS)}") from exc
    except zipfile.BadZipFile as exc:
        raise VlaopsError(f"{path}: not a valid npz archive ({exc})") from exc
    return b"".join(f"{i.CRC:08x}{i.file_size:012x}".encode() for i in infos)


def cache_key(split: CalvinSplit, frame_ids: np.ndarray, image_size: int) -> str:
    """sha256 of what the cached arrays are a function of: format version, image size, frame ids and
    the content (zip CRC-32 + size) of every cached frame's images."""
    digest = hashlib.sha256()
    digest.update(f"vlaops-frame-cache-v{CACHE_FORMAT_VERSION}:{image_size}:".encode())
    digest.update(np.ascontiguousarray(frame_ids, dtype=np.int64).tobytes())
    for frame_id in frame_ids.tolist():
        digest.update(_image_member_digests(split.frame_path(frame_id)))
    return digest.hexdigest()


def _prefix(split: CalvinSplit, image_size: int) -> str:
    """Directory-name prefix of one split at one size: caches of other splits and sizes never collide."""
    where = hashlib.sha256(str(split.dir.resolve()).encode()).hexdigest()[:8]
    return f"{split.dir.name}-{where}-{image_size}px"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (created if absent), released on exit or process death."""
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


class FrameCache:
    """Read access to one built cache: ``window(first_row, n)`` -> two uint8 (n, 3, S, S) arrays.

    The arrays are memory-mapped at once (a mapping outlives the removal of its files by a later
    rebuild) and never pickled: a spawned DataLoader worker maps the same files again instead of
    receiving a copy, a forked one inherits the mapping.
    """

    def __init__(self, directory: Path, image_size: int, built: bool) -> None:
        self.dir = directory
        self.image_size = image_size
        self.built = built  # True when this process built it, False when an existing cache was reused
        self.frame_ids = np.load(directory / FRAME_IDS_FILE)  # (N,) int64, ascending
        self._arrays: dict[str, np.ndarray] | None = None
        self._open()

    def __len__(self) -> int:
        return len(self.frame_ids)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": None}  # reopened on first use in the receiving process

    def _open(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            # copy-on-write: slices are writable views (torch takes them without a copy), the file is never written
            self._arrays = {k: np.load(self.dir / f"{k}.npy", mmap_mode="c") for k in IMAGE_KEYS}
        return self._arrays

    def row(self, frame_id: int) -> int:
        """Row of ``frame_id``; rows of an annotated span are consecutive (its frame ids are)."""
        r = int(np.searchsorted(self.frame_ids, frame_id))
        if r >= len(self.frame_ids) or self.frame_ids[r] != frame_id:
            raise VlaopsError(f"{self.dir}: frame {frame_id} is not in the cache (not in an annotated span)")
        return r

    def window(self, first_row: int, n: int) -> dict[str, np.ndarray]:
        """Rows ``first_row .. first_row + n - 1`` of each camera: {key: uint8 (n, 3, S, S)}, views of the
        mapped files (the transforms read them once, into new float tensors)."""
        return {k: a[first_row : first_row + n] for k, a in self._open().items()}


def _build(split: CalvinSplit, frame_ids: np.ndarray, image_size: int, key: str, out: Path) -> None:
    """Decode, resize and pack ``frame_ids`` of ``split`` into ``out`` (an empty directory)."""
    n, s = len(frame_ids), image_size
    np.save(out / FRAME_IDS_FILE, frame_ids)
    arrays = {
        k: np.lib.format.open_memmap(out / f"{k}.npy", mode="w+", dtype=np.uint8, shape=(n, 3, s, s))  # (N, 3, S, S)
        for k in IMAGE_KEYS
    }
    with tqdm(total=n, desc=f"frame cache {split.dir.name}", unit="frame", disable=None, dynamic_ncols=True) as bar:
        for lo in range(0, n, BUILD_BATCH):
            ids = frame_ids[lo : lo + BUILD_BATCH].tolist()
            frames = [split.load_frame(i, IMAGE_KEYS) for i in ids]
            for k, array in arrays.items():
                raw = np.stack([f[k] for f in frames])  # (b, H, W, 3) uint8; VlaopsError if a frame lacks it
                array[lo : lo + len(ids)] = resize_uint8(torch.from_numpy(raw), s).numpy()
            bar.update(len(ids))
    for array in arrays.values():
        array.flush()
    del arrays
    meta = {
        "format_version": CACHE_FORMAT_VERSION,
        "key": key,
        "image_size": s,
        "frames": n,
        "split_dir": str(split.dir.resolve()),
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    for name in (FRAME_IDS_FILE, *(f"{k}.npy" for k in IMAGE_KEYS), META_FILE):
        _fsync(out / name)  # on disk before the rename publishes them, so a power cut cannot either


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_complete(directory: Path, key: str, image_size: int) -> bool:
    try:
        meta = json.loads((directory / META_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return (
        meta.get("format_version") == CACHE_FORMAT_VERSION
        and meta.get("key") == key
        and meta.get("image_size") == image_size
    )


def open_frame_cache(split: CalvinSplit, image_size: int, cache_dir: str | os.PathLike[str]) -> FrameCache:
    """The split's frame cache at ``image_size`` under ``cache_dir``: reused when its key matches the
    split's current content, else built once (atomically) and older caches of the split removed."""
    if image_size <= 0:
        raise VlaopsError(f"model.image_size must be > 0 for the frame cache, got {image_size}")
    root = Path(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    frame_ids = annotated_frame_ids(split)
    key = cache_key(split, frame_ids, image_size)
    prefix = _prefix(split, image_size)
    final = root / f"{prefix}-{key[:16]}"
    with _locked(root / f".{prefix}.lock"):
        if _is_complete(final, key, image_size):
            log.info("frame cache %s: reusing %d frames at %d px", final, len(frame_ids), image_size)
            return FrameCache(final, image_size, built=False)
        # under the lock no other process is building this prefix: any temporary left is a crashed build's
        for stale in root.glob(f".{prefix}-*.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():  # a directory without a matching stamp: never taken as whole, rebuilt
            log.warning("frame cache %s: incomplete or of another format, rebuilding", final)
            shutil.rmtree(final)
        log.info(
            "frame cache %s: building %d frames of %s at %d px (once per split content)",
            final,
            len(frame_ids),
            split.dir,
            image_size,
        )
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
        tmp.chmod(0o777 & ~current_umask())  # mkdtemp's 0700 would survive the rename: shared caches stay readable
        try:
            _build(split, frame_ids, image_size, key, tmp)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for old in root.glob(f"{prefix}-*"):  # superseded: the split's content changed since they were built
            if old != final and old.is_dir():
                log.info("frame cache %s: superseded, removed", old)
                shutil.rmtree(old, ignore_errors=True)
    return FrameCache(final, image_size, built=True)
