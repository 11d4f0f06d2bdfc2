"""bitbench: the benchmark suite (data, model registry, training, launching, report, perf)."""
