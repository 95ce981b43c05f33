"""The one exception type the CLI turns into a one-line message and a non-zero exit code."""


class FerkitError(Exception):
    """A problem the user can fix (bad path, bad file, bad option). Its message is one line."""

    exit_code = 2
