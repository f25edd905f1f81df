"""The beta report: statistics equal a direct computation, the gain response, per-token units, the CLI."""

import json

import pytest
import torch
from torch import nn

from asqpost import QATConfig, QuantizerConfig, calibrate, prepare_qat
from asqpost.beta_report import (
    NoASQLayersError,
    RunningStats,
    asq_quantizers,
    beta_report,
    collect_beta,
    gained_inputs,
)
from asqpost.cli import main
from asqpost.data import ImageSet, Normalizer, TensorBatches
from asqpost.runconfig import RunConfig
from asqpost.train.run import fit

pytestmark = pytest.mark.numerics

TINY = {
    "data": "synthetic",
    "model": "smallcnn",
    "model_args": {"width": 8},
    "batch_size": 64,
    "epochs": 2,
    "lr": 0.05,
    "progress": False,
    "threads": 1,
}


def _set_adapter(quantizer, weight, bias):
    """beta = exp(weight . channel_means + bias): the ``exp`` adapter with a single linear layer (C < 8)."""
    assert quantizer.adapter.hidden is None and quantizer.adapter.positive == "exp"
    with torch.no_grad():
        quantizer.adapter.out.weight.copy_(torch.tensor([weight], dtype=torch.float32))
        quantizer.adapter.out.bias.fill_(bias)


def _asq_net(per_token=False):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(2), nn.Linear(4, 4))
    asq = QuantizerConfig("asq", 4, adapter="exp", adapter_form="paper", per_token=per_token)
    model = prepare_qat(net, QATConfig(QuantizerConfig("lsq", 4), asq, first=None, last=None), inplace=True)
    calibrate(model, [torch.rand(8, 2, 4, 4)])
    return model


def _direct_beta_conv(x):
    return torch.exp(x.mean(dim=(2, 3)).double() @ torch.tensor([0.5, -1.0], dtype=torch.float64) + 0.1)


def _check_stats(stats: RunningStats, values: torch.Tensor) -> None:
    values = values.double().flatten()
    assert stats.count == values.numel()
    assert stats.mean == pytest.approx(float(values.mean()), rel=1e-6)
    assert stats.std == pytest.approx(float(values.std(unbiased=False)), rel=1e-5)
    assert stats.low == pytest.approx(float(values.min()), rel=1e-6)
    assert stats.high == pytest.approx(float(values.max()), rel=1e-6)


def _direct_beta_tokens(tokens, weight, bias, per_token):
    """The second layer's beta, from its (N, T, C) input: exp(weight . (token or token mean) + bias)."""
    stats = tokens if per_token else tokens.mean(dim=1)
    return torch.exp(stats.double() @ weight.double() + bias)


def test_statistics_equal_a_direct_computation_over_every_batch():
    model = _asq_net()
    quantizers = asq_quantizers(model)
    assert list(quantizers) == ["0", "4"]
    _set_adapter(quantizers["0"], [0.5, -1.0], 0.1)
    # the second layer sees (N, T=3, C=4) inputs: pooled over T, one beta per sample
    weight = torch.tensor([0.3, -0.2, 0.1, 0.4])
    _set_adapter(quantizers["4"], weight.tolist(), -0.2)
    batches = [torch.randn(5, 2, 4, 4) * 2, torch.randn(7, 2, 4, 4), torch.randn(1, 2, 4, 4) + 3]
    stats, units = collect_beta(model, batches)
    x = torch.cat(batches)
    _check_stats(stats["0"], _direct_beta_conv(x))
    with torch.no_grad():
        tokens = model[:4](x)  # the second quantized layer's input
    _check_stats(stats["4"], _direct_beta_tokens(tokens, weight, -0.2, per_token=False))
    assert units == {"0": "sample", "4": "sample"}
    assert stats["0"].std > 0.1 and stats["4"].std > 0  # beta varies: the checks above are not of a constant


