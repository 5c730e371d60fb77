"""Train a run: `python launch.py --config configs/flowers.py --workdir runs/flowers`.

The one loop (`scott_jax.loop.train_and_evaluate`) runs `config.method`: 'mim_jepa'
(configs/flowers.py, ...), 'ijepa', 'moca', 'splitmask' (configs/*_<method>.py) or
'supervised' (configs/*_supervised.py, the from-scratch baselines).

Any config field can be overridden with a dotted flag, e.g. `--config.optim.lr_peak=1e-4` or
`--config.variant=scott-7/16`; a misspelt field is an error. Re-running the same command on
the same workdir resumes from its latest checkpoint. Exit codes: 0 finished, 2 a config,
data, checkpoint or lock error (one message; `--verbose` for the traceback), 128 + N
stopped by signal N after saving (143 SIGTERM, 130 Ctrl-C, 129 SIGHUP).
"""

import logging
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from scott_jax import cli

config_flags.DEFINE_config_file(
    "config", None, "Config file (a get_config() module).", lock_config=True
)
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics.jsonl, TensorBoard.")
flags.mark_flags_as_required(["config", "workdir"])


@cli.reporting_errors
def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from scott_jax.loop import train_and_evaluate

    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax's INFO lines are noise here
    logging.getLogger("scott_jax").setLevel(logging.INFO)
    cli.join_job()
    outcome = train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
    if outcome.interrupted is not None:
        return cli.interrupted_exit_code(outcome.interrupted)
    return 0


if __name__ == "__main__":
    app.run(main)
