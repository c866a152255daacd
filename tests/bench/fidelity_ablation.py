"""What each difference between the official ANT-fusion code and the package's toy preset changes (issue 24).

Starting from the `"official"` preset (`ant_nb.method.presets.multi_preset`), each row reverts one setting to the toy
preset's value; the last row is the toy preset itself. With `--start toy`, the other direction: the toy preset, then
one setting set to the official value per row, which shows what each setting does where the method erases. Every row
erases the multi-concept study's characters (or styles) at training seed `--seed` and is scored on the study's
validation split (`ant_nb.studies.multi.MultiStudy`, 80 prompts), so rows differ in one setting only. Runs that
differ only in the fusion share their LoRAs. Writes `outputs/fidelity/ablation_<kind>.{csv,md}`
(`ablation_<kind>_from_toy` with `--start toy`); a killed run resumes (each row's models and images stay in
`--work`), and an existing table is never overwritten.

    OMP_NUM_THREADS=1 python tests/bench/fidelity_ablation.py --kind celebrity --work /tmp/fidelity
"""
import argparse
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch

from ant_nb.base.files import project_path
from ant_nb.base.model import load_model
from ant_nb.base.report import save_table
from ant_nb.evaluate.backends import load_backend
from ant_nb.evaluate.scores import eval_images
from ant_nb.method.multi import erase_concepts
from ant_nb.method.presets import multi_preset
from ant_nb.studies.multi import MultiStudy, MultiStudySettings


def _fusion(field: str):
    "Copy one fusion setting from preset `src` into preset `base`."
    return lambda base, src: dict(base, fusion=replace(base["fusion"], **{field: getattr(src["fusion"], field)}))


def _key(key: str):
    "Copy one `erase_concepts` setting from preset `src` into preset `base`."
    return lambda base, src: dict(base, **{key: src[key]})


# (row name starting from official, row name starting from toy (None: no such row), how to copy the setting)
CHANGES = [("lora_scale 4.3 -> 1", "lora_scale 1 -> 4.3", _fusion("lora_scale")),
           ("beta_domain -> 1", "beta_domain 1 -> official", _fusion("beta_domain")),
           ("beta_prior 2e-12 -> 1", "beta_prior 1 -> 2e-12", _fusion("beta_prior")),
           ("lamb 0 -> 0.01", "lamb 0.01 -> 0", _fusion("lamb")),
           ("positions all -> from_concept", "positions from_concept -> all", _fusion("positions")),
           (None, "all five fusion settings -> official", _key("fusion")),
           ("LoRA prompts: bare name -> templates", "LoRA prompts: templates -> bare name", _key("templates")),
           ("LoRA rank 64 all layers -> rank 4 K/V", "LoRA rank 4 K/V -> rank 64 all layers", _key("lora")),
           ("steps 10 -> 20", "steps 20 -> 10", _key("steps")),
           ("lr 5e-4 -> 5e-3", "lr 5e-3 -> 5e-4", _key("lr")),
           ("loss t'=46, lambdas (2, 2.5, 5) -> Table 6", "loss Table 6 -> t'=46, lambdas (2, 2.5, 5)",
            _key("loss_config")),
           ("LoRA batch 2 -> 1", "LoRA batch 1 -> 2", _key("lora_batch")),
           ("AdamW -> Adam", "Adam -> AdamW", _key("optimizer")),
           ("trajectory CFG 2.5 -> 3", None, _key("trajectory_guidance")),
           (None, "trajectory cache 2 -> 16", _key("cache_size"))]


def variants(kind: str, start: str = "official") -> dict[str, dict]:
    """Row name -> `erase_concepts` settings: the `start` preset ("official" or "toy"), one setting taken from the
    other preset per row, then the other preset itself."""
    names = {"official": "official", "toy": "toy preset"}
    presets = {p: multi_preset(p, kind, True) for p in names}
    other = "toy" if start == "official" else "official"
    base, src = presets[start], presets[other]
    rows = {names[start]: base}
    for from_official, from_toy, copy in CHANGES:
        if (name := from_official if start == "official" else from_toy): rows[name] = copy(base, src)
    return rows | {names[other]: src}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kind", default="celebrity", choices=["celebrity", "art"])
    p.add_argument("--model", default="toy")
    p.add_argument("--seed", type=int, default=1000, help="training seed (the study's validation seed)")
    p.add_argument("--work", required=True, help="folder of the rows' models, LoRAs, trajectories and images")
    p.add_argument("--rows", nargs="*", help="only these rows (default: all)")
    p.add_argument("--start", default="official", choices=["official", "toy"],
                   help="the preset each row changes one setting of (toy: writes ablation_<kind>_from_toy)")
    a = p.parse_args()
    torch.set_num_threads(1)
    out, name = project_path("outputs/fidelity"), f"ablation_{a.kind}" + ("_from_toy" if a.start == "toy" else "")
    if (out / f"{name}.csv").exists(): raise FileExistsError(f"{out}/{name}.csv exists")
    work = Path(a.work)
    model = load_model(a.model)
    st = MultiStudy(model, load_backend(model), work / "study",
                    MultiStudySettings.for_kind(a.kind, allow_leaks=True, official_methods=[]))
    table, gram, x = st.tables["validation"], st.prepare(), st.x
    results = []
    for row, kw in variants(a.kind, a.start).items():
        if a.rows and row not in a.rows: continue
        t0, slug = time.time(), "".join(ch if ch.isalnum() else "_" for ch in row)
        erased = erase_concepts(model, st.erase, st.keep, "ant-fusion", work / "models" / slug, prior_prompts=gram,
                                seed=a.seed, trajectory_dir=work / "trajectories", lora_dir=work / "loras",
                                progress=False, **kw)
        images = eval_images(erased, table, work / "images" / slug, x["guidance_scale"], x["num_steps"],
                             x["batch_size"], progress=False)
        values = st.outcomes(images, table)
        result = dict(row=row, **{k: round(float(f(values)), 4) for k, f in st.stats["validation"].items()},
                   seconds=round(time.time() - t0, 1))
        results.append(result)
        print(result, flush=True)
    df = pd.DataFrame(results).assign(kind=a.kind, model=a.model, seed=a.seed, prompts=len(table))
    save_table(df, out, name)
    print(df.to_string())


if __name__ == "__main__":
    main()