def test_running_stats_keep_a_tiny_std_next_to_a_large_mean():
    torch.manual_seed(3)
    batches = [1000 + 1e-4 * torch.randn(n, dtype=torch.float64) for n in (1, 50, 7, 300)]
    stats = RunningStats()
    for batch in batches:
        stats.add(batch)
    stats.add(torch.empty(0))  # an empty batch changes nothing
    values = torch.cat(batches)
    assert stats.count == 358 and stats.mean == pytest.approx(float(values.mean()), rel=1e-15)
    assert stats.std == pytest.approx(float(values.std(unbiased=False)), rel=1e-6)
    assert (stats.low, stats.high) == (float(values.min()), float(values.max()))
    assert torch.isnan(torch.tensor(RunningStats().std))


def test_hooks_are_removed_and_the_mode_restored():
    model = _asq_net().train()
    collect_beta(model, [torch.rand(2, 2, 4, 4)])
    assert model.training
    assert all(not q._forward_pre_hooks for q in asq_quantizers(model).values())


def test_per_token_statistics_count_every_token():
    model = _asq_net(per_token=True)
    quantizer = asq_quantizers(model)["4"]
    weight = torch.tensor([0.5, -0.4, 0.2, 0.1])
    _set_adapter(quantizer, weight.tolist(), 0.05)
    x = torch.randn(6, 2, 4, 4)
    stats, units = collect_beta(model, [x])
    with torch.no_grad():
        tokens = model[:4](x)  # (6, 3, 4): 3 tokens of 4 features
    assert units == {"0": "sample", "4": "token"}  # per_token only changes (N, T, C) inputs
    _check_stats(stats["4"], _direct_beta_tokens(tokens, weight, 0.05, per_token=True))
    assert stats["4"].count == 6 * 3 and stats["0"].count == 6


def test_gain_response_equals_the_direct_computation_at_each_gain():
    model = _asq_net()
    _set_adapter(asq_quantizers(model)["0"], [0.5, -1.0], 0.1)
    images = torch.rand(10, 2, 4, 4)
    data = ImageSet(images, torch.zeros(10, dtype=torch.long), 2)
    norm = Normalizer((0.4, 0.6), (0.2, 0.3))
    batches = TensorBatches(data, 4, norm)
    gains = (0.25, 0.5, 1.0, 2.0, 4.0)
    report = beta_report(model, lambda g: gained_inputs(batches, g), gains)
    assert report.gains == gains and report.units["0"] == "sample"
    for gain in gains:
        direct = _direct_beta_conv(norm(images * gain))  # the raw image times the gain, then normalised
        _check_stats(report.by_gain[gain]["0"], direct)
    ratio = float(_direct_beta_conv(norm(images * 4)).mean() / _direct_beta_conv(norm(images)).mean())
    assert report.ratio(4.0, "0") == pytest.approx(ratio, rel=1e-6)
    layer_ratios = [report.ratio(0.25, layer) for layer in report.layers]
    assert report.mean_ratio(0.25) == pytest.approx(sum(layer_ratios) / 2)
    saved = report.to_dict()
    at_gain_4 = float(_direct_beta_conv(norm(images * 4)).mean())
    assert saved["layers"]["0"]["mean_by_gain"]["4.0"] == pytest.approx(at_gain_4)
    assert "| 0 | sample | 10 |" in report.markdown()


def test_gain_one_is_always_measured_and_bad_gains_are_refused():
    model = _asq_net()
    report = beta_report(model, lambda g: [torch.rand(2, 2, 4, 4) * g], (4.0, 0.5))
    assert report.gains == (0.5, 1.0, 4.0)
    with pytest.raises(ValueError, match="positive"):
        beta_report(model, lambda g: [torch.rand(2, 2, 4, 4)], (0.0, 1.0))


