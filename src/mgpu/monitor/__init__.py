"""Monitoring: per-rank step timings, device telemetry, the imbalance warning, the live view."""
