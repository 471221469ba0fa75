"""The one exception type users see: a single clear line, no traceback."""


class MedimgenError(Exception):
    """An error caused by the user's input or environment.

    The CLI prints ``str(error)`` as one line and exits with status 2; nothing
    already written is lost or overwritten.
    """
