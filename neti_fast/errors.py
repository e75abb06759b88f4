"""One exception type for everything a user can get wrong.

The CLI prints a NetiError as a single line (no traceback) and exits with status 2; anything
else is a bug and keeps its traceback.

A problem with one request setting carries it as `field` (the engine's name for it: "truncation",
"prompt", "negative_prompt", "height", "width", "concept", ...) and `value`, with a message that
names neither, so that each front end names the setting its own way: the CLI as its flag
(`--truncation 9999: must be between 1 and 128`), a job file as its key, the server as the JSON
field of its error. The check itself lives in one place (engine/request.py).
"""

_NO_VALUE = object()


class NetiError(Exception):
    """A user-facing error. The message names the file or argument and what is wrong with it."""

    def __init__(self, message: str, *, field: str | None = None, value=_NO_VALUE):
        super().__init__(message)
        self.message, self.field, self.value = message, field, value

    def detail(self) -> str:
        """The message with the value (if any) in front: what follows the field's name."""
        if self.value is _NO_VALUE:
            return self.message
        v = repr(self.value) if isinstance(self.value, str) else str(self.value)
        return f"{v}: {self.message}"

    def render(self, name: str | None = None) -> str:
        """One line naming the field as `name` (a flag, a key; default: the field itself)."""
        if self.field is None:
            return self.message
        sep = " " if self.value is not _NO_VALUE else ": "
        return f"{name or self.field}{sep}{self.detail()}"

    def __str__(self) -> str:
        return self.render()
