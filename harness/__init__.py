"""Start modelcast services as real processes and wait on conditions: shared by the tests, the
benchmarks, the demo and serve_glue.testing."""

from .procs import ServiceProcess, free_port, modelcast_argv
from .starters import NodeProcess, TrackerProcess, hostport, start_node, start_tracker
from .wait import wait_until, wait_until_async

__all__ = ["NodeProcess", "ServiceProcess", "TrackerProcess", "free_port", "hostport", "modelcast_argv",
           "start_node", "start_tracker", "wait_until", "wait_until_async"]
