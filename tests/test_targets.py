"""A reference network's RSM on the probe: the monitor's settings, and the network untouched."""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch
from conftest import make_data
from torch import nn

from lightning_rsm.callbacks.probe import capture_layers
from lightning_rsm.functional import semantic_rsm, to_concepts
from lightning_rsm.targets import reference_features, reference_rsm


def _teacher() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Flatten(),
        nn.Linear(256, 3),
    )


def test_the_rsm_of_a_named_layer_uses_the_monitors_settings():
    teacher, (images, _) = _teacher(), make_data(10)
    rsm = reference_rsm((teacher, "2"), images, kernel="inner", max_positions=16, batch_size=3)
    features, _ = capture_layers(teacher, ["2"], images, batch_size=10, max_positions=16)
    torch.testing.assert_close(rsm, semantic_rsm(features["2"], kernel="inner"))
    assert rsm.dtype == torch.float32 and torch.equal(rsm, rsm.T)


def test_the_network_is_left_as_it_was():
    teacher, (images, _) = _teacher(), make_data(10)
    teacher.train()
    teacher[1].eval()
    modes = [m.training for m in teacher.modules()]
    state = {k: v.clone() for k, v in teacher.state_dict().items()}
    random.seed(1), np.random.seed(1), torch.manual_seed(1)  # noqa: NPY002
    expected = (random.random(), np.random.rand(), torch.rand(1))  # noqa: NPY002
    random.seed(1), np.random.seed(1), torch.manual_seed(1)  # noqa: NPY002
    reference_rsm((teacher, "3"), images, max_positions=4)  # dropout: eval mode, or RSMs differ
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected  # noqa: NPY002
    assert [m.training for m in teacher.modules()] == modes
    assert all(torch.equal(v, state[k]) for k, v in teacher.state_dict().items())  # BN stats
    assert not any(m._forward_hooks for m in teacher.modules())
    with torch.no_grad():
        in_eval_mode = copy.deepcopy(teacher).eval()[:4](images)
    expected = semantic_rsm(to_concepts(in_eval_mode, max_positions=4))
    torch.testing.assert_close(reference_rsm((teacher, "3"), images, max_positions=4), expected)


def test_a_callable_returning_features_gives_the_same_rsm():
    teacher, (images, _) = _teacher(), make_data(9)
    body = teacher[:3]
    body.train()
    from_callable = reference_rsm(body, images, max_positions=16, batch_size=4)
    assert body.training  # put in eval mode for the call only
    from_layer = reference_rsm((teacher, "2"), images, max_positions=16)
    torch.testing.assert_close(from_callable, from_layer)
    tokens = reference_features(
        lambda x: x.flatten(2).transpose(1, 2),
        images,
        special_tokens=1,
        tokens="patches",
        max_positions=None,
    )
    expected = to_concepts(images.flatten(2).transpose(1, 2), special_tokens=1, tokens="patches")
    torch.testing.assert_close(tokens, expected)


def test_bad_references_are_one_line_errors():
    teacher, (images, _) = _teacher(), make_data(4)
    with pytest.raises(ValueError, match=r"names from `model.named_modules\(\)`"):
        reference_rsm((teacher, "layer4"), images)
    with pytest.raises(TypeError, match=r"`\(model, layer_name\)` or a callable"):
        reference_rsm("teacher", images)
    with pytest.raises(ValueError, match=r"features of shape \(4, \.\.\.\) for a batch of 4"):
        reference_rsm(lambda x: x[:2], images)
