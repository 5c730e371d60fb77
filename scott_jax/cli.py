"""What `launch.py` and `probe.py` share: errors a user can act on as one message, and the
exit codes a job scheduler reads.

Exit codes: 0 finished; 2 a `UserError` (bad config, data, checkpoint, locked workdir, a
diverged run), printed as one message without a traceback (`--verbose` or
SCOTT_JAX_VERBOSE=1 shows it); 128 + N stopped by signal N after saving a checkpoint (143
SIGTERM, 130 SIGINT, 129 SIGHUP), so a retry loop tells "interrupted" from "done"; 1 any
other error (a bug), with its traceback.
"""

import functools
import os
import signal
import sys
from collections.abc import Callable

from absl import flags

from scott_jax.errors import UserError

EXIT_USER_ERROR = 2
flags.DEFINE_bool("verbose", False, "Show the traceback of configuration and data errors.")
flags.DEFINE_string("coordinator", None, "Multi-process runs: host:port of process 0.")
flags.DEFINE_integer("num_processes", None, "Multi-process runs: how many processes.")
flags.DEFINE_integer("process_id", None, "Multi-process runs: this process's index.")


def join_job() -> None:
    """`distributed.initialize` from the flags or the cluster's environment (before JAX is
    used)."""
    from scott_jax import distributed

    f = flags.FLAGS
    distributed.initialize(f.coordinator, f.num_processes, f.process_id)


def interrupted_exit_code(signum: signal.Signals) -> int:
    """The shell's code for a process ended by `signum`: 128 + N."""
    return 128 + int(signum)


def verbose() -> bool:
    return flags.FLAGS.verbose or os.environ.get("SCOTT_JAX_VERBOSE", "") not in ("", "0")


def reporting_errors(main: Callable) -> Callable:
    """`main(argv)` that turns a UserError into one line on stderr and exit code 2."""

    @functools.wraps(main)
    def wrapped(argv):
        try:
            return main(argv)
        except UserError as e:
            if verbose():
                raise
            print(f"error: {e}", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)

    return wrapped
