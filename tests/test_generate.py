"""Batched generation: prompts of different lengths in one batch give, token for token, what each
gives alone (greedy, and seeded sampling with per-prompt seeds), also when rows join and leave a
running batch and when windows slide past block_size; the KV cache is allocated once; per-row
positions; top-p and stop strings."""
import numpy as np
import pytest

from minillm import backend, no_grad
from minillm.infer.generate import Batch, Sequence, SamplingParams, generate
from minillm.infer.text import TextStream
from minillm.model import GPT, GPTConfig, KVCache
from minillm.model.sampling import sample_next, top_p_filter

V = 40


def model_for(pos, seed=0):
    """A small GPT whose logits are spread out (token embeddings x8), so the most likely token
    is clear and greedy decoding compares tokens, not float rounding."""
    m = GPT(GPTConfig(vocab_size=V, block_size=16, n_layer=2, n_head=2, n_embd=32, pos=pos,
                      norm="rmsnorm" if pos == "rope" else "layernorm"), seed=seed)
    m.transformer.wte.weight.data *= 8
    return m.eval()


def prompts_of(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, V, n).tolist() for n in lengths]


LENGTHS = (3, 9, 1, 14, 22)   # block_size 16: the last prompt is cropped, all windows slide


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_batched_greedy_equals_one_prompt_at_a_time(pos):
    m = model_for(pos)
    prompts = prompts_of(LENGTHS)
    batched = generate(m, prompts, 24, temperature=0)
    for p, got in zip(prompts, batched):
        alone = m.generate([p], 24, temperature=0)[0, len(p):].tolist()   # GPT.generate, no batch
        assert got.tokens == alone and got.finish_reason == "length"
    # rows joining a running batch (two rows at a time; longer prompts shift the cache)
    assert [c.tokens for c in generate(m, prompts, 24, temperature=0, max_batch=2)] == \
        [c.tokens for c in batched]


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_batched_sampling_equals_single_with_the_same_seeds(pos):
    m = model_for(pos, seed=1)
    prompts = prompts_of(LENGTHS, seed=1)
    kw = dict(temperature=0.9, top_k=20, top_p=0.9)
    batched = generate(m, prompts, 20, seed=7, **kw)           # prompt i gets seed 7 + i
    for i, p in enumerate(prompts):
        assert batched[i].tokens == generate(m, [p], 20, seed=7 + i, **kw)[0].tokens
    # one prompt without top-p is exactly GPT.generate's seeded sampling
    one = generate(m, [prompts[1]], 20, seed=3, temperature=0.9, top_k=20)[0].tokens
    assert one == m.generate([prompts[1]], 20, temperature=0.9, top_k=20, seed=3)[0, 9:].tolist()
    assert generate(m, prompts, 20, seed=8, **kw)[0].tokens != batched[0].tokens


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_rows_joining_and_leaving_a_running_batch(pos, monkeypatch):
    """A server's batch: rows arrive while others decode (a longer prompt shifts the cache right,
    a shorter one is copied in right-aligned), finish at different times (the last row moves
    into the freed one), and free columns are dropped when the cache fills. Every row still gets
    exactly its one-prompt-at-a-time greedy tokens."""
    calls = []
    for name in ("shift", "write_rows", "move_row", "drop_front"):
        orig = getattr(KVCache, name)
        monkeypatch.setattr(KVCache, name, lambda self, *a, _o=orig, _n=name, **k:
                            (calls.append(_n), _o(self, *a, **k))[1])
    m = model_for(pos, seed=2)
    p = prompts_of((3, 9, 2, 5), seed=2)
    seqs = [Sequence(q, SamplingParams(max_new_tokens=n, temperature=0)) for q, n in zip(p, (6, 3, 12, 4))]
    batch = Batch(m, 3)
    batch.add(seqs[:1])             # 3 columns
    batch.step()
    batch.step()
    batch.add(seqs[1:2])            # 9 tokens > the 5 columns so far: shift right
    batch.step()
    batch.add(seqs[2:3])            # 2 tokens: copied in at the right
    while len(batch):
        batch.step()
        if batch.free and seqs[0].done and len(seqs[3].tokens) == 5:
            batch.add(seqs[3:])     # joins after the first one left
    # the 2-token row outlives the others: at 16 columns the ones before it are dropped
    for q, s in zip(p, seqs):
        n = s.params.max_new_tokens
        assert s.generated == m.generate([q], n, temperature=0)[0, len(q):].tolist(), (q, n)
    assert {"shift", "write_rows", "move_row", "drop_front"} <= set(calls), calls


def test_padded_rows_see_only_their_own_tokens():
    """Logits of a left-padded row equal those of the row alone (positions and mask per row)."""
    m = model_for("rope")
    short, long = prompts_of((4, 11))
    batch = Batch(m, 2)
    batch.add([Sequence(short, SamplingParams(temperature=0)), Sequence(long, SamplingParams(temperature=0))])
    with no_grad():
        alone = backend.to_numpy(m(np.array([short]))[0].data[0, -1])
        padded = backend.asarray(np.array([[0] * 7 + short, long]))
        valid = np.ones((2, 11), dtype=bool)
        valid[0, :7] = False
        pos = np.array([[0] * 7 + list(range(4)), list(range(11))])
        both = backend.to_numpy(m(padded, attn_mask=backend.asarray(valid[:, None, None, :]),
                                  positions=pos)[0].data[:, -1])
    np.testing.assert_allclose(both[0], alone, rtol=1e-5, atol=1e-5)
    assert batch.cache.length == 11 and batch.valid[0, :11].tolist() == [False] * 7 + [True] * 4


