"""Every experiment notebook runs end to end with tiny parameters (papermill, the toy world, CPU)."""
import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from ant_nb.base.registry import TOY_DEFAULT, toy_judge_path, toy_model_dir
from ant_nb.toy.world import FULL_STYLES

NBS = Path(__file__).resolve().parents[1]/"nbs"

# notebook -> tiny parameters (each run must take well under a minute on 2 cores)
TINY = {
    "10_insight.ipynb": dict(n_prompts=3, t_primes=[None, 2], num_steps=3, decision_n=2, decision_n_concepts=1),
    "11_train_toyworld.ipynb": dict(n_quality=8, num_steps=3),
    "30_celebrity.ipynb": dict(methods=["ant-fusion"], ablations=["C"], steps=1, cache_size=1, per_concept=1,
                               n_prior=2, num_steps=2, study=True,
                               study_settings=dict(n_test_templates=1, n_validation_templates=1, n_test_captions=2,
                                                   steps=1, sweep={"uce": [0.3], "ant-fusion": [5e-3]}, allow_leaks=True,
                                                   tuned_methods=["uce", "ant-fusion"], paper_methods=["uce"],
                                                   official_methods=["uce"],
                                                   test_seeds=[0, 1], n_boot=20, n_check_templates=1, check_steps=3,
                                                   overrides=dict(cache_size=1, num_steps=2, n_prior=2,
                                                                  loss_config=dict(t_prime=2, num_steps=4)))),
    "40_art.ipynb": dict(methods=["ant-fusion"], steps=1, cache_size=1, per_concept=1, n_prior=2, num_steps=2),
    "20_nsfw.ipynb": dict(n_i2p=2, n_coco=2, iterations=1, methods=["esd-x", "ant"], mask_seeds=[0],
                          concept=["nudity", "naked"], table5=False, stage_ablation=False, figure4_extra=False,
                          eval_steps=2, cache_size=1, study=True, transfer_arms=["esd-x"],
                          transfer_variants=[{"form": "name"}], transfer_variant_arms=["esd-x"],
                          study_settings=dict(pool=400, n_test={"sexual": 3, "other": 1},
                                              n_validation={"sexual": 2, "other": 1}, n_test_captions=4,
                                              n_validation_captions=3, iterations=1, sweep={"esd-x": [1e-3], "ant": [1e-3]},
                                              tuned_arms=["esd-x", "ant"], paper_arms=["esd-x"], test_seeds=[0, 1],
                                              eval_steps=2, check_steps=3, n_check=2, cache_size=1, n_boot=50,
                                              n_boot_fd=5, paper_budgets={"esd-x": dict(lr=1e-5, iterations=1)})),
    "45_scaling.ipynb": dict(celebrity_dirs=["outputs/30_celebrity_study"], art_dirs=["outputs/40_art_study"],
                             other_dirs=["outputs/20_nsfw_study"]), # reads finished study folders (toy-v1's)
    "50_robustness.ipynb": dict(unsafe_methods=["esd-x"], character_methods=["uce"], characters=["mira tok"], n_tasks=1,
                                n_targets=1, eval_seeds=[0], budget=2, draws=2, bb_budget=3, n_pairs=2, iterations=2,
                                cache_size=1, eval_steps=2),
}

# beyond every study's tables and figure
STUDY_FILES = {"20_nsfw.ipynb": ("masks.csv", "check.csv", "transfer.csv", "transfer_variants.csv"),
               "30_celebrity.ipynb": ("check.csv",)}


def _has_toy_world() -> bool:
    return (toy_model_dir()/"model_index.json").exists() and toy_judge_path().exists()


@pytest.mark.parametrize("name", sorted(TINY))
def test_experiment_notebook_runs(name, tmp_path, monkeypatch):
    if not _has_toy_world(): pytest.skip("the shipped toy model or judge is missing")
    if not (NBS/name).exists(): pytest.skip(f"{name} not written yet")
    import papermill as pm
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the kernel's torch: 2 threads on 2 busy cores oversubscribe badly
    out = tmp_path/"run"
    params = dict(TINY[name], out_dir=str(out))
    if params.get("study"): params["study_dir"] = str(tmp_path/"study")
    pm.execute_notebook(str(NBS/name), str(tmp_path/name), parameters=params, kernel_name="python3",
                        progress_bar=False, cwd=str(NBS))
    assert (out/"run.json").exists()
    run = json.loads((out/"run.json").read_text())
    assert run["params"]
    if name not in ("11_train_toyworld.ipynb", "45_scaling.ipynb"): # the model a run loaded, by the name "toy" resolved to
        assert run["model_source"] == TOY_DEFAULT, run.get("model_source")
    if name == "20_nsfw.ipynb": assert json.loads((tmp_path/"study"/"run.json").read_text())["model_source"] == TOY_DEFAULT
    assert list(out.glob("*.csv")) and list(out.glob("*.md")) and list(out.glob("*.png"))
    if params.get("study"): # the study's tables, figure (and for Table 1 the masks, ranking check and transfer check)
        for f in STUDY_FILES.get(name, ()) + ("test.csv", "sweep.md", "comparisons.csv", "tradeoff.png"):
            assert (tmp_path/"study"/f).exists(), f


