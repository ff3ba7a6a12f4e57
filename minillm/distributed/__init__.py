"""minillm.distributed: everything that crosses processes, one job per module.

- ``comm.py``        the only file that imports mpi4py (lazily: importing minillm never starts MPI):
                     ``Comm`` over an MPI communicator, ``SerialComm`` for a world of one
- ``launch.py``      an error on any rank ends every rank (never a hang)
- ``topology.py``    the (dp, pp) grid of ranks and the pipeline partition
- ``grad_sync.py``   the gradient-sync interface (``GradSync``) and ``LocalSync``
- ``data_parallel.py``  ``DataParallel``: bucketed all-reduce overlapped with backward
- ``ring.py``        the hand-written ring all-reduce
- ``zero.py``        ZeRO-1: optimizer state sharded over data-parallel ranks
- ``pipeline_schedule.py``  pipeline schedules as pure step lists, and their simulator
- ``pipeline.py``    the pipeline engine that runs a schedule across stages
- ``timeline.py``    what a pipeline rank did during a step, for plots

Import the modules themselves (``from minillm.distributed.comm import get_world_comm``).
"""
