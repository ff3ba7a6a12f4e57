"""Reference solutions, lesson 13."""
import numpy as np


def sft_targets(ids, train):
    ids, train = np.asarray(ids), np.asarray(train)
    return np.where(train[1:], ids[1:], -100)


def lora_forward(x, W, b, A, B, alpha):
    return x @ W.T + b + (alpha / A.shape[0]) * (x @ A.T) @ B.T


def pick_choice(logprobs, byte_lengths):
    return int(np.argmax(np.asarray(logprobs) / np.asarray(byte_lengths)))
