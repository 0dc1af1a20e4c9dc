"""User-facing errors: one line naming the problem and the fix; the CLI prints them and exits 2."""


class UserError(RuntimeError):
    """Bad input or configuration. The message is one line: the problem, then the fix."""
