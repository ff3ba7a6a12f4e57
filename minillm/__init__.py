"""minillm: train a GPT from scratch, with every piece of the pipeline written out to read."""
__version__ = "0.1.0"
