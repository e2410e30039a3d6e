"""Deterministic benchmark datasets: realistic-looking preference pairs of varied length, in two shapes.

- ``answer`` (answer-heavy, :func:`make_pairs`): a user question about a topic, sometimes preceded by a
  few sentences of context, with a chosen answer (on topic, structured, polite) and a rejected one
  (vaguer, sometimes off topic or curt). Lengths are drawn from skewed distributions, as in real
  preference data: most answers are a few sentences, a few are long.
- ``prompt`` (prompt-heavy, :func:`make_prompt_heavy_pairs`): the shape of summarisation, RAG and
  multi-turn data: a ~150-token prompt (forum notes on a topic, then a question) shared by a chosen and a
  rejected answer of ~20 tokens each (one sentence).

The same seed gives byte-identical files everywhere.

    python benchmarks/data.py --pairs 128 --out /tmp/bench.jsonl                   # answer-heavy, chat messages
    python benchmarks/data.py --pairs 128 --out /tmp/bench.jsonl --standard        # plain prompt/chosen/rejected
    python benchmarks/data.py --pairs 128 --out /tmp/bench.jsonl --shape prompt    # prompt-heavy
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

TOPICS = [
    ("sourdough bread", "baking"), ("a vegetable garden", "gardening"), ("a first marathon", "running"),
    ("Python virtual environments", "programming"), ("a used car", "buying"), ("the French Revolution", "history"),
    ("photosynthesis", "biology"), ("compound interest", "personal finance"), ("a job interview", "careers"),
    ("learning the guitar", "music"), ("a rainy weekend in Lisbon", "travel"), ("houseplants in winter", "gardening"),
    ("SQL joins", "programming"), ("a leaking tap", "home repair"), ("black holes", "astronomy"),
    ("a birthday party for a six-year-old", "planning"), ("sleep hygiene", "health"), ("git rebase", "programming"),
    ("a budget for a student", "personal finance"), ("the water cycle", "earth science"),
    ("a cover letter", "careers"), ("training a puppy", "pets"), ("a chess opening", "games"),
    ("solar panels on a house", "energy"), ("the causes of inflation", "economics"), ("a week of meal prep", "cooking"),
    ("unit tests", "programming"), ("a camping trip", "outdoors"), ("public speaking", "communication"),
    ("the Roman aqueducts", "history"), ("a small business website", "marketing"), ("composting", "gardening"),
]
ASKS = [
    "Can you explain {topic} to me?", "What should I know about {topic}?", "How do I get started with {topic}?",
    "I'm confused about {topic}. Where do I begin?", "Give me practical advice on {topic}.",
    "What are the most common mistakes people make with {topic}?",
    "Could you walk me through {topic} step by step?", "Is {topic} worth the effort? Please explain.",
]
CONTEXT = [
    "I have been reading about {field} for a few weeks, but most sources assume a lot of background.",
    "My friend recommended I look into {topic}, and I would like to understand it properly.",
    "I only have a couple of hours each weekend, so I need something realistic.",
    "Last time I tried, it went badly and I am not sure what I did wrong.",
    "I prefer concrete examples over theory, if possible.",
    "Budget matters to me, so cheaper options are better.",
    "I am writing a short report on {field} and want to get the basics right.",
    "English is not my first language, so please keep the wording simple.",
    "Please assume I know nothing about {field} yet.",
]
GOOD = [
    "A good way to think about {topic} is to start from the goal and work backwards.",
    "First, set aside some time to learn the vocabulary of {field}, because everything else builds on it.",
    "Second, practise on a small example before committing to anything large or expensive.",
    "Many beginners try to do everything at once; with {topic} it pays to change one thing at a time.",
    "Keep notes as you go, so that you can see what worked and what did not.",
    "If something fails, check the simplest explanation first before assuming a deep problem.",
    "For example, people who succeed with {topic} usually follow a routine rather than relying on motivation.",
    "It also helps to ask someone with experience in {field} to look at your first attempt.",
    "Expect the first result to be imperfect; the second and third attempts improve quickly.",
    "Finally, review your progress after a few weeks and adjust the plan to what you have learned.",
    "The key trade-off is between speed and reliability, and most people underestimate the value of reliability.",
    "A reasonable budget of time is about an hour a week at first, rising as the habit forms.",
    "Books and free courses on {field} cover the same ground in more depth if you want to go further.",
    "To sum up: start small, measure what happens, and build on what works.",
]
BAD = [
    "{topic} is a thing that a lot of people talk about.",
    "It depends on many factors, so it is hard to say anything definite.",
    "You could look it up online, there is plenty of information out there.",
    "Honestly, most advice about {field} is overrated.",
    "Some people like {topic} and some do not, that is just how it is.",
    "I would not worry about the details too much.",
    "There are pros and cons, like with anything else in life.",
    "Anyway, {field} changes all the time, so whatever you learn will be outdated soon.",
    "Just try it and see what happens, that is the only way.",
    "I am not sure why you would want to do that, but okay.",
]


def _sentences(rng: random.Random, pool: list[str], n: int, **fmt) -> str:
    picks: list[str] = []
    while len(picks) < n:  # each sentence once before any repeats, in a random order
        block = pool[:]
        rng.shuffle(block)
        picks += block
    return " ".join(s.format(**fmt) for s in picks[:n])


def _length(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    """A lognormal count: most small, a long tail (as answer lengths in real preference data are)."""
    return max(lo, min(hi, round(rng.lognormvariate(0.0, sigma) * median)))


def make_pairs(n: int = 128, seed: int = 0, conversational: bool = True) -> list[dict]:
    """``n`` preference rows with an ``id`` column; conversational rows hold message lists."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic, field = rng.choice(TOPICS)
        fmt = {"topic": topic, "field": field}
        context = _sentences(rng, CONTEXT, _length(rng, 0.8, 0.9, 0, 6), **fmt)
        ask = rng.choice(ASKS).format(**fmt)
        prompt = f"{context} {ask}" if context else ask
        chosen = _sentences(rng, GOOD, _length(rng, 2.2, 0.6, 1, 14), **fmt)
        rejected = _sentences(rng, BAD, _length(rng, 1.6, 0.7, 1, 10), **fmt)
        if rng.random() < 0.5:  # half the pairs: the rejected answer is the long-winded one
            rejected = f"{rejected} {_sentences(rng, GOOD, _length(rng, 1.6, 0.6, 1, 10), **fmt)}"
        if conversational:
            rows.append({"id": f"bench-{i:06d}", "prompt": [{"role": "user", "content": prompt}],
                         "chosen": [{"role": "assistant", "content": chosen}],
                         "rejected": [{"role": "assistant", "content": rejected}]})
        else:
            rows.append({"id": f"bench-{i:06d}", "prompt": prompt, "chosen": " " + chosen,
                         "rejected": " " + rejected})
    return rows


