"""The one exception type users see.

Every error caused by user input (a config key, a file, a shape) is raised as `UserError`
so the CLI can print it as a single line and exit non-zero, while genuine bugs keep their
tracebacks.
"""


class UserError(Exception):
    """Bad input from the user: printed as one line by the CLI, exit status 2."""


class Failed(Exception):
    """A check that ran and said no (`verify`, `gate`): the CLI prints `result` as its JSON
    line as usual, then the message, and exits 1, so a pipeline can tell "failed" from
    "bad input" (2)."""

    def __init__(self, message: str, result: dict):
        super().__init__(message)
        self.result = result


class Preempted(Exception):
    """A command stopped on SIGTERM, leaving nothing half-done: training after saving a
    checkpoint (rerunning resumes it), an import after removing what it wrote."""


def disk_full(error: BaseException) -> str | None:
    """The message of a full-disk error anywhere in `error`'s chain (an OSError ENOSPC, or
    tensorstore/Orbax wrapping one as RESOURCE_EXHAUSTED), else None.

    A full disk is the environment, not a bug: the CLI reports it in one line, where the
    libraries would print hundreds of lines of wrapped tracebacks."""
    import errno

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return f"no space left on device{f': {error.filename}' if error.filename else ''}"
        text = str(error)
        if "No space left on device" in text or "ENOSPC" in text:
            first = next((ln for ln in text.splitlines() if "No space left" in ln), text)
            return f"no space left on device ({first.strip()[:300]})"
        error = error.__cause__ or error.__context__
    return None
