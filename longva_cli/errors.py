"""The one exception type whose message is meant for the user.

Commands raise `LongVAError("what is wrong; how to fix it")`; the CLI prints the message
as one line on stderr and exits non-zero, without a traceback.
"""


class LongVAError(Exception):
    """A problem with the user's input or environment, explained in one sentence."""

    exit_code = 1


class Interrupted(LongVAError):
    """Ctrl-C: the message says what was kept and the command that continues the work.

    Exits with 130 (128 + SIGINT), as shells report a process stopped by Ctrl-C.
    """

    exit_code = 130
