"""The benchmark's machinery (`examples/benchmark.py`): pools, methods, report. Not part of the library."""
