"""Errors a user can fix. The CLI prints the one-line message and exits with code 2."""


class UserError(Exception):
    """Bad input: a missing path, a model that does not fit, a ratio out of range, ...

    The message is one line that says what is wrong and what to do.
    """
