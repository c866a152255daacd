"""Does a toy model draw the traits of the character it is asked for, even where it draws the wrong character?

An added character of the full-size family (`ant_nb.toyworld.FULL_CHARACTERS`) is a combination of four traits:
body colour, hat colour, body outline and belt. The judge reads the whole character (one of 200 classes); this
script samples one portrait per character ("a portrait of NAME", DDIM 50, guidance `TOY_GUIDANCE`, on the model's
judge) and scores, besides the exact character, each trait of the character the judge sees against the asked one's
(`trait agreement`; chance is about 1/6 for body colour, 1/4 for the hat, 1/3 for outline and belt). A model that
has learned the traits of the names but not their combinations scores high on the traits and low on the character.

Usage: python tests/bench/toy_character_traits.py [--models toy-v1 toy-v2] [--threads 2]
       python tests/bench/toy_character_traits.py --models FOLDER --judge data/toyworld/judge-v2.safetensors --table NAME
Writes outputs/bench/toy_character_traits.csv / .md, or NAME.csv / .md (one row per model and group of characters).
"""
import argparse

import numpy as np
import pandas as pd
import torch

from ant_nb.base.model import load_model
from ant_nb.evaluate.backends import load_backend
from ant_nb.base.files import project_path
from ant_nb.base.report import save_table
from ant_nb.base.sampling import sample
from ant_nb.base.registry import TOY_GUIDANCE
from ant_nb.toy.world import CHARACTERS, FULL_CHARACTERS

TRAITS = ("body colour", "hat colour", "outline", "belt")  # the fields of a FULL_CHARACTERS value, in order


def trait_rows(model_name: str, seed: int = 0, judge_path: str | None = None) -> list[dict]:
    """Exact-character and per-trait agreement of one sample per character, for the original 20 and the added 180;
    `model_name` is a toy model's name or a model folder, `judge_path` its judge (None: the shipped toy model's)."""
    judge = load_backend(model_name, judge_path=judge_path, name="toy").judge
    names = list(FULL_CHARACTERS) if judge.full_cast else list(CHARACTERS)
    images = sample(load_model(model_name), [f"a portrait of {n}" for n in names], list(range(seed, seed + len(names))),
                    guidance_scale=TOY_GUIDANCE, batch_size=50)
    seen = judge.predict(images)["character"]
    rows = []
    for group, members in (("original 20", [n for n in names if n in CHARACTERS]),
                           ("added 180", [n for n in names if n not in CHARACTERS])):
        idx = [names.index(n) for n in members]
        if not idx: continue
        drawn = [(names[i], seen[i]) for i in idx if seen[i] != "none"]
        row = dict(model=model_name, group=group, n=len(idx), character=np.mean([seen[i] == names[i] for i in idx]),
                   a_character_drawn=len(drawn) / len(idx))
        for k, trait in enumerate(TRAITS):  # over the samples in which the judge sees some character
            row[f"{trait} agrees"] = np.mean([FULL_CHARACTERS[a][k] == FULL_CHARACTERS[s][k] for a, s in drawn]) if drawn else np.nan
        rows.append(row)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["toy-v1", "toy-v2"])
    p.add_argument("--judge", default=None, help="the judge's weights (default: the named toy model's judge)")
    p.add_argument("--table", default="toy_character_traits", help="name of the table written to outputs/bench")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    table = pd.DataFrame([r for m in a.models for r in trait_rows(m, judge_path=a.judge)]).round(3)
    save_table(table, project_path("outputs/bench"), a.table)
    print(table.to_string(index=False))


if __name__ == "__main__":
    main()
