"""The one error type a person can fix: the CLI prints its message, not a traceback."""


class UserError(Exception):
    """Bad settings, missing topics, unreachable broker, missing system library..."""
