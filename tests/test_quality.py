"""Quality you can see: one scorer (memorisation included), runs that score themselves, plots immune to seaborn."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import FLAT_2D, plan_once


@pytest.fixture(scope="module")
def real_2d(nnunet_roots):
    from medimgen.evaluation.api import real_cases, reference

    cfg = plan_once(FLAT_2D).config.get("2d")
    val, _, _ = real_cases(cfg, str(FLAT_2D), "val")
    return reference(cfg, str(FLAT_2D), val)


def test_memorisation_flags_training_copies_not_heldout_cases(real_2d):
    from medimgen.evaluation.scorer import memorisation

    ref = real_2d
    assert len(ref.train) >= 4 and len(ref.heldout) >= 2
    g = torch.Generator().manual_seed(0)
    copies = ref.train[:2]
    noised = (ref.train[2:4] + 0.05 * torch.randn(ref.train[2:4].shape, generator=g)).clamp(-1, 1)
    mem = memorisation(torch.cat([copies, noised]), ref.train, ref.heldout, ref.train_ids)
    assert mem.fraction == 1.0, (mem.nearest, mem.threshold)
    assert mem.pairs[0]["train_id"] in ref.train_ids[:2] and mem.pairs[0]["ncc"] == pytest.approx(1.0)
    # held-out real cases, as if generated, are not flagged (none is nearer a training case than the held-out
    # percentile), and the noised copies are nearer their training case than any held-out case is
    held = memorisation(ref.heldout, ref.train, ref.heldout, ref.train_ids)
    assert held.fraction == 0.0 and max(held.nearest) < 0.99
    assert min(mem.nearest) > max(held.nearest)
    # unrelated images (noise) are not either
    assert memorisation(torch.rand(ref.train[:4].shape, generator=g) * 2 - 1, ref.train, ref.heldout,
                        ref.train_ids).fraction == 0.0


def test_scorer_names_and_quality_metrics(real_2d):
    from medimgen.evaluation.scorer import quality_metrics, score

    ref = real_2d
    scores, mem = score(ref.train[:4], ref)
    assert {"mmd_stats", "ms_ssim_generated", "ms_ssim_gap", "memorised_fraction"} <= set(scores)
    assert not any(k.startswith("fid") for k in scores)  # no extractor: no FID
    q = quality_metrics(scores)
    assert q["quality/memorised_fraction"] == 1.0 and "quality/ms_ssim" in q and "quality/mmd_stats" in q
