"""minillm.distributed: MPI communication, the ring all-reduce, data and pipeline parallelism, ZeRO-1.

``comm.py`` is the only file that imports mpi4py (lazily: importing minillm never starts MPI).
"""
from minillm.distributed.comm import (Comm, Request, SerialComm, get_world_comm, mpi_available,
                                      require_mpi, wait_all)
from minillm.distributed.launch import exit_with_error, install_abort_handler
from minillm.distributed.data_parallel import DataParallel
from minillm.distributed.pipeline import PipelineEngine
from minillm.distributed.ring import ring_allreduce_
from minillm.distributed.topology import Topology, make_topology
from minillm.distributed.zero import ShardLayout, ZeroAdamW, ZeroSync, optimizer_state_nbytes

__all__ = [
    "Comm", "SerialComm", "Request", "wait_all", "get_world_comm", "mpi_available", "require_mpi",
    "install_abort_handler", "exit_with_error", "ring_allreduce_", "DataParallel",
    "PipelineEngine", "Topology", "make_topology", "ShardLayout", "ZeroAdamW", "ZeroSync",
    "optimizer_state_nbytes",
]
