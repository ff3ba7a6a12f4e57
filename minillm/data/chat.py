"""The chat template: conversations -> token ids plus a loss mask, with role special tokens.

A conversation is a list of messages ``{"role": "system" | "user" | "assistant", "content": str}``.
Each message becomes its role token, its content (encoded by the base tokenizer, never as special
tokens: user text cannot forge a role marker) and an end token::

    <|user|>12+34=<|end|><|assistant|>46<|end|>

The model learns to answer, not to ask: the loss mask is True only on the tokens of assistant
contents and on their end token (so the model learns to stop). A prompt for generation is the
conversation so far plus ``<|assistant|>``; generation stops at ``<|end|>``.
"""
from __future__ import annotations

import json
from pathlib import Path

from minillm.data.tokenizers import AddedTokens
from minillm.errors import UserError

SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
TEMPLATE_TOKENS = (SYSTEM, USER, ASSISTANT, END)
ROLES = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}


def chat_tokenizer(tok) -> AddedTokens:
    """``tok`` with the template's tokens added after its vocabulary (those it lacks)."""
    have = tok.added if isinstance(tok, AddedTokens) else []
    return AddedTokens(tok, [t for t in TEMPLATE_TOKENS if t not in have])


def has_template(tok) -> bool:
    return isinstance(tok, AddedTokens) and all(t in tok.ids for t in TEMPLATE_TOKENS)


def require_template(tok, where: str) -> None:
    if not has_template(tok):
        have = tok.added if isinstance(tok, AddedTokens) else []
        missing = [t for t in TEMPLATE_TOKENS if t not in have]
        raise UserError(f"{where}: the tokenizer has no chat template tokens ({', '.join(missing)}); "
                        f"use a checkpoint made by `minillm finetune`, or plain prompts")


def encode_chat(tok, messages, where="chat") -> tuple[list, list]:
    """(ids, train): token ids of the conversation and, per token, whether the loss counts it."""
    require_template(tok, where)
    end = tok.token_id(END)
    ids, train = [], []
    for m in messages:
        try:
            content = tok.encode_plain(m["content"])
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
        is_answer = m["role"] == "assistant"
        ids += [tok.token_id(ROLES[m["role"]])] + content + [end]
        train += [False] + [is_answer] * (len(content) + 1)
    return ids, train


def prompt_ids(tok, messages, where="prompt") -> list:
    """The ids that ask the model for the next assistant message."""
    ids, _ = encode_chat(tok, messages, where)
    return ids + [tok.token_id(ASSISTANT)]


def render(messages) -> str:
    """The conversation as text, role tokens spelled out (what the model sees, for reading)."""
    return "".join(f"{ROLES[m['role']]}{m['content']}{END}" for m in messages)


def row_messages(row, where: str) -> list:
    """The messages of one JSONL row: ``{"messages": [...]}`` or ``{"prompt", "completion"}``."""
    if isinstance(row, dict) and "messages" in row:
        msgs = row["messages"]
    elif isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
        msgs = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
    else:
        keys = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise UserError(f"{where}: expected 'messages' (a list of {{role, content}}) or 'prompt' and "
                        f"'completion' (strings); the row has {keys}")
    if not isinstance(msgs, list) or not msgs:
        raise UserError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    for i, m in enumerate(msgs):
        if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
            raise UserError(f"{where}: message {i} must be {{\"role\": one of {', '.join(ROLES)}, "
                            f"\"content\": a string}}, got {json.dumps(m)[:80]}")
    if not any(m["role"] == "assistant" for m in msgs):
        raise UserError(f"{where}: no assistant message, so nothing to learn; add one")
    return msgs


def read_jsonl(path) -> list:
    """(where, row) for every non-blank line of a JSONL file; ``where`` names file and line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such JSONL file")
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append((f"{path} line {n}", json.loads(line)))
                except ValueError as e:
                    raise UserError(f"{path} line {n}: not valid JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 ({e.reason} at byte {e.start}); save it as UTF-8") from None
    if not rows:
        raise UserError(f"{path} is empty; it needs one JSON object per line")
    return rows
