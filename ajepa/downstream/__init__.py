"""Downstream evaluation: fine-tuning, linear probes and their metrics."""