def make_prompt_heavy_pairs(n: int = 128, seed: int = 0, conversational: bool = True) -> list[dict]:
    """``n`` prompt-heavy rows: ~150-token prompts (median; 100-200), one-sentence answers (~20 tokens)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic, field = rng.choice(TOPICS)
        fmt = {"topic": topic, "field": field}
        notes = _sentences(rng, GOOD + CONTEXT + BAD, _length(rng, 5.0, 0.2, 4, 8), **fmt)
        ask = rng.choice(ASKS).format(**fmt)
        prompt = f"Here are some notes from a forum thread about {topic}. {notes} Based on these notes: {ask}"
        chosen = _sentences(rng, GOOD, 1, **fmt)
        rejected = _sentences(rng, BAD, 1, **fmt)
        if conversational:
            rows.append({"id": f"bench-p-{i:06d}", "prompt": [{"role": "user", "content": prompt}],
                         "chosen": [{"role": "assistant", "content": chosen}],
                         "rejected": [{"role": "assistant", "content": rejected}]})
        else:
            rows.append({"id": f"bench-p-{i:06d}", "prompt": prompt, "chosen": " " + chosen,
                         "rejected": " " + rejected})
    return rows


SHAPES = {"answer": make_pairs, "prompt": make_prompt_heavy_pairs}  # --shape name -> generator


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def warn_if_busy() -> None:
    """Say so when other work already loads the CPU: every timing that follows would be noisy."""
    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"WARNING: load average {load:.1f} on {os.cpu_count()} CPUs before starting: other work competes "
              "for the CPU and the timings will be noisy (use --rounds N, or an idle machine)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--standard", action="store_true", help="plain-text prompt/chosen/rejected, no chat template")
    ap.add_argument("--shape", choices=tuple(SHAPES), default="answer", help="answer-heavy or prompt-heavy pairs")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    print(write_jsonl(args.out, SHAPES[args.shape](args.pairs, args.seed, not args.standard)))


if __name__ == "__main__":
    main()
