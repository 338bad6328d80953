#!/usr/bin/env python3
"""Quality bars of the embedded demo model (ds4/data), measured in one run:

1. held-out perplexity of the float model (a `ds4-train` checkpoint, when given) against the
   quantized GGUFs (the shipped q2 mix, and a q4 export when given);
2. MTP first-draft acceptance with teacher forcing: at every held-out position q the MTP pairs the
   trunk state h_q with the true token q+1, and its argmax is compared with the trunk's own argmax
   for q+2 (what a depth-1 draft is verified against when the trunk emitted token q+1);
3. greedy generation, plain and `--mtp` continuous depth-1, on held-out passages and on copying a
   passage seen in the prompt: draft acceptance, trunk passes per committed token, tokens/s side
   by side, and whether the speculative stream equals plain greedy.

The held-out text is the last 5 % of the corpus (cut at a paragraph), never seen in training.
The CPU BLAS is MLX's bundled one unless --blas says otherwise: it computes every row of a batch
as a one-row product, so the exact verifier checks drafts in one batched pass (with OpenBLAS it
verifies row by row, which cannot be faster than plain decode).

    python speed-bench/quality_small.py --checkpoint build/train/small.safetensors \\
        --q4 build/train/ds4-small-q4.gguf
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="base GGUF (default: the embedded q2 model)")
    ap.add_argument("--mtp", help="MTP GGUF (default: the embedded one)")
    ap.add_argument("--q4", help="a q4 export of the same weights, for the perplexity table")
    ap.add_argument("--checkpoint", help="the float checkpoint (ds4-train --out) for the perplexity table")
    ap.add_argument("--corpus", default=str(ROOT / "promessi_sposi.txt"))
    ap.add_argument("--windows", type=int, default=16, help="held-out windows of 256 tokens")
    ap.add_argument("--prompts", type=int, default=6, help="held-out generation prompts")
    ap.add_argument("--tokens", type=int, default=96, help="tokens generated per prompt")
    ap.add_argument("--blas", default="none", help="DS4_BLAS for this run (none: MLX's bundled BLAS)")
    args = ap.parse_args()
    os.environ["DS4_BLAS"] = args.blas

    import ds4  # first: it picks the CPU BLAS (DS4_BLAS) before mlx.core loads  # isort: skip
    import mlx.core as mx
    import numpy as np

    from ds4 import train
    from ds4.numerics import Numerics
    from ds4.decode import DecodeStats, Speculative, generate
    from ds4.loader import EMBEDDED_MODEL, EMBEDDED_MTP, open_model, open_mtp
    from ds4.model import Model
    from ds4.mtp import MTPHead
    from ds4.session import Engine, Sampler, Session
    from ds4.speculative import SpecOptions, SpecStats

    mx.set_default_device(mx.cpu)
    model_path, mtp_path = args.model or str(EMBEDDED_MODEL), args.mtp or str(EMBEDDED_MTP)
    base_file = open_model(model_path)
    tok = base_file.tokenizer()
    corpus = train.Corpus.from_text(tok, Path(args.corpus).read_text(encoding="utf-8"))
    valid = corpus.valid
    print(f"model {Path(model_path).name} + {Path(mtp_path).name}; held-out {len(valid)} tokens; "
          f"blas {ds4.BLAS or 'bundled'}")

    # 1. perplexity ----------------------------------------------------------------------------
    def gguf_pair(path):
        f = open_model(path)
        m = Model.load(f)
        return m, MTPHead.load(open_mtp(mtp_path, f.config), m)

    rows = []
    if args.checkpoint:
        arrays, config, _ = train.load_checkpoint(args.checkpoint)
        rows.append(("float (checkpoint)", train.build(arrays, config, Numerics())))
    shipped = gguf_pair(model_path)
    rows.append((f"{Path(model_path).name}", shipped))
    if args.q4:
        rows.append((f"{Path(args.q4).name}", gguf_pair(args.q4)))
    print(f"\n{'model':<28}{'trunk CE':>10}{'ppl':>9}{'MTP CE':>9}{'MTP ppl':>9}")
    for label, (model, mtp) in rows:
        trunk, mtp_ce = train.evaluate(model, mtp, valid, n_windows=args.windows)
        print(f"{label:<28}{trunk:>10.3f}{math.exp(trunk):>9.2f}{mtp_ce:>9.3f}{math.exp(mtp_ce):>9.2f}")

    # 2. teacher-forced first-draft acceptance ---------------------------------------------------
    model, mtp = shipped

    def draft_agreement(seq: np.ndarray) -> tuple[int, int]:
        logits, mtp_logits = train.trunk_and_mtp_logits(model, mtp, seq)
        agree = mx.argmax(mtp_logits, axis=-1) == mx.argmax(logits[1:], axis=-1)  # both predict q+2
        return int(mx.sum(agree).item()), len(seq) - 1

    starts = np.linspace(0, len(valid) - 258, args.windows).astype(int)
    ok = total = 0
    for s in starts:
        a, n = draft_agreement(valid[s:s + 256])
        ok, total = ok + a, total + n
    print(f"\nMTP first-draft agreement with the trunk, held-out text (teacher forced): "
          f"{ok / total:.1%} of {total} positions")
    ok = total = 0
    for s in starts[: args.windows // 2]:
        passage = valid[s:s + 100]
        a, n = draft_agreement(np.concatenate([passage, passage]))
        ok, total = ok + a, total + n
    print(f"same, on a passage of 100 tokens followed by its copy: {ok / total:.1%} of {total} positions")

    # 3. generation: plain vs continuous ---------------------------------------------------------
    engine = Engine(model_path, base_file, mtp_path=mtp_path)
    margin = open_mtp(mtp_path, base_file.config).mtp_margin
    eos = tok.eos_id
    gen_starts = np.linspace(0, len(valid) - 200, args.prompts).astype(int)
    held = [valid[s:s + 64].tolist() for s in gen_starts]
    copy = []
    for s in gen_starts:
        passage = valid[s + 64:s + 64 + args.tokens + 8].tolist()
        copy.append((passage + tok.encode("\n\n") + passage[:8], passage[8:]))
    print(f"\n{'prompts':<10}{'mode':<34}{'tokens/s':>9}{'accept k0':>11}{'passes/tok':>12}{'= plain':>9}{'copied':>8}")
    for label, prompts in (("held-out", [(p, None) for p in held]), ("copy", copy)):
        plain_streams, plain_tokens, plain_s = [], 0, 0.0
        for prompt, _ in prompts:
            g = generate(Session(engine, 4096), prompt, args.tokens, Sampler(temperature=0.0), eos)
            plain_streams.append(g.generated)
            plain_tokens, plain_s = plain_tokens + len(g.generated), plain_s + g.decode_seconds
        print(f"{label:<10}{'plain greedy':<34}{plain_tokens / plain_s:>9.2f}{'-':>11}{1.0:>12.2f}{'-':>9}"
              f"{_copied(plain_streams, prompts):>8}")
        for mode, opts, adaptive in (("continuous depth-1, no gate", SpecOptions(draft=1, margin=0), False),
                                     ("ds4 --mtp-continuous (file margin)", SpecOptions(draft=1, margin=margin), True),
                                     ("margin 3.0 + adaptive (reference)", SpecOptions(draft=1, margin=3.0), True)):
            stats, n_tok, secs, same = SpecStats(), 0, 0.0, True
            streams = []
            for (prompt, _), ref in zip(prompts, plain_streams):
                g = generate(Session(engine, 4096), prompt, args.tokens, Speculative(opts, adaptive=adaptive), eos,
                             stats=DecodeStats(spec=stats))  # one SpecStats summed over the prompts
                streams.append(g.generated)
                n_tok, secs, same = n_tok + len(g.generated), secs + g.decode_seconds, same and g.generated == ref
            acc = stats.accepted[0] / max(1, stats.proposed[0])
            print(f"{'':<10}{mode:<34}{n_tok / secs:>9.2f}{acc:>11.1%}{stats.trunk_passes / stats.committed:>12.2f}"
                  f"{str(same):>9}{_copied(streams, prompts):>8}")


def _copied(streams, prompts) -> str:
    """Fraction of generated tokens equal to the passage being copied (copy prompts only)."""
    pairs = [(s, ref) for s, (_, ref) in zip(streams, prompts) if ref is not None]
    if not pairs:
        return "-"
    hit = sum(a == b for s, ref in pairs for a, b in zip(s, ref))
    return f"{hit / sum(len(s) for s, _ in pairs):.0%}"


if __name__ == "__main__":
    main()
