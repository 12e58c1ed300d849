"""The one exception type for bad input from the user."""


class UserInputError(ValueError):
    """A path, file or option the user gave is wrong.

    The message names the input and what was expected; the CLI prints it as one line, without a
    traceback, because the fix is on the user's side, not in the code.
    """
