"""Tools around the pipeline: throughput benchmarks, the FLOP counter, presets, the parameters page."""
