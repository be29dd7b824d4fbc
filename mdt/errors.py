"""The one exception type for mistakes a user can make and fix."""


class UserError(Exception):
    """A problem with the user's input, stated in one sentence that names the input and the fix.

    The CLI prints the message (no traceback) and exits with status 2.
    """
