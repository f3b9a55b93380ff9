"""Evaluation tools on synthetic features with known structure (k-NN, linear probe, collapse)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lmim.train.evaluate.collapse import collapse_stats, cross_image_cosine, plot_collapse
from lmim.train.evaluate.knn import knn_loo1, knn_loo1_predictions, knn_weighted
from lmim.train.evaluate.linear import linear_probe


def clusters(n_per_class: int, num_classes: int, dim: int, spread: float, seed: int):
    """Gaussian clusters around random unit centres; `spread` is the per-dimension noise std."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(num_classes, dim, generator=g), dim=1) * 3.0
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    feats = centres[labels] + spread * torch.randn(labels.shape[0], dim, generator=g)
    perm = torch.randperm(labels.shape[0], generator=g)
    return feats[perm], labels[perm]


def brute_loo1(feats, labels) -> float:
    u = F.normalize(feats.double(), dim=1)
    correct = 0
    for i in range(u.shape[0]):
        best, best_j = -math.inf, -1
        for j in range(u.shape[0]):
            if j != i:
                s = float(u[i] @ u[j])
                if s > best:
                    best, best_j = s, j
        correct += int(labels[best_j] == labels[i])
    return 100.0 * correct / u.shape[0]


def test_knn_loo1_matches_brute_force_across_chunk_sizes():
    feats, labels = clusters(15, 4, 8, spread=1.5, seed=1)       # overlapping: accuracy well below 100
    expected = brute_loo1(feats, labels)
    assert 30 < expected < 100
    for chunk in (1, 7, 1024):
        assert knn_loo1(feats, labels, chunk=chunk) == pytest.approx(expected)


def test_knn_loo1_excludes_the_query_itself():
    # Every sample is unique in its class: including itself would give 100 %, leaving it out gives 0 %.
    feats = torch.eye(6)
    labels = torch.arange(6)
    assert knn_loo1(feats, labels) == 0.0
    # Duplicates of each point with the same label: the neighbour is the twin, 100 %.
    assert knn_loo1(torch.cat([feats, feats * 2]), torch.cat([labels, labels])) == 100.0


def test_knn_separates_clusters_and_is_at_chance_on_random_labels():
    feats, labels = clusters(100, 5, 16, spread=0.3, seed=2)
    assert knn_loo1(feats, labels) == 100.0
    random_labels = torch.randint(0, 5, labels.shape, generator=torch.Generator().manual_seed(3))
    acc = knn_loo1(feats, random_labels)
    assert 10 < acc < 30, acc                                     # chance is 20 %
    tr_f, tr_y = clusters(100, 5, 16, spread=0.3, seed=4)
    assert knn_weighted(tr_f, tr_y, tr_f, tr_y) == 100.0


def brute_weighted(train_f, train_y, test_f, k, T, num_classes):
    a = F.normalize(train_f.double(), dim=1)
    b = F.normalize(test_f.double(), dim=1)
    preds = []
    for q in b:
        sims = [(float(q @ a[j]), j) for j in range(a.shape[0])]
        sims.sort(key=lambda s: -s[0])
        votes = [0.0] * num_classes
        for s, j in sims[:k]:
            votes[int(train_y[j])] += math.exp(s / T)
        preds.append(max(range(num_classes), key=lambda c: votes[c]))
    return torch.tensor(preds)


@pytest.mark.parametrize("k,T", [(1, 0.07), (5, 0.07), (20, 0.5)])
def test_knn_weighted_matches_direct_computation(k, T):
    tr_f, tr_y = clusters(20, 3, 6, spread=1.5, seed=5)
    te_f, te_y = clusters(10, 3, 6, spread=1.5, seed=6)
    te_f = te_f + 0.1  # not the same points
    expected = brute_weighted(tr_f, tr_y, te_f, k, T, 3)
    acc = knn_weighted(tr_f, tr_y, te_f, te_y, k=k, T=T, chunk=4)
    assert acc == pytest.approx(100.0 * float((expected == te_y).float().mean()))


def test_knn_rejects_unlabelled_and_misshaped_input():
    with pytest.raises(ValueError, match="unlabelled"):
        knn_loo1(torch.randn(4, 3), torch.tensor([0, 1, -1, 0]))
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        knn_loo1(torch.randn(4), torch.tensor([0, 1, 1, 0]))
    with pytest.raises(ValueError, match="like the train features"):
        knn_weighted(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), torch.randn(2, 5), torch.zeros(2, dtype=torch.long))


