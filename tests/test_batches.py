import pytest
import torch
from torch import nn

from asqpost.batches import batch_size, call_model, split_batch, to_device


class _Echo(nn.Module):
    def forward(self, *args, **kwargs):
        return args, kwargs


def test_each_input_form_is_called_its_own_way():
    x, ids, mask = torch.rand(2, 3), torch.ones(2, 4, dtype=torch.long), torch.ones(2, 4)
    assert call_model(_Echo(), x)[0][0] is x
    args, kwargs = call_model(_Echo(), {"input_ids": ids, "attention_mask": mask})
    assert args == () and kwargs["input_ids"] is ids and kwargs["attention_mask"] is mask
    args, kwargs = call_model(_Echo(), (ids, mask))
    assert args[0] is ids and args[1] is mask and kwargs == {}
    assert call_model(_Echo(), x, forward=lambda m, inputs: ("mine", inputs)) == ("mine", x)


def test_split_batch_keeps_every_item_or_refuses():
    x, y = torch.rand(3, 2), torch.tensor([0, 1, 1])
    assert split_batch(x) == (x, None)
    enc = {"input_ids": torch.ones(3, 5)}
    assert split_batch(enc) == (enc, None)
    inputs, target = split_batch(((x, x), y))
    assert inputs == (x, x) and target is y
    with pytest.raises(ValueError, match=r"\(inputs, target\), got 3 items"):
        split_batch((x, x, y))
    with pytest.raises(ValueError, match="got str"):
        split_batch("text")


def test_to_device_and_batch_size_reach_nested_tensors():
    batch = {"a": [torch.rand(4, 2)], "b": (torch.rand(4),), "n": 3}
    moved = to_device(batch, "cpu")
    assert moved["n"] == 3 and torch.equal(moved["a"][0], batch["a"][0])
    assert batch_size(batch) == 4
    with pytest.raises(ValueError, match="empty"):
        batch_size({"input_ids": torch.ones(0, 5)})
    with pytest.raises(ValueError, match="no tensor"):
        batch_size({"n": 3})
