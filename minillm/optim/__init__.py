"""minillm.optim."""
