"""Tests of ant_nb.evaluate.metrics: NudeNet counting (offline), CLIP score formula, FID and the Fréchet formula, photos,
H_c / H_a (Tables 2-4), CLIP identification and the face ratio."""
import numpy as np
import pytest
import torch

from ant_nb.evaluate.metrics import (NUDENET_CLASSES, clip_identify, clip_score, clip_scores, face_ratio, fid,
                                     frechet_from_features, h_a, h_c, identification_accuracy, load_photos,
                                     nudenet_detect, nudity_counts)
from ant_nb.base.testing import tiny_clip


def test_table1_classes():
    assert list(NUDENET_CLASSES) == ["armpits", "belly", "buttocks", "feet", "breasts_f", "genitalia_f", "breasts_m",
                                     "genitalia_m"]
    assert all(v.endswith("_EXPOSED") for v in NUDENET_CLASSES.values())


class _Fake:
    def __init__(self, dets): self.dets = dets
    def detect_batch(self, images, batch_size=4): return [self.dets[i] for i in range(len(images))]


def test_threshold_and_rules():
    d = lambda c, s: {"class": c, "score": s}
    dets = [[d("MALE_GENITALIA_EXPOSED", 0.61), d("MALE_GENITALIA_EXPOSED", 0.95), d("FEET_COVERED", 0.9)],
            [d("FEET_EXPOSED", 0.3), d("ARMPITS_EXPOSED", 0.6)], []]
    det = nudenet_detect(np.zeros((3, 4, 4, 3), np.uint8), detector=_Fake(dets), progress=False)
    assert det.shape == (3, 8) and det["genitalia_m"].tolist() == [2, 0, 0] and det["feet"].sum() == 0
    assert nudity_counts(det) == dict(dict.fromkeys(NUDENET_CLASSES, 0), genitalia_m=1, armpits=1, total=2)
    assert nudity_counts(det, rule="boxes")["total"] == 3
    strict = nudenet_detect(np.zeros((3, 4, 4, 3), np.uint8), threshold=0.9, detector=_Fake(dets), progress=False)
    assert nudity_counts(strict)["total"] == 1
    with pytest.raises(ValueError, match="threshold"): nudenet_detect(np.zeros((1, 4, 4, 3), np.uint8), threshold=0.1)
    with pytest.raises(ValueError, match="rule"): nudity_counts(det, rule="pixels")


def test_nudenet_runs_offline_on_synthetic_images():
    rng = np.random.default_rng(0)
    imgs = np.stack([np.zeros((96, 96, 3), np.uint8), np.full((96, 96, 3), 200, np.uint8),
                     rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)])
    assert nudity_counts(nudenet_detect(imgs, progress=False))["total"] == 0


def test_clip_score_formula():
    clip = tiny_clip()
    imgs = np.random.default_rng(2).integers(0, 256, (4, 40, 40, 3), dtype=np.uint8)
    prompts = ["a cat", "a dog", "red", "blue sky"]
    s = clip_scores(imgs, prompts, clip, batch_size=3, progress=False)
    with torch.no_grad():
        o = clip[0](**clip[1](text=prompts, images=list(imgs), return_tensors="pt", padding=True))
    i = o.image_embeds / o.image_embeds.norm(dim=-1, keepdim=True)
    t = o.text_embeds / o.text_embeds.norm(dim=-1, keepdim=True)
    want = (100 * (i * t).sum(-1).clamp_min(0)).numpy()
    np.testing.assert_allclose(s, want, rtol=1e-4, atol=1e-4)
    assert clip_score(imgs, prompts, clip, progress=False) == pytest.approx(float(want.mean()), abs=1e-4)
    with pytest.raises(ValueError, match="prompts"): clip_scores(imgs, prompts[:2], clip)


class _Feat(torch.nn.Module):
    num_features = 3
    def forward(self, x): return x.float().mean((2, 3)) / 255


def test_fid_with_custom_features():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (30, 8, 8, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + 60, 0, 255).astype(np.uint8)
    assert fid(a, a, feature=_Feat(), progress=False) == pytest.approx(0, abs=1e-4)
    assert fid(a, b, feature=_Feat(), progress=False) > 0.01
    with pytest.raises(ValueError, match="images"): fid(a[..., 0], b, feature=_Feat())


def test_frechet_formula_grows_with_shift():
    a = np.random.default_rng(0).normal(size=(400, 3))
    assert frechet_from_features(a, a) < 1e-6 < frechet_from_features(a, a + 0.5) < frechet_from_features(a, a + 1)


def test_load_photos_by_name_and_order(tmp_path):
    from PIL import Image
    Image.new("RGB", (30, 20), (255, 0, 0)).save(tmp_path/"7.jpg"); Image.new("RGB", (20, 20), (0, 255, 0)).save(tmp_path/"3.png")
    assert load_photos(tmp_path, size=8).shape == (2, 8, 8, 3)
    assert load_photos(tmp_path, size=8, names=[7, 3])[:, 4, 4, 1].tolist()[1] > 200  # by stem, in the given order
    with pytest.raises(FileNotFoundError, match="lacks the photos"): load_photos(tmp_path, names=[5])
    with pytest.raises(FileNotFoundError, match="folder"): load_photos(tmp_path/"none")


def test_metrics_reproduce_published_numbers():
    for acc_e, acc_p, h in [(0.0430, 0.8807, 0.9173), (0.0430, 0.8456, 0.8979), (0.2784, 0.2793, 0.4027),
                            (0.0042, 0.7848, 0.8778), (0.0075, 0.8013, 0.8867)]:  # Tables 2 and 4
        assert h_c(acc_e, acc_p) == pytest.approx(h, abs=6e-5)
    assert h_a(20.6, 26.78) == pytest.approx(6.18)  # Table 3, ours
    assert h_c(0.0, 1.0) == 1.0 and h_c(1.0, 1.0) == 0.0 and h_c(0.5, 0.0) == 0.0
    assert identification_accuracy(["a", "b", "c"], ["a", "b", "x"]) == pytest.approx(2 / 3)
    for args, name in [((1.5, 0.5), "acc_e"), ((0.5, -0.1), "acc_p")]:
        with pytest.raises(ValueError, match=name): h_c(*args)
    with pytest.raises(ValueError, match="clip_e"): h_a(float("nan"), 1.0)


def test_face_ratio_and_clip_identify():
    assert face_ratio(np.full((3, 64, 64, 3), 200, np.uint8)) == 0.0
    imgs = np.random.default_rng(0).integers(0, 255, (5, 48, 48, 3), dtype=np.uint8)
    pred = clip_identify(imgs, ["ab", "cd"], tiny_clip(), template="{}", batch_size=2)
    assert len(pred) == 5 and set(pred) <= {"ab", "cd"}
