"""minillm.nn."""