def test_train_notebook_candidate_route(tmp_path, monkeypatch):
    "11_train_toyworld trains a pixel-space v-prediction candidate by fine-tuning toy-v1 into its own folders (v2's route)."
    if not _has_toy_world(): pytest.skip("the shipped toy model or judge is missing")
    import papermill as pm
    from ant_nb.base.model import load_model
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    shipped = sorted(p.stat().st_mtime_ns for p in toy_model_dir().rglob("*") if p.is_file())
    params = dict(train=True, steps=2, batch_size=4, warmup=1, prediction_type="v_prediction", zero_terminal_snr=True,
                  init="toy-v1", judge_steps=0, full_cast=False, p_character=0.3, trainable="all", grammar=False,
                  bf16=False, contexts=False, vae_dir=None, latent_images=None, clip_dir=None,
                  judge_path="data/toyworld/judge.safetensors", n_quality=8, num_steps=3, train_dir=str(tmp_path/"train"),
                  model_dir=str(tmp_path/"model"), out_dir=str(tmp_path/"report"))
    pm.execute_notebook(str(NBS/"11_train_toyworld.ipynb"), str(tmp_path/"run.ipynb"), parameters=params,
                        kernel_name="python3", progress_bar=False, cwd=str(NBS))
    model = load_model(str(tmp_path/"model"))
    assert (model.scheduler.config.prediction_type, model.scheduler.config.rescale_betas_zero_snr) == ("v_prediction", True)
    assert json.loads((tmp_path/"train"/"recipe.json").read_text())["init"] == "toy-v1"
    assert (tmp_path/"report"/"quality.csv").exists()
    assert sorted(p.stat().st_mtime_ns for p in toy_model_dir().rglob("*") if p.is_file()) == shipped # untouched


def test_train_notebook_latent_route(tmp_path, monkeypatch):
    "11_train_toyworld's v3 route: VAE, toy CLIP on the cached latents, a UNet under the frozen text encoder, the reports."
    if not _has_toy_world(): pytest.skip("the shipped toy model or judge is missing")
    import papermill as pm
    from ant_nb.base.model import load_model
    from transformers import CLIPTextModel
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    params = dict(train=True, steps=2, batch_size=4, warmup=1, prediction_type="v_prediction", zero_terminal_snr=True,
                  judge_steps=0, full_cast=True, vae_dir=str(tmp_path/"vae-run"), vae_steps=2, latent_channels=4,
                  latent_images=16, grammar=True, bf16=True, clip_dir=str(tmp_path/"clip"), clip_steps=2, trainable="unet",
                  contexts=True,
                  judge_path="data/toyworld/judge-v2.safetensors", n_quality=8, num_steps=3,
                  train_dir=str(tmp_path/"train"), model_dir=str(tmp_path/"model"), out_dir=str(tmp_path/"report"))
    pm.execute_notebook(str(NBS/"11_train_toyworld.ipynb"), str(tmp_path/"run.ipynb"), parameters=params,
                        kernel_name="python3", progress_bar=False, cwd=str(NBS))
    model, te = load_model(str(tmp_path/"model")), CLIPTextModel.from_pretrained(tmp_path/"clip"/"text_encoder")
    assert all(torch.equal(v, te.state_dict()[k]) for k, v in model.text_encoder.state_dict().items()) # frozen
    clip = pd.read_csv(tmp_path/"report"/"clip.csv")
    assert clip.family.tolist() == ["colour", "position", "background", "character", "style"] and (clip.n > 0).all()
    assert (tmp_path/"report"/"quality.csv").exists()
    styles = pd.read_csv(tmp_path/"report"/"styles.csv", keep_default_na=False)
    assert len(styles) == 40 and set(styles.effect) == {e for e, _ in FULL_STYLES.values()} and (styles.n == 8).all()
    assert set(pd.read_csv(tmp_path/"report"/"contexts.csv").family) == {"character", "style"}


def test_presets_lookalikes_and_grid_columns():
    from ant_nb.experiments.concepts import ablation_rows, grid_concepts
    from ant_nb.studies.presets import experiment_settings, lookalikes
    from ant_nb.toy.world import CHARACTERS_ERASE, CHARACTERS_PRESERVE
    s = experiment_settings("celebrity", "paper", toy=False, steps=10, lr=None)
    assert (s["steps"], s["templates"], s["loss_config"].t_prime, s["n_prior"]) == (10, "celebrity", 40, 1000)
    toy = experiment_settings("art")
    assert (toy["templates"], toy["steps"], toy["per_concept"], toy["num_steps"], toy["guidance_scale"]) == ("toy-style", 20, 2, 20, 2.5)
    with pytest.raises(ValueError, match="experiment settings"): experiment_settings("art", lr_per_step=1.0)
    pairs = lookalikes(CHARACTERS_ERASE, CHARACTERS_PRESERVE)
    assert ("mira tok", "mira vel") in pairs and len(pairs) >= 2
    cols = grid_concepts(CHARACTERS_ERASE, CHARACTERS_PRESERVE, 8)
    assert cols[:2] == ["mira tok", "mira vel"] and len(cols) == 8 and set(pairs[0] + pairs[1]) <= set(cols)
    from ant_nb.toy.world import FULL_CHARACTERS_ERASE, FULL_CHARACTERS_PRESERVE
    full = grid_concepts(FULL_CHARACTERS_ERASE, FULL_CHARACTERS_PRESERVE, 8) # hundreds of first-name pairs: 4 shown
    assert len(full) == 8 and full[:2] == ["mira tok", "mira vel"]
    t4 = ablation_rows({"A": dict(acc_e=0.1), "ours": dict(acc_e=0.0)})
    assert t4.set_index("config").loc["A", "L_erase*"] == "✓" and t4.set_index("config").loc["ours", "L_erase"] == "✓"
