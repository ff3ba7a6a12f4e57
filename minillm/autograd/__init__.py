"""minillm.autograd."""
