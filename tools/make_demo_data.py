"""Write small JSONL data sets for demo tenants with different, easily learnable tasks.

"reverse" and "caps" use the same prompt shape ("<word>="), so only the adapter decides what to answer;
"arith" adds two digits; "echo" is plain text from a tiny grammar. Every sample is well under 64 bytes, so a
tiny byte-level model learns them quickly. Output: ``DIR/<tenant>/{train,valid}.jsonl``, deterministic from
``--seed``.

    python tools/make_demo_data.py --out demo_data
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

WORDS = (
    "cat dog sun map red box cup hat pen fox owl bee ant egg ice jam key lamp moon star tree bird fish frog "
    "milk rain snow wind leaf rock sand ship door book cake salt gold ring"
).split()
ADJECTIVES = "big small red blue old new happy quiet".split()
NOUNS = "cat dog bird fish fox owl frog bee".split()
VERBS = "sees likes chases finds helps".split()


def reverse(rng: random.Random) -> dict:
    word = rng.choice(WORDS)
    return {"prompt": f"{word}=", "completion": word[::-1]}


def caps(rng: random.Random) -> dict:
    word = rng.choice(WORDS)
    return {"prompt": f"{word}=", "completion": word.upper()}


def arith(rng: random.Random) -> dict:
    a, b = rng.randrange(10), rng.randrange(10)
    return {"prompt": f"{a}+{b}=", "completion": str(a + b)}


def echo(rng: random.Random) -> dict:
    subject, obj = rng.sample(NOUNS, 2)
    return {"text": f"the {rng.choice(ADJECTIVES)} {subject} {rng.choice(VERBS)} the {obj}."}


TASKS = {"reverse": reverse, "caps": caps, "arith": arith, "echo": echo}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--train-samples", type=int, default=2000)
    parser.add_argument("--valid-samples", type=int, default=200)
    args = parser.parse_args(argv)

    for name, task in TASKS.items():
        rng = random.Random(f"{args.seed}/{name}")  # str seeds are hashed stably: same data on every run
        directory = args.out / name
        directory.mkdir(parents=True, exist_ok=True)
        for split, count in (("train", args.train_samples), ("valid", args.valid_samples)):
            lines = (json.dumps(task(rng)) for _ in range(count))
            (directory / f"{split}.jsonl").write_text("".join(f"{line}\n" for line in lines))
        print(f"{name}: {args.train_samples} train / {args.valid_samples} valid samples in {directory}")


if __name__ == "__main__":
    main()
