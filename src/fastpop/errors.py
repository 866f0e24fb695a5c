"""The one error type that the CLI turns into a one-line message and exit status 2."""


class UsageError(ValueError):
    """Bad input from the user: a config value, a path, a data file, a run directory."""


class ResourceError(RuntimeError):
    """The machine ran out of something (memory) mid-run; the CLI prints one line and exits 1."""
