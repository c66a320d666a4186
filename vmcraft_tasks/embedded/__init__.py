"""A private fleet on one machine: its own redis-server and local workers, started and
stopped by id. Used by `vmcraft-tasks run` without a broker, by the demo, the tests and
the benchmarks."""
