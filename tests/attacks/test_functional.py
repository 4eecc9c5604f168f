"""Functional update rules and the differentiable unroll (attacks/functional.py).

The rules must give ``torch.optim``'s parameters bit for bit (same arithmetic, CPU single-tensor
path); the unroll must give second-order gradients that agree with central finite differences in
float64.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from immunekit.attacks.functional import (
    FUNCTIONAL_OPTIMIZERS,
    FunctionalOptimizer,
    clip_by_norm,
    safe_sqrt,
    unroll,
)
from immunekit.errors import ConfigError

F64 = torch.float64


def _torch_opt(name: str, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    if name in ("gd", "sgd"):
        return torch.optim.SGD(params, lr=lr)
    if name == "sgd_momentum":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.1)


def _rule(name: str) -> FunctionalOptimizer:
    return FunctionalOptimizer(name, momentum=0.9, weight_decay=0.1 if name == "adamw" else 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("name", FUNCTIONAL_OPTIMIZERS)
def test_update_is_torch_optim_bit_for_bit(name: str, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    start = [torch.randn(3, 4, generator=g, dtype=dtype), torch.randn(5, generator=g, dtype=dtype)]
    ref = [nn.Parameter(t.clone()) for t in start]
    opt = _torch_opt(name, ref, lr=0.05)
    rule = _rule(name)
    params = {"a": start[0].clone(), "b": start[1].clone()}
    state = rule.init(params)
    for step in range(6):
        grads = [torch.randn(t.shape, generator=g, dtype=dtype) for t in start]
        grads[0][0, 0] = 0.0  # a zero entry: √v = 0 must not matter
        skip_b = step == 2  # torch.optim skips a parameter without a gradient (state not advanced)
        for p, gr in zip(ref, grads, strict=True):
            p.grad = gr.clone()
        if skip_b:
            ref[1].grad = None
        opt.step()
        params, state = rule.update(params, state, {"a": grads[0], "b": None if skip_b else grads[1]}, 0.05)
    assert torch.equal(params["a"], ref[0].detach())
    assert torch.equal(params["b"], ref[1].detach())
    assert state["b"]["step"] == 5 and state["a"]["step"] == 6


@pytest.mark.parametrize("name", FUNCTIONAL_OPTIMIZERS)
def test_tensor_lr_matches_float_lr(name: str) -> None:
    g = torch.Generator().manual_seed(1)
    params = {"w": torch.randn(7, generator=g, dtype=F64)}
    rule = _rule(name)
    sf, st = rule.init(params), rule.init(params)
    pf, pt = dict(params), dict(params)
    for _ in range(4):
        grad = {"w": torch.randn(7, generator=g, dtype=F64)}
        pf, sf = rule.update(pf, sf, grad, 0.01)
        pt, st = rule.update(pt, st, grad, torch.tensor(0.01, dtype=F64))
    torch.testing.assert_close(pt["w"], pf["w"], rtol=1e-14, atol=1e-15)


def test_update_leaves_inputs_untouched() -> None:
    rule = FunctionalOptimizer("adam")
    params = {"w": torch.ones(3)}
    state = rule.init(params)
    grads = {"w": torch.full((3,), 2.0)}
    new, new_state = rule.update(params, state, grads, 0.1)
    assert torch.equal(params["w"], torch.ones(3)) and state == {"w": {"step": 0}}
    assert torch.equal(grads["w"], torch.full((3,), 2.0))
    # first Adam step moves every coordinate by lr · sign(g) (up to ε)
    torch.testing.assert_close(new["w"], torch.full((3,), 0.9), rtol=0, atol=1e-6)
    assert new_state["w"]["step"] == 1


def test_unknown_optimizer_is_refused() -> None:
    with pytest.raises(ConfigError, match="gd_exact"):
        FunctionalOptimizer("gd_exact")


def test_safe_sqrt_values_and_derivative() -> None:
    x = torch.tensor([0.0, 1e-300, 2.0, 9.0], dtype=F64, requires_grad=True)
    y = safe_sqrt(x)
    assert torch.equal(y.detach(), x.detach().sqrt())
    (grad,) = torch.autograd.grad(y.sum(), x)
    assert grad[0] == 0.0
    torch.testing.assert_close(grad[2:], 0.5 / x.detach()[2:].sqrt(), rtol=1e-15, atol=0)


def test_clip_by_norm_matches_clip_grad_norm() -> None:
    g = torch.Generator().manual_seed(2)
    grads = {"a": torch.randn(4, 3, generator=g, dtype=F64), "b": torch.randn(6, generator=g, dtype=F64)}
    ps = [nn.Parameter(torch.zeros_like(t)) for t in grads.values()]
    for p, t in zip(ps, grads.values(), strict=True):
        p.grad = t.clone()
    before = torch.nn.utils.clip_grad_norm_(ps, max_norm=0.5)
    clipped, norm = clip_by_norm(grads, 0.5)
    torch.testing.assert_close(norm, before, rtol=1e-15, atol=0)
    for p, k in zip(ps, grads, strict=True):
        torch.testing.assert_close(clipped[k], p.grad, rtol=1e-15, atol=0)
    same, _ = clip_by_norm(grads, 1e6)  # below the bound: untouched
    assert all(torch.equal(same[k], grads[k]) for k in grads)
    with pytest.raises(ConfigError, match="max_norm"):
        clip_by_norm(grads, 0.0)


# ---------------------------------------------------------------- unroll


def _mlp() -> nn.Module:
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(F64)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=F64))
    return net


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=F64), torch.randint(0, 2, (n,), generator=g)


CE = nn.functional.cross_entropy


@pytest.mark.parametrize("name", FUNCTIONAL_OPTIMIZERS)
def test_unroll_without_graph_is_the_in_place_loop(name: str) -> None:
    model = _mlp()
    batches = [_data(8, s) for s in range(5)]
    ref = _mlp()
    opt = _torch_opt(name, list(ref.parameters()), lr=0.1)
    losses = []
    for x, y in batches:
        opt.zero_grad()
        loss = CE(ref(x), y)
        loss.backward()
        losses.append(float(loss.detach()))
        opt.step()
    params = dict(model.named_parameters())
    traj = unroll(model, params, batches, loss_fn=CE, optimizer=_rule(name), lr=0.1, create_graph=False)
    for k, p in ref.named_parameters():
        assert torch.equal(traj.final[k], p.detach()), k
    assert [float(v) for v in traj.losses] == losses
    assert len(traj.params) == 6 and all(not t.grad_fn for t in traj.final.values())
    for k, p in model.named_parameters():  # the module is never written
        assert torch.equal(p, params[k]) and torch.equal(p, dict(_mlp().named_parameters())[k])


def _meta_loss(
    model: nn.Module, theta0: dict[str, torch.Tensor], lr: torch.Tensor | float, name: str
) -> torch.Tensor:
    """L_outer(θ_2) after a 2-step unroll from θ0 (clipped), as a function of θ0 and lr."""
    batches = [_data(6, 10), _data(6, 11)]
    traj = unroll(
        model, theta0, batches, loss_fn=CE, optimizer=_rule(name), lr=lr, create_graph=True, clip=5.0
    )
    xo, yo = _data(10, 12)
    return CE(torch.func.functional_call(model, traj.final, (xo,)), yo)


@pytest.mark.parametrize("name", ["sgd", "sgd_momentum", "adam", "adamw"])
def test_second_order_gradient_matches_finite_differences(name: str) -> None:
    model = _mlp()
    base = {k: p.detach().clone() for k, p in model.named_parameters()}
    theta = {k: v.clone().requires_grad_(True) for k, v in base.items()}
    lr = torch.tensor(0.05, dtype=F64, requires_grad=True)
    loss = _meta_loss(model, theta, lr, name)
    grads = torch.autograd.grad(loss, [*theta.values(), lr])
    g = torch.Generator().manual_seed(3)
    direction = {k: torch.randn(v.shape, generator=g, dtype=F64) for k, v in base.items()}
    analytic = sum(float((gr * direction[k]).sum()) for k, gr in zip(theta, grads[:-1], strict=True))
    h = 1e-6

    def at(eps: float, lr_eps: float = 0.0) -> float:
        shifted = {k: base[k] + eps * direction[k] for k in base}
        with torch.no_grad():
            return float(_meta_loss(model, shifted, torch.tensor(0.05 + lr_eps, dtype=F64), name))

    numeric = (at(h) - at(-h)) / (2 * h)
    assert analytic == pytest.approx(numeric, rel=1e-6, abs=1e-9)
    numeric_lr = (at(0.0, h) - at(0.0, -h)) / (2 * h)
    assert float(grads[-1]) == pytest.approx(numeric_lr, rel=1e-6, abs=1e-9)
    assert abs(float(grads[-1])) > 1e-6  # the lr really moves the outer loss


def test_one_sgd_step_lr_gradient_closed_form() -> None:
    # θ1 = θ0 − η g0  ⇒  dL(θ1)/dη = −∇L(θ1) · g0
    model = _mlp()
    theta = {k: p.detach().clone().requires_grad_(True) for k, p in model.named_parameters()}
    x, y = _data(8, 20)
    lr = torch.tensor(0.3, dtype=F64, requires_grad=True)
    traj = unroll(
        model, theta, [(x, y)], loss_fn=CE, optimizer=FunctionalOptimizer("sgd"), lr=lr, create_graph=True
    )
    outer = CE(torch.func.functional_call(model, traj.final, (x,)), y)
    (dlr,) = torch.autograd.grad(outer, lr)
    g0 = torch.autograd.grad(CE(torch.func.functional_call(model, theta, (x,)), y), list(theta.values()))
    theta1 = {k: v.detach().requires_grad_(True) for k, v in traj.final.items()}
    g1 = torch.autograd.grad(CE(torch.func.functional_call(model, theta1, (x,)), y), list(theta1.values()))
    expected = -sum(float((a * b).sum()) for a, b in zip(g0, g1, strict=True))
    assert float(dlr) == pytest.approx(expected, rel=1e-12)


def test_unroll_keep_last_and_bad_keep() -> None:
    model = _mlp()
    params = dict(model.named_parameters())
    batches = [_data(4, s) for s in range(3)]
    traj = unroll(
        model, params, batches, loss_fn=CE, optimizer=_rule("adam"), lr=0.1, create_graph=False, keep="last"
    )
    full = unroll(model, params, batches, loss_fn=CE, optimizer=_rule("adam"), lr=0.1, create_graph=False)
    assert len(traj.params) == 2 and len(traj.losses) == 3
    assert all(torch.equal(traj.final[k], full.final[k]) for k in params)
    with pytest.raises(ConfigError, match="keep"):
        unroll(
            model, params, batches, loss_fn=CE, optimizer=_rule("adam"), lr=0.1, create_graph=False, keep="x"
        )
