"""The errors a user can act on (a bad config value, unreadable data, a damaged checkpoint, a
workdir in use, a run that diverged). `launch.py` and `probe.py` print them as one message
without a traceback (`--verbose` or SCOTT_JAX_VERBOSE=1 shows it); anything else is a bug and
keeps its traceback."""


class UserError(Exception):
    """Base of the errors whose message says all a user needs."""


class ConfigError(UserError, ValueError):
    """A config value out of its range, or settings that do not fit together."""


class DataError(UserError, ValueError):
    """A dataset that cannot be read, or that changed under a run."""


class MissingDataError(DataError, FileNotFoundError):
    """A dataset folder or file that is not there."""


class CheckpointError(UserError, ValueError):
    """No checkpoint, or none that can be read and verified."""


class MissingCheckpointError(CheckpointError, FileNotFoundError):
    """The workdir or the asked step has no checkpoint."""


class LockError(UserError, RuntimeError):
    """The workdir is held by another run."""


class DivergedError(UserError, FloatingPointError):
    """The loss or the training state became non-finite; nothing non-finite was saved."""
