"""Profiling sweeps behind the ``fastattn-bench`` command (see :mod:`fastattn.bench.cli`)."""
