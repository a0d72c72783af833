"""Samplers on Gaussian data, whose exact flow-matching velocity field is closed-form."""

import pytest
import torch

from mpdit_dist.flow import FlowMatching, guided_velocity, interpolate, sample

MU = torch.tensor([1.5, -2.0, 0.5])
SIGMA = torch.tensor([0.5, 1.0, 2.0])


def exact_velocity(x, t, y):
    """E[noise - x0 | x_t] for x0 ~ N(MU, diag(SIGMA^2)), x_t = (1 - t) x0 + t noise."""
    t = t.view(-1, 1).double()
    x = x.double()
    var = (1 - t) ** 2 * SIGMA.double() ** 2 + t**2
    cov = t - (1 - t) * SIGMA.double() ** 2
    return (-MU.double() + cov / var * (x - (1 - t) * MU.double())).float()


def _moments(samples):
    return samples.mean(0), samples.std(0)


@pytest.mark.parametrize("sampler,steps,tol", [("euler", 200, 0.03), ("heun", 20, 0.02), ("dopri5", 1, 0.02),
                                               ("euler_maruyama", 300, 0.06)])
def test_samplers_recover_gaussian(sampler, steps, tol):
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(40000, 3, generator=g)
    y = torch.zeros(40000, dtype=torch.long)
    out = sample(exact_velocity, noise, y, sampler=sampler, steps=steps, generator=g)
    mean, std = _moments(out)
    torch.testing.assert_close(mean, MU, atol=tol * 2, rtol=0)
    torch.testing.assert_close(std, SIGMA, atol=tol * 2, rtol=tol)


def _deterministic_error(sampler, steps):
    # same noise, compared with a near-exact solution: error of the integrator alone
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(2000, 3, generator=g)
    y = torch.zeros(2000, dtype=torch.long)
    ref = sample(exact_velocity, noise.double(), y, sampler="heun", steps=2000)
    out = sample(exact_velocity, noise.double(), y, sampler=sampler, steps=steps)
    return (out - ref).abs().max().item()


def test_euler_first_order_heun_second_order():
    e1, e2 = _deterministic_error("euler", 20), _deterministic_error("euler", 40)
    h1, h2 = _deterministic_error("heun", 20), _deterministic_error("heun", 40)
    assert 1.6 < e1 / e2 < 2.5  # halving the step halves the error
    assert 3.2 < h1 / h2 < 5.0  # ... and quarters it for Heun
    assert h1 < e1


def test_cfg_scale_one_equals_conditional():
    torch.manual_seed(0)
    calls = []

    def model(x, t, y):
        calls.append(len(x))
        return x * (y.float().view(-1, 1) + 1) + t.view(-1, 1)

    x, t, y = torch.randn(5, 3), torch.rand(5), torch.arange(5)
    v = guided_velocity(model, num_classes=10, cfg_scale=1.0)
    torch.testing.assert_close(v(x, t, y), model(x, t, y))
    g = guided_velocity(model, num_classes=10, cfg_scale=3.0)
    vc, vu = model(x, t, y), model(x, t, torch.full_like(y, 10))
    torch.testing.assert_close(g(x, t, y), vu + 3.0 * (vc - vu))
    # outside the guidance interval the conditional model alone runs
    gi = guided_velocity(model, num_classes=10, cfg_scale=3.0, guidance_interval=(0.0, 0.5))
    torch.testing.assert_close(gi(x, torch.full((5,), 0.9), y), model(x, torch.full((5,), 0.9), y))


def test_sampling_seed_reproducible():
    noise = torch.randn(16, 3, generator=torch.Generator().manual_seed(3))
    y = torch.zeros(16, dtype=torch.long)
    a = sample(exact_velocity, noise, y, "euler_maruyama", 20, generator=torch.Generator().manual_seed(7))
    b = sample(exact_velocity, noise, y, "euler_maruyama", 20, generator=torch.Generator().manual_seed(7))
    c = sample(exact_velocity, noise, y, "euler_maruyama", 20, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_sde_samples_do_not_depend_on_batching():
    """generate(): sample i's initial and SDE noise depend only on (seed, i), so one batch of 4 and
    two batches of 2 (as ranks or micro-batches split the work) give the same samples."""
    from mpdit_dist.models import create_model
    from mpdit_dist.sample import generate

    model = create_model("custom", stages=((4, 1), (2, 1)), hidden_size=32, num_heads=2, input_size=8,
                         num_classes=10, num_condition_tokens=2, time_embed="mlp")
    with torch.no_grad():  # a non-zero output layer, so the model's velocity matters
        model.final_layer.linear.weight.normal_(0, 0.02, generator=torch.Generator().manual_seed(0))
    kw = dict(seed=3, cfg_scale=2.0, sampler="euler_maruyama", steps=8, device=torch.device("cpu"))
    classes = [1, 2, 3, 4]
    whole = generate(model, model.args, classes, **kw)
    parts = torch.cat([generate(model, model.args, classes[:2], **kw),
                       generate(model, model.args, classes[2:], offset=2, **kw)])
    torch.testing.assert_close(parts, whole, rtol=1e-4, atol=1e-4)
    other = generate(model, model.args, classes, **{**kw, "seed": 4})
    assert (other - whole).abs().max() > 0.1


def test_training_objective():
    fm = FlowMatching(num_classes=10, time_sampler="lognormal", p_mean=0.0, p_std=1.0, class_dropout=0.25)
    g = torch.Generator().manual_seed(0)
    draw = fm.draw(20000, (3,), g)
    assert 0 < draw.t.min() and draw.t.max() < 1
    # logit-normal: logit(t) ~ N(p_mean, p_std)
    logit = torch.log(draw.t / (1 - draw.t))
    assert abs(logit.mean()) < 0.03 and abs(logit.std() - 1) < 0.03
    assert abs(draw.drop.float().mean() - 0.25) < 0.02
    # the exact velocity field reaches the irreducible loss; a wrong one does worse
    x = MU + SIGMA * torch.randn(20000, 3, generator=g)
    y = torch.randint(0, 10, (20000,), generator=g)
    seen = {}

    def exact(xt, t, yy):
        seen["y"] = yy
        return exact_velocity(xt, t, yy)

    good = fm.per_sample_loss(exact, x, y, draw).mean()
    bad = fm.per_sample_loss(lambda xt, t, yy: exact_velocity(xt, t, yy) * 0.9, x, y, draw).mean()
    assert good < bad
    assert torch.equal(seen["y"][draw.drop], torch.full_like(y[draw.drop], 10))
    assert torch.equal(interpolate(x, draw.noise, torch.zeros(20000)), x)


def test_weightings():
    t = torch.tensor([0.25, 0.5, 0.9])
    assert torch.allclose(FlowMatching(10, loss_weighting="snr").weight(t), t / (1 - t), atol=1e-6)
    assert FlowMatching(10, loss_weighting="min_snr").weight(t).max() <= 3.0
    with pytest.raises(ValueError, match="time_sampler"):
        FlowMatching(10, time_sampler="beta")
