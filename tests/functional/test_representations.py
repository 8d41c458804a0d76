"""to_concepts: shapes, layout and pooling."""

import pytest
import torch

from lightning_rsm.functional import to_concepts


def test_feature_map_positions_become_rows():
    x = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    concepts = to_concepts(x)
    assert concepts.shape == (2, 4, 3)
    # position (h=1, w=0) of sample 1 is row 2; its channels are x[1, :, 1, 0]
    torch.testing.assert_close(concepts[1, 2], x[1, :, 1, 0])


def test_tokens_and_vectors():
    tokens = torch.randn(3, 5, 4)
    assert to_concepts(tokens) is tokens
    assert to_concepts(torch.randn(3, 4)).shape == (3, 1, 4)
    assert to_concepts(torch.ones(2, 3, dtype=torch.int64)).dtype == torch.float32


def test_pooling_keeps_aspect_ratio_and_cap():
    x = torch.randn(2, 3, 8, 16)
    pooled = to_concepts(x, max_positions=32)
    assert pooled.shape == (2, 32, 3)
    torch.testing.assert_close(
        pooled, torch.nn.functional.adaptive_avg_pool2d(x, (4, 8)).flatten(2).transpose(1, 2)
    )
    assert to_concepts(x, max_positions=1000).shape == (2, 128, 3)
    assert to_concepts(torch.randn(2, 10, 4), max_positions=5).shape == (2, 5, 4)


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_bad_max_positions(bad):
    with pytest.raises(ValueError, match=f"positive int or None, but got {bad!r}"):
        to_concepts(torch.zeros(2, 3, 4, 4), max_positions=bad)
