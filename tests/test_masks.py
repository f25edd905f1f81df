"""Batches of any form reach the model, and attention masks reach the quantizers: padding changes nothing.

What "nothing" means (docs/numerics.md): a padded batch runs its matrix products, reductions and vectorised
elementwise maps on tensors of other shapes than the unpadded one, and those round differently on some CPUs (and
under ``ATEN_CPU_CAPABILITY=avx2``). So the tests assert what holds on every CPU: the same elements reach the
observers (their statistics are bit for bit the same), and every quantity computed over a padded axis or through
another shape agrees within float32 rounding (``numerics.FLOAT32_RTOL``), with activation codes identical except
at rounding ties. Each such test also shows that padding which leaks moves the result far beyond that bound.

The transformer is the tiny random BERT of DEVELOPERS.md (no download); sentence-transformers wraps it from a
folder written by ``save_pretrained``.
"""

import copy
import logging

import pytest
import torch
import transformers
from torch import nn

from asqpost import (
    QATConfig,
    QuantizerConfig,
    StepAdapter,
    build_quantizer,
    calibrate,
    load_quantized,
    prepare_qat,
    quant_layers,
    quantized_state,
)
from asqpost.export import convert_to_packed, load_packed, save_packed
from asqpost.export.modules import PackedLayer
from asqpost.masking import (
    as_token_mask,
    current_mask,
    install_mask_hooks,
    mask_for,
    token_mask,
    token_mean,
    valid_tokens,
)
from numerics import (
    FLOAT32_RTOL,
    assert_beyond_rounding,
    assert_codes_match,
    assert_float32_close,
    codes_beyond_ties,
    relative_error,
)
from tiny_bert import VOCAB, tiny_bert_config

pytestmark = pytest.mark.numerics


def _bert() -> transformers.BertModel:
    config = tiny_bert_config(transformers)
    return transformers.BertModel(config).eval()


