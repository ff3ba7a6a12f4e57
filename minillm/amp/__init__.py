"""minillm.amp."""
