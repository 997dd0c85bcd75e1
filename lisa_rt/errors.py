"""The one base class for errors a user can cause (bad path, bad config, bad flag).

The command line turns these into a single `error: ...` line and exit code 2; anything else
is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """An error caused by the user's input, with a message fit to show as is."""
