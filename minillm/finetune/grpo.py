"""Reinforcement learning on a verifiable task: REINFORCE with a group baseline (GRPO-style).

SFT shows the model the right answer. Here the model answers by itself and only learns whether it
was right: for each prompt it samples a group of G answers, each gets reward 1 for an exact match
and 0 otherwise, and an answer's advantage is its reward minus the group's mean, divided by the
group's standard deviation::

    A_i = (r_i - mean(r)) / (std(r) + eps)          loss = -sum_i A_i log p(answer_i) / tokens

Better-than-the-group answers are made likelier, worse ones less likely; a group whose answers all
score alike (all right, or all wrong) teaches nothing. Sampling and updating use the same weights
(one update per batch, on-policy), so the ratio clipping and KL penalty of PPO/GRPO are not needed.
It starts from a fine-tuned chat model (``minillm finetune`` first: a model that never answers
right gets no signal) and runs in the Finetuner's loop and run directory.
"""
import numpy

import minillm.functional as F
from minillm import backend
from minillm.data.chat import END
from minillm.errors import UserError
from minillm.finetune.loop import Finetuner
from minillm.optim import get_lr
from minillm.train.update import apply_update


def exact_match(got, answer) -> float:
    """The verifiable reward: 1 when the sampled ids (through <|end|>) are the answer's."""
    return float(got == answer)


class GroupRL(Finetuner):
    """``Finetuner`` whose step samples answers and weights them by their group advantage.
    ``reward(sampled ids, reference ids) -> float`` defaults to exact_match."""

    def __init__(self, ckpt, opts, overrides=(), log=print, group=8, prompts=16, temperature=1.0,
                 reward=None):
        super().__init__(ckpt, opts, overrides, log)
        self.reward = reward or exact_match
        if group < 2 or prompts < 1 or temperature <= 0:
            raise UserError(f"GRPO needs --group >= 2 (got {group}), --prompts >= 1 (got {prompts}) and "
                            f"--temperature > 0 (got {temperature})")
        if self.lora is None and self.report["share"] < 1.0:
            raise UserError("GRPO: the model has frozen parameters but no adapters")
        self.group, self.prompts, self.temperature = group, prompts, temperature
        self.end = self.tok.token_id(END)

    def _question(self, ex):
        """(prompt ids up to <|assistant|>, reference answer ids before <|end|>) of an example."""
        first = int(numpy.argmax(ex.train))                  # the first answer's first token
        end = first + int(numpy.argmax(ex.ids[first:] == self.end))
        return ex.ids[:first], [int(i) for i in ex.ids[first:end]]

    def sample(self, step):
        """Rows (x, y, weights) of this step's sampled answers and their mean reward."""
        rng = numpy.random.default_rng([self.cfg.train.seed, step])
        picks = rng.choice(len(self.train_ex), self.prompts, replace=False)
        seqs, rewards = [], []
        for k, i in enumerate(picks):
            prompt, answer = self._question(self.train_ex[int(i)])
            out = self.model.generate(numpy.repeat(prompt[None], self.group, 0), len(answer) + 2,
                                      temperature=self.temperature, seed=int(rng.integers(2**31)))
            group = []
            for row in out[:, len(prompt):].tolist():
                got = row[:row.index(self.end) + 1] if self.end in row else row
                group.append(float(self.reward(got, answer + [self.end])))
                seqs.append((prompt, got))
            rewards.append(group)
        r = numpy.asarray(rewards)                           # (prompts, group)
        adv = (r - r.mean(1, keepdims=True)) / (r.std(1, keepdims=True) + 1e-6)
        L = max(len(p) + len(a) for p, a in seqs) - 1
        x = numpy.zeros((len(seqs), L), numpy.int64)
        y = numpy.full((len(seqs), L), -1, numpy.int64)
        w = numpy.zeros((len(seqs), L))
        for n, ((p, a), A) in enumerate(zip(seqs, adv.reshape(-1))):
            s = list(p) + a
            x[n, :len(s) - 1] = s[:-1]
            y[n, len(p) - 1:len(s) - 1] = a                  # only the sampled answer is scored
            w[n, len(p) - 1:len(s) - 1] = A
        return x, y, w, float(r.mean())

    def train_step(self):
        t = self.cfg.train
        lr = get_lr(self.step, t)
        x, y, w, reward = self.sample(self.step)
        keep = numpy.flatnonzero((w != 0).any(1))            # rows with an advantage
        loss_value, n_tok = 0.0, int((y[keep] >= 0).sum())
        if keep.size:
            with self.precision.quiet():
                logits, _ = self.model(backend.asarray(x[keep]))
                logp = F.log_softmax(logits)                                         # (R, L, V)
                r, c = numpy.nonzero(y[keep] >= 0)
                picked = logp[backend.asarray(r), backend.asarray(c), backend.asarray(y[keep][r, c])]  # (N,)
                weights = backend.asarray((w[keep][r, c] / n_tok).astype("float32"))
                loss = -(picked * weights).sum()
                self.precision.scale_loss(loss).backward()
                found_inf = self.precision.grads_to_master()
            grad_norm = apply_update(self.precision, self.optimizer, lr, t.grad_clip, found_inf)
            loss_value, grad_norm = backend.fetch(loss.data, grad_norm)
        else:
            grad_norm = 0.0
            self.optimizer.zero_grad()
        self.model.zero_grad()
        self.last_reward = reward
        return loss_value, lr, grad_norm, n_tok

    def step_metrics(self):
        return {"reward": self.last_reward}
