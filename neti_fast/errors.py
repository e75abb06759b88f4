"""One exception type for everything a user can get wrong.

The CLI prints a NetiError as a single line (no traceback) and exits with status 2; anything
else is a bug and keeps its traceback.
"""


class NetiError(Exception):
    """A user-facing error. The message names the file or argument and what is wrong with it."""
