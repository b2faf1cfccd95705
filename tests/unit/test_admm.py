"""ADMMSparsifier: the Z/U updates, penalty gradient, evaluation projection, squash and state round trip."""

import pytest
import torch
from torch import nn

from nxm_deploy.errors import ConfigError
from nxm_deploy.sparsity import count_nm_violations, nm_project
from nxm_deploy.sparsity.admm import ADMMSparsifier, apply_masks_


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))


CONFIG = [{"tensor_fqn": "0.weight"}, {"tensor_fqn": "2.weight"}]


def test_prepare_initialises_z_and_u():
    model = _model()
    s = ADMMSparsifier("2:4", rho=0.1)
    s.prepare(model, CONFIG)
    w = model[0].weight.detach()
    assert torch.equal(s.admm_z["0.weight"], nm_project(w, "2:4"))
    assert torch.equal(s.admm_u["0.weight"], torch.zeros_like(w))
    r = ADMMSparsifier("2:4", rho=0.1, u_init="residual")
    r.prepare(model, CONFIG)
    assert torch.allclose(r.admm_u["0.weight"], w - nm_project(w, "2:4"))


def test_penalty_value_and_gradient():
    model = _model()
    s = ADMMSparsifier("2:4", rho=0.3, u_init="residual")
    s.prepare(model, CONFIG)
    penalty = s.penalty()
    expected = sum(
        0.5 * 0.3 * (model.get_submodule(f.rpartition(".")[0]).weight - s.admm_z[f] + s.admm_u[f]).pow(2).sum()
        for f in ("0.weight", "2.weight")
    )
    assert torch.allclose(penalty, expected)
    penalty.backward()
    w = model[0].weight
    assert torch.allclose(w.grad, 0.3 * (w.detach() - s.admm_z["0.weight"] + s.admm_u["0.weight"]))
    assert model[0].bias.grad is None  # biases are not in the penalty


def test_step_is_scaled_admm_update():
    model = _model()
    s = ADMMSparsifier("2:4", rho=0.1, rho_factor=2.0, rho_max=0.3)
    s.prepare(model, CONFIG)
    with torch.no_grad():
        model[0].weight.add_(0.5)
    u_old = {k: v.clone() for k, v in s.admm_u.items()}
    record = s.step()
    for fqn in ("0.weight", "2.weight"):
        w = model.get_submodule(fqn.rpartition(".")[0]).weight.detach()
        z = nm_project(w + u_old[fqn], "2:4")
        assert torch.allclose(s.admm_z[fqn], z)
        # rho doubles after the update: the scaled dual U = Lambda / rho halves, Lambda is unchanged (Boyd 3.4.1)
        assert torch.allclose(s.admm_u[fqn], (u_old[fqn] + w - z) * 0.1 / 0.2)
    assert record["rho"] == 0.1 and s.rho == pytest.approx(0.2)
    assert 0 < record["mask_change"] <= 1 and record["primal_residual"] > 0
    s.step()
    s.step()
    assert s.rho == pytest.approx(0.3)  # capped
    assert [h["update"] for h in s.history] == [1, 2, 3]


def test_hard_projected_evaluates_projection_and_restores():
    model = _model()
    s = ADMMSparsifier("2:4")
    s.prepare(model, CONFIG)
    dense = model[0].weight.detach().clone()
    with s.hard_projected():
        assert torch.equal(model[0].weight, nm_project(dense, "2:4"))
    assert torch.equal(model[0].weight, dense)


def test_admm_drives_weights_toward_pattern_and_squash_is_exact():
    """A few ADMM rounds on a regression task reduce the pruned mass; squash_mask is then exactly 2:4."""
    torch.manual_seed(0)
    model = nn.Linear(16, 4)
    x = torch.randn(256, 16)
    y = x @ torch.randn(16, 4)
    s = ADMMSparsifier("2:4", rho=1.0)
    s.prepare(model, [{"tensor_fqn": "weight"}])
    opt = torch.optim.SGD(model.parameters(), lr=0.05)

    def pruned_mass():
        w = model.weight.detach()
        return float((w - nm_project(w, "2:4")).pow(2).sum())

    start = pruned_mass()
    for _ in range(30):
        for _ in range(10):
            loss = (model(x) - y).pow(2).mean() + s.penalty()
            opt.zero_grad()
            loss.backward()
            opt.step()
        s.step()
    assert pruned_mass() < 0.2 * start
    masks = s.squash_mask()
    assert count_nm_violations(model.weight.detach().numpy(), "2:4", axis=1)[1] == 0
    assert torch.equal(model.weight.detach() != 0, masks["weight"] & (model.weight.detach() != 0))
    assert not s.admm_z and s.squashed


def test_state_dict_round_trip_resumes_identically():
    model_a, model_b = _model(), _model()
    a = ADMMSparsifier("2:4", rho=0.1, rho_factor=1.5)
    a.prepare(model_a, CONFIG)
    with torch.no_grad():
        model_a[0].weight.mul_(1.1)
    a.step()
    b = ADMMSparsifier("2:4", rho=0.1, rho_factor=1.5)
    b.prepare(model_b, CONFIG)
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        model_b[0].weight.copy_(model_a[0].weight)
    ra, rb = a.step(), b.step()
    assert ra == rb
    for k in a.admm_z:
        assert torch.equal(a.admm_z[k], b.admm_z[k]) and torch.equal(a.admm_u[k], b.admm_u[k])


def test_load_state_dict_rejects_other_pattern():
    model = _model()
    a = ADMMSparsifier("2:4")
    a.prepare(model, CONFIG)
    b = ADMMSparsifier("1:4")
    b.prepare(model, CONFIG)
    with pytest.raises(ConfigError, match="pattern 2:4"):
        b.load_state_dict(a.state_dict())


def test_apply_masks_checks_shape_and_zeros():
    model = _model()
    mask = torch.zeros(8, 16, dtype=torch.bool)
    mask[:, ::4] = True
    apply_masks_(model, {"0.weight": mask})
    assert (model[0].weight[~mask] == 0).all() and (model[0].weight[mask] != 0).all()
    with pytest.raises(ConfigError, match="must have shape"):
        apply_masks_(model, {"0.weight": torch.ones(2, 2, dtype=torch.bool)})


@pytest.mark.parametrize("kwargs", [{"rho": 0}, {"rho_factor": 0.5}, {"u_init": "ones"}])
def test_bad_arguments(kwargs):
    with pytest.raises(ConfigError):
        ADMMSparsifier("2:4", **kwargs)


def test_increasing_rho_converges_with_the_dual_rescaled():
    """Proximal ADMM with rho tripled at every update: the relative residual falls update after update. Without
    the rescaling of U (scaled dual) each increase inflates the dual and the W-step overshoots Z."""
    torch.manual_seed(0)
    model = nn.Linear(32, 8)
    x = torch.randn(512, 32)
    y = x @ torch.randn(32, 8)
    s = ADMMSparsifier("2:4", rho=1.0, rho_factor=3.0, penalty_mode="proximal")
    s.prepare(model, [{"tensor_fqn": "weight"}])
    opt = torch.optim.SGD(model.parameters(), lr=0.02)
    for _ in range(5):
        for _ in range(20):
            loss = (model(x) - y).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            s.proximal_step(0.02)
        s.step()
    residuals = [h["relative_residual"] for h in s.history]
    assert all(b < a for a, b in zip(residuals, residuals[1:])), residuals
    assert residuals[-1] < 0.02, residuals
