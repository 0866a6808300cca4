"""Conversations with real-shaped lengths, for benchmarks: ``python -m lft.bench.conversations``.

Chat training sets run from a few dozen to a few thousand tokens per row, with most rows a few
hundred long and a long tail; the embedded task's rows are short and nearly equal. This writes
multi-turn support-style conversations whose lengths follow that shape: the number of exchanges
(1 to 6) and the length of each answer are drawn from seeded distributions (answers log-normal,
so a few are long), and about a third of the rows start with a system prompt. With the defaults
(400 rows, seed 0) rows run from 54 to 2,272 tokens, median 294 and mean 386, in SmolLM2's
tokenizer with its chat template.

Rows are conversational prompt/completion pairs: the conversation up to the last answer, then the
last answer, which is what is trained. The same seed always writes the same file.

``--pairs`` writes preference rows instead: the same conversations, the last answer chosen and a
shorter, vaguer one rejected. ``sized`` (used by ``python -m lft.bench --sweep-length``) writes
rows of one length in tokens, for measuring cost against sequence length.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path
from typing import Any

TOPICS = (
    "an order that has not arrived",
    "a refund for a damaged lamp",
    "resetting a forgotten password",
    "changing the delivery address",
    "a charge that appears twice",
    "upgrading a subscription",
    "a printer that will not connect",
    "exporting data to a spreadsheet",
    "a coupon that was rejected",
    "moving an appointment",
    "setting up two-factor sign-in",
    "a missing invoice",
)
SYSTEMS = (
    "You are a patient support agent. Answer clearly and ask for details when you need them.",
    "You help customers of an online shop. Be brief, friendly and exact.",
    "You are the help desk of a software company. Give numbered steps when a task has several.",
)
OPENERS = (
    "Hello, I need help with {topic}.",
    "Hi there. I have a question about {topic}.",
    "Good morning, could you help me with {topic}?",
    "I am writing about {topic}.",
)
FOLLOW_UPS = (
    "Thanks. What should I do next?",
    "I tried that, but it did not work.",
    "How long will that take?",
    "Is there anything else I need to check?",
    "Can you explain the second step again?",
    "Could you send me a summary of what we agreed?",
)
WORDS = (
    "please check the account settings and confirm the details shown on the order page before you continue "
    "the system usually updates within a few minutes after the change is saved and you will receive an email "
    "with the reference number if the problem remains open the ticket and attach a screenshot of the message "
    "our team reviews every request in the order it arrives and replies as soon as the cause is clear"
).split()


def answer(rng: random.Random, words: int) -> str:
    """A plausible support answer of about ``words`` words, in sentences."""
    out, sentence = [], []
    for _ in range(words):
        sentence.append(rng.choice(WORDS))
        if len(sentence) >= rng.randint(8, 18):
            out.append(" ".join(sentence).capitalize() + ".")
            sentence = []
    if sentence:
        out.append(" ".join(sentence).capitalize() + ".")
    return " ".join(out)


def conversation(rng: random.Random) -> dict:
    messages = []
    if rng.random() < 0.35:
        messages.append({"role": "system", "content": rng.choice(SYSTEMS)})
    exchanges = min(6, 1 + int(rng.expovariate(0.7)))
    topic = rng.choice(TOPICS)
    for turn in range(exchanges):
        question = rng.choice(OPENERS).format(topic=topic) if turn == 0 else rng.choice(FOLLOW_UPS)
        messages.append({"role": "user", "content": question})
        # answers: log-normal, median about 100 words, a long tail to over a thousand
        words = max(4, min(1200, int(math.exp(rng.gauss(math.log(100), 0.9)))))
        messages.append({"role": "assistant", "content": answer(rng, words)})
    return {"prompt": messages[:-1], "completion": messages[-1:]}


def pair(rng: random.Random) -> dict:
    """A preference row: the conversation's last answer chosen, a vague short one rejected."""
    row = conversation(rng)
    vague = answer(rng, max(4, len(row["completion"][0]["content"].split()) // 4))
    return {
        "prompt": row["prompt"],
        "chosen": row["completion"],
        "rejected": [{"role": "assistant", "content": "I am not sure. " + vague}],
    }


def write(path: Path, rows: int = 400, seed: int = 0, pairs: bool = False) -> Path:
    rng = random.Random(seed)
    make = pair if pairs else conversation
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(make(rng)) + "\n" for _ in range(rows)), encoding="utf-8")
    return path


def sized(path: Path, tokenizer: Any, length: int, rows: int = 32, seed: int = 0) -> Path:
    """Rows of ``length`` tokens each (within a few, in ``tokenizer``'s chat template): exchanges
    are added until the conversation is long enough, then the last answer is cut to fit."""
    rng = random.Random(seed)

    def tokens(messages: list) -> int:
        return len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False))

    out = []
    for _ in range(rows):
        messages: list = [{"role": "system", "content": rng.choice(SYSTEMS)}]
        topic = rng.choice(TOPICS)
        while True:
            first = len(messages) == 1
            question = rng.choice(OPENERS).format(topic=topic) if first else rng.choice(FOLLOW_UPS)
            text = answer(rng, max(4, int(math.exp(rng.gauss(math.log(100), 0.9)))))
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": text}]
            if tokens(messages) >= length:
                break
        while True:
            words = messages[-1]["content"].split()
            low, high = 1, len(words)  # the most words of the last answer that still fit
            while low < high:
                mid = (low + high + 1) // 2
                messages[-1]["content"] = " ".join(words[:mid])
                low, high = (mid, high) if tokens(messages) <= length else (low, mid - 1)
            messages[-1]["content"] = " ".join(words[:low])
            if tokens(messages) <= length or len(messages) <= 3:
                break
            messages = messages[:-2]  # its question alone overflows: cut the answer before it instead
        out.append({"prompt": messages[:-1], "completion": messages[-1:]})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in out), encoding="utf-8")
    return path


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m lft.bench.conversations", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pairs", action="store_true", help="preference rows (prompt, chosen, rejected)")
    parser.add_argument("--out", default="bench-results/conversations.jsonl")
    args = parser.parse_args()
    print(write(Path(args.out), args.rows, args.seed, args.pairs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
