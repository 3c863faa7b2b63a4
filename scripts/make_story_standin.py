"""Build a seeded STAND-IN for ROCStories from the OpenWebText prompts.

ROCStories (five-sentence stories, the paper's infilling data, Sec. 4.2) needs a request form
and cannot be downloaded offline. This script cuts "stories" of exactly three sentences from
the one-to-three-sentence OpenWebText prompts: beginning = first sentence, middle = second,
ending = third. It is NOT a story corpus: the sentences are news/web prose, and the results
on it are not comparable with the paper's ROCStories numbers. Say so wherever they are shown.

Rules: a line qualifies when it splits into exactly three sentences (a split after ".", "!"
or "?" followed by whitespace), each of at least ``--min_words`` words and ending with "."
(so every middle is one declarative sentence), with no quote characters. The first
``--skip_first`` lines (the continuation task's 1,000 prompts) are never used. The qualifying
lines are shuffled with ``--seed`` and the first ``--num`` are written as JSON lines
``{"id", "source_line", "beginning", "middle", "ending"}`` to ``--out`` (a path you name; the
repository ignores ``runs/``; never commit data). The same arguments give the same file.

    python scripts/make_story_standin.py --out runs/data/story_standin.jsonl
    python scripts/make_story_standin.py --out runs/data/story_standin.jsonl --num 1100 --seed 0
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Dict, List, Optional, Sequence

DEFAULT_PROMPTS = "../shared/data/openwebtext/prompts.txt"
_SPLIT = re.compile(r"(?<=[.!?])\s+(?=\S)")

__all__ = ["split_sentences", "story_from_line", "build_standin", "main"]


def split_sentences(text: str) -> List[str]:
    """Sentences of ``text``: split after ".", "!" or "?" followed by whitespace."""
    t = text.strip()
    return [s.strip() for s in _SPLIT.split(t)] if t else []


def story_from_line(text: str, min_words: int = 3) -> Optional[Dict[str, str]]:
    """``{"beginning", "middle", "ending"}`` when ``text`` is exactly three qualifying
    sentences (see the module doc), else None."""
    s = split_sentences(text)
    if len(s) != 3:
        return None
    if any(not x.endswith(".") or len(x.split()) < min_words or '"' in x or "\u201c" in x
           or "\u201d" in x for x in s):
        return None
    return {"beginning": s[0], "middle": s[1], "ending": s[2]}


def build_standin(lines: Sequence[str], num: int, seed: int = 0, skip_first: int = 0,
                  min_words: int = 3) -> List[Dict[str, object]]:
    """The stand-in rows from ``lines`` (1-based ``source_line``), seeded; at most ``num``."""
    import numpy as np

    cands = []
    for k, line in enumerate(lines, 1):
        if k <= skip_first:
            continue
        st = story_from_line(line, min_words)
        if st is not None:
            cands.append({"id": f"owt-{k}", "source_line": k, **st})
    order = np.random.default_rng(seed).permutation(len(cands))
    return [cands[i] for i in order[:num]]


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the JSON-lines file to write")
    p.add_argument("--prompts", default=DEFAULT_PROMPTS, help="OpenWebText prompts, one a line")
    p.add_argument("--num", type=int, default=1100, help="stories to write (default 1100: "
                   "100 held out + 1000 for training)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip_first", type=int, default=1000,
                   help="never use the first N lines (the continuation prompts)")
    p.add_argument("--min_words", type=int, default=3)
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    a = p.parse_args(argv)
    if a.num < 1:
        p.error("--num must be >= 1")
    if not os.path.isfile(a.prompts):
        print(f"error: prompt file not found: {a.prompts!r}", file=sys.stderr)
        return 2
    if os.path.exists(a.out) and not a.force:
        print(f"error: {a.out!r} exists; pass --force to overwrite", file=sys.stderr)
        return 2
    with open(a.prompts, encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f]
    rows = build_standin(lines, a.num, a.seed, a.skip_first, a.min_words)
    if len(rows) < a.num:
        print(f"warning: only {len(rows)} qualifying lines (asked for {a.num})", file=sys.stderr)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    tmp = a.out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, a.out)
    print(f"wrote {len(rows)} stand-in stories (NOT ROCStories) to {a.out} "
          f"(seed {a.seed}, from {a.prompts}, first {a.skip_first} lines skipped)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
