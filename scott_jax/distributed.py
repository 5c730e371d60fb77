"""Multi-host runs on JAX's own distributed runtime: one process per host (a TPU pod slice,
a SLURM job, an MPI launch, or processes started by hand), each feeding its slice of every
global batch; checkpoints are written collectively by orbax.

`initialize` must run before JAX touches a device: `launch.py` and `probe.py` call it first.
"""

import logging
import os

import jax

log = logging.getLogger(__name__)

#: Environment variables whose value > 1 says this process is one of several that JAX's
#: `jax.distributed.initialize()` finds on its own (SLURM, Open MPI, a TPU pod slice).
CLUSTER_SIZES = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def detected_cluster() -> bool:
    """True when the environment is one multi-process job that JAX can initialise alone."""
    for name in CLUSTER_SIZES:
        if int(os.environ.get(name, "1") or "1") > 1:
            return True
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return len([h for h in hosts.split(",") if h]) > 1


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Joins this process to the job: explicitly (`coordinator` 'host:port', `num_processes`,
    `process_id`, all three) or as the cluster environment says; a single process does
    nothing. On CPU the processes' collectives go through gloo."""
    explicit = (coordinator, num_processes, process_id)
    if any(x is not None for x in explicit) and not all(x is not None for x in explicit):
        raise ValueError("--coordinator, --num_processes and --process_id go together")
    if coordinator is None and not detected_cluster():
        return
    if os.environ.get("JAX_PLATFORMS", "").split(",")[0] == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator is None:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
    log.info("Process %d of %d joined the job.", jax.process_index(), jax.process_count())
