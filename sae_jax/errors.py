"""The one exception type users see.

Every error caused by user input (a config key, a file, a shape) is raised as `UserError`
so the CLI can print it as a single line and exit non-zero, while genuine bugs keep their
tracebacks.
"""


class UserError(Exception):
    """Bad input from the user: printed as one line by the CLI, exit status 2."""


class Preempted(Exception):
    """A command stopped on SIGTERM, leaving nothing half-done: training after saving a
    checkpoint (rerunning resumes it), an import after removing what it wrote."""
