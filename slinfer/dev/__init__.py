"""Developer tools: the local Slurm bed behind `slinfer dev-cluster` (devcluster.py) and the tiny model maker
(tinymodel.py)."""
