import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from asqpost import NotCalibratedError, QuantizerConfig, StepAdapter, build_quantizer
from asqpost.functional import sum_to_shape
from asqpost.levels import GRIDS
from asqpost.quantizers import ASQQuantizer, LevelSetQuantizer, LSQQuantizer
from asqpost.registry import methods_for

pytestmark = pytest.mark.numerics


def _act(method="lsq", bits=4, channels=8, **kw):
    return build_quantizer(QuantizerConfig(method, bits, **kw), "act", channels=channels)


def test_lsq_init_rule_and_range():
    x = torch.rand(16, 8, 4, 4) * 3
    q = _act(init="lsq").calibrate_(x)
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
    """Independent ASQ reference (docs/method.md): returns x_hat and the analytic dL/ds, dL/dbeta, dL/dx."""
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
    q = _act("asq", bits=3, channels=8, adapter_form="paper").double()
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
    """An adapter whose output is exactly 1 (zero last weights, the relu map's unit bias: ``relu(0 + 1) = 1`` in any
    float arithmetic; softplus would give 1 only to within its implementation's rounding) makes ASQ LSQ itself."""
    x = torch.rand(shape, dtype=torch.float64) * 2
    lsq = _act("lsq", channels=8).double().calibrate_(x)
    asq = _act("asq", channels=8, adapter_form="paper", adapter="relu").double().calibrate_(x)
    with torch.no_grad():
        asq.adapter.out.weight.zero_()
        asq.adapter.out.bias.fill_(1.0)
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


SCALE_SHAPES = [  # (channels, shape, per_token): images, vectors, tokens pooled, tokens each, a C < 8 adapter
    (16, (6, 16, 4, 4), False),
    (16, (6, 16), False),
    (16, (6, 5, 16), False),
    (16, (6, 5, 16), True),
    (3, (6, 3, 4, 4), False),
]


def _sample_gains(shape):
    """One gain per sample, from 0.25 to 4, shaped to broadcast against ``shape``."""
    return torch.logspace(-2, 2, shape[0], base=2, dtype=torch.float64).reshape((-1,) + (1,) * (len(shape) - 1))


def _scale_adapter(channels, per_token=False, positive="softplus"):
    return StepAdapter(channels, positive=positive, per_token=per_token, form="scale").double()


@pytest.mark.parametrize("positive", ["softplus", "exp", "relu"])
@pytest.mark.parametrize(("channels", "shape", "per_token"), SCALE_SHAPES)
def test_scale_adapter_beta_follows_input_gain_at_init(channels, shape, per_token, positive):
    adapter = _scale_adapter(channels, per_token, positive)
    x = torch.randn(shape, dtype=torch.float64) * _sample_gains(shape)
    beta = adapter(x)
    assert beta.shape == ((shape[0], shape[1], 1) if per_token else (shape[0],) + (1,) * (len(shape) - 1))
    assert adapter.gamma.item() == 1.0
    for k in (4.0, 0.25, 3.7):
        assert torch.allclose(adapter(k * x) / beta, torch.full_like(beta, k), rtol=1e-12)
    with torch.no_grad():
        adapter.gamma.fill_(0.6)
    beta = adapter(x)
    assert torch.allclose(adapter(4 * x) / beta, torch.full_like(beta, 4**0.6), rtol=1e-12)


def test_scale_adapter_is_homogeneous_in_float32_and_after_its_mlp_moved():
    """``beta(k x) = k^gamma beta(x)`` holds by construction, not only at init (the MLP sees m(x) / r(x))."""
    torch.manual_seed(3)
    adapter = StepAdapter(32, form="scale")
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn_like(p) * 0.5)
        adapter.gamma.fill_(1.3)
        adapter.r_ref.fill_(0.7)
    x = torch.rand(8, 32, 3, 3) * 2
    beta = adapter(x)
    assert beta.std() > 0.01, "a moved MLP gives each sample its own beta"
    assert torch.allclose(adapter(4 * x) / beta, torch.full_like(beta, 4**1.3), rtol=1e-5)


def test_scale_adapter_beta_is_the_formula():
    adapter = _scale_adapter(16)
    with torch.no_grad():
        adapter.gamma.fill_(0.8)
        adapter.r_ref.fill_(1.5)
    x = torch.randn(4, 16, 3, 3, dtype=torch.float64)
    r = x.abs().mean(dim=(1, 2, 3))[:, None]
    z = x.mean(dim=(2, 3)) / r
    mlp = torch.nn.functional.softplus(adapter.out(torch.relu(adapter.hidden(z))))
    assert torch.allclose(adapter(x).reshape(4, 1), (r / 1.5) ** 0.8 * mlp, rtol=1e-12)


def test_scale_adapter_gradients_reach_gamma_and_mlp():
    q = _act("asq", bits=3, channels=16, adapter_form="scale").double()
    x = torch.rand(6, 16, 3, 3, dtype=torch.float64) * _sample_gains((6, 16, 3, 3))
    q.calibrate_(x)
    (q(x) ** 2).sum().backward()
    a = q.adapter
    for name, p in (("gamma", a.gamma), ("hidden", a.hidden.weight), ("out.w", a.out.weight), ("out.b", a.out.bias)):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert q.raw_scale.grad.abs() > 0
    # d beta / d gamma = beta * log(r / r_ref)
    a.zero_grad()
    beta = a(x)
    beta.sum().backward()
    log_ratio = torch.log(a.input_scale(x) / a.r_ref).reshape(beta.shape)
    assert torch.allclose(a.gamma.grad, (beta * log_ratio).sum().detach(), rtol=1e-12)


