"""Frozen-feature probes on a pretraining run: `python probe.py --workdir runs/flowers`.

Reads the run's checkpoint (the method's default encoder, e.g. MIM-JEPA's context encoder;
`--config.encoder=target` for the EMA one, `--config.encoder=random` for the random-init
baseline: the run's architecture with its step-0 weights, results in WORKDIR/probe_random/),
trains the linear and attentive probes of the paper's evaluation (Appendix E) with the
official recipe, prints a table and writes WORKDIR/probe/results.json.
`--config` defaults to configs/probe.py; any field can be overridden with a dotted flag, e.g.
`--config.num_epochs=10`.
"""

import logging
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from scott_jax import cli

config_flags.DEFINE_config_file(
    "config",
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "probe.py"),
    "Probe config file (a get_config() module).",
    lock_config=True,
)
flags.DEFINE_string("workdir", None, "The pretraining run's directory (launch.py --workdir).")
flags.mark_flags_as_required(["workdir"])


@cli.reporting_errors
def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from scott_jax.evaluators.probes import format_table, run_probes

    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax's INFO lines are noise here
    logging.getLogger("scott_jax").setLevel(logging.INFO)
    cli.join_job()
    print(format_table(run_probes(flags.FLAGS.config, flags.FLAGS.workdir)))


if __name__ == "__main__":
    app.run(main)
