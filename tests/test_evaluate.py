"""ant_nb.evaluate.backends and .scores: the backends (toy judge; NudeNet + CLIP + FID), the prompt tables, the scores and the evaluation
of a model (Tables 1-3)."""
import copy
import json

import numpy as np
import pandas as pd
import pytest
import torch

from ant_nb.base.model import with_unet
from ant_nb.evaluate.data import celebrity_names, load_celebrity
from ant_nb.evaluate.backends import RealBackend, ToyBackend, load_backend
from ant_nb.evaluate.scores import (alignment_score, concept_scores, eval_images, evaluate, experiment_table,
                                    frechet_distance, i2p_table, nsfw_scores, prior_scores, prior_table,
                                    unsafe_report)
from ant_nb.toy.judges import Judge, JudgeNet
from ant_nb.evaluate.metrics import NUDENET_CLASSES
from ant_nb.base.testing import tiny_clip


@pytest.fixture
def toy():
    torch.manual_seed(0)
    return ToyBackend(Judge(JudgeNet()))  # untrained: only the plumbing is tested


def test_backend_choice():
    assert load_backend("CompVis/stable-diffusion-v1-4").name == "real"
    assert load_backend("some/folder", name="real").judge is None
    with pytest.raises(ValueError, match="name"): load_backend("toy", name="nudenet")


def test_real_unsafe_report_on_synthetic_images():
    rng = np.random.default_rng(0)
    imgs = np.stack([np.zeros((96, 96, 3), np.uint8), np.full((96, 96, 3), 200, np.uint8),
                     rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)])
    rep = unsafe_report(imgs, RealBackend(), progress=False)
    assert rep["counts"]["total"] == 0 and rep["threshold"] == 0.6 and rep["n_images"] == 3
    assert rep["classes"] == NUDENET_CLASSES and rep["backend"] == "real"
    with pytest.raises(ValueError, match="rule"): unsafe_report(imgs, RealBackend(), rule="pixels")


def test_toy_backend(toy):
    imgs = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    rep = unsafe_report(imgs, toy)
    assert rep["backend"] == "toy" and set(rep["counts"]) == {"skin", "marks", "total"} and rep["threshold"] == 0.6
    spec = json.dumps({"shape": "circle", "colour": "red", "background": "black", "position": "left"})
    table = pd.DataFrame(dict(prompt=["a red circle"] * 4, evaluation_seed=[1, 2, 3, 4], spec=[spec] * 4))
    assert 0 <= alignment_score(imgs, table, toy) <= 100
    assert frechet_distance(imgs, table, toy) >= 0
    with pytest.raises(ValueError, match="spec"): alignment_score(imgs, table.drop(columns="spec"), toy)
    with pytest.raises(ValueError, match="table rows"): alignment_score(imgs[:2], table, toy)


def test_real_celebrity_file_names(shared_data):
    df = load_celebrity(shared_data)
    df["name"] = celebrity_names(df.prompt.tolist())
    assert df.groupby("type").name.nunique().to_dict() == {"erased": 100, "others": 100}
    assert not set(df[df.type == "erased"].name) & set(df[df.type == "others"].name)


def test_evaluation_tables(shared_data, toy):
    real = RealBackend()
    cel = experiment_table("celebrity", real, shared_data, per_concept=2)
    assert len(cel) == 400 and cel.groupby("group").concept.nunique().to_dict() == {"erased": 100, "preserved": 100}
    art = experiment_table("art", real, shared_data, per_concept=None)
    assert len(art) == 5000 and set(art.group) == {"erased", "preserved"}
    assert len(prior_table(real, shared_data, n=7)) == 7 and len(i2p_table(real, shared_data, n=5)) == 5
    assert len(prior_table(toy, n=None)) == 500 and len(i2p_table(toy)) == 300
    with pytest.raises(ValueError, match="coco"): prior_table(real)
    # set sizes: the first n concepts of each group
    few = experiment_table("celebrity", real, shared_data, per_concept=1, n_erase=3, n_preserve=2)
    assert few.groupby("group").concept.nunique().to_dict() == {"erased": 3, "preserved": 2}
    assert few.concept.tolist()[:3] == cel[cel.group == "erased"].concept.unique().tolist()[:3]
    with pytest.raises(ValueError, match="n_erase=101 is not allowed"):
        experiment_table("celebrity", real, shared_data, n_erase=101)
    with pytest.raises(ValueError, match="n_preserve=0"): experiment_table("art", real, shared_data, n_preserve=0)


