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


# ------------------------------------------------------------------ token roles


def vit_tokens(n: int = 2, side: int = 6, special: int = 1, dim: int = 3) -> torch.Tensor:
    """Special tokens full of 100 (easy to spot in an average) followed by side x side patches."""
    patches = torch.randn(n, side * side, dim)
    return torch.cat([torch.full((n, special, dim), 100.0), patches], dim=1)


def test_pooling_never_mixes_special_tokens_into_patches():
    x = vit_tokens()  # 1 + 36 tokens
    kept = to_concepts(x, max_positions=9, special_tokens=1, token_grid="auto")
    assert kept.shape == (2, 1 + 9, 3)
    torch.testing.assert_close(kept[:, 0], x[:, 0])  # the CLS token, as it was
    assert bool((kept[:, 1:].abs() < 50).all())  # no patch average holds a special token
    # without `special_tokens` the CLS is averaged into the first position, as the hint warns
    mixed = to_concepts(x, max_positions=36)
    assert bool((mixed.abs() > 2).any())


def test_patch_grid_is_pooled_as_an_image():
    x = vit_tokens(side=6)
    grid = x[:, 1:].transpose(1, 2).reshape(2, 3, 6, 6)
    expected = torch.nn.functional.adaptive_avg_pool2d(grid, (3, 3)).flatten(2).transpose(1, 2)
    got = to_concepts(x, max_positions=9, special_tokens=1, tokens="patches", token_grid="auto")
    torch.testing.assert_close(got, expected)
    explicit = to_concepts(
        x, max_positions=9, special_tokens=1, tokens="patches", token_grid=(6, 6)
    )
    torch.testing.assert_close(explicit, expected)
    along_t = to_concepts(x, max_positions=9, special_tokens=1, tokens="patches")
    assert not torch.allclose(along_t, expected)  # token_grid=None pools along T


def test_special_tokens_alone_and_unpooled_patches():
    x = vit_tokens(special=2)
    torch.testing.assert_close(to_concepts(x, special_tokens=2, tokens="special"), x[:, :2])
    torch.testing.assert_close(to_concepts(x, special_tokens=2, tokens="patches"), x[:, 2:])
    assert to_concepts(x, special_tokens=2) is x  # "all" without pooling changes nothing


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"special_tokens": -1}, "`special_tokens` to be an int of at least 0"),
        ({"tokens": "cls"}, r"`tokens` to be one of \['all', 'patches', 'special'\]"),
        ({"tokens": "special"}, "at least 1 with `tokens='special'`"),
        ({"token_grid": (5, 5), "max_positions": 4, "special_tokens": 1}, "36 patch tokens"),
        ({"token_grid": "square"}, "`token_grid` to be 'auto', None or a tuple"),
        ({"special_tokens": 37}, r"at least 38 tokens .* but got T = 37"),
    ],
)
def test_bad_token_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        to_concepts(vit_tokens(), **kwargs)
