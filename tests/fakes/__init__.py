"""Test doubles, each named for what it stands in for: kube.py (a FAKE Kubernetes API server), kuberecorder.py
(a recording API server for the official client's exact requests), slurm_double.py (an in-memory SlurmClient),
slurmbed.py (helpers that drive the real Slurm test bed)."""
