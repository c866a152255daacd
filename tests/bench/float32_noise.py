"""How far apart are batched and per-prompt UNet calls in float32? The noise floor behind the tests' tolerances.

The package's sampler runs the unconditional and conditional predictions of all prompts in one UNet call; the tests'
hand-written reference makes one call per half. Both are correct; they differ by float32 rounding, because batch
composition and thread count change the order of summation. This measures that difference on the tiny SD model of
the tests (`ant_nb.testing.build_tiny_sd`), over seeds, t' and thread counts, so `tests/conftest.py:BATCH_ATOL` is
set from a measurement rather than a guess.

Usage: python tests/bench/float32_noise.py
Writes outputs/bench/float32_noise.csv / .md (one row per run) and prints the worst difference.
"""
import sys
import tempfile
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_sampling import reference_run  # noqa: E402  the tests' hand-written DDIM + CFG loop

from ant_nb.base.model import load_model# noqa: E402
from ant_nb.base.report import save_table# noqa: E402
from ant_nb.base.files import project_path
from ant_nb.base.sampling import sample# noqa: E402
from ant_nb.base.testing import build_tiny_sd# noqa: E402


def main():
    model = load_model(str(build_tiny_sd(Path(tempfile.mkdtemp())/"tiny")))
    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for seeds in ([1, 2], [3, 4], [5, 6], [7, 8]):
            for t_prime in (None, 3, 6):
                ref = reference_run(model, ["a cat", "a dog"], seeds, 6, 7.5, t_prime=t_prime)[0]
                ours = sample(model, ["a cat", "a dog"], seeds, num_steps=6, guidance_scale=7.5,
                                      t_prime=t_prime, progress=False, output_type="latent")
                rows.append(dict(threads=threads, seeds=str(seeds), t_prime=str(t_prime),
                                 max_abs_diff=(ours - ref).abs().max().item(), max_abs_latent=ref.abs().max().item()))
    df = pd.DataFrame(rows)
    save_table(df, project_path("outputs/bench"), "float32_noise")
    print(df.to_string(index=False))
    print(f"worst difference {df.max_abs_diff.max():.2e} (latents up to {df.max_abs_latent.max():.1f})")


if __name__ == "__main__":
    main()
