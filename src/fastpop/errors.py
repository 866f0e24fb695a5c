"""The one error type that the CLI turns into a one-line message and exit status 2."""


class UsageError(ValueError):
    """Bad input from the user: a config value, a path, a data file, a run directory."""


class ResourceError(RuntimeError):
    """The machine ran out of something (memory) mid-run; the CLI prints one line and exits 1."""


def shown(value, limit: int = 80) -> str:
    """A user's value as an error message shows it: its repr when short, else what it is (type, dtype and
    shape, or length); never a whole array or object, which would bury the one line under pages."""
    if hasattr(value, "shape") and hasattr(value, "dtype"):  # numpy, torch
        return f"<{type(value).__name__} {value.dtype} {list(value.shape)}>"
    text = repr(value)
    if isinstance(value, str):  # paths may be long and are worth seeing whole
        return text if len(text) <= 4 * limit else repr(value[: 4 * limit - 5]) + "..."
    if len(text) <= limit:
        return text
    size = f" of {len(value)}" if hasattr(value, "__len__") else ""
    return f"<{type(value).__name__}{size}>"
