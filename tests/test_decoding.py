"""Decoding plans: which decoding each block uses, the calibration that picks it, and the file beside the checkpoint
that stores it."""
import itertools
import json
import random

import pytest
import torch
from conftest import IMAGE, VIDEO, tiny_model

from transformer_flow import OFFICIAL_JACOBI, SEQUENTIAL, BlockDecoding, default_plan
from utils.decoding import calibrate, choose, load_plans, plan_path, relative_error, save_plan


def guided_inputs(batch=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 8, 8, generator=g), torch.randn(2 * batch, 6, 16, generator=g)


def test_plan_precedence():
    model = tiny_model(**IMAGE)
    jacobi = BlockDecoding(window=8, threshold=1e-4)
    assert model.decoding_plan() == default_plan(model) == default_plan(model, "cpu")
    assert [d.window for d in default_plan(model)] == [64, 64, 16]  # the deep block: narrower windows on the CPU
    assert default_plan(model, "cuda") == [BlockDecoding(64, 1e-3)] * 2 + [BlockDecoding(64, 1e-4)]
    model.decoding = {4: [jacobi, SEQUENTIAL, jacobi], 32: [SEQUENTIAL] * 3}  # plans by calibration batch size
    assert model.decoding_plan() == [jacobi, SEQUENTIAL, jacobi]  # the calibrated plan nearest the batch
    assert model.decoding_plan(batch=10) == [jacobi, SEQUENTIAL, jacobi]
    assert model.decoding_plan(batch=12) == [SEQUENTIAL] * 3
    assert model.decoding_plan(jacobi=False) == [SEQUENTIAL] * 3
    assert model.decoding_plan(jacobi=True, jacobi_th=1e-2) == [BlockDecoding(64, 1e-2, 32)] * 3  # official defaults
    assert model.decoding_plan(jacobi_block_size=16) == [BlockDecoding(16, OFFICIAL_JACOBI.threshold, 32)] * 3
    assert model.decoding_plan(decoding=jacobi, jacobi=False) == [jacobi] * 3
    with pytest.raises(ValueError, match="one per block"):
        model.decoding_plan(decoding=[jacobi])


@pytest.mark.parametrize("kwargs,name", [(dict(window=0), "jacobi_block_size"), (dict(max_iter=0), "jacobi_max_iter"),
                                         (dict(threshold=float("nan")), "jacobi_th"),
                                         (dict(threshold=-1.0), "jacobi_th"), (dict(window=2.5), "jacobi_block_size"),
                                         (dict(frame_window=0), "frame_window")])
def test_bad_decoding_options_name_the_option(kwargs, name):
    with pytest.raises(ValueError, match=name):
        BlockDecoding(**kwargs)


def test_plan_file_round_trips_and_keeps_other_devices(tmp_path):
    weights = tmp_path / "model.safetensors"
    folder = tmp_path / "step-00000010"
    folder.mkdir()
    plan = [BlockDecoding(window=64, threshold=1e-4), SEQUENTIAL, BlockDecoding(window=4, frame_window=16)]
    for checkpoint in (weights, folder):
        assert load_plans(checkpoint, "cpu", 3) == {}
        save_plan(checkpoint, "cuda", 4, [SEQUENTIAL] * 3, {"measured": {}})
        save_plan(checkpoint, "cpu", 16, [SEQUENTIAL] * 3, {"measured": {}})
        path = save_plan(checkpoint, "cpu", 4, plan, {"measured": {"error": 1e-3}})
        assert path == plan_path(checkpoint) and path.parent == (folder if checkpoint == folder else tmp_path)
        assert load_plans(checkpoint, "cpu", 3) == {4: plan, 16: [SEQUENTIAL] * 3}
        assert load_plans(checkpoint, "cuda", 3) == {4: [SEQUENTIAL] * 3}
        with pytest.raises(ValueError, match="the cpu plan has 3 blocks, the model 6"):
            load_plans(checkpoint, "cpu", 6)
    assert plan_path(weights).name == "model.decoding.json"
    plan_path(weights).write_text("{not json")
    with pytest.raises(ValueError, match="model.decoding.json: not a decoding plan file"):
        load_plans(weights, "cpu", 3)
    plan_path(weights).write_text(json.dumps({"plans": {"cpu": {"4": {"blocks": [{"window": 0}] * 3}}}}))
    with pytest.raises(ValueError, match="bad cpu plan for batch 4.*jacobi_block_size"):
        load_plans(weights, "cpu", 3)


