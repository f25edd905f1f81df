import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from asqpost import NotCalibratedError, QuantizerConfig, StepAdapter, build_quantizer
from asqpost.functional import sum_to_shape
from asqpost.levels import GRIDS
from asqpost.quantizers import ASQQuantizer, LevelSetQuantizer, LSQQuantizer
from asqpost.registry import methods_for


def _act(method="lsq", bits=4, channels=8, **kw):
    return build_quantizer(QuantizerConfig(method, bits, **kw), "act", channels=channels)


def test_lsq_init_rule_and_range():
    x = torch.rand(16, 8, 4, 4) * 3
    q = _act().calibrate_(x)
    assert q.signed is False and q.qrange == (0, 15)
    assert q.init == "lsq"
    assert torch.allclose(q.step, 2 * x.abs().mean() / 15**0.5)
    y = q(x)
    codes = y / q.step
    assert torch.allclose(codes, codes.round(), atol=1e-5) and codes.min() >= 0 and codes.max() <= 15


def test_signed_activation_detected():
    q = _act(bits=3).calibrate_(torch.randn(4, 8))
    assert q.signed is True and q.qrange == (-4, 3)
    assert _act(bits=3, signed=False).calibrate_(torch.randn(4, 8)).qrange == (0, 7)


def test_forward_before_calibration_raises():
    with pytest.raises(NotCalibratedError, match="calibrate"):
        _act()(torch.rand(2, 8))


def _reference_asq(x, s, beta, qmin, qmax):
    """Independent ASQ reference (method.md): returns x_hat and the analytic dL/ds, dL/dbeta, dL/dx."""
    s_a = s * beta
    v = x / s_a
    inside = (v >= qmin) & (v <= qmax)
    x_hat = torch.clamp(torch.round(v), qmin, qmax) * s_a
    d_sa = torch.where(
        v < qmin,
        torch.full_like(v, qmin),
        torch.where(v > qmax, torch.full_like(v, qmax), torch.round(v) - v),
    )
    g = 1.0 / (qmax * x.numel()) ** 0.5
    d_s = (beta * d_sa).sum() * g
    d_beta = sum_to_shape(s * d_sa, beta.shape)
    return x_hat, d_s, d_beta, inside.to(x.dtype)


@pytest.mark.parametrize("shape", [(6, 8, 5, 5), (6, 8), (6, 5, 8)])
def test_asq_gradients_match_method(shape):
    q = _act("asq", bits=3, channels=8).double()
    gain = torch.linspace(0.5, 4, shape[0], dtype=torch.float64).reshape((-1,) + (1,) * (len(shape) - 1))
    x = torch.rand(shape, dtype=torch.float64) * gain  # per-sample scale, so beta varies per sample
    q.calibrate_(x)
    with torch.no_grad():
        q.adapter.hidden.weight.abs_()
        q.adapter.out.weight.fill_(0.3)
    x.requires_grad_()
    y = q(x)
    y.sum().backward()
    beta = q.beta(x.detach()).detach()
    assert beta.shape[0] == shape[0] and beta.numel() == shape[0]
    assert beta.std() > 0.01
    x_hat, d_s, d_beta, d_x = _reference_asq(x.detach(), q.step.detach(), beta, *q.qrange)
    assert torch.allclose(y, x_hat, atol=1e-12)
    assert torch.allclose(q.raw_scale.grad, d_s, rtol=1e-9)
    assert torch.allclose(x.grad - _adapter_input_grad(q, x, d_beta), d_x, atol=1e-9)
    # beta's gradient reaches the adapter: check the last bias, d beta / d bias = softplus'(z)
    z = q.adapter.out(torch.relu(q.adapter.hidden(q.adapter.statistics(x.detach()))))
    d_bias = (d_beta.reshape(z.shape) * torch.sigmoid(z)).sum()
    assert torch.allclose(q.adapter.out.bias.grad, d_bias.reshape(1), rtol=1e-9)


def _adapter_input_grad(q, x, d_beta):
    """The part of dL/dx that flows through the adapter's statistics (not the STE path)."""
    xx = x.detach().clone().requires_grad_()
    beta = q.beta(xx)
    return torch.autograd.grad(beta, xx, d_beta)[0]


@pytest.mark.parametrize("shape", [(4, 8, 3, 3), (4, 8), (4, 7, 8)])
def test_asq_with_unit_beta_equals_lsq(shape):
    x = torch.rand(shape, dtype=torch.float64) * 2
    lsq = _act("lsq", channels=8).double().calibrate_(x)
    asq = _act("asq", channels=8).double().calibrate_(x)
    with torch.no_grad():
        asq.adapter.out.weight.zero_()
        asq.adapter.out.bias.fill_(torch.log(torch.expm1(torch.tensor(1.0, dtype=torch.float64))))
    assert torch.equal(asq.beta(x), torch.ones_like(asq.beta(x)))
    xa, xl = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yl = asq(xa), lsq(xl)
    (ya * ya).sum().backward()
    (yl * yl).sum().backward()
    assert torch.equal(ya, yl)
    assert torch.allclose(asq.raw_scale.grad, lsq.raw_scale.grad, rtol=1e-13)  # summed per sample first
    assert torch.allclose(xa.grad, xl.grad, atol=1e-12)  # differs only through the (zero-weight) adapter


@pytest.mark.parametrize("positive", ["softplus", "exp", "relu"])
@pytest.mark.parametrize(
    ("channels", "shape"), [(3, (5, 3, 4, 4)), (64, (5, 64, 2, 2)), (16, (5, 16)), (16, (5, 9, 16))]
)
def test_beta_is_per_sample_positive_and_near_one(positive, channels, shape):
    adapter = StepAdapter(channels, positive=positive)
    beta = adapter(torch.rand(shape))
    assert beta.shape == (shape[0],) + (1,) * (len(shape) - 1)
    assert (beta > 0).all()
    assert torch.allclose(beta, torch.ones_like(beta), atol=0.05)


