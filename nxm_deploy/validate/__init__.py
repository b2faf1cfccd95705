"""Validation: task metric and latency of dense vs sparse INT8, measured in one process, and the run report."""
