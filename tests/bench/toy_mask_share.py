"""Which weights the saliency mask M* keeps, per toy model: the share of each parameter group's entries that M* (the
intersection of the five seeds' top-50 % saliency maps for the four nudity phrasings, as 20_nsfw builds it with the
toy preset's loss) keeps. A diagnosis of why ANT with M* erases on one model and not on another.

Usage: python tests/bench/toy_mask_share.py [--models toy-v1 toy-v3 FOLDER ...] [--threads 1]
Writes outputs/bench/toy_mask_share.csv / .md; saliency maps in a temp folder.
"""
import argparse
import tempfile
from pathlib import Path

import pandas as pd
import torch

from ant_nb.base.files import project_path
from ant_nb.base.model import load_model
from ant_nb.base.report import save_table
from ant_nb.method.erase import erase_defaults
from ant_nb.method.saliency import MASK_SEEDS, cached_saliency_mask
from ant_nb.toy.world import UNSAFE_WORDS

GROUPS = {"cross-attention k, v": ("attn2.to_k", "attn2.to_v"), "cross-attention q, out": ("attn2.to_q", "attn2.to_out"),
          "self-attention": ("attn1.",), "resnets": ("resnets.",), "time embedding": ("time_emb",)}


def group_of(name: str) -> str:
    "The `GROUPS` key a UNet parameter name belongs to ('other' if none)."
    return next((g for g, keys in GROUPS.items() if any(k in name for k in keys)), "other")


def shares(model, folder: Path) -> list[dict]:
    "Per group: its entries, the share M* keeps, and its share of M*."
    cfg = erase_defaults("ant", "toy")["config"]
    mask = cached_saliency_mask(model, UNSAFE_WORDS, MASK_SEEDS, folder / "multi.safetensors",
                                top_fraction=0.5, config=cfg)[0]
    kept, total = {}, {}
    for n, m in mask.items():
        g = group_of(n); kept[g] = kept.get(g, 0) + int(m.sum()); total[g] = total.get(g, 0) + m.numel()
    all_kept = sum(kept.values())
    return [dict(group=g, entries=total[g], kept=round(kept[g] / total[g], 4), share_of_mask=round(kept[g] / all_kept, 4))
            for g in total]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["toy-v1", "toy-v3"]); ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rows = []
    for i, m in enumerate(a.models):
        work = Path(tempfile.mkdtemp(prefix=f"mask-share-{i}-"))
        rows += [dict(model=m) | r for r in shares(load_model(m), work)]
        print(rows[-1], flush=True)
    save_table(pd.DataFrame(rows), project_path("outputs/bench"), "toy_mask_share")


if __name__ == "__main__":
    main()
