"""The one exception type a user sees: it names the file or key and what was expected."""


class VlaopsError(Exception):
    """A problem with the user's input, config or data; the CLI prints it as one line and exits 1."""
