"""The one exception type the CLI turns into a one-line message and a non-zero exit code."""


class FerkitError(Exception):
    """A problem the user can fix (bad path, bad file, bad option). Its message is one line."""

    exit_code = 2


class Terminated(KeyboardInterrupt):
    """`kill` (SIGTERM) during a ferkit command: handled as Ctrl-C is, so that the same clean-up runs."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none."""
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def on_one_line(text: str) -> str:
    """`text` with its line breaks shown as \\n: a file's name may hold one, and a message stays one line."""
    return text.replace("\r", "\\r").replace("\n", "\\n")
