"""Reference solutions, lesson 03."""


def char_codec(text):
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    return (lambda s: [stoi[c] for c in s]), (lambda ids: "".join(chars[i] for i in ids))


def most_frequent_pair(words):
    counts = {}
    for word, n in words.items():
        for pair in zip(word, word[1:]):
            counts[pair] = counts.get(pair, 0) + n
    return min(counts, key=lambda p: (-counts[p], p))   # highest count, then the smallest pair


def merge(ids, pair, new_id):
    out, skip = [], False
    for i, token in enumerate(ids):
        if skip:                                 # the second half of a pair just merged
            skip = False
        elif tuple(ids[i:i + 2]) == tuple(pair):
            out.append(new_id)
            skip = True
        else:
            out.append(token)
    return out