def test_per_token_beta_and_bad_shape():
    adapter = StepAdapter(16, per_token=True)
    assert adapter(torch.rand(2, 7, 16)).shape == (2, 7, 1)
    with pytest.raises(ValueError, match="C = 16"):
        adapter(torch.rand(2, 15))


def test_softplus_adapter_cannot_die_but_relu_can():
    for positive, alive in (("softplus", True), ("relu", False)):
        adapter = StepAdapter(4, positive=positive)
        with torch.no_grad():
            adapter.out.bias.fill_(-5.0)
        adapter(torch.rand(3, 4)).sum().backward()
        assert (adapter.out.bias.grad.abs() > 0).item() is alive


@pytest.mark.parametrize("grid", sorted(GRIDS))
@pytest.mark.parametrize("init", ["mse", "percentile"])
def test_level_set_weights_on_grid(grid, init):
    w = torch.randn(16, 8, 3, 3) * 0.1
    q = build_quantizer(QuantizerConfig(grid, 4, init=init), "weight", weight_shape=w.shape)
    assert isinstance(q, LevelSetQuantizer)
    q.calibrate_(w)
    w_hat = q(w)
    normalised = w_hat / q.scale
    assert torch.allclose(q.levels.project(normalised), normalised, atol=1e-6)
    assert torch.equal(q.levels.decode(q.codes(w)) * q.scale, w_hat)


@pytest.mark.parametrize(
    ("method", "inits", "role"),
    [  # POST quantizes weights only (test_roles_are_checked), so it has no act case
        pytest.param("post", ("mse", "percentile"), "weight", id="post-weight"),
        pytest.param("lsq", ("mse", "percentile", "lsq"), "weight", id="lsq-weight"),
        pytest.param("lsq", ("mse", "percentile", "lsq"), "act", id="lsq-act"),
    ],
)
def test_mse_init_has_least_error(method, inits, role):
    x = torch.randn(32, 64) * 0.05
    errs = {}
    for init in inits:
        cfg = QuantizerConfig(method, 3, init=init)
        q = (
            build_quantizer(cfg, role, weight_shape=x.shape)
            if role == "weight"
            else build_quantizer(cfg, role, channels=64)
        )
        errs[init] = (q.calibrate_(x)(x) - x).pow(2).sum().item()
    assert errs["mse"] == min(errs.values())
    assert errs["mse"] < max(errs.values())


def test_level_set_scale_gradient():
    w = (torch.randn(4, 10, dtype=torch.float64) * 0.3).requires_grad_()
    q = build_quantizer(QuantizerConfig("post", 3), "weight", weight_shape=w.shape).double().calibrate_(w)
    q(w).sum().backward()
    v = w.detach() / q.scale.detach()
    per = torch.where(v.abs() > 1, v.sign(), q.levels.project(v.clamp(-1, 1)) - v)
    assert torch.allclose(q.raw_scale.grad, per.sum(dim=1, keepdim=True) / 10**0.5, atol=1e-12)
    with pytest.raises(ValueError, match="init 'lsq'"):
        QuantizerConfig("post", 3, init="lsq")
    assert torch.equal(w.grad, (v.abs() <= 1).double())


def test_lsq_weight_per_channel():
    w = torch.randn(6, 3, 3, 3)
    q = build_quantizer(QuantizerConfig("lsq", 4, init="lsq"), "weight", weight_shape=w.shape).calibrate_(w)
    assert isinstance(q, LSQQuantizer) and q.step.shape == (6, 1, 1, 1) and q.qrange == (-8, 7)
    assert torch.allclose(q.step.flatten(), 2 * w.abs().mean(dim=(1, 2, 3)) / 7**0.5)


def test_roles_are_checked():
    with pytest.raises(ValueError, match="cannot quantize weights"):
        build_quantizer(QuantizerConfig("asq", 4), "weight", weight_shape=(4, 4))
    with pytest.raises(ValueError, match="cannot quantize acts"):
        build_quantizer(QuantizerConfig("post", 4), "act", channels=4)


def test_state_round_trip_keeps_calibration():
    x = torch.randn(4, 8) - 0.5
    a = _act("asq").calibrate_(x)
    b = _act("asq")
    b.load_state_dict(a.state_dict())
    assert b.calibrated and b.signed is True
    assert torch.equal(a(x), b(x))


def test_calibration_rejects_bad_data():
    with pytest.raises(ValueError, match="NaN or inf"):
        _act().calibrate_(torch.tensor([[1.0, float("nan")] * 4]))
    with pytest.raises(ValueError, match="empty"):
        _act().calibrate_(torch.zeros(0, 8))


@settings(max_examples=40, deadline=None)
@given(
    method=st.sampled_from(methods_for("act")),
    bits=st.integers(2, 8),
    shape=st.sampled_from([(3, 8), (2, 8, 3, 3), (2, 5, 8)]),
    scale=st.floats(1e-3, 1e3),
)
def test_fuzz_activation_outputs_finite_on_grid(method, bits, shape, scale):
    q = _act(method, bits)
    x = torch.randn(shape) * scale
    q.calibrate_(x)
    y = q(x * 1.7)
    assert y.shape == x.shape and torch.isfinite(y).all()
    step = q.step * (q.beta(x * 1.7) if isinstance(q, ASQQuantizer) else 1)
    codes = y / step
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert codes.min() >= q.qrange[0] - 1e-3 and codes.max() <= q.qrange[1] + 1e-3
