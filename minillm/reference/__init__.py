"""Optional references for benchmarks and comparison tests (PyTorch); never imported by training."""