def test_linear_probe_separates_linearly_separable_classes():
    # Classes given by hyperplanes (with a margin) on features with wildly different scales per
    # dimension: standardisation must make the probe work regardless of scale.
    g = torch.Generator().manual_seed(7)
    scale = torch.logspace(-3, 3, 10)
    z = torch.randn(4000, 10, generator=g)
    w = torch.randn(10, 3, generator=g)
    logits = z @ w
    top2 = logits.topk(2, dim=1).values
    keep = (top2[:, 0] - top2[:, 1]) > 0.5                       # a margin between the classes
    x, y = (z * scale)[keep][:1200], logits.argmax(1)[keep][:1200]
    acc = linear_probe(x[:1000], y[:1000], x[1000:], y[1000:], epochs=100, device="cpu")
    assert acc > 97, acc
    # k-NN is much worse there (the large-scale dimensions dominate distances): the probe is not k-NN.
    assert knn_weighted(x[:1000], y[:1000], x[1000:], y[1000:]) < acc - 10


def test_linear_probe_is_at_chance_on_random_labels_and_deterministic():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(800, 16, generator=g)
    y = torch.randint(0, 4, (800,), generator=g)
    a = linear_probe(x[:600], y[:600], x[600:], y[600:], epochs=5, device="cpu", seed=1)
    b = linear_probe(x[:600], y[:600], x[600:], y[600:], epochs=5, device="cpu", seed=1)
    assert a == b
    assert 10 < a < 40, a                                         # chance is 25 %
    # the train split's figure tells memorising from generalising: 16-d features, 600 random labels
    from lmim.train.evaluate.linear import fit_linear_probe

    train_top1, test_top1 = fit_linear_probe(x[:600], y[:600], x[600:], y[600:], epochs=5, device="cpu", seed=1)
    assert test_top1 == a and train_top1 > test_top1


def test_collapse_stats_identical_vs_random_features():
    g = torch.Generator().manual_seed(9)
    one = torch.randn(1, 32, generator=g)
    same = one.repeat(50, 1) * torch.rand(50, 1, generator=g).add(0.5)   # same direction, other norms
    s = collapse_stats(same)
    assert s["collapse_cos"] == pytest.approx(1.0, abs=1e-6)
    assert s["effective_rank"] < 1.5
    rnd = collapse_stats(torch.randn(200, 32, generator=g))
    assert abs(rnd["collapse_cos"]) < 0.05
    assert rnd["effective_rank"] > 20
    # Tokens [N, T, D]: pooled by the mean; within-image similarity 1 when all tokens of an image agree.
    tokens = torch.randn(40, 1, 16, generator=g).repeat(1, 9, 1)
    t = collapse_stats(tokens)
    assert t["token_sim"] == pytest.approx(1.0, abs=1e-5)
    assert abs(t["collapse_cos"]) < 0.2


def test_cross_image_cosine_equals_pairwise_mean():
    x = torch.randn(30, 5, generator=torch.Generator().manual_seed(10)) + 1.0
    u = F.normalize(x.double(), dim=1)
    sim = u @ u.T
    expected = float((sim.sum() - sim.diagonal().sum()) / (30 * 29))
    assert cross_image_cosine(x) == pytest.approx(expected, rel=1e-9)


def test_plot_collapse_writes_a_png(tmp_path):
    x = torch.randn(100, 8, generator=torch.Generator().manual_seed(11))
    out = plot_collapse(x, tmp_path / "sub" / "c.png", title="random")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["c.png"]   # no temporary left behind


def test_knn_weighted_stays_right_at_small_temperatures():
    """exp(cos / T) in float32 is inf for every neighbour once T < ~0.011, so every class tied and
    the vote went to class 0 (50 % on a real split, with exit 0). The votes are now taken relative to
    the nearest neighbour: the same ranking, finite for any T. (The brute force sums exp(cos / T) in
    Python's double, which holds these T.)"""
    tr_f, tr_y = clusters(30, 2, 8, spread=1.5, seed=7)
    te_f, te_y = clusters(15, 2, 8, spread=1.5, seed=8)
    for T in (0.01, 0.005, 0.003):
        expected = brute_weighted(tr_f, tr_y, te_f, 20, T, 2)
        assert knn_weighted(tr_f, tr_y, te_f, te_y, k=20, T=T) == pytest.approx(
            100.0 * float((expected == te_y).float().mean()))
    assert knn_weighted(tr_f, tr_y, te_f, te_y, k=20, T=0.003) > 60.0    # not the all-tied vote for class 0
