"""`reflexflow demo --dataset photos`: its data, spectrum metric, feature network, models,
method rows, paired differences and the command end to end (tiny settings, a few seconds).

Needs the demo extra (scikit-image, matplotlib).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("skimage")
pytest.importorskip("matplotlib")

from reflexflow.cli import main  # noqa: E402
from reflexflow.demo import photos as P  # noqa: E402
from reflexflow.demo.methods import (  # noqa: E402
    METHODS,
    PHOTO_METHODS,
    check_method,
    method_knobs,
    parse_method,
)
from reflexflow.demo.model import PatchUNet  # noqa: E402
from reflexflow.demo.photo_features import (  # noqa: E402
    FeatureSettings,
    load_or_train_photo_classifier,
)
from reflexflow.demo.report import paired_differences, rerender_markdown  # noqa: E402
from reflexflow.demo.settings import DemoConfig  # noqa: E402
from reflexflow.demo.sit import SIT_S2, SiT  # noqa: E402
from reflexflow.demo.spectrum import band_scores, radial_power_spectrum  # noqa: E402
from reflexflow.presets import DEFAULT_PRESET  # noqa: E402


@pytest.fixture(scope="module")
def raw_photos():
    return {name: P.load_photo(name) for name in P.PHOTOS}


@pytest.fixture(scope="module")
def crops(raw_photos):
    return P.load_photo_crops(raw_photos)


def test_every_photo_is_read_from_the_installed_wheel(raw_photos):
    assert len(raw_photos) == 8
    for name, img in raw_photos.items():
        assert (P.photo_dir() / P.PHOTOS[name]).is_file()
        assert img.dtype == torch.uint8 and img.dim() == 3 and img.shape[0] == 3, name
        assert min(img.shape[-2:]) >= 300, name
    with pytest.raises(ValueError, match="photo must be one of"):
        P.load_photo("moon")


def test_crops_have_the_stated_shape_range_and_balanced_labels(crops):
    x, y = crops.sample(37, "train", torch.Generator().manual_seed(0))
    assert x.shape == (37, 3, 32, 32) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y.shape == (37,)
    assert x.min() >= -1 and x.max() <= 1 and torch.isfinite(x).all()
    counts = torch.bincount(y, minlength=8)
    assert counts.max() - counts.min() <= 1  # 37 = 4 * 8 + 5
    assert x.flatten(1).std(1).mean() > 0.02  # real image content, not a constant


def test_crops_are_deterministic_given_the_seed(raw_photos, crops):
    again = P.load_photo_crops(raw_photos)
    assert again.digest == crops.digest
    a, ya = crops.sample(64, "train", torch.Generator().manual_seed(3))
    b, yb = again.sample(64, "train", torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and torch.equal(ya, yb)
    c, _ = crops.sample(64, "train", torch.Generator().manual_seed(4))
    assert not torch.equal(a, c)
    for split in ("val", "test"):
        h1, l1 = crops.heldout(split, 48)
        h2, l2 = again.heldout(split, 48)
        assert torch.equal(h1, h2) and torch.equal(l1, l2)
    assert not torch.equal(crops.heldout("val", 48)[0], crops.heldout("test", 48)[0])


def test_regions_partition_every_photograph(raw_photos):
    for img in raw_photos.values():
        h, w = img.shape[-2:]
        mask = torch.zeros(h, w, dtype=torch.int64)
        for top, left, bottom, right in P.region_boxes(h, w).values():
            assert bottom > top and right > left
            mask[top:bottom, left:right] += 1
        assert bool((mask == 1).all())  # disjoint and covering


def _poisoned(raw_photos, splits):
    """Photos as float with NaN in the regions of ``splits`` (any read of them shows)."""
    out = {}
    for name, img in raw_photos.items():
        x = img.double()
        for split, (top, left, bottom, right) in P.region_boxes(*img.shape[-2:]).items():
            if split in splits:
                x[:, top:bottom, left:right] = float("nan")
        out[name] = x
    return out


def test_training_crops_never_read_a_held_out_pixel(raw_photos, crops):
    poisoned = P.load_photo_crops(_poisoned(raw_photos, ("val", "test")))
    gen = torch.Generator().manual_seed(11)
    x, labels, win = poisoned.sample(3000, "train", gen, return_windows=True)
    assert torch.isfinite(x).all()  # no NaN of the held-out band reached a training crop
    ref, _ = crops.sample(3000, "train", torch.Generator().manual_seed(11))
    assert torch.allclose(x, ref, atol=1e-5)  # and the crops are the real ones
    # every window (split, top, left, side, flip) lies inside its photograph's train region
    hw = torch.tensor([list(r.shape[-2:]) for r in crops.regions["train"]]).double()[labels]
    assert (win[:, 0] == P.REGIONS.index("train")).all()
    assert (win[:, 1] >= 0).all() and (win[:, 2] >= 0).all()
    assert (win[:, 1] + win[:, 3] <= hw[:, 0]).all() and (win[:, 2] + win[:, 3] <= hw[:, 1]).all()
    # the other way round: held-out crops never read a train pixel
    poisoned_train = P.load_photo_crops(_poisoned(raw_photos, ("train",)))
    for split in ("val", "test", P.HELDOUT):
        held, _ = poisoned_train.sample(2000, split, torch.Generator().manual_seed(5))
        assert torch.isfinite(held).all(), split
    # and val crops never read a test pixel
    poisoned_test = P.load_photo_crops(_poisoned(raw_photos, ("test",)))
    assert torch.isfinite(poisoned_test.heldout("val", 2000)[0]).all()


def test_white_noise_has_a_flat_spectrum():
    x = 0.5 * torch.randn(3000, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    p = radial_power_spectrum(x)
    assert p.shape == (16,)
    assert torch.allclose(p, torch.full_like(p, 0.25), rtol=0.04)
    scores = band_scores(p, torch.full_like(p, 0.25))
    assert scores["spec_low"] < 0.04 and scores["spec_high"] < 0.04


def test_a_low_passed_image_set_loses_high_band_power(crops):
    real, _ = crops.heldout("test", 512)
    blurred = F.avg_pool2d(F.pad(real, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    s = band_scores(radial_power_spectrum(blurred), radial_power_spectrum(real))
    assert s["power_high"] < -0.5  # much less power above a quarter of Nyquist
    assert abs(s["power_low"]) < 0.2  # little change below it
    assert s["spec_high"] > 3 * s["spec_low"]
    same = band_scores(radial_power_spectrum(real), radial_power_spectrum(real))
    assert same == {"spec_low": 0.0, "power_low": 0.0, "spec_high": 0.0, "power_high": 0.0}


def test_spectrum_rejects_bad_input():
    with pytest.raises(ValueError, match="square"):
        radial_power_spectrum(torch.zeros(2, 3, 8, 6))
    with pytest.raises(ValueError, match="spectra"):
        band_scores(torch.ones(4), torch.ones(5))


def test_feature_network_is_cached_by_its_settings(crops, tmp_path):
    tiny = FeatureSettings(steps=3, batch_size=16)
    clf, cached, key = load_or_train_photo_classifier(crops, tiny, tmp_path, show_progress=False)
    assert not cached and (tmp_path / f"{key}.pt").is_file()
    again, cached2, key2 = load_or_train_photo_classifier(
        crops, tiny, tmp_path, show_progress=False
    )
    assert cached2 and key2 == key
    for a, b in zip(clf.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    x, _ = crops.heldout("test", 8)
    assert torch.equal(clf.features(x), again.features(x))
    assert clf.features(x).shape == (8, tiny.feature_dim)
    other = FeatureSettings(steps=4, batch_size=16)
    assert other.key(crops.digest) != key
    assert tiny.key("another-digest") != key


def test_patch_unet_and_sit_map_images_to_velocities():
    x, t = torch.randn(2, 3, 32, 32), torch.rand(2)
    assert PatchUNet(3, 2, (8, 16))(x, t).shape == x.shape
    sit = SiT(in_channels=3, image_size=32, patch=2, hidden=32, depth=2, heads=2)
    assert sit(x, t).shape == x.shape
    assert sit(x, t).abs().max() == 0  # adaLN-zero and a zero output layer: v = 0 at init


def test_sit_unpatchify_keeps_each_patch_in_place():
    torch.manual_seed(0)
    sit = SiT(in_channels=3, image_size=8, patch=2, hidden=16, depth=0, heads=2)
    torch.nn.init.normal_(sit.out.weight)  # depth 0: each token sees only its own patch
    x, t = torch.randn(1, 3, 8, 8), torch.rand(1)
    y = x.clone()
    y[:, :, 2:4, 4:6] += 1.0  # one patch (row 1, column 2)
    changed = (sit(y, t) - sit(x, t)).abs().sum(1)[0] > 1e-6
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[2:4, 4:6] = True
    assert torch.equal(changed, expected)


def test_sit_s2_has_the_stated_size():
    sit = SiT(**SIT_S2)
    params = sum(p.numel() for p in sit.parameters())
    assert 32e6 < params < 33e6  # SiT-S/2 at 32x32x3
    assert sit.forward_flops() == pytest.approx(12.1e9, rel=0.01)


def test_method_rows_and_their_overrides():
    assert parse_method("defar:lambda_adr=0.5:adr_loss=mse") == (
        "defar",
        {"lambda_adr": 0.5, "adr_loss": "mse"},
    )
    assert parse_method("fm:ip_gamma=1:rollout_grad=true")[1] == {
        "ip_gamma": 1,
        "rollout_grad": True,
    }
    for bad in ("nope", "fm:lambda_adr", "fm:=1", "fm:x=1:x=2", "fm:lambda_adr=inf"):
        with pytest.raises(ValueError):
            parse_method(bad)
    # preset and stable rows ignore the digits study's shared knobs ...
    assert method_knobs("defar", lambda_adr=3.0) == {"preset": "defar"}
    assert method_knobs("defar-stable")["target"] == "stable"
    assert method_knobs("fm-stable") == {"method": "fm", "target": "stable", "stable_ref": 256}
    # ... the digits rows take them, and a row's own override wins
    assert method_knobs("gd-direction", lambda_adr=3.0)["lambda_adr"] == 3.0
    assert method_knobs("gd-direction").get("preset", "grid-direction") == "grid-direction"
    assert method_knobs("gd-direction:lambda_adr=0.1", lambda_adr=3.0)["lambda_adr"] == 0.1
    # the reflexflow row is the library's default preset, untouched by the digits knobs
    assert method_knobs("reflexflow", lambda_adr=3.0) == {"preset": DEFAULT_PRESET}
    assert set(PHOTO_METHODS) <= set(METHODS)


def test_every_row_builds_or_names_the_knob_the_loss_lacks():
    for name in METHODS:
        try:
            loss = check_method(name, method_knobs(name))
        except ValueError as err:  # presets / stable targets not in this reflexflow yet
            assert "needs ReflexFlowLoss(" in str(err) and name in str(err)
            assert "preset=" in str(err) or "target=" in str(err)
        else:
            assert loss.config is not None
    with pytest.raises(ValueError, match="not_a_knob"):
        check_method("fm:not_a_knob=1", method_knobs("fm:not_a_knob=1"))
    with pytest.raises(ValueError, match="ip_gamma"):
        check_method("ip:ip_gamma=-1", method_knobs("ip:ip_gamma=-1"))


def test_paired_differences_use_matching_seeds():
    def run(method, seed, fd):
        return {
            "method": method,
            "seed": seed,
            "scores": {"10": {"fd": fd}},
            "bias": {"10": {"mean_mse": 0.0}},
        }

    runs = [run("fm", s, v) for s, v in enumerate((10.0, 20.0, 30.0))]
    runs += [run("x", s, v) for s, v in enumerate((9.0, 18.0, 28.5))]
    d = paired_differences(runs, (10,))["x"]["10"]["fd"]
    assert d["values"] == [-1.0, -2.0, -1.5] and d["mean"] == pytest.approx(-1.5)
    # std of the differences is 0.5: ci95 = t_{0.975, 2} 0.5 / sqrt(3)
    assert d["ci95"] == pytest.approx(4.303 * 0.5 / math.sqrt(3))
    assert paired_differences(runs[3:], (10,)) == {}  # no fm, no differences


def test_photo_presets_resolve_by_size_and_device():
    cpu = DemoConfig(dataset="photos")
    assert cpu.methods == PHOTO_METHODS and cpu.arch == "unet" and not cpu.amp
    cuda = DemoConfig(dataset="photos", device="cuda")
    assert cuda.arch == "sit" and cuda.amp and cuda.steps >= 20_000
    quick = DemoConfig(dataset="photos", quick=True, steps=7)
    assert quick.steps == 7 and quick.seeds == (0, 1)
    digits = DemoConfig(dataset="digits")
    assert (digits.steps, digits.num_samples, digits.channels) == (400, 500, (16, 32))
    with pytest.raises(ValueError, match="arch"):
        DemoConfig(dataset="photos", arch="mlp")


@pytest.fixture(scope="module")
def photos_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("photos-quick")
    args = ["demo", "--dataset", "photos", "--quick", "--steps", "3", "--seeds", "2"]
    args += ["--eval-steps", "2,3", "--num-samples", "16", "--bias-samples", "8"]
    args += ["--eval-size", "64", "--feature-steps", "5", "--methods", "fm,ss,gd-mse"]
    rc = main([*args, "--out", str(out), "--cache-dir", str(out / "cache"), "--no-progress"])
    assert rc == 0
    return out, json.loads((out / "results.json").read_text())


def test_photos_quick_runs_end_to_end(photos_run):
    out, res = photos_run
    for name in (
        "results.md",
        "exposure-bias.png",
        "loss-curves.png",
        "differences.png",
        "spectrum.png",
        "samples-data.png",
        "samples-fm.png",
        "samples-gd-mse.png",
    ):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert res["config"]["dataset"] == "photos" and res["data"]["image_size"] == 32
    assert len(res["runs"]) == 6 and len(res["data_spectrum"]) == 16
    for run in res["runs"]:
        for n in ("2", "3"):
            s = run["scores"][n]
            assert {"fd", "precision", "recall", "spec_low", "spec_high"} <= set(s)
            assert all(math.isfinite(v) for v in s.values())
            assert len(run["spectra"][n]) == 16
        assert len(run["term_curves"]["fm_term"]) == 3
    mse = next(r for r in res["runs"] if r["method"] == "gd-mse")
    assert all(v is not None and v > 0 for v in mse["term_curves"]["adr_term"])
    assert mse["loss_config"]["adr_loss"] == "mse"
    assert set(res["vs_fm"]) == {"ss", "gd-mse"}
    assert res["vs_fm"]["ss"]["2"]["fd"]["n"] == 2
    clf = res["classifier"]
    assert 0 <= clf["accuracy"] <= 1 and "train-region" in clf["accuracy_on"]
    md = (out / "results.md").read_text()
    assert "method − fm, paired over seeds" in md and "spectrum error, low band" in md


def test_photos_results_md_rerenders_from_results_json(photos_run):
    out, _ = photos_run
    assert rerender_markdown(out) == (out / "results.md").read_text()


def test_missing_scikit_image_gives_a_clear_message(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(__import__("sys").modules, "skimage", None)
    args = ["demo", "--dataset", "photos", "--quick", "--out", str(tmp_path), "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "scikit-image" in err and 'pip install "reflexflow[demo]"' in err


def test_a_row_the_loss_cannot_build_stops_before_training(tmp_path, capsys):
    args = ["demo", "--dataset", "photos", "--quick", "--methods", "fm,fm:not_a_knob=1"]
    assert main([*args, "--out", str(tmp_path), "--no-progress"]) == 2
    assert "not_a_knob" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()