def test_kv_cache_is_allocated_once_and_written_in_place():
    m = model_for("learned")
    batch = Batch(m, 3)
    batch.add([Sequence(p, SamplingParams(max_new_tokens=10, temperature=0)) for p in prompts_of((2, 5))])
    buffers = [id(b) for b in batch.cache._k + batch.cache._v]
    nbytes = batch.cache.nbytes
    for _ in range(6):
        batch.step()
    batch.add([Sequence(prompts_of((3,))[0], SamplingParams(temperature=0))])  # a row joins
    batch.step()
    assert [id(b) for b in batch.cache._k + batch.cache._v] == buffers and batch.cache.nbytes == nbytes
    # (rows, nh, block_size, hs) per layer, keys and values, float32
    assert nbytes == 2 * 2 * 3 * 2 * 16 * 16 * 4
    assert batch.cache.k[0].shape == (3, 2, batch.cache.length, 16)


def test_kv_cache_rows_move_shift_and_drop():
    c = KVCache(1, capacity=6, rows=3)
    k = backend.asarray(np.arange(2 * 1 * 3 * 1, dtype=np.float32).reshape(2, 1, 3, 1))
    c.update(0, k, k)                                     # rows 0, 1 hold positions 0..2
    c.shift(2)                                            # room on the left: length 5
    assert c.length == 5 and backend.to_numpy(c.k[0])[:, 0, 2:, 0].tolist() == [[0, 1, 2], [3, 4, 5]]
    c.move_row(1, 0)
    assert backend.to_numpy(c.k[0])[0, 0, 2:, 0].tolist() == [3, 4, 5]
    c.drop_front(2)
    assert c.length == 3 and backend.to_numpy(c.k[0])[0, 0, :, 0].tolist() == [3, 4, 5]
    with pytest.raises(ValueError, match="capacity"):
        four = backend.asarray(np.zeros((2, 1, 4, 1), np.float32))    # 3 + 4 positions > 6
        c.update(0, four, four)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = np.array([[0.15, 0.5, 0.05, 0.3]])
    np.testing.assert_allclose(top_p_filter(probs, 0.8), [[0, 0.625, 0, 0.375]])
    np.testing.assert_allclose(top_p_filter(probs, 0.81), [[0.15 / 0.95, 0.5 / 0.95, 0, 0.3 / 0.95]])
    np.testing.assert_allclose(top_p_filter(probs, 0.1), [[0, 1, 0, 0]])   # the top token always
    rng = np.random.default_rng(0)
    logits = np.log(np.tile(probs, (2000, 1)))
    drawn = sample_next(logits, 1.0, None, rng, top_p=0.75)
    assert set(drawn.tolist()) == {1, 3} and abs((drawn == 1).mean() - 0.625) < 0.05


def test_text_stream_holds_back_possible_stop_strings():
    s = TextStream(lambda ids: "".join(chr(97 + i) for i in ids), stop=("cd", "x"))
    assert s.push(0) == "a" and s.push(1) == "b"
    assert s.push(2) == ""                    # "c" may start "cd"
    assert s.push(4) == "ce"                  # it did not
    assert s.push(2) == "" and s.push(3) == "" and s.stopped and s.text == "abce"
    t = TextStream(lambda ids: bytes(ids).decode("utf-8", errors="replace"))
    assert [t.push(b) for b in "é!".encode()] == ["", "é", "!"]    # a split UTF-8 character


def test_text_stream_decodes_new_tokens_only_and_equals_the_whole_decode():
    """A push decodes the ids after the last whole character, not the whole answer again (the
    server pays this per token per row); the streamed text is still exactly the whole decode."""
    sizes = []

    def decode(ids):
        sizes.append(len(ids))
        return bytes(ids).decode("utf-8", errors="replace")
    data = "héllo wörld ✓ ".encode() + b"\x80\xff" + "bye €".encode()
    t = TextStream(decode)
    streamed = "".join(t.push(b) for b in data) + t.finish()
    assert streamed == t.text == data.decode("utf-8", errors="replace")
    assert sum(sizes) <= 4 * len(data)   # whole decodes each time would be len * (len + 1) / 2


def test_stop_strings_end_a_row_early():
    from minillm.data import CharTokenizer
    tok = CharTokenizer.train("".join(chr(60 + i) for i in range(V)))   # "<" .. "c"
    m = model_for("learned")
    prompts = ["abc", "ABCDEFG"]
    full = generate(m, prompts, 20, temperature=0, tokenizer=tok)
    stop = full[0].text[3:5]
    got = generate(m, prompts, 20, temperature=0, tokenizer=tok, stop=[stop])
    assert got[0].finish_reason == "stop" and got[0].text == full[0].text[:full[0].text.index(stop)]
    assert len(got[0].tokens) <= 5
    if stop not in full[1].text:
        assert got[1].text == full[1].text and got[1].finish_reason == "length"


def test_bad_sampling_arguments():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)
    with pytest.raises(ValueError, match="decode"):
        Sequence([1], SamplingParams(stop=("x",)))
