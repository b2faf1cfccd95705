"""NMPattern, exact n:m masks, target selection."""

import itertools

import numpy as np
import pytest
import torch

from tiny_models import tiny_classifier

from nxm_deploy.errors import ConfigError, PatternError
from nxm_deploy.sparsity import NMPattern, count_nm_violations, nm_mask, nm_project
from nxm_deploy.sparsity.targets import select_targets, target_names


# -- NMPattern -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,n_keep,m_group", [("2:4", 2, 4), ("1:4", 1, 4), (" 2 : 8 ", 2, 8), ("4:16", 4, 16), ("1:2", 1, 2)])
def test_parse_legal(text, n_keep, m_group):
    p = NMPattern.parse(text)
    assert (p.n_keep, p.m_group) == (n_keep, m_group)
    assert str(p) == f"{n_keep}:{m_group}"
    assert p.density == n_keep / m_group and p.sparsity == 1 - n_keep / m_group
    assert p.slug == f"{n_keep}of{m_group}"


def test_parse_rejects_reversed_with_hint():
    with pytest.raises(ConfigError, match="did you mean '2:4'"):
        NMPattern.parse("4:2")


@pytest.mark.parametrize("text", ["2:3", "2:32", "0:4", "4:4", "2-4", "two:four", ""])
def test_parse_rejects_illegal(text):
    with pytest.raises(ConfigError):
        NMPattern.parse(text)


# -- masks ---------------------------------------------------------------------------------------------------
def _brute_force_mask(row_groups: np.ndarray, n_keep: int) -> np.ndarray:
    """Best subset of each group by enumeration: maximise kept |w| (= minimise projection error)."""
    out = np.zeros_like(row_groups, dtype=bool)
    for g, values in enumerate(row_groups):
        best = max(itertools.combinations(range(len(values)), n_keep), key=lambda idx: (sum(abs(values[i]) for i in idx), [-i for i in idx]))
        out[g, list(best)] = True
    return out


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "2:8", "4:8"])
def test_mask_is_exact_projection(pattern):
    p = NMPattern.parse(pattern)
    w = torch.randn(6, 32, generator=torch.Generator().manual_seed(0))
    mask = nm_mask(w, p)
    assert mask.dtype == torch.bool and mask.shape == w.shape
    groups = w.numpy().reshape(-1, p.m_group)
    expected = _brute_force_mask(groups, p.n_keep).reshape(w.shape)
    np.testing.assert_array_equal(mask.numpy(), expected)
    assert (mask.reshape(-1, p.m_group).sum(1) == p.n_keep).all()


def test_mask_ties_go_to_lower_index():
    w = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, -2.0, 2.0, 0.0]])
    assert nm_mask(w, "2:4").tolist() == [[True, True, False, False, False, True, True, False]]


def test_all_six_legal_2of4_patterns_are_fixed_points():
    for keep in itertools.combinations(range(4), 2):
        w = torch.zeros(1, 4)
        w[0, list(keep)] = torch.tensor([3.0, -5.0])
        assert torch.equal(nm_project(w, "2:4"), w)  # idempotent on the n:m set
        assert nm_mask(w, "2:4")[0, list(keep)].all()


def test_projection_idempotent_and_within_pattern():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    z = nm_project(w, "2:4")
    assert torch.equal(nm_project(z, "2:4"), z)
    assert count_nm_violations(z.numpy(), "2:4", axis=1)[1] == 0


def test_mask_rejects_bad_shape():
    with pytest.raises(PatternError, match="not a multiple of the group size 4"):
        nm_mask(torch.randn(4, 6), "2:4")


def test_count_violations_reports_first_bad_group_in_own_coordinates():
    w = nm_project(torch.randn(8, 16, generator=torch.Generator().manual_seed(2)), "2:4").numpy()
    w[5, 9] = 7.0 if w[5, 9] == 0 else w[5, 9]
    w[5, 10] = 7.0
    w[5, 11] = 7.0  # group (row 5, columns 8..11) now has >= 3 nonzeros
    checked, bad, first = count_nm_violations(w, "2:4", axis=1)
    assert (checked, bad, first) == (32, 1, (5, 8))
    # same matrix transposed: reduction axis 0, bad group starts at (8, 5)
    assert count_nm_violations(w.T, "2:4", axis=0) == (32, 1, (8, 5))


# -- target selection ----------------------------------------------------------------------------------------
def _tiny(model_type):
    return tiny_classifier(model_type)

