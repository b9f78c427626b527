"""slinfer's programs: the `slinfer` command (main.py) and its subcommands: wait-ready and hold (readiness.py),
the admin commands (admin.py) and doctor (doctor.py)."""
