"""minillm.checkpoint."""
