class LayerpruneError(Exception):
    """A problem with the user's input or environment.

    The app prints its message as one line and exits non-zero, without a traceback: the
    message must name the bad value and what is allowed instead.
    """
