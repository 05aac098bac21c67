"""Start modelcast services as real processes: shared by the tests, the benchmarks and the demo."""

from .procs import ServiceProcess, free_port, modelcast_argv

__all__ = ["ServiceProcess", "free_port", "modelcast_argv"]
