"""ant_nb.evaluate.data: the published prompt files and the errors for bad ones."""
import huggingface_hub
import pandas as pd
import pytest

from ant_nb.evaluate.data import FILE_NAMES, I2P_HUB, load_artist, load_celebrity, load_coco, load_i2p


def test_real_files_row_counts_and_columns(shared_data):
    i2p = load_i2p(shared_data/FILE_NAMES["i2p"])
    assert len(i2p) == 4703 and len(load_i2p(shared_data)) == 4703
    assert {"prompt", "categories", "evaluation_seed", "evaluation_guidance", "case_number"} <= set(i2p.columns)
    assert i2p.evaluation_seed.dtype == "int64" and i2p.prompt.map(type).eq(str).all()
    assert i2p.categories.str.contains("sexual").sum() > 0
    celeb = load_celebrity(shared_data)
    assert len(celeb) == 5000 and celeb.type.value_counts().to_dict() == {"erased": 2500, "others": 2500}
    art = load_artist(shared_data)
    assert len(art) == 5000 and art.groupby("type").artist.nunique().to_dict() == {0: 100, 1: 100}
    coco = load_coco(shared_data)
    assert len(coco) == 30000 and {"prompt", "evaluation_seed", "coco_id"} <= set(coco.columns)
    assert "Unnamed: 0" not in celeb.columns


def test_missing_file_and_columns(tmp_path):
    with pytest.raises(FileNotFoundError, match="art_100_concepts.csv"): load_artist(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.csv"): load_coco(tmp_path/"nope.csv")
    pd.DataFrame({"prompt": ["x"], "evaluation_seed": [1]}).to_csv(tmp_path/"f.csv")
    with pytest.raises(ValueError, match=r"lacks the columns \['type', 'artist'\]"): load_artist(tmp_path/"f.csv")
    pd.DataFrame({"type": [0, 2], "artist": ["a", "b"], "prompt": ["x", "y"],
                  "evaluation_seed": [1, 2]}).to_csv(tmp_path/"g.csv")
    with pytest.raises(ValueError, match=r"values \[2\]"): load_artist(tmp_path/"g.csv")


def test_i2p_from_hub_renames_columns(tmp_path, monkeypatch):
    hub_csv = tmp_path/"i2p_benchmark.csv"
    pd.DataFrame({"prompt": ["a", None], "categories": ["sexual", "violence"], "sd_seed": [3, 4],
                  "sd_guidance_scale": [7, 8]}).to_csv(hub_csv, index=False)
    calls = []
    def fake_download(repo_id, filename, repo_type=None):
        calls.append((repo_id, filename, repo_type))
        return str(hub_csv)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    df = load_i2p()
    assert calls == [(*I2P_HUB, "dataset")]
    assert df.evaluation_seed.tolist() == [3, 4] and df.evaluation_guidance.tolist() == [7, 8]
    assert df.prompt.tolist() == ["a", ""] and df.case_number.tolist() == [0, 1]
