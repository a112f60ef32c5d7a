class CogtuneError(Exception):
    """An error the user can fix. The CLI prints its message as one line and exits non-zero."""
