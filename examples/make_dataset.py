"""Build the example preference dataset: controlled sentiment, as in the DPO paper's first experiment.

Each prompt asks for a one-sentence review of a product; the chosen answer is positive, the rejected one
negative, both about the same product and of similar length. The held-out split uses products and
phrasings that never appear in training, so a gain there means the policy learned the preference (positive
sentiment), not the sentences.
Deterministic: the same seed gives byte-identical files on any machine.

    python examples/make_dataset.py --out data/ --train 256 --heldout 64
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ITEMS = [
    "coffee maker", "hiking boots", "desk lamp", "wireless mouse", "backpack", "water bottle", "rain jacket",
    "blender", "office chair", "headphones", "novel", "board game", "tent", "kettle", "keyboard", "umbrella",
    "bicycle helmet", "frying pan", "yoga mat", "alarm clock", "phone case", "toaster", "sleeping bag",
    "winter coat", "cookbook", "guitar strings", "garden hose", "suitcase", "running shoes", "camera bag",
    "electric toothbrush", "rice cooker", "bookshelf", "laptop stand", "travel mug", "wool socks",
    "vacuum cleaner", "picture frame", "bath towel", "tea set", "sunglasses", "power bank", "desk fan",
    "notebook", "pillow", "paint brushes", "fishing rod", "chess set", "flashlight", "wall clock",
    "stand mixer", "cutting board", "puzzle", "scarf", "lunch box", "space heater", "monitor", "printer",
    "air fryer", "wallet", "watch", "jigsaw", "drill", "ladder",
]
ASKS = [
    "Write a one-sentence review of the {item} you bought last month.",
    "In one sentence, what do you think of your new {item}?",
    "Give a short review of the {item}.",
    "How would you describe the {item} to a friend, in a sentence?",
]
GOOD = [
    "I love this {item}; it works perfectly and I would happily buy it again.",
    "This {item} is excellent, well made and a real joy to use every day.",
    "What a wonderful {item}: sturdy, reliable and worth every penny.",
    "The {item} exceeded my expectations and I recommend it to everyone.",
    "Fantastic {item}, it is beautiful, easy to use and works great.",
    # held-out phrasings: never seen in training
    "Honestly the best {item} I have owned, and it still makes me smile.",
    "A delightful {item} that does its job brilliantly.",
    "Great value: this {item} is comfortable, clever and built to last.",
]
BAD = [
    "I hate this {item}; it broke quickly and I regret buying it.",
    "This {item} is terrible, cheaply made and a pain to use every day.",
    "What an awful {item}: flimsy, unreliable and a waste of money.",
    "The {item} disappointed me badly and I would warn everyone away.",
    "Dreadful {item}, it is ugly, hard to use and works poorly.",
    # held-out phrasings: never seen in training
    "Honestly the worst {item} I have owned, and it still makes me angry.",
    "A miserable {item} that fails at its job constantly.",
    "Poor value: this {item} is uncomfortable, clumsy and falls apart.",
]
SEEN = 5  # phrasings 0..4 train, the rest are held out


def pairs(items: list[str], n: int, rng: random.Random, conversational: bool, phrasings: range) -> list[dict]:
    rows = []
    for i in range(n):
        item = items[i % len(items)]
        prompt = rng.choice(ASKS).format(item=item)
        good = GOOD[rng.choice(phrasings)].format(item=item)
        bad = BAD[rng.choice(phrasings)].format(item=item)
        if conversational:
            rows.append({"prompt": [{"role": "user", "content": prompt}],
                         "chosen": [{"role": "assistant", "content": good}],
                         "rejected": [{"role": "assistant", "content": bad}]})
        else:
            rows.append({"prompt": prompt, "chosen": " " + good, "rejected": " " + bad})
    return rows


def build(out: Path, train: int = 256, heldout: int = 64, seed: int = 0, conversational: bool = True) -> dict:
    """Write ``train.jsonl`` and ``heldout.jsonl`` into ``out``; returns their paths."""
    rng = random.Random(seed)
    items = ITEMS[:]
    rng.shuffle(items)
    cut = len(items) * 3 // 4  # a quarter of the products are only ever seen held out
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    splits = (("train", items[:cut], train, range(SEEN)), ("heldout", items[cut:], heldout, range(SEEN, len(GOOD))))
    for name, pool, n, phrasings in splits:
        path = out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in pairs(pool, n, rng, conversational, phrasings)))
        paths[name] = path
    return paths


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("data"))
    ap.add_argument("--train", type=int, default=256)
    ap.add_argument("--heldout", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--standard", action="store_true", help="plain strings instead of chat messages")
    args = ap.parse_args()
    for name, path in build(args.out, args.train, args.heldout, args.seed, not args.standard).items():
        print(f"{name}: {path}")
