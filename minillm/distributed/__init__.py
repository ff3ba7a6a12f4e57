"""minillm.distributed."""
