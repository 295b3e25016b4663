"""The one exception type a user sees: it names the file or key and what was expected."""


class VlaopsError(Exception):
    """A problem with the user's input, config or data; the CLI prints it as one line and exits 1."""


class Terminated(BaseException):
    """SIGTERM arrived (a cancelled CI job, ``docker stop``, a killed DVC experiment).

    A BaseException like KeyboardInterrupt (SIGINT), so ``except Exception`` blocks do not swallow it
    and every ``finally`` and context manager on the way out runs: temporaries are removed and the
    MLflow run is closed as KILLED. ``vlaops.cli`` installs the handler that raises it.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum
