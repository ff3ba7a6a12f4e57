"""Supervised fine-tuning and LoRA: the chat template and its loss mask (prompt tokens get no
gradient), packing with document masks, vocabulary growth, LoRA merge == unmerged forward, a LoRA
run that changes no base parameter, adapter files, and every kind of bad input (one line, exit 2)."""
import json
from pathlib import Path

import numpy as np
import pytest

import minillm.functional as F
from minillm import backend
from minillm.autograd.tensor import Tensor, no_grad
from minillm.checkpoint import load_checkpoint
from minillm.config import load_config
from minillm.data import load_tokenizer
from minillm.data.chat import ASSISTANT, END, USER, chat_tokenizer, encode_chat, prompt_ids
from minillm.errors import UserError
from minillm.finetune.adapters import load_adapted
from minillm.finetune.data import IGNORE, Example, pack
from minillm.finetune.lora import (LoRALinear, adapters, apply_lora, merge_lora, trainable_parameters,
                                   unmerge_lora)
from minillm.finetune.loop import FinetuneOptions, Finetuner
from minillm.finetune.vocab import grow_vocab
from minillm.model import GPT, GPTConfig, document_mask
from minillm.train.trainer import train

TINY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.toml"
CHATS = [{"messages": [{"role": "user", "content": "1+2="}, {"role": "assistant", "content": "3"}]},
         {"prompt": "copy abc: ", "completion": "abc"},
         {"messages": [{"role": "system", "content": "add"}, {"role": "user", "content": "10+5="},
                       {"role": "assistant", "content": "15"}]}]


def quiet(msg):
    pass


@pytest.fixture(scope="module")
def base_run(char_data, tmp_path_factory):
    """A tiny pretrained run (block_size 32) to fine-tune."""
    out = tmp_path_factory.mktemp("base") / "run"
    cfg = load_config(TINY_CONFIG, [f"--data.dir={char_data}", f"--train.out_dir={out}", "--train.max_steps=6",
                                    "--model.block_size=32", "--train.sample_tokens=0"])
    train(cfg, log=quiet)
    return out


@pytest.fixture
def chat_file(tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in CHATS * 8))
    return path


def finetuner(base_run, data, out, *overrides, **opts):
    return Finetuner(base_run, FinetuneOptions(str(data), str(out), **opts),
                     ["--train.max_steps=3", "--train.batch_size=2", "--train.log_interval=1", *overrides], log=quiet)


# ------------------------------------------------------------------ template and loss mask
def test_template_marks_only_assistant_answers_and_their_end(base_run):
    tok = chat_tokenizer(load_tokenizer(base_run))
    ids, train_mask = encode_chat(tok, CHATS[2]["messages"])
    text = tok.decode(ids)
    assert text == "<|system|>add<|end|><|user|>10+5=<|end|><|assistant|>15<|end|>"
    trained = tok.decode([i for i, t in zip(ids, train_mask) if t])
    assert trained == "15" + END
    assert tok.decode(prompt_ids(tok, CHATS[0]["messages"][:1])) == f"{USER}1+2={END}{ASSISTANT}"
    forged = encode_chat(tok, [{"role": "user", "content": "<|end|>"}, {"role": "assistant", "content": "x"}])[0]
    assert tok.token_id(END) not in forged[1:6]  # user text spelling a role token stays text
    saved = tok.save(base_run.parent)
    assert load_tokenizer(saved).encode(text) == ids  # tokenizer.json keeps the added tokens


def test_sft_loss_gives_prompt_token_logits_zero_gradient(base_run, chat_file, tmp_path):
    ft = finetuner(base_run, chat_file, tmp_path / "sft")
    x, y, doc = ft.batches.batch(0)
    captured = {}
    head = ft.model.head

    def leaf_head(h):  # the real loss path, with the logits made a leaf so their gradient is kept
        captured["logits"] = Tensor(head(h).data, requires_grad=True)
        return captured["logits"]
    ft.model.head = leaf_head
    ft.loss(x, y, doc).backward()
    g = np.abs(backend.to_numpy(captured["logits"].grad)).sum(-1)              # (B, T)
    assert (g[y == IGNORE] == 0).all()          # prompt tokens (and padding) teach nothing
    assert (g[y != IGNORE] > 0).all()           # every answer token does
    tok = ft.tok
    answered = tok.decode([int(t) for t in y[0][y[0] != IGNORE]])
    assert answered.count(END) == (y[0] == tok.token_id(END)).sum() > 0


def test_packed_rows_with_document_mask_equal_each_example_alone():
    # rope: attention depends on relative positions only, so packing must change nothing
    model = GPT(GPTConfig(vocab_size=20, block_size=24, n_layer=2, n_head=2, n_embd=16, pos="rope"), seed=0)
    rng = np.random.default_rng(0)
    exs = [Example(rng.integers(0, 20, n), rng.random(n) < 0.5) for n in (7, 9, 5)]
    for e in exs:
        e.train[-1] = True
    x, y, doc = pack(exs, 24)
    assert x.shape == (1, 24) and (doc[0, :18] == np.repeat([0, 1, 2], [6, 8, 4])).all() and (doc[0, 18:] == -1).all()
    with no_grad():
        packed = model(x, y, attn_mask=document_mask(doc))[1]
        alone = [model(e.inputs[None], e.targets[None])[1] for e in exs]
    counts = [(e.targets != IGNORE).sum() for e in exs]
    expected = sum(float(a.data) * c for a, c in zip(alone, counts)) / sum(counts)
    assert float(packed.data) == pytest.approx(expected, rel=1e-5)
    one_per_row = pack(exs, 24, pack=False)[0]
    assert one_per_row.shape == (3, 24)


def test_grow_vocab_keeps_every_old_logit(base_run):
    from minillm.train.inference import load_model
    model, _, _ = load_model(base_run)
    idx = np.arange(10)[None]
    with no_grad():
        before = model(idx)[0].numpy()
        grow_vocab(model, 4, seed=0)
        after = model(idx)[0].numpy()
    assert after.shape[-1] == before.shape[-1] + 4 and model.config.vocab_size == before.shape[-1] + 4
    np.testing.assert_allclose(after[..., :-4], before, rtol=1e-6, atol=1e-7)  # a wider GEMM may round differently


# ------------------------------------------------------------------ LoRA
@pytest.mark.parametrize("bias,frozen", [(True, False), (False, True)])
def test_fused_lora_linear_gradcheck_against_the_formula(bias, frozen):
    from minillm.autograd.gradcheck import gradcheck
    rng = np.random.default_rng(3)
    x, w, b, a, bm = (rng.standard_normal(s) for s in ((2, 3, 5), (4, 5), (4,), (2, 5), (4, 2)))
    t = [Tensor(backend.asarray(v.copy()), requires_grad=not (frozen and i in (1, 2))) for i, v in enumerate((x, w, b, a, bm))]
    fn = lambda x_, w_, b_, a_, bm_: F.lora_linear(x_, w_, b_ if bias else None, a_, bm_, 1.5)  # noqa: E731
    assert gradcheck(fn, t).ok
    want = x @ w.T + (b if bias else 0) + 1.5 * (x @ a.T) @ bm.T
    np.testing.assert_allclose(fn(*[Tensor(backend.asarray(v)) for v in (x, w, b, a, bm)]).numpy(), want, rtol=1e-12)
    if frozen:
        assert t[1].grad is None and t[2].grad is None


def test_head_over_new_token_rows_gradchecks_and_equals_the_plain_linear():
    """The head of a fine-tune that adds tokens: gradients for x and the new rows only (checked
    against central differences), and the output bit for bit the Linear over the whole table."""
    from minillm.autograd.gradcheck import gradcheck
    from minillm.finetune.lora import NewRowsLinear
    rng = np.random.default_rng(4)
    x, old, new = (backend.asarray(rng.standard_normal(s)) for s in ((2, 3, 5), (6, 5), (2, 5)))
    t = [Tensor(x, requires_grad=True), Tensor(new, requires_grad=True)]
    assert gradcheck(lambda x_, n_: NewRowsLinear.apply(x_, n_, frozen=old), t).ok
    table = Tensor(backend.asarray(np.concatenate([backend.to_numpy(old), backend.to_numpy(new)])))
    np.testing.assert_array_equal(NewRowsLinear.apply(Tensor(x), Tensor(new), frozen=old).numpy(),
                                  F.linear(Tensor(x), table).numpy())


def test_lora_starts_as_the_base_and_merged_equals_unmerged():
    model = GPT(GPTConfig(vocab_size=17, block_size=8, n_layer=2, n_head=2, n_embd=16, mlp="swiglu"), seed=0)
    idx = backend.asarray(np.random.default_rng(1).integers(0, 17, (2, 8)))
    with no_grad():
        base = model(idx)[0].numpy()
    names = apply_lora(model, ["c_attn", "mlp.c_gate", "mlp.c_proj"], rank=4, seed=0, new_tokens_from=15)
    assert names == [f"transformer.h.{i}.{n}" for i in range(2) for n in ("attn.c_attn", "mlp.c_gate", "mlp.c_proj")]
    with no_grad():
        np.testing.assert_array_equal(model(idx)[0].numpy(), base)          # B = 0: no change at the start
    rng = np.random.default_rng(2)
    for m in adapters(model).values():
        if isinstance(m, LoRALinear):
            m.lora_B.data[...] = backend.asarray(rng.standard_normal(m.lora_B.shape).astype(np.float32) * 0.1)
    weights = {n: backend.to_numpy(p.data).copy() for n, p in model.named_parameters()}
    with no_grad():
        unmerged = model(idx)[0].numpy()
        merge_lora(model)
        merged = model(idx)[0].numpy()
    assert np.abs(unmerged - base).max() > 1e-3
    np.testing.assert_allclose(merged, unmerged, rtol=1e-5, atol=1e-5)
    unmerge_lora(model)
    for n, p in model.named_parameters():
        np.testing.assert_allclose(backend.to_numpy(p.data), weights[n], atol=1e-6, err_msg=n)


def test_lora_run_changes_no_base_parameter_and_saves_adapters_alone(base_run, chat_file, tmp_path):
    ft = finetuner(base_run, chat_file, tmp_path / "lora", lora_rank=2, lora_targets="c_attn,mlp.c_fc")
    base = load_checkpoint(sorted(base_run.glob("ckpt_*.h5"))[-1])["model"]
    trainable = {n for n, _ in trainable_parameters(ft.model)}
    assert trainable == set(ft.optimizer.names) == {n for n in trainable if "lora_" in n or n.endswith("new_rows")}
    assert set(ft.optimizer.state) == trainable                 # no optimizer state for the base
    summary = ft.run()
    assert summary["trainable_share"] < 0.2
    for n, p in ft.model.named_parameters():
        if n in trainable:
            continue
        assert p.grad is None, n                                  # frozen: never a gradient
        want = base[n]
        if n == "transformer.wte.weight":                         # old rows untouched, new rows appended
            np.testing.assert_array_equal(backend.to_numpy(p.data)[:want.shape[0]], want)
        else:
            np.testing.assert_array_equal(backend.to_numpy(p.data), want, err_msg=n)
    moved = [n for n, p in trainable_parameters(ft.model) if "lora_B" in n and np.abs(backend.to_numpy(p.data)).max() > 0]
    assert moved, "the adapters trained"
    adapter = Path(summary["checkpoint"])
    saved = load_checkpoint(adapter)
    assert set(saved["adapters"]) == trainable
    assert saved["meta"]["base_checkpoint"] == str(sorted(base_run.glob("ckpt_*.h5"))[-1].resolve())
    assert adapter.stat().st_size < sorted(base_run.glob("ckpt_*.h5"))[-1].stat().st_size
    loaded, _, tok = load_adapted(adapter)                        # base + adapters, merged
    x = backend.asarray(ft.batches.batch(0)[0])
    with no_grad():
        ft.model.eval()
        np.testing.assert_allclose(loaded(x)[0].numpy(), ft.model(x)[0].numpy(), rtol=1e-4, atol=1e-5)
    assert tok.vocab_size == loaded.config.vocab_size


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("row,words", [({"text": "hi"}, "line 3: expected 'messages'"),
                                       ({"messages": [{"role": "bot", "content": "x"}]}, "line 3: message 0"),
                                       ({"prompt": "1+1=", "completion": "é"}, "line 3: prompt contains characters"),
                                       ({"prompt": "1+1=" * 20, "completion": "2"}, "line 3: the chat is")])
def test_bad_rows_are_named_by_line(base_run, tmp_path, row, words):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(CHATS[0]) + "\n\n" + json.dumps(row) + "\n")
    with pytest.raises(UserError, match=words):
        finetuner(base_run, path, tmp_path / "x")


def test_lora_target_that_does_not_exist(base_run, chat_file, tmp_path):
    with pytest.raises(UserError, match="LoRA target 'c_atn' names no Linear layer"):
        finetuner(base_run, chat_file, tmp_path / "x", lora_rank=2, lora_targets="c_atn")


