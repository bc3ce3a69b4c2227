"""Benchmarks: each module prints ratios against a peer measured in the same run and ends with one key=value line;
run from the repository root as `python -m bench.<name>` (`make bench` runs them all). Shared timing and reporting:
`bench/harness.py`."""
