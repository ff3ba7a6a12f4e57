"""Training: the loop (trainer.py), engines, metrics, FLOP counting, plots, inference helpers."""