@pytest.mark.parametrize("model_type", ["bert", "roberta", "distilbert", "electra"])
def test_default_targets_are_six_per_encoder_layer(model_type):
    model = _tiny(model_type)
    decisions = select_targets(model, NMPattern.parse("2:4"))
    targets = target_names(decisions)
    assert len(targets) == 12, targets
    skipped = [d for d in decisions if not d.target]
    assert skipped and all(d.reason.startswith("skipped:") for d in skipped)
    assert {d.module for d in decisions} == {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def test_exclude_rule_and_indivisible_layer_are_recorded():
    model = _tiny("bert")
    decisions = select_targets(model, NMPattern.parse("2:4"), exclude=["*.attention.self.query"])
    by_name = {d.module: d for d in decisions}
    assert by_name["bert.encoder.layer.0.attention.self.query"].reason == "skipped: excluded by rule '*.attention.self.query'"
    from transformers import BertConfig, BertForSequenceClassification

    odd = BertForSequenceClassification(BertConfig(vocab_size=100, num_hidden_layers=1, hidden_size=30,
                                                   num_attention_heads=2, intermediate_size=64))
    by_name = {d.module: d for d in select_targets(odd, NMPattern.parse("2:4"))}
    assert by_name["bert.encoder.layer.0.attention.self.query"].reason == "skipped: in_features 30 not a multiple of m_group 4"
    assert by_name["bert.encoder.layer.0.output.dense"].target  # in_features 64


@pytest.mark.parametrize("pattern", ["1:2", "2:4", "1:4", "2:8", "4:8", "4:16"])
def test_mask_equals_stable_sort_reference_on_ties(pattern):
    """Integer-valued weights (many ties): the mask equals a stable-sort top-n_keep reference, ties to the lower index."""
    p = NMPattern.parse(pattern)
    w = torch.randint(-3, 4, (64, 32), generator=torch.Generator().manual_seed(3)).float()
    groups = w.abs().reshape(-1, p.m_group)
    order = torch.sort(groups, dim=1, descending=True, stable=True).indices[:, : p.n_keep]
    reference = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, order, True).reshape(w.shape)
    assert torch.equal(nm_mask(w, p), reference)


@pytest.mark.parametrize("pattern", ["1:4", "2:4", "3:4", "2:8", "4:8"])
def test_rank_count_path_equals_the_stable_sort_mask(pattern):
    """The fast rank-count mask (group size <= 8) is the stable-sort mask, ties included."""
    from nxm_deploy.sparsity.mask import _rank_count_mask

    p = NMPattern.parse(pattern)
    g = torch.Generator().manual_seed(3)
    values = torch.randint(0, 4, (512, p.m_group * 4), generator=g).float()  # many ties
    values[::7] = torch.randn(values[::7].shape, generator=g)
    groups = values.abs().reshape(-1, p.m_group)
    order = torch.sort(groups, dim=1, descending=True, stable=True).indices[:, : p.n_keep]
    expected = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, order, True)
    assert torch.equal(_rank_count_mask(groups, p), expected)


def test_require_targets_refuses_globs_that_match_nothing_and_models_without_eligible_layers():
    from torch import nn

    from nxm_deploy.sparsity.targets import require_targets

    model = tiny_classifier("bert")
    pattern = NMPattern.parse("2:4")
    assert len(target_names(require_targets(model, pattern))) == 12
    with pytest.raises(ConfigError, match=r"include glob\(s\) \['\*\.layers\.\*'\] match no nn.Linear") as err:
        require_targets(model, pattern, include=["*.layers.*"])
    assert "encoder.layer" in err.value.hint  # shows real module names
    with pytest.raises(ConfigError, match=r"exclude glob\(s\) \['\*\.qkv'\]"):
        require_targets(model, pattern, exclude=["*.qkv"])
    with pytest.raises(ConfigError, match="No nn.Linear of .* is eligible for 2:4.*excluded by rule"):
        require_targets(model, pattern, exclude=["*"])

    odd = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))  # in_features 6 and 8: neither holds a group of 16
    with pytest.raises(ConfigError, match="not a multiple of m_group 16"):
        require_targets(odd, NMPattern.parse("4:16"), include=["*"])
    with pytest.raises(ConfigError, match="no nn.Linear module"):
        require_targets(nn.Sequential(nn.ReLU()), pattern, include=[])
