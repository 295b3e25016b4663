"""The one exception type a user sees: it names the file or key and what was expected."""

from __future__ import annotations

import re


class VlaopsError(Exception):
    """A problem with the user's input, config or data; the CLI prints it as one line and exits 1."""


class RecordingError(VlaopsError):
    """One recording (or one episode of it) is unusable: ingest quarantines it or stops with this line.

    Besides the one-line message (``<recording>: <reason>``) it carries the parts the quarantine report
    lists, so a person can find the bad data and the summary can count reasons: ``recording`` (the file or
    bag directory as the user named it, never a temporary path), ``episode`` (the episode id or the
    key of one episode in a multi-episode file), ``stream`` (the topic or HDF5 key at fault) and ``check``
    (a short, stable name of what failed, e.g. ``non_finite``, ``joint_limits``, ``unreadable``).
    """

    def __init__(
        self, recording: str, reason: str, *, check: str, stream: str | None = None, episode: str | None = None
    ) -> None:
        reason = " ".join(reason.split())  # one line, even when a library's message spans several (YAML errors)
        # and the same line in every run: a library's repr of an object names its address (PIL did)
        reason = re.sub(r" at 0x[0-9a-fA-F]+", "", reason)
        super().__init__(f"{recording}: {reason}")
        self.recording, self.reason, self.check, self.stream, self.episode = recording, reason, check, stream, episode

    def __reduce__(self):  # picklable, so a worker process can hand it back (kw-only args defeat the default)
        return _recording_error, (self.recording, self.reason, self.check, self.stream, self.episode)


def _recording_error(
    recording: str, reason: str, check: str, stream: str | None, episode: str | None
) -> RecordingError:
    return RecordingError(recording, reason, check=check, stream=stream, episode=episode)


class Terminated(BaseException):
    """SIGTERM arrived (a cancelled CI job, ``docker stop``, a killed DVC experiment).

    A BaseException like KeyboardInterrupt (SIGINT), so ``except Exception`` blocks do not swallow it
    and every ``finally`` and context manager on the way out runs: temporaries are removed and the
    MLflow run is closed as KILLED. ``vlaops.cli`` installs the handler that raises it.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum
