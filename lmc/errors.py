"""Errors shown to users: one line saying what is wrong and what to do."""


class LmcError(Exception):
    """A user-facing error; the CLI prints its message and exits with status 1."""


class WorkspaceError(LmcError):
    """A workspace is missing, damaged, or of an unknown format version."""


def one_line(error: BaseException) -> str:
    """A library exception's message on one line, to quote inside an LmcError (many span several lines)."""
    return " ".join(str(error).split())