def _padded(lengths: list[int], extra: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids padded (with id 0) to the longest length plus ``extra``, and their mask."""
    width = max(lengths) + extra
    keep = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    ids = torch.randint(1, VOCAB, (len(lengths), width)) * keep
    return {"input_ids": ids, "attention_mask": keep.long()}


def _calibration_batches() -> list[dict[str, torch.Tensor]]:
    return [_padded([3, 9, 5, 12, 7, 4, 10, 6]) for _ in range(2)]


def _act_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every calibrated activation quantity: steps and the scale adapters' r_ref."""
    return {k: v for k, v in model.state_dict().items() if k.endswith(("input_quantizer.raw_scale", "r_ref"))}


def _assert_close_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Every calibrated quantity of ``a`` equals ``b``'s within float32 rounding."""
    assert a.keys() == b.keys() and a
    for key in a:
        assert_float32_close(a[key], b[key], what=key)


# ---------------------------------------------------------------- the mask context and its helpers


def test_token_mask_holds_inside_its_block_only():
    keep = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert current_mask() is None
    with token_mask(keep):
        assert torch.equal(current_mask(), keep.bool())
        with token_mask(None):
            assert current_mask() is None
        assert torch.equal(current_mask(), keep.bool())
    assert current_mask() is None


@pytest.mark.parametrize(
    ("mask", "expected"),
    [
        (torch.tensor([[True, False]]), [[True, False]]),
        (torch.tensor([[1, 0]]), [[True, False]]),
        (torch.tensor([[1.0, 0.0]]), [[True, False]]),
    ],
)
def test_masks_of_every_dtype_read_one_as_token(mask, expected):
    assert as_token_mask(mask).tolist() == expected


@pytest.mark.parametrize(
    ("mask", "message"),
    [
        (torch.ones(2, 3, 4), r"\(N, T\) tensor"),
        (torch.ones(3), r"\(N, T\) tensor"),
        ([[1, 0]], r"\(N, T\) tensor"),
        (torch.tensor([[0.0, float("-inf")]]), "additive"),
    ],
)
def test_a_bad_mask_is_a_clear_error(mask, message):
    with pytest.raises(ValueError, match=message), token_mask(mask):
        pass


def test_mask_helpers_apply_only_where_the_mask_fits():
    """Small integers: every sum here is exact in any order, so the masked mean is bit for bit the mean of the
    real rows (one division, correctly rounded) whichever kernel reduces which shape."""
    keep = torch.tensor([[True, True, False, False], [True, True, True, False]])
    x = torch.randint(-8, 9, (2, 4, 3)).float().requires_grad_()
    with token_mask(keep):
        assert mask_for(torch.randn(2, 3)) is None  # (N, C): no tokens
        assert mask_for(torch.randn(2, 5, 3)) is None  # another length
        assert mask_for(torch.randn(2, 3, 4, 4)) is None  # an image
        assert torch.equal(valid_tokens(x), torch.cat([x[0, :2], x[1, :3]]))
        mean = token_mean(x)
    assert torch.equal(mean[0], x[0, :2].mean(dim=0)) and torch.equal(mean[1], x[1, :3].mean(dim=0))
    mean.sum().backward()
    assert torch.equal(x.grad[~keep], torch.zeros(3, 3))  # padding gets no gradient
    assert torch.equal(token_mean(x), x.mean(dim=1))  # no mask: every token


# ---------------------------------------------------------------- hooks on the prepared model's root


class _Recorder(nn.Module):
    """Records the current mask during its forward; ``attention_mask`` is its second positional parameter."""

    def __init__(self):
        super().__init__()
        self.seen: list[torch.Tensor | None] = []

    def forward(self, x, attention_mask=None, fail=False):
        self.seen.append(current_mask())
        if fail:
            raise RuntimeError("forward failed")
        return x


def test_hooks_set_the_mask_from_the_call_for_that_forward_only():
    model = install_mask_hooks(_Recorder())
    install_mask_hooks(model)  # a second install adds nothing
    assert len(model._forward_pre_hooks) == 1 and len(model._forward_hooks) == 1
    x, keep, outer = torch.randn(2, 3, 4), torch.tensor([[1, 1, 0], [1, 1, 1]]), torch.ones(2, 3, dtype=torch.bool)
    model(x, attention_mask=keep)  # keyword
    model(x, keep)  # positional, where forward names attention_mask
    model({"input_ids": x, "attention_mask": keep})  # one features dict (sentence-transformers modules)
    model(x)  # no mask
    with token_mask(outer):
        model(x)  # no mask in the call: the explicit one holds
        model(x, attention_mask=keep)  # the call's own mask wins for its forward
        assert torch.equal(current_mask(), outer)  # ... and the outer one is back afterwards
        with pytest.raises(RuntimeError, match="forward failed"):
            model(x, attention_mask=keep, fail=True)
        assert torch.equal(current_mask(), outer)  # restored when the forward raised too
    assert current_mask() is None
    masks = [None if m is None else m.tolist() for m in model.seen]
    k, o = keep.bool().tolist(), outer.tolist()
    assert masks == [k, k, k, None, o, k, k]


def test_a_mask_without_padding_is_no_mask_and_gives_the_same_means():
    model = install_mask_hooks(_Recorder())
    x, outer = torch.randn(2, 3, 4), torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    with token_mask(outer):
        model(x, attention_mask=torch.ones(2, 3, dtype=torch.long))  # no padding: no masking passes
        assert torch.equal(current_mask(), outer)
    assert model.seen == [None]
    with token_mask(torch.ones(2, 3, dtype=torch.bool)):  # the same means, bit for bit, masked or not
        masked = token_mean(x)
    assert torch.equal(masked, token_mean(x))


def test_hooks_survive_deepcopy_and_a_state_dict_round_trip():
    torch.manual_seed(1)
    q = calibrate(prepare_qat(_bert(), QATConfig.recipe("post-asq", 4)), _calibration_batches())
    copied = copy.deepcopy(q)
    restored = load_quantized(_bert(), quantized_state(q))
    batch = _padded([4, 11])
    with torch.no_grad():
        want = q(**batch).last_hidden_state
        assert_beyond_rounding(q.forward(**batch).last_hidden_state, want)  # bypassing the hooks drops the mask
        for other in (copied, restored):
            assert torch.equal(other(**batch).last_hidden_state, want)


# ---------------------------------------------------------------- adapters and observers skip padding


def _pad_with_garbage(x: torch.Tensor, extra: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (N, T, C) followed by ``extra`` large, negative-heavy tokens, and the mask of the real ones."""
    garbage = 50 * torch.randn(x.shape[0], extra, x.shape[2]) - 20
    keep = torch.cat([torch.ones(x.shape[:2]), torch.zeros(x.shape[0], extra)], dim=1).bool()
    return torch.cat([x, garbage], dim=1), keep


@pytest.mark.parametrize("form", ["paper", "scale"])
@pytest.mark.parametrize("per_token", [False, True])
def test_adapter_beta_ignores_padding(form, per_token):
    """A padded sample's (or token's) beta and ``r`` equal those of the unpadded input within float32 rounding:
    the means run over another length, and the adapter's matrix products and softplus over tensors of another
    shape (per token, 27 rows instead of 15), which round differently on some CPUs."""
    torch.manual_seed(2)
    adapter = StepAdapter(16, per_token=per_token, form=form)
    nn.init.normal_(adapter.out.weight, std=0.5)  # a beta that depends on its input, as after training
    x = torch.randn(3, 5, 16).abs()
    padded, keep = _pad_with_garbage(x, 4)
    with torch.no_grad(), token_mask(keep):
        beta, r = adapter(padded), adapter.input_scale(padded)
    with torch.no_grad():
        alone_beta, alone_r = adapter(x), adapter.input_scale(x)
        unmasked_beta, unmasked_r = adapter(padded), adapter.input_scale(padded)
    if per_token:
        beta, r, unmasked_beta, unmasked_r = beta[:, :5], r[:, :5], unmasked_beta[:, :5], unmasked_r[:, :5]
    assert_float32_close(beta, alone_beta, what="beta")
    assert_float32_close(r, alone_r, what="r")
    if per_token:  # each token's beta is its own: padding cannot reach it, masked or not
        assert_float32_close(unmasked_beta, alone_beta, what="unmasked per-token beta")
    else:  # the test can fail: without the mask the garbage moves beta and r far beyond rounding
        assert_beyond_rounding(unmasked_beta, alone_beta, what="unmasked beta")
        assert_beyond_rounding(unmasked_r, alone_r, what="unmasked r")


@pytest.mark.parametrize(
    "config",
    [
        QuantizerConfig("lsq", 4, init="lsq"),
        QuantizerConfig("lsq", 4, init="mse"),
        QuantizerConfig("asq", 4, adapter_form="scale"),
        QuantizerConfig("asq", 4, adapter_form="scale", per_token=True, init="percentile"),
    ],
)
def test_observers_skip_padded_tokens_exactly(config):
    """Calibrating from a padded batch under its mask gives exactly the step (and signedness) that the unpadded
    batch gives: the observers see the same elements in the same order, so their statistics are the same bits on
    every CPU. The scale adapter's ``r_ref`` averages means that run over the padded tensor's shape: equal within
    float32 rounding."""
    torch.manual_seed(3)
    x = torch.randn(4, 6, 16).abs()  # unsigned data; the garbage is mostly negative
    padded, keep = _pad_with_garbage(x, 5)
    alone = build_quantizer(config, "act", channels=16).calibrate_(x)
    masked = build_quantizer(config, "act", channels=16)
    with token_mask(keep):
        masked.calibrate_(padded)
    assert masked.signed is False and alone.signed is False
    assert torch.equal(alone.raw_scale, masked.raw_scale)
    if config.method == "asq":
        assert_float32_close(masked.adapter.r_ref, alone.adapter.r_ref, what="r_ref")
    unmasked = build_quantizer(config, "act", channels=16).calibrate_(padded)
    assert_beyond_rounding(unmasked.raw_scale, alone.raw_scale, what="unmasked step")


# ---------------------------------------------------------------- calibrate takes every batch form


def test_calibrate_takes_dicts_batch_encodings_positional_tuples_and_a_forward():
    torch.manual_seed(4)
    bert, config = _bert(), QATConfig.recipe("post-asq", 4)
    batches = _calibration_batches()
    labels = torch.zeros(8, dtype=torch.long)
    by_dict = _act_state(calibrate(prepare_qat(bert, config), batches))
    forms = {
        "BatchEncoding": ([transformers.BatchEncoding(dict(b)) for b in batches], None),
        "((ids, mask), labels)": ([((b["input_ids"], b["attention_mask"]), labels) for b in batches], None),
        "(dict, labels)": ([(b, labels) for b in batches], None),
        "forward": (
            [{"ids": b["input_ids"], "keep": b["attention_mask"].bool()} for b in batches],
            lambda model, inputs: model(inputs["ids"], attention_mask=inputs["keep"]),
        ),
    }
    for name, (data, forward) in forms.items():
        q = calibrate(prepare_qat(bert, config), data, forward=forward)
        assert _act_state(q).keys() == by_dict.keys(), name
        for key, value in _act_state(q).items():
            assert torch.equal(value, by_dict[key]), f"{name}: {key}"
    without_mask = _act_state(calibrate(prepare_qat(bert, config), [{"input_ids": b["input_ids"]} for b in batches]))
    assert max(relative_error(without_mask[k], by_dict[k]) for k in by_dict) > 100 * FLOAT32_RTOL  # the mask counted


def test_calibrate_calls_positional_inputs_in_order():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 3), nn.Linear(2, 3)

        def forward(self, x, y):
            return self.a(x) + self.b(y)

    x, y = torch.randn(8, 4), 3 + torch.randn(8, 2)
    config = QATConfig.recipe("lsq", 4, first=None, last=None)
    q = calibrate(prepare_qat(TwoInputs(), config), [((x, y), torch.zeros(8))])
    assert torch.equal(
        q.a.input_quantizer.raw_scale, build_quantizer(config.act, "act", channels=4).calibrate_(x).raw_scale
    )
    assert torch.equal(
        q.b.input_quantizer.raw_scale, build_quantizer(config.act, "act", channels=2).calibrate_(y).raw_scale
    )


def test_calibrate_still_refuses_empty_and_non_finite_batches():
    q = prepare_qat(_bert(), QATConfig.recipe("post-asq", 4))
    with pytest.raises(ValueError, match="empty"):
        calibrate(q, [{"input_ids": torch.zeros(0, 5, dtype=torch.long)}])
    with pytest.raises(ValueError, match="no tensor"):
        calibrate(q, [{"input_ids": None}])
    with pytest.raises(ValueError, match="got 3 items"):
        calibrate(q, [(torch.ones(2, 5, dtype=torch.long), torch.ones(2, 5), torch.zeros(2))])
    with pytest.raises(ValueError, match="NaN or inf"):
        calibrate(q, [{"inputs_embeds": torch.full((2, 5, 32), float("nan"))}])


def test_an_ids_and_mask_pair_read_as_inputs_and_target_is_warned_about(caplog):
    batch = _padded([3, 7])
    q = prepare_qat(_bert(), QATConfig.recipe("post-asq", 4))
    with caplog.at_level(logging.WARNING, logger="asqpost.convert"):
        calibrate(q, [(batch["input_ids"], batch["attention_mask"])] * 2)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "'attention_mask': mask" in warnings[0] and "((ids, mask), target)" in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="asqpost.convert"):
        calibrate(q, [(batch["input_ids"], torch.tensor([0, 1]))])  # (ids, labels): a real target
        calibrate(q, [((batch["input_ids"], batch["attention_mask"]), torch.tensor([0, 1]))])
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


# ---------------------------------------------------------------- padding invariance end to end


def _record_codes(model: nn.Module) -> tuple[dict[str, list[tuple[torch.Tensor, torch.Tensor]]], list]:
    """Per quantized layer (fake-quant or packed), ``(codes, x / step)`` of its input in every forward, layers in
    the order they run (hooks on the layers: Q, K and V share one input quantizer, which runs once for each)."""
    recorded: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def hook(name):
        def record(layer, args):
            x = args[0]
            if isinstance(layer, PackedLayer):
                codes, step = layer.input_quant(x)
            else:
                quantizer = layer.input_quantizer
                step = quantizer.step * quantizer.beta(x) if hasattr(quantizer, "adapter") else quantizer.step
                codes = torch.clamp(torch.round(x / step), *quantizer.qrange)
            recorded.setdefault(name, []).append((codes, x / step))

        return record

    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, PackedLayer)]
    layers += [(name, layer) for name, layer in quant_layers(model) if layer.input_quantizer is not None]
    return recorded, [layer.register_forward_pre_hook(hook(name)) for name, layer in layers]


def _first_sample(t: torch.Tensor, length: int) -> torch.Tensor:
    return t[0, :length] if t.dim() == 3 else t[0]  # (N, C): the pooler's [CLS] row


def _compare_first_sample(recorded: dict[str, list[tuple[torch.Tensor, torch.Tensor]]], length: int) -> int:
    """Sample 0's codes for its ``length`` real tokens, in the two recorded forwards: identical except at rounding
    ties, layer after layer in the order they ran. Returns the number of codes that flipped at a tie; the layers
    after the first such flip are not compared (their inputs differ by a quantization step, not by rounding)."""
    for name, ((codes, values), (other, _)) in recorded.items():
        flipped = assert_codes_match(
            _first_sample(codes, length), _first_sample(other, length), _first_sample(values, length), what=name
        )
        if flipped:
            return flipped
    return 0


def _layers_beyond_ties(recorded: dict[str, list[tuple[torch.Tensor, torch.Tensor]]], length: int) -> list[str]:
    """Layers whose codes for sample 0's real tokens differ, other than at rounding ties, between the two
    recorded forwards."""
    return [
        name
        for name, ((codes, values), (other, _)) in recorded.items()
        if codes_beyond_ties(_first_sample(codes, length), _first_sample(other, length), _first_sample(values, length))
    ]


def _assert_outputs_agree(padded: torch.Tensor, alone: torch.Tensor, flipped: int) -> None:
    """Outputs of the same sentence alone and padded: within float32 rounding when every code matched
    (``atol=1e-6`` for values of order 1: equal codes leave no quantization step to amplify the rounding); a code
    flipped at a tie moves its layer's output by a whole step, which only the codes' check can judge."""
    if flipped == 0:
        torch.testing.assert_close(padded, alone, rtol=0, atol=1e-6)


@pytest.mark.parametrize("per_token", [False, True])
def test_a_sentence_alone_or_padded_gives_the_same_codes_and_outputs(per_token):
    """W4A4 POST+ASQ on the tiny BERT: the same sentence alone, or padded next to a longer one, gives the same
    activation codes for its real tokens at every quantized layer, except at rounding ties: the two forwards run
    matrix products, attention and the adapters on tensors of other shapes, so every value agrees within float32
    rounding only, and a value that lies within that rounding of a boundary ``k + 1/2`` may round either way.
    Unless a code flipped so, the outputs then differ only by float32 rounding (attention over 5 or 11 keys,
    matrix products of other shapes): at most a few ulp, ``atol=1e-6`` for values of order 1."""
    torch.manual_seed(5)
    q = prepare_qat(_bert(), QATConfig.recipe("post-asq", 4, act={"per_token": per_token}))
    calibrate(q, _calibration_batches())
    for m in q.modules():
        if isinstance(m, StepAdapter):
            nn.init.normal_(m.out.weight, std=0.5)  # adapters that react to their input, as after training
    sentence = torch.randint(1, VOCAB, (1, 5))
    pair = _padded([5, 11])
    pair["input_ids"][0, :5] = sentence
    recorded, handles = _record_codes(q)
    with torch.no_grad():
        alone = q(input_ids=sentence, attention_mask=torch.ones(1, 5, dtype=torch.long))
        padded = q(input_ids=pair["input_ids"], attention_mask=pair["attention_mask"])
        assert len(recorded) == 12  # the unused pooler is float
        flipped = _compare_first_sample(recorded, 5)
        for forwards in recorded.values():
            forwards.pop()
        q.forward(**pair)  # the same call past the hooks: the mask does not reach the quantizers
    for handle in handles:
        handle.remove()
    unmasked_differ = _layers_beyond_ties(recorded, 5)
    assert (unmasked_differ == []) == per_token  # per token, padding never mattered; per sample it did
    _assert_outputs_agree(padded.last_hidden_state[0, :5], alone.last_hidden_state[0], flipped)
    _assert_outputs_agree(padded.pooler_output[0], alone.pooler_output[0], flipped)


@pytest.mark.parametrize("per_token", [False, True])
def test_calibration_from_a_padded_batch_equals_the_unpadded_batch(per_token):
    """Model level: two sentences of one length, calibrated alone or padded with 4 extra tokens under their
    mask, give the same steps and r_ref within float32 rounding. The real tokens' activations are those of the
    unpadded batch within rounding only (the BERT's matrix products and attention run on 10 tokens instead of 6),
    and the observers' statistics (means, the MSE search's sums) carry that rounding through. Calibrated past the
    mask hooks (the attention still masked, the observers seeing padding), the steps move far beyond it."""
    torch.manual_seed(6)
    bert, config = _bert(), QATConfig.recipe("post-asq", 4, act={"per_token": per_token})
    ids = torch.randint(1, VOCAB, (2, 6))
    padded = {"input_ids": torch.cat([ids, torch.randint(1, VOCAB, (2, 4))], 1), "attention_mask": torch.ones(2, 10)}
    padded["attention_mask"][:, 6:] = 0
    alone = _act_state(calibrate(prepare_qat(bert, config), [{"input_ids": ids}]))
    _assert_close_state(alone, _act_state(calibrate(prepare_qat(bert, config), [padded])))
    leaked = _act_state(calibrate(prepare_qat(bert, config), [padded], forward=lambda m, batch: m.forward(**batch)))
    assert max(relative_error(leaked[k], alone[k]) for k in alone) > 100 * FLOAT32_RTOL


# ---------------------------------------------------------------- sentence-transformers


def _sentence_transformer(tmp_path):
    st_models = pytest.importorskip("sentence_transformers.sentence_transformer.modules")
    sentence_transformers = pytest.importorskip("sentence_transformers")
    words = [f"w{i}" for i in range(VOCAB - 5)]
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(tmp_path)
    _bert().save_pretrained(tmp_path)
    encoder = st_models.Transformer(str(tmp_path))
    pooling = st_models.Pooling(encoder.get_embedding_dimension(), "mean")
    return sentence_transformers.SentenceTransformer(modules=[encoder, pooling], device="cpu")


SENTENCES = ["w1 w2 w3", "w4 w5 w6 w7 w8 w9 w10 w11 w12 w13 w14", "w20 w21 w22 w23 w24"]


@pytest.mark.parametrize("how", ["prepare the SentenceTransformer", "swap in a prepared BertModel"])
def test_sentence_transformer_encode_of_padded_batches_matches_encoding_alone(tmp_path, how):
    """``encode`` pads each batch to its longest sentence; with the mask reaching the quantizers, a sentence's
    embedding does not depend on its neighbours: equal within float32 rounding, as above (``atol=1e-6``, which
    holds while no activation code flips at a rounding tie).

    sentence-transformers' ``Transformer`` module calls the BERT's ``forward`` method directly, past its hooks:
    a swapped-in prepared model needs the hooks on the SentenceTransformer (``install_mask_hooks(st)``)."""
    torch.manual_seed(7)
    st = _sentence_transformer(tmp_path)
    config = QATConfig.recipe("post-asq", 4)
    features = st.preprocess(SENTENCES)
    if how == "prepare the SentenceTransformer":
        q = calibrate(prepare_qat(st, config), [((features,), None)])
    else:
        bert = calibrate(
            prepare_qat(st[0].auto_model, config), [{k: features[k] for k in ("input_ids", "attention_mask")}]
        )
        q = st
        q[0].model = bert  # auto_model is a read-only alias of .model in sentence-transformers 6
        install_mask_hooks(q)
    for m in q.modules():
        if isinstance(m, StepAdapter):
            nn.init.normal_(m.out.weight, std=0.5)
    together = q.encode(SENTENCES, convert_to_tensor=True, batch_size=8)
    for i, sentence in enumerate(SENTENCES):
        alone = q.encode([sentence], convert_to_tensor=True)
        torch.testing.assert_close(together[i], alone[0], rtol=0, atol=1e-6)


def test_a_packed_export_masks_padding_after_loading(tmp_path, monkeypatch):
    """``load_packed`` rebuilds the model with the mask hooks, so its ASQ adapters skip padding too: the same
    codes alone and padded except at rounding ties, and (unless one flipped) outputs within float32 rounding."""
    monkeypatch.setenv("ASQPOST_KERNEL", "reference")  # the kernels agree (tests/test_kernels.py); no build here
    torch.manual_seed(8)
    q = calibrate(prepare_qat(_bert(), QATConfig.recipe("post-asq", 4)), _calibration_batches())
    for m in q.modules():
        if isinstance(m, StepAdapter):
            nn.init.normal_(m.out.weight, std=0.5)
    save_packed(convert_to_packed(q), tmp_path / "bert.asq")
    packed = load_packed(tmp_path / "bert.asq", model=_bert())
    pair = _padded([5, 11])
    recorded, handles = _record_codes(packed)
    with torch.no_grad():
        alone = packed(input_ids=pair["input_ids"][:1, :5]).last_hidden_state[0]
        padded = packed(**pair).last_hidden_state[0, :5]
        for handle in handles:
            handle.remove()
        assert len(recorded) == 12
        flipped = _compare_first_sample(recorded, 5)
        unmasked = packed.forward(**pair).last_hidden_state[0, :5]
        assert not torch.allclose(unmasked, alone, rtol=0, atol=1e-4)
    _assert_outputs_agree(padded, alone, flipped)
