"""Evaluation harness (``minillm eval RUN|CKPT --task NAME``): text metrics (loss, perplexity,
bits per byte), multiple choice by length-normalised log-likelihood, exact-match generation,
and built-in tasks that need no download. See tasks.py for the tasks, scoring.py for the math."""
from minillm.evals.runner import load_for_eval, results_table, run_task, write_results
from minillm.evals.scoring import bits_per_byte, continuation_logprobs, greedy_answers, text_loss
from minillm.evals.tasks import BUILTIN, Task, load_task, train_rows

__all__ = ["load_for_eval", "results_table", "run_task", "write_results", "bits_per_byte",
           "continuation_logprobs", "greedy_answers", "text_loss", "BUILTIN", "Task", "load_task",
           "train_rows"]
