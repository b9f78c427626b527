"""slinfer's benchmarks (`make bench` runs bench/run_all.py)."""
