"""User-facing errors: a mistake in input or configuration, reported in one line with exit code 2."""


class UserError(Exception):
    """A mistake the user can fix (bad config, missing data, bad checkpoint).

    The CLI prints ``error: <message>`` on one line and exits with code 2; no traceback.
    The message should say what to change. ``on_every_rank``: every rank of an MPI job raises
    this same error at the same point (a decision broadcast from rank 0), so rank 0 alone
    prints it and every rank simply exits; otherwise the CLI ends the job with MPI_Abort.
    """

    on_every_rank = False

    @classmethod
    def everywhere(cls, message: str) -> "UserError":
        e = cls(message)
        e.on_every_rank = True
        return e


class ConfigError(UserError, ValueError):
    """An invalid configuration value or key."""