def test_choose_agrees_with_brute_force():
    rng = random.Random(0)
    for _ in range(200):
        options = [[(rng.uniform(1, 2), 0.0, SEQUENTIAL)] +
                   [(rng.uniform(0.1, 2), rng.uniform(0, 0.01), SEQUENTIAL) for _ in range(rng.randint(0, 5))]
                   for _ in range(rng.randint(1, 4))]
        budget = rng.uniform(0, 0.02)
        seconds = lambda picks, options=options: sum(o[k][0] for o, k in zip(options, picks))
        feasible = [p for p in itertools.product(*(range(len(o)) for o in options))
                    if sum(o[k][1] for o, k in zip(options, p)) <= budget]
        picks = choose(options, budget)
        assert sum(o[k][1] for o, k in zip(options, picks)) <= budget
        assert seconds(picks) == pytest.approx(min(seconds(p) for p in feasible))


@pytest.mark.slow
def test_calibrated_plan_holds_its_tolerance_and_is_what_reverse_uses():
    model = tiny_model(**IMAGE)
    z, y = guided_inputs()
    plan, report = calibrate(model, z, y, guidance=1.5, tolerance=2e-3, repeats=1, verbose=False)
    assert len(plan) == 3 and all(isinstance(d, BlockDecoding) for d in plan)
    exact = model.reverse(z, y, guidance=1.5, jacobi=False)
    error = relative_error(model.reverse(z, y, guidance=1.5, decoding=plan), exact)
    assert error <= 2e-3
    assert report["measured"]["error"] == pytest.approx(error, rel=1e-2, abs=1e-7)
    assert [row["block"] for row in report["measured"]["blocks"]] == [0, 1, 2]
    model.decoding = {3: plan}
    assert torch.equal(model.reverse(z, y, guidance=1.5), model.reverse(z, y, guidance=1.5, decoding=plan))


@pytest.mark.slow
def test_calibration_keeps_sequential_decoding_where_jacobi_does_not_pay():
    """A Jacobi setting must beat sequential decoding of its block by `margin`; none beats it by 99.9%."""
    model = tiny_model(**IMAGE)
    z, y = guided_inputs(batch=2)
    plan, report = calibrate(model, z, y, guidance=1.5, repeats=1, margin=0.999, verbose=False)
    assert plan == [SEQUENTIAL] * 3
    assert report["measured"]["error"] == 0.0


@pytest.mark.parametrize("config", ["image", "video"])
def test_static_sweeps_decode_as_dynamic_ones_and_do_not_depend_on_the_batch(config, monkeypatch):
    """CUDA's fixed-shape sweeps (transformer_flow.StaticSweep, captured as CUDA graphs there) run here eagerly: the
    same samples as the CPU's sweeps, ragged frontiers, mixed first-frame and later windows and a batch included."""
    import transformer_flow

    video = config == "video"
    model = tiny_model(**(VIDEO if video else IMAGE))
    g = torch.Generator().manual_seed(3)
    z = torch.randn(3, *((3, 4, 4, 4) if video else (4, 8, 8)), generator=g)
    y = torch.randn(6, 6, 16, generator=g)
    plan = [BlockDecoding(window=4, threshold=1e-3, frame_window=16)] * len(model.blocks)
    out = {}
    for kind, devices in (("dynamic", ()), ("static", ("cpu",))):
        monkeypatch.setattr(transformer_flow, "STATIC_SWEEP_DEVICES", devices)
        out[kind] = model.reverse(z, y, guidance=2.0, decoding=plan)
        alone = model.reverse(z[1:2], y[[1, 4]], guidance=2.0, decoding=plan)
        torch.testing.assert_close(alone, out[kind][1:2], atol=1e-5, rtol=0)
    assert relative_error(out["static"], out["dynamic"]) < 1e-5
    exact = model.reverse(z, y, guidance=2.0, jacobi=False)
    assert relative_error(out["static"], exact) < 2e-2
