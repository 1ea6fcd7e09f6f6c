#!/usr/bin/env python
"""Inject noise into an SFT data set (JSONL), as in the PoFT paper's noise ablation.

What the noise is and how records are marked: poft_mlx/noise.py (this is its command line).

    python scripts/inject_noise.py train.jsonl train_noisy.jsonl --share 0.3 --seed 0
"""

from __future__ import annotations

import argparse
import json
import sys

from poft_mlx.data.noise import KINDS, corrupt_chars, inject, inject_file, response_of, with_response  # noqa: F401

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="input JSONL (chat or prompt/completion records)")
    ap.add_argument("dst", help="output JSONL")
    ap.add_argument("--share", type=float, default=0.3, help="share of records made noisy (default 0.3)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kinds", default=",".join(KINDS), help="comma-separated: mismatch,chars (default both)")
    ap.add_argument("--char-rate", type=float, default=0.1,
                    help="character edits per character of a 'chars' reply (default 0.1)")
    args = ap.parse_args(argv)
    try:
        counts = inject_file(args.src, args.dst, share=args.share, seed=args.seed,
                             kinds=tuple(k.strip() for k in args.kinds.split(",") if k.strip()),
                             char_rate=args.char_rate)
    except (OSError, ValueError) as e:
        print(f"inject_noise: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"out": str(args.dst), **counts}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
