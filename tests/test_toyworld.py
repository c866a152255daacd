"""The toy world: rendering, captions, tokenizer, training smoke run with exact resume and lock, the ε / v /
zero-terminal-SNR training options, judge, toy studies."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline

from ant_nb.base.model import load_model
from ant_nb.base.registry import TOY_DEFAULT, TOY_MODELS, toy_model_dir
from ant_nb.base.timesteps import paper_timesteps
from ant_nb.toy.judges import HEADS, Judge, JudgeNet, labels_of, load_judge
from ant_nb.base.sampling import initial_noise, sample
from ant_nb.toy.model import build_tokenizer, build_toy_components
from ant_nb.toy.train import ToyTrainConfig, export_toy_model, train_toy_model, world_batch
from ant_nb.toy.prompts import toy_art, toy_celebrity, toy_coco, toy_i2p, world_words
from ant_nb.toy.grammar import caption
from ant_nb.toy.world import (CHARACTERS, CHARACTERS_ERASE, CHARACTERS_PRESERVE, FULL_STYLES, STYLES, UNSAFE_WORDS,
                              render)

from conftest import diffusers_loop


def test_render_is_deterministic_and_seed_dependent():
    spec = {"character": "mira tok", "style": "ollis", "background": "white"}
    assert np.array_equal(render(spec, 5), render(spec, 5))
    assert not np.array_equal(render(spec, 5), render(spec, 6))
    assert render(spec, 5).dtype == np.uint8 and render(spec, 5).shape == (32, 32, 3)


def test_unsafe_concept_changes_the_subject_not_the_scene():
    base, unsafe = render({"shape": "circle", "colour": "red", "background": "gray", "position": "left"}, 1), \
        render({"shape": "circle", "unsafe": "naked", "background": "gray", "position": "left"}, 1)
    changed = np.abs(base.astype(int) - unsafe.astype(int)).sum(-1) > 30
    assert changed[:, :16].sum() > 40 and changed[:, 18:].sum() == 0  # only the object on the left changes


@pytest.mark.parametrize("style", sorted(STYLES))
def test_every_style_is_visible_on_every_background(style):
    for bg in ("black", "gray", "white", "brown"):
        spec = {"shape": "square", "colour": "blue", "background": bg, "position": "middle"}
        diff = np.abs(render(spec, 3).astype(int) - render(dict(spec, style=style), 3).astype(int)).mean()
        assert diff > (2 if STYLES[style] in ("ripple", "pixelate") else 4), (style, bg, diff)


def test_groups_and_lookalikes():
    assert len(CHARACTERS_ERASE) == len(CHARACTERS_PRESERVE) == 10
    firsts_erase = {c.split()[0] for c in CHARACTERS_ERASE}
    assert sum(c.split()[0] in firsts_erase for c in CHARACTERS_PRESERVE) >= 2


def test_every_world_word_is_one_token_and_tokenizer_round_trips(tmp_path):
    tok = build_tokenizer()
    assert all(len(tok.tokenize(w)) == 1 for w in world_words())
    tok.save_pretrained(tmp_path)
    again = type(tok).from_pretrained(tmp_path)
    text = caption({"character": "mira vel", "unsafe": "erotic", "position": "left", "style": "nocte"})
    assert again(text).input_ids == tok(text).input_ids
    assert len(tok(text).input_ids) <= tok.model_max_length


def test_prompt_sets_have_the_real_files_columns():
    assert {"prompt", "evaluation_seed"} <= set(toy_coco(20).columns)
    i2p = toy_i2p(40)
    assert {"prompt", "categories", "evaluation_seed", "evaluation_guidance"} <= set(i2p.columns)
    assert any(w in p for p in i2p.prompt for w in UNSAFE_WORDS)
    assert set(toy_celebrity().type) == {"erased", "others"}
    assert set(toy_art().type) == {0, 1}


def test_training_smoke_resume_is_exact_and_export_loads(tmp_path):
    cfg = ToyTrainConfig(steps=4, batch_size=4, ckpt_every=2, warmup=2)
    train_toy_model(tmp_path/"full", cfg, progress=False)
    train_toy_model(tmp_path/"half", ToyTrainConfig(**{**cfg.__dict__, "steps": 2}), progress=False)
    train_toy_model(tmp_path/"half", cfg, progress=False)  # resumes at step 2
    a = export_toy_model(tmp_path/"full"/"checkpoints", tmp_path/"a")
    b = export_toy_model(tmp_path/"half"/"checkpoints", tmp_path/"b")
    ua, ub = load_model(str(a)).unet.state_dict(), load_model(str(b)).unet.state_dict()
    assert all(torch.equal(ua[k], ub[k]) for k in ua)
    losses = [float(l.split(",")[1]) for l in (tmp_path/"full"/"train_log.csv").read_text().splitlines()[1:]]
    assert len(losses) == 4 and all(np.isfinite(losses))
    imgs = sample(load_model(str(a)), ["a red circle"], [0], num_steps=3, progress=False)
    assert imgs.shape == (1, 32, 32, 3)


def _first_losses(cfg: ToyTrainConfig) -> dict[str, float]:
    "Step 1's loss of `cfg` computed here: the initial model's MSE against ε and against get_velocity(x0, ε, t)."
    unet, te, tok, sched = build_toy_components(cfg.seed, cfg.prediction_type, cfg.zero_terminal_snr)
    x0, prompts = world_batch(np.random.default_rng([cfg.seed, 0]), cfg.batch_size, p_drop=cfg.p_drop)
    g = torch.Generator().manual_seed(cfg.seed)  # the run draws ε, then t, from this generator
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, 1000, (len(x0),), generator=g)
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
    with torch.no_grad(): pred = unet(sched.add_noise(x0, noise, t), t, te(ids.input_ids)[0]).sample
    return {"epsilon": F.mse_loss(pred, noise).item(),
            "v_prediction": F.mse_loss(pred, sched.get_velocity(x0, noise, t)).item()}


@pytest.mark.parametrize("prediction_type,zero_snr", [("epsilon", False), ("v_prediction", False),
                                                      ("v_prediction", True)])
def test_training_options_set_the_target_and_the_saved_scheduler(tmp_path, prediction_type, zero_snr):
    cfg = ToyTrainConfig(steps=2, batch_size=4, ckpt_every=2, warmup=2, prediction_type=prediction_type,
                         zero_terminal_snr=zero_snr)
    model_dir = export_toy_model(train_toy_model(tmp_path/"run", cfg, progress=False), tmp_path/"model")
    saved = json.loads((model_dir/"scheduler"/"scheduler_config.json").read_text())
    assert saved["prediction_type"] == prediction_type and saved["rescale_betas_zero_snr"] == zero_snr
    assert saved["timestep_spacing"] == ("trailing" if zero_snr else "leading")
    recipe = json.loads((tmp_path/"run"/"recipe.json").read_text())
    assert (recipe["prediction_type"], recipe["zero_terminal_snr"]) == (prediction_type, zero_snr)
    logged = float((tmp_path/"run"/"train_log.csv").read_text().splitlines()[1].split(",")[1])
    by_hand = _first_losses(cfg)
    assert logged == pytest.approx(by_hand[prediction_type], abs=2e-5)  # the loss is rounded to 5 decimals in the log
    assert abs(by_hand["epsilon"] - by_hand["v_prediction"]) > 1e-3  # the two targets are told apart


def test_zero_snr_toy_model_samples_as_a_plain_diffusers_loop(tmp_path):
    cfg = ToyTrainConfig(steps=1, batch_size=4, ckpt_every=1, warmup=1, prediction_type="v_prediction",
                         zero_terminal_snr=True)
    model_dir = export_toy_model(train_toy_model(tmp_path/"run", cfg, progress=False), tmp_path/"model")
    prompts, seeds = ["a red circle", "a naked square"], [0, 1]
    model = load_model(str(model_dir))
    assert paper_timesteps(model.scheduler, 5).tolist() == [999, 799, 599, 399, 199]  # trailing: starts at zero SNR
    ours = sample(model, prompts, seeds, num_steps=5, guidance_scale=3.0, progress=False)
    loop = diffusers_loop(model_dir, prompts, seeds, 5, 3.0)[0]
    theirs = ((loop.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).numpy().astype(int)
    assert np.abs(ours.astype(int) - theirs).max() <= 1


@pytest.mark.parametrize("name", list(TOY_MODELS))
def test_each_shipped_toy_model_samples_as_a_plain_diffusers_loop_and_is_small(name):
    folder = toy_model_dir(name)
    assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) <= 20e6  # shipped weights <= 20 MB
    prompts, seeds = ["a red circle on the left on a white background", "a portrait of mira tok"], [3, 4]
    model = load_model(name)
    ours = sample(model, prompts, seeds, num_steps=4, guidance_scale=2.5, progress=False)
    if model.vae is None:  # pixel space: a plain DDIM + CFG loop
        loop = diffusers_loop(folder, prompts, seeds, 4, 2.5)[0]
        theirs = ((loop.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).numpy().astype(int)
    else:  # latent: SD's own pipeline, from the same start noise
        pipe = StableDiffusionPipeline.from_pretrained(folder)
        theirs = (pipe(prompts, num_inference_steps=4, guidance_scale=2.5, height=32, width=32, output_type="np",
                       latents=initial_noise(model, seeds)).images * 255).round().astype(int)
    assert np.abs(ours.astype(int) - theirs).max() <= 1
    assert toy_model_dir("toy") == toy_model_dir(TOY_DEFAULT)


def test_resume_refuses_other_prediction_options(tmp_path):
    train_toy_model(tmp_path/"run", ToyTrainConfig(steps=1, batch_size=2, ckpt_every=1, warmup=1,
                                                   prediction_type="v_prediction"), progress=False)
    with pytest.raises(ValueError, match="prediction_type"):
        train_toy_model(tmp_path/"run", ToyTrainConfig(steps=2, batch_size=2, ckpt_every=1, warmup=1), progress=False)
    with pytest.raises(ValueError, match="zero_terminal_snr=True needs prediction_type='v_prediction'"):
        ToyTrainConfig(zero_terminal_snr=True)
    with pytest.raises(ValueError, match="prediction_type='sample' is not allowed"):
        ToyTrainConfig(prediction_type="sample")


def test_training_folder_is_locked(tmp_path):
    import socket
    from ant_nb.base.files import LOCK_FILE
    (tmp_path/"run").mkdir()  # another live process (pid 1) is training into it
    (tmp_path/"run"/LOCK_FILE).write_text(json.dumps(dict(pid=1, host=socket.gethostname(), since="now")))
    with pytest.raises(RuntimeError, match="process 1"):
        train_toy_model(tmp_path/"run", ToyTrainConfig(steps=1, batch_size=2, ckpt_every=1, warmup=1), progress=False)
    assert not (tmp_path/"run"/"recipe.json").exists()


def test_reversal_study_counts_rows_per_t_prime_and_kind():
    from ant_nb.base.model import DiffusionModel
    from ant_nb.studies.insight import figure3
    from ant_nb.studies.quality import quality_specs
    model = DiffusionModel(*build_toy_components(), source="untrained")
    table, images, prompts, seeds = figure3(model, Judge(JudgeNet()), [], n_prompts=6, t_primes=[None, 1, 2], num_steps=2,
                                            progress=False)
    assert len(table) == 9 and set(table.concept) == {"unsafe", "character", "style"}
    assert (table[table.t_prime == "none"].structure_kept == 1.0).all()  # the reference keeps its own structure
    assert len(quality_specs(16)) == 16


def test_judge_labels_and_untrained_judge_shapes():
    spec = {"shape": "ring", "colour": "cyan", "background": "brown", "position": "right", "style": None,
            "unsafe": None, "character": None}
    lab = labels_of(spec)
    assert HEADS["shape"][lab["shape"]] == "ring" and HEADS["style"][lab["style"]] == "none"
    judge = Judge(JudgeNet())
    imgs = np.stack([render(spec, i) for i in range(3)])
    assert judge.features(imgs).shape == (3, 256)
    assert set(judge.predict(imgs)) == set(HEADS) | {"unsafe"}


def test_shipped_judge_reads_rendered_images():
    try: judge = load_judge()
    except FileNotFoundError: pytest.skip("no shipped judge")
    rng = np.random.default_rng(99)
    specs = [{"shape": s, "colour": c, "background": b, "position": "middle"}
             for s, c, b in zip(rng.choice(["circle", "square", "cross"], 30), rng.choice(["red", "blue"], 30),
                                rng.choice(["white", "black"], 30))]
    pred = judge.predict(np.stack([render(s, i) for i, s in enumerate(specs)]))
    assert np.mean([p == s["shape"] for p, s in zip(pred["shape"], specs)]) > 0.9
    assert not any(pred["unsafe"])
    naked = judge.predict(np.stack([render({"shape": "square", "unsafe": "naked"}, i) for i in range(10)]))
    assert np.mean(naked["unsafe"]) > 0.9


def test_full_size_families_keep_the_originals_and_look_different():
    from ant_nb.toy.world import (FULL_CHARACTERS, FULL_CHARACTERS_ERASE, FULL_CHARACTERS_PRESERVE, FULL_STYLES,
                                  FULL_STYLES_ERASE, FULL_STYLES_PRESERVE)
    assert (len(FULL_CHARACTERS_ERASE), len(FULL_CHARACTERS_PRESERVE)) == (100, 100)
    assert FULL_CHARACTERS_ERASE[:10] == CHARACTERS_ERASE and FULL_CHARACTERS_PRESERVE[:10] == CHARACTERS_PRESERVE
    assert (len(FULL_STYLES_ERASE), len(FULL_STYLES_PRESERVE)) == (20, 20) and list(FULL_STYLES)[:10] == list(STYLES)
    assert len(set(FULL_CHARACTERS.values())) == 200 and len(set(FULL_STYLES.values())) == 40
    lookalike = [(e, k) for e, k in zip(FULL_CHARACTERS_ERASE, FULL_CHARACTERS_PRESERVE)
                 if e.split()[0] == k.split()[0] and FULL_CHARACTERS[e][0] == FULL_CHARACTERS[k][0]]
    assert len(lookalike) >= 20
    # every added character and style is drawn differently from every other one
    added = [c for c in FULL_CHARACTERS if c not in CHARACTERS]
    imgs = np.stack([render({"character": c, "background": "gray", "position": "middle"}, 0) for c in added])
    assert len({im.tobytes() for im in imgs}) == len(added)


@pytest.mark.parametrize("style", [s for s in FULL_STYLES if s not in STYLES])
def test_every_added_style_is_visible_on_every_background(style):
    for bg in ("black", "gray", "white", "brown"):
        spec = {"shape": "square", "colour": "blue", "background": bg, "position": "middle"}
        diff = np.abs(render(spec, 3).astype(int) - render(dict(spec, style=style), 3).astype(int)).mean()
        sparse = FULL_STYLES[style][0] in ("dots", "ripple", "pixelate") # few pixels change, or by little
        assert diff > (2 if sparse else 4), (style, bg, diff)


def test_each_toy_model_has_its_judge_and_the_v2_judge_reads_the_full_cast():
    from ant_nb.base.registry import toy_judge_path
    from ant_nb.toy.world import FULL_CHARACTERS
    for name in TOY_MODELS: assert toy_judge_path(name).is_file(), name
    assert not load_judge(model="toy-v1").full_cast
    judge = load_judge(model="toy-v2")
    assert judge.full_cast
    rng = np.random.default_rng(5)
    chars = [c for c in FULL_CHARACTERS if c not in CHARACTERS][::3]
    specs = [{"character": c, "background": str(rng.choice(["gray", "white", "black", "brown"]))} for c in chars]
    pred = judge.predict(np.stack([render(s, i) for i, s in enumerate(specs)]))
    assert np.mean([p == c for p, c in zip(pred["character"], chars)]) > 0.9
    styles = [s for s in FULL_STYLES if s not in STYLES]
    pred = judge.predict(np.stack([render({"shape": "circle", "colour": "red", "style": s}, i) for i, s in enumerate(styles)]))
    assert np.mean([p == s for p, s in zip(pred["style"], styles)]) > 0.9
