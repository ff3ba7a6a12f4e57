"""minillm.data."""