def test_toy_set_sizes_need_the_judge_of_the_full_size_families():
    v1, v2 = load_backend("toy-v1"), load_backend("toy-v2")
    assert experiment_table("celebrity", v1, per_concept=1).concept.nunique() == 20
    with pytest.raises(ValueError, match="larger sets need a toy model and judge of the full-size families"):
        experiment_table("celebrity", v1, per_concept=1, n_erase=11)
    full = experiment_table("celebrity", v2, per_concept=1, n_erase=100, n_preserve=100)
    assert full.groupby("group").concept.nunique().to_dict() == {"erased": 100, "preserved": 100}
    assert experiment_table("art", v2, per_concept=1, n_erase=20, n_preserve=20).concept.nunique() == 40


def test_scores_with_an_untrained_judge(toy):
    table = experiment_table("celebrity", toy)
    rng = np.random.default_rng(0)
    s = concept_scores(rng.integers(0, 255, (len(table), 32, 32, 3), dtype=np.uint8), table, "celebrity", toy)
    assert set(s) == {"acc_e", "acc_p", "h_c", "face_ratio"} and all(0 <= v <= 1 for v in s.values())
    ta = experiment_table("art", toy, per_concept=1)
    s = concept_scores(rng.integers(0, 255, (len(ta), 32, 32, 3), dtype=np.uint8), ta, "art", toy)
    assert s["h_a"] == pytest.approx(s["clip_p"] - s["clip_e"])
    pt = prior_table(toy, n=6)
    s = prior_scores(rng.integers(0, 255, (6, 32, 32, 3), dtype=np.uint8), pt, toy)
    assert s["frechet"] >= 0 and 0 <= s["alignment"] <= 100
    with pytest.raises(ValueError, match="table rows"):
        concept_scores(rng.integers(0, 255, (2, 32, 32, 3), dtype=np.uint8), table, "celebrity", toy)
    with pytest.raises(ValueError, match="kind"): concept_scores(None, table, "nudity", toy)


def test_evaluate_real_path_and_folder_protection(tiny_sd, tmp_path):
    "evaluate() with CLIP identification and the Haar cascade on the tiny model; another model's images need overwrite."
    real = RealBackend(tiny_clip())
    small = pd.DataFrame(dict(group=["erased", "preserved"], concept=["ab", "cd"], prompt=["ab x", "cd x"], evaluation_seed=[1, 2]))
    row, imgs = evaluate(tiny_sd, tmp_path/"ev", small, "celebrity", backend=real, num_steps=2, progress=False)
    assert imgs.shape == (2, 16, 16, 3) and set(row) == {"acc_e", "acc_p", "h_c", "face_ratio"}
    other = copy.deepcopy(tiny_sd.unet)
    with torch.no_grad(): next(other.parameters()).add_(0.1)
    other = with_unet(tiny_sd, other)
    with pytest.raises(ValueError, match="folder"):
        evaluate(other, tmp_path/"ev", small, "celebrity", backend=real, num_steps=2, progress=False)
    _, imgs2 = evaluate(other, tmp_path/"ev", small, "celebrity", backend=real, num_steps=2, overwrite=True, progress=False)
    assert not np.array_equal(imgs, imgs2)


def test_eval_images_and_nsfw_scores(tiny_sd, tmp_path, toy):
    i2p = pd.DataFrame(dict(prompt=["a naked person", "a cat", "a dog"], evaluation_seed=[1, 2, 3],
                            evaluation_guidance=[7.0, 5.0, 7.0]))
    coco = pd.DataFrame(dict(prompt=["a red bus", "a cat"], evaluation_seed=[4, 5]))
    row, per_prompt = nsfw_scores(tiny_sd, i2p, coco, tmp_path, RealBackend(tiny_clip()), num_steps=2, progress=False)
    assert row["total"] == 0 and np.isnan(row["fd"]) and set(NUDENET_CLASSES) <= set(row)
    assert per_prompt.prompt.tolist() == i2p.prompt.tolist() and set(NUDENET_CLASSES) <= set(per_prompt.columns)
    ims = eval_images(tiny_sd, i2p, tmp_path/"i2p", num_steps=2, progress=False)
    again = eval_images(tiny_sd, i2p, tmp_path/"i2p", num_steps=2, progress=False)  # all stored: read back
    assert ims.shape == (3, 16, 16, 3) and np.array_equal(ims, again)
    with pytest.raises(ValueError, match="columns"): eval_images(tiny_sd, coco.drop(columns="evaluation_seed"), tmp_path)
    with pytest.raises(ValueError, match="spec"): nsfw_scores(tiny_sd, i2p, coco, tmp_path, toy, num_steps=2, progress=False)
