"""One exception type for problems a user can fix; the CLI prints its message on one line."""


class SPOError(Exception):
    """A user-facing error: the message says what is wrong and how to fix it."""
