"""Performance tooling: FLOP counts and MFU (flops.py), ``minillm bench`` (bench.py), the per-op
profiler (profiler.py) and host-allocator tuning (allocator.py)."""