def test_a_model_without_asq_layers_gets_a_clear_message():
    net = nn.Sequential(nn.Flatten(), nn.Linear(32, 4))
    lsq = QuantizerConfig("lsq", 4)
    for model in (net, prepare_qat(net, QATConfig(lsq, lsq, first=None, last=None))):
        with pytest.raises(NoASQLayersError, match="no ASQ layers"):
            collect_beta(model, [torch.rand(2, 2, 4, 4)])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = tmp_path_factory.mktemp("beta")
    fit(RunConfig(**TINY), out / "float")
    qat = {"init": str(out / "float" / "checkpoint.pt"), "quant": {"recipe": "post-asq", "bits": 4}, "epochs": 1}
    fit(RunConfig(**{**TINY, **qat}), out / "asq")
    return out


def test_cli_eval_beta_report_writes_json_markdown_and_png(checkpoints, tmp_path, capsys):
    ckpt = str(checkpoints / "asq" / "checkpoint.pt")
    out = tmp_path / "beta"
    assert main(["eval", ckpt, "--data", "synthetic", "--beta-report", str(out), "--gains", "0.5", "2"]) == 0
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "| layer | g=0.5 | g=1 | g=2 |" in printed
    report = json.loads((out / "beta.json").read_text())
    assert report["gains"] == [0.5, 1.0, 2.0]
    assert report["layers"] and all(layer["count"] == 256 for layer in report["layers"].values())  # the test split
    assert (out / "beta.md").read_text().strip() in printed
    assert (out / "beta.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["eval", ckpt, "--data", "synthetic", "--beta-report", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["beta"]["gains"] == [0.25, 0.5, 1.0, 2.0, 4.0] and "accuracy" in result


def test_cli_eval_beta_report_on_a_float_model_is_a_clear_error(checkpoints, tmp_path, capsys):
    ckpt = str(checkpoints / "float" / "checkpoint.pt")
    assert main(["eval", ckpt, "--data", "synthetic", "--beta-report", str(tmp_path / "b")]) == 2
    assert "has no ASQ layers" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
    assert main(["eval", ckpt, "--data", "synthetic", "--gains", "2"]) == 2
    assert "--beta-report" in capsys.readouterr().err


def test_compare_beta_adds_ratio_columns_and_cell_reports(checkpoints, tmp_path):
    sets = [f"--set={k}={json.dumps(v)}" for k, v in TINY.items()]
    init = str(checkpoints / "float" / "checkpoint.pt")
    args = ["compare", *sets, "--set=epochs=1", "--init", init, "--methods", "lsq", "post-asq", "--bits", "2"]
    plain, with_beta = tmp_path / "plain", tmp_path / "beta"
    assert main([*args, "--seeds", "0", "--out", str(plain)]) == 0
    assert "beta(" not in (plain / "results.md").read_text()
    assert all(not any(k.startswith("beta") for k in r) for r in json.loads((plain / "results.json").read_text()))
    assert not (plain / "cells" / "post-asq-w2-s0" / "beta.json").exists()
    assert main([*args, "--seeds", "0", "--out", str(with_beta), "--beta"]) == 0
    records = {r["method"]: r for r in json.loads((with_beta / "results.json").read_text())}
    cell = with_beta / "cells" / "post-asq-w2-s0"
    report = json.loads((cell / "beta.json").read_text())
    assert records["post-asq"]["beta_4_over_1"] == report["mean_ratio_to_gain_1"]["4.0"]
    assert records["post-asq"]["beta_0.25_over_1"] == report["mean_ratio_to_gain_1"]["0.25"]
    assert "beta_4_over_1" not in records["lsq"]
    assert (cell / "beta.md").is_file() and (cell / "beta.png").is_file()
    table = (with_beta / "results.md").read_text()
    assert "beta(4x)/beta(1x)" in table and f"| {records['post-asq']['beta_4_over_1']:.3f} |" in table
    # the same cells: every row of the plain table, then the beta columns ("-" for LSQ)
    plain_rows = [line for line in (plain / "results.md").read_text().splitlines() if line.startswith("| ")]
    beta_rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert [b.startswith(p) for p, b in zip(plain_rows, beta_rows, strict=True)] == [True] * 3
    assert beta_rows[1].endswith("| - | - |")
