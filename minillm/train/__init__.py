"""minillm.train."""