def test_finetune_and_eval_from_the_command_line(base_run, chat_file, tmp_path, minillm_cli):
    r = minillm_cli("finetune", base_run, "--data", chat_file, "--out", tmp_path / "sft", "--train.max_steps=2",
                    "--train.batch_size=2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "trainable" in r.stdout and (tmp_path / "sft" / "ckpt_0000002.h5").is_file()
    info = json.loads((tmp_path / "sft" / "finetune.json").read_text())
    assert Path(info["base_checkpoint"]).parent == base_run.resolve()
    r = minillm_cli("sample", tmp_path / "sft", "--prompt", "<|user|>1+2=<|end|><|assistant|>",
                    "--max-new-tokens", "3", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = minillm_cli("finetune", base_run, "--data", chat_file, "--out", tmp_path / "lora", "--lora-rank", "2",
                    "--train.max_steps=2", "--train.batch_size=2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = minillm_cli("eval", tmp_path / "lora", "--task", "add2", "--n", "5", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "lora_0000002.h5" in r.stdout and "format chat" in r.stdout


@pytest.mark.parametrize("args,words", [(("--data", "none.jsonl"), "none.jsonl: no such file"),
                                        (("--lora-rank", "2", "--lora-targets", "mlp.c_fx"), "LoRA target 'mlp.c_fx'"),
                                        (("--model.n_layer=3",), "--train.key=value overrides only"),
                                        (("--lora-rank", "-1"), "--lora-rank=-1 must be >= 0"),
                                        (("--parallel.tp=2",), "--parallel.tp=2: minillm finetune runs in one process"),
                                        (("--parallel.dp=2", "--parallel.zero=2"), "--parallel.dp=2: minillm finetune"),
                                        (("--lora-rank", "2", "--parallel.zero=1"), "--parallel.zero=1: minillm finetune"),
                                        (("--train.memory_limit=1GiB",), "--train.memory_limit: the memory ledger")])
def test_finetune_command_errors_are_one_line(base_run, chat_file, tmp_path, capsys, args, words):
    from minillm.cli import main
    code = main(["finetune", str(base_run), "--data", str(chat_file), "--out", str(tmp_path / "bad"), *args])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and words in err, err


def test_adapters_refuse_a_missing_or_changed_base(base_run, chat_file, tmp_path):
    import shutil
    base = tmp_path / "base" / "ckpt.h5"
    base.parent.mkdir()
    shutil.copy(sorted(base_run.glob("ckpt_*.h5"))[-1], base)
    shutil.copy(base_run / "tokenizer.json", base.parent / "tokenizer.json")
    adapter = Path(finetuner(base, chat_file, tmp_path / "lora", lora_rank=2).run()["checkpoint"])
    load_adapted(adapter)                                   # the same base: fine
    with open(base, "ab") as f:
        f.write(b"\0")                                      # the base changed after training
    with pytest.raises(UserError, match="changed since the adapters were trained"):
        load_adapted(adapter)
    base.unlink()
    with pytest.raises(UserError, match="its base checkpoint .* is missing"):
        load_adapted(adapter)


def test_grpo_step_climbs_the_advantage_weighted_log_likelihood(base_run, chat_file, tmp_path):
    from minillm.finetune.grpo import GroupRL
    # a verifiable reward with variance even for a barely trained model: "answer with an even token"
    rl = GroupRL(base_run, FinetuneOptions(str(chat_file), str(tmp_path / "rl")),
                 ["--train.max_steps=1", "--train.lr=1e-3", "--train.warmup_steps=0"], log=quiet,
                 group=4, prompts=4, reward=lambda got, answer: float(got[0] % 2 == 0))
    x, y, w, mean_reward = rl.sample(0)
    assert 0 < mean_reward < 1
    assert not ((w != 0) & (y < 0)).any()                         # weights only where an answer is scored
    adv = np.array([row[y_row >= 0][0] for row, y_row in zip(w, y)]).reshape(4, 4)   # one per answer
    assert np.allclose(adv.sum(1), 0, atol=1e-5)                  # the group mean is the baseline

    def objective():  # sum_i A_i log p(answer_i): what a GRPO step should raise
        with no_grad():
            logp = backend.to_numpy(F.log_softmax(rl.model(x)[0]).data)
        r, c = np.nonzero(y >= 0)
        return float((logp[r, c, y[r, c]] * w[r, c]).sum())
    before = objective()
    rl.train_step()                                               # samples step 0 again: the same answers
    assert objective() > before


@pytest.mark.parametrize("layout", [{"tp": 2, "sp": True}, {"dp": 2, "zero": 2}])
def test_a_base_trained_in_parallel_fine_tunes_serially(base_run, chat_file, tmp_path, layout):
    """Checkpoints are in the serial format whatever layout wrote them: the fine-tune drops the
    base's [parallel] section (and its run dir records the serial one) instead of crashing."""
    from minillm.checkpoint import save_checkpoint
    state = load_checkpoint(sorted(base_run.glob("ckpt_*.h5"))[-1], exclude=("optimizer",))
    state["config"]["parallel"].update(layout)
    base = tmp_path / "base" / "ckpt_0000006.h5"
    base.parent.mkdir()
    save_checkpoint(base, state)
    (base.parent / "tokenizer.json").write_bytes((base_run / "tokenizer.json").read_bytes())
    ft = finetuner(base, chat_file, tmp_path / "lora", lora_rank=2)
    assert ft.cfg.parallel.tp == ft.cfg.parallel.dp == 1 and ft.cfg.parallel.zero == 0
    ft.run()
    assert load_config(tmp_path / "lora" / "config.toml").parallel.tp == 1


def test_finetune_under_mpirun_is_one_line_on_every_rank(base_run, chat_file, tmp_path):
    from mpi_util import run_mpi
    r = run_mpi(2, ["-m", "minillm", "finetune", str(base_run), "--data", str(chat_file), "--out",
                    str(tmp_path / "ft"), "--train.max_steps=1"], timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.count("error: minillm finetune runs in one process") == 1, r.stderr
    assert not (tmp_path / "ft").exists()


@pytest.mark.parametrize("lora_rank", [0, 2])
def test_recomputation_changes_no_bit_of_a_fine_tune(base_run, chat_file, tmp_path, lora_rank):
    runs = {mode: finetuner(base_run, chat_file, tmp_path / mode, f"--train.recompute={mode}", "--train.max_steps=2",
                            lora_rank=lora_rank) for mode in ("none", "full")}
    from minillm.autograd.checkpoint import Checkpoint
    from minillm.autograd.tensor import topological_order
    for mode, ft in runs.items():  # "full" replays every block (LoRA layers inside) in backward
        loss = ft.loss(*ft.batches.batch(0))
        regions = [n for n in topological_order(loss) if n._ctx is not None and n._ctx.fn is Checkpoint]
        assert len(regions) == (ft.cfg.model.n_layer if mode == "full" else 0)
    losses = {mode: [ft.train_step()[0] for _ in range(2)] for mode, ft in runs.items()}
    assert losses["none"] == losses["full"]
    for (n, a), (_, b) in zip(runs["none"].precision.master_params, runs["full"].precision.master_params):
        assert np.array_equal(backend.to_numpy(a.data), backend.to_numpy(b.data)), n


def test_a_fine_tune_never_mixes_into_another_run(base_run, chat_file, tmp_path, capsys):
    """The output directory belongs to one run: a second fine-tune there is a one-line error that
    loses nothing; --overwrite replaces the first run's files (checkpoint, adapters, metrics)."""
    from minillm.cli import main
    out = tmp_path / "ft"
    args = ["finetune", str(base_run), "--data", str(chat_file), "--out", str(out), "--train.batch_size=2"]
    assert main([*args, "--lora-rank", "2", "--train.max_steps=2"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != "run.lock"}
    capsys.readouterr()
    assert main([*args, "--train.max_steps=1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already holds a run" in err and "--overwrite" in err, err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name in before} == before
    assert main([*args, "--train.max_steps=1", "--overwrite"]) == 0
    assert not list(out.glob("lora_*.h5")) and (out / "ckpt_0000001.h5").is_file()
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]


def test_the_model_loads_on_the_device_the_overrides_name(base_run, chat_file, tmp_path, monkeypatch):
    """--train.device beats MINILLM_DEVICE for fine-tuning too: the base model is loaded on the
    device it trains on (before, it was loaded where MINILLM_DEVICE said, and the override came
    too late)."""
    from minillm import backend
    from minillm.cli import main
    before = backend.device()
    monkeypatch.setenv("MINILLM_DEVICE", "gpu" if before == "cpu" else "cpu")
    try:
        code = main(["finetune", str(base_run), "--data", str(chat_file), "--out", str(tmp_path / "ft"),
                     "--train.batch_size=2", "--train.max_steps=1", f"--train.device={before}"])
        assert code == 0 and backend.device() == before
    finally:
        backend.set_device(before)
