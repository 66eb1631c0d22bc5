"""The one exception type whose message is meant for the user.

Commands raise `LongVAError("what is wrong; how to fix it")`; the CLI prints the message
as one line on stderr and exits non-zero, without a traceback.
"""


class LongVAError(Exception):
    """A problem with the user's input or environment, explained in one sentence."""

    exit_code = 1
