"""User-facing errors: a mistake in input or configuration, reported in one line with exit code 2."""


class UserError(Exception):
    """A mistake the user can fix (bad config, missing data, bad checkpoint).

    The CLI prints ``error: <message>`` on one line and exits with code 2; no traceback.
    The message should say what to change.
    """


class ConfigError(UserError, ValueError):
    """An invalid configuration value or key."""
