"""A packed transformers ``PreTrainedModel`` of any head records its class and config in the export, so
``load_packed(path)`` rebuilds it offline without ``model=``; classes that transformers does not export, and
specs naming anything but a transformers model class, are refused clearly."""

import pytest
import torch

from asqpost import QATConfig, calibrate, prepare_qat
from asqpost.export import ExportError, convert_to_packed, load_packed, read_export, save_packed
from asqpost.models import model_from_spec
from asqpost.train.evaluation import evaluate_export
from tiny_bert import VOCAB, tiny_bert_config

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.numerics


def _packed(model):
    torch.manual_seed(0)
    ids = torch.randint(1, VOCAB, (4, 7))
    qat = calibrate(prepare_qat(model.eval(), QATConfig.recipe("post-asq", 4)), [{"input_ids": ids}])
    return convert_to_packed(qat)


def _inputs():
    ids = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize(
    ("build", "output"),
    [
        (lambda config: transformers.BertModel(config), "last_hidden_state"),
        (lambda config: transformers.BertModel(config, add_pooling_layer=False), "last_hidden_state"),
        (lambda config: transformers.BertForSequenceClassification(config), "logits"),
    ],
)
def test_a_packed_pretrained_model_rebuilds_from_its_file_alone(tmp_path, build, output):
    torch.manual_seed(1)
    packed = _packed(build(tiny_bert_config(transformers)))
    path = tmp_path / "bert.safetensors"
    save_packed(packed, path)
    spec = read_export(path)[0]["model"]
    assert spec["name"] == "hf-model" and spec["hf_class"] == type(packed).__name__
    assert spec["hf_config"]["vocab_size"] == VOCAB
    loaded = load_packed(path)  # no model=: class and config come from the file
    assert type(loaded) is type(packed)
    assert (getattr(loaded, "pooler", None) is None) == (getattr(packed, "pooler", None) is None)
    with torch.no_grad():  # the same packed layers on the same inputs: the same bits
        assert torch.equal(getattr(loaded(**_inputs()), output), getattr(packed(**_inputs()), output))
    with pytest.raises(ValueError, match=f"records a transformers {type(packed).__name__},"):
        evaluate_export(path, "synthetic")  # no dataset belongs to it: a clear error, not a KeyError


def test_a_class_transformers_does_not_export_needs_the_architecture(tmp_path):
    class OwnBert(transformers.BertModel):  # a user's subclass: its code is not in transformers
        pass

    packed = _packed(OwnBert(tiny_bert_config(transformers)))
    path = tmp_path / "own.safetensors"
    save_packed(packed, path)
    assert read_export(path)[0]["model"] is None
    with pytest.raises(ExportError, match="records no model spec; pass the float architecture as model="):
        load_packed(path)
    loaded = load_packed(path, model=OwnBert(tiny_bert_config(transformers)))
    with torch.no_grad():
        assert torch.equal(loaded(**_inputs()).last_hidden_state, packed(**_inputs()).last_hidden_state)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"hf_class": "AutoConfig"}, "not a transformers model class"),
        ({"hf_class": "os.system"}, "not a transformers model class"),
        ({"hf_class": "NoSuchModel"}, "not a transformers model class"),
        ({"init_kwargs": {"trust_remote_code": True}}, "unknown init_kwargs"),
        ({"hf_config": {"vocab_size": 3}}, "model_type"),
    ],
)
def test_a_spec_naming_anything_else_is_refused(edit, message):
    spec = {"name": "hf-model", "hf_class": "BertModel", "hf_config": tiny_bert_config(transformers).to_dict()}
    assert type(model_from_spec(spec)) is transformers.BertModel
    with pytest.raises(ValueError, match=message):
        model_from_spec({**spec, **edit})