@pytest.mark.parametrize(("shape", "per_token"), [((5, 8, 3, 3), False), ((5, 4, 8), False), ((5, 4, 8), True)])
def test_calibration_sets_r_ref_to_the_mean_input_scale(shape, per_token):
    q = _act("asq", channels=8, adapter_form="scale", per_token=per_token).double()
    batches = [torch.randn(shape, dtype=torch.float64) * g for g in (0.5, 3.0)]
    batches.append(torch.randn((2, *shape[1:]), dtype=torch.float64))  # a smaller last batch
    for x in batches:
        q.observe_(x)
    q.finalize_()
    dims = (-1,) if per_token else tuple(range(1, len(shape)))
    r = torch.cat([x.abs().mean(dim=dims).reshape(-1) for x in batches])
    assert q.adapter.r_ref.item() == pytest.approx(r.mean().item(), rel=1e-12)


def test_scale_adapter_survives_an_all_zero_input():
    q = _act("asq", channels=8, adapter_form="scale").calibrate_(torch.rand(4, 8))
    x = torch.zeros(2, 8)
    beta = q.beta(x)
    assert torch.isfinite(beta).all() and (beta > 0).all()
    assert torch.equal(q(x), x)
    with pytest.raises(ValueError, match="reference scale"):
        StepAdapter(8).set_reference_scale_(1.0)


def test_paper_adapter_state_is_unchanged_and_scale_state_round_trips():
    paper = _act("asq", channels=16, adapter_form="paper")
    assert sorted(paper.adapter.state_dict()) == ["hidden.bias", "hidden.weight", "out.bias", "out.weight"]
    assert paper.adapter.form == "paper"
    q = _act("asq", channels=16, adapter_form="scale").calibrate_(torch.rand(4, 16, 2, 2) * 5)
    with torch.no_grad():
        q.adapter.gamma.fill_(0.75)
    copy = _act("asq", channels=16, adapter_form="scale")
    copy.load_state_dict(q.state_dict())
    x = torch.rand(3, 16, 2, 2)
    assert copy.adapter.r_ref.item() == q.adapter.r_ref.item() != 1.0
    assert copy.adapter.gamma.item() == 0.75
    assert torch.equal(copy(x), q(x))
    with pytest.raises(RuntimeError, match="gamma"):  # a paper adapter refuses scale-form state
        _act("asq", channels=16, adapter_form="paper").load_state_dict(q.state_dict())


@pytest.mark.parametrize("init", ["lsq", "mse", "percentile"])
def test_asq_takes_lsq_step_inits(init):
    x = torch.rand(16, 8, 3, 3) * 3
    lsq = _act("lsq", init=init).calibrate_(x)
    for form in ("paper", "scale"):  # the scale form fits x itself unless normalise_init asks otherwise
        asq = _act("asq", init=init, adapter_form=form).calibrate_(x)
        assert asq.init == init
        assert torch.equal(asq.step, lsq.step)


@pytest.mark.parametrize("init", ["lsq", "mse", "percentile"])
@pytest.mark.parametrize(("shape", "per_token"), [((16, 8, 3, 3), False), ((6, 5, 8), False), ((6, 5, 8), True)])
def test_scale_form_step_is_the_fit_to_normalised_inputs_times_r_ref(init, shape, per_token):
    gains = torch.logspace(0, 1, shape[0]).reshape(-1, *(1,) * (len(shape) - 1))  # per-sample gains 1 .. 10
    x = (torch.rand(shape) - 0.3) * gains
    asq = _act("asq", init=init, adapter_form="scale", per_token=per_token, normalise_init=True).calibrate_(x)
    r = asq.adapter.input_scale(x)
    normalised = _act("lsq", init=init).calibrate_(x / r.reshape(r.shape + (1,) * (x.dim() - r.dim())))
    assert asq.adapter.r_ref.item() == pytest.approx(r.double().mean().item(), rel=1e-6)
    assert asq.signed == normalised.signed
    assert torch.equal(asq.step, normalised.step * asq.adapter.r_ref)


@pytest.mark.parametrize("per_token", [False, True])
def test_scale_form_init_fits_inputs_whose_gain_varies(per_token):
    torch.manual_seed(0)
    gains = torch.logspace(0, 1, 32).reshape(-1, 1, 1)  # per-sample gains 1 .. 10
    x = torch.randn(32, 6, 16) * gains
    asq = _act(
        "asq", bits=4, channels=16, init="mse", adapter_form="scale", per_token=per_token, normalise_init=True
    ).calibrate_(x)
    raw_fit = _act("lsq", bits=4, init="mse").calibrate_(x)  # the step fitted to raw x, as before
    with torch.no_grad():
        error = (asq(x) - x).pow(2).mean()
        asq.raw_scale.copy_(raw_fit.raw_scale)
        raw_error = (asq(x) - x).pow(2).mean()
    assert error < 0.7 * raw_error


def test_normalise_init_is_for_the_scale_adapter_only():
    for bad in ({"method": "lsq"}, {"method": "asq", "adapter_form": "paper"}):
        with pytest.raises(ValueError, match="normalise_init"):
            QuantizerConfig(bits=8, normalise_init=True, **bad)
    with pytest.raises(ValueError, match="true or false"):
        QuantizerConfig("asq", 8, normalise_init="yes")
