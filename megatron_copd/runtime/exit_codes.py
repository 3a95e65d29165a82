"""Process exit statuses that launchers and sbatch scripts act on.

``EXIT_REQUEUE``: the job stopped on purpose after a preemption / time-limit signal
(SIGTERM or SIGUSR1) with its state in a complete checkpoint; the sbatch script should requeue it
(``scontrol requeue $SLURM_JOB_ID``) and the next start resumes from ``latest``. Distinct from 0
(finished), 1 (crash), 2 (user error, see ``megatron_copd.cli``) and the 128+N statuses of
processes killed by a signal.
"""

EXIT_OK = 0
EXIT_REQUEUE = 3
