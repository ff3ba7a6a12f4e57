"""`python -m minillm ...` (what mpirun launches: mpirun -np N python -m mpi4py -m minillm train ...)."""
import sys

from minillm.cli import main

sys.exit(main())
