"""Layer representations as sets of concept vectors: validation, reshaping and pooling.

A layer's output for N samples becomes a tensor of shape ``(N, S, C)``: S concept vectors
of C channels each.

==================  ==================  =========================
input shape         meaning             concept vectors
==================  ==================  =========================
``(N, C, H, W)``    conv feature maps   S = H * W vectors of C
``(N, T, D)``       tokens              S = T vectors of D
``(N, D)``          pooled / linear     S = 1 vector of D
==================  ==================  =========================

Tokens have roles: a ViT's sequence starts with ``special_tokens`` special tokens (CLS,
registers) followed by patch tokens, which often form a grid (14 x 14). ``tokens`` picks
``"all"`` of them, only the ``"patches"`` or only the ``"special"`` ones; when a sequence is
pooled to ``max_positions``, only patch tokens are averaged (as a 2-D grid when
``token_grid`` says they form one), and special tokens are kept as they are, so pooling never
mixes a CLS token into a patch.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_rsm.functional.checks import check_representations
from lightning_rsm.functional.options import check_choice, check_positive_int

#: Which tokens of an ``(N, T, D)`` layer become concept vectors.
TOKEN_SELECTIONS = ("all", "patches", "special")

#: How patch tokens are pooled: ``"auto"`` (as a square grid when their number is a square),
#: ``None`` (along T) or an explicit grid ``(h, w)``.
TokenGrid = str | tuple[int, int] | None


def check_token_options(special_tokens: object, tokens: object, token_grid: object) -> None:
    """Raise ``ValueError`` for token options that cannot work together.

    Example:
        >>> check_token_options(0, "special", "auto")
        Traceback (most recent call last):
        ...
        ValueError: Expected `special_tokens` to be at least 1 with `tokens='special'`, but got 0.
    """
    if not (
        isinstance(special_tokens, int)
        and not isinstance(special_tokens, bool)
        and special_tokens >= 0
    ):
        raise ValueError(
            f"Expected `special_tokens` to be an int of at least 0, but got {special_tokens!r}."
        )
    check_choice(tokens, TOKEN_SELECTIONS, "tokens")
    if tokens == "special" and special_tokens == 0:
        raise ValueError(
            "Expected `special_tokens` to be at least 1 with `tokens='special'`, but got 0."
        )
    if not (
        token_grid is None
        or token_grid == "auto"
        or (
            isinstance(token_grid, tuple)
            and len(token_grid) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in token_grid)
        )
    ):
        raise ValueError(
            "Expected `token_grid` to be 'auto', None or a tuple (h, w) of positive ints, "
            f"but got {token_grid!r}."
        )


def _pooled_grid(height: int, width: int, max_positions: int) -> tuple[int, int]:
    """Largest grid of at most ``max_positions`` cells that keeps the aspect ratio."""
    scale = math.sqrt(max_positions / (height * width))
    h = max(1, min(height, math.floor(height * scale)))
    w = max(1, min(width, max_positions // h))
    return h, w


def to_concepts(
    x: Tensor,
    *,
    max_positions: int | None = None,
    name: str = "x",
    special_tokens: int = 0,
    tokens: str = "all",
    token_grid: TokenGrid = None,
) -> Tensor:
    """Reshape a layer's representations into N sets of concept vectors.

    Args:
        x: tensor of shape ``(N, C, H, W)``, ``(N, T, D)`` or ``(N, D)``.
        max_positions: if given and the sample has more positions than this, positions are
            averaged with adaptive average pooling (feature maps keep their aspect ratio; token
            sequences are pooled along T) until at most ``max_positions`` remain. Pooling
            trades spatial detail for speed: the LAP per pair costs about O(S^3).
        name: the argument's name in error messages.
        special_tokens: for ``(N, T, D)``: how many leading tokens are special (CLS,
            registers); they are never pooled together with patch tokens.
        tokens: for ``(N, T, D)``: keep ``"all"`` tokens, only the ``"patches"`` (the tokens
            after the special ones) or only the ``"special"`` ones.
        token_grid: for ``(N, T, D)``: how patch tokens are pooled when there are more than
            ``max_positions``: ``None`` along T, ``(h, w)`` as an ``h x w`` grid (like a
            feature map), ``"auto"`` as a grid when their number is a square (a ViT's
            14 x 14), else along T. Special tokens kept with ``tokens="all"`` come on top of the
            ``max_positions`` patch positions.

    Returns:
        floating tensor of shape ``(N, S, C)`` with S = H * W, T or 1 (after pooling).

    Raises:
        TypeError: If ``x`` is not a tensor of real dtype.
        ValueError: If ``x`` has another number of dimensions, an empty dimension or NaN/Inf,
            ``max_positions`` is not a positive int, the token options do not fit together or
            ``x`` has too few tokens for them.

    Example:
        >>> import torch
        >>> to_concepts(torch.zeros(5, 16, 7, 7)).shape
        torch.Size([5, 49, 16])
        >>> to_concepts(torch.zeros(5, 16, 14, 14), max_positions=49).shape
        torch.Size([5, 49, 16])
        >>> to_concepts(torch.zeros(5, 10)).shape
        torch.Size([5, 1, 10])
        >>> vit = torch.zeros(5, 1 + 14 * 14, 8)                 # CLS + 14 x 14 patches
        >>> to_concepts(vit, max_positions=50, special_tokens=1, token_grid="auto").shape
        torch.Size([5, 50, 8])
        >>> to_concepts(vit, special_tokens=1, tokens="special").shape
        torch.Size([5, 1, 8])
    """
    check_positive_int(max_positions, "max_positions", optional=True)
    check_token_options(special_tokens, tokens, token_grid)
    check_representations(x, name)
    return _reshape_concepts(x, max_positions, special_tokens, tokens, token_grid, name)


def _reshape_concepts(
    x: Tensor,
    max_positions: int | None,
    special_tokens: int = 0,
    tokens: str = "all",
    token_grid: TokenGrid = None,
    name: str = "x",
) -> Tensor:
    """:func:`to_concepts` without the checks, for inputs that were already validated."""
    if not x.is_floating_point():
        x = x.float()
    if x.ndim == 2:
        return x.unsqueeze(1)
    if x.ndim == 4:
        n, c, h, w = x.shape
        if max_positions is not None and h * w > max_positions:
            x = F.adaptive_avg_pool2d(x, _pooled_grid(h, w, max_positions))
        return x.flatten(2).transpose(1, 2)
    plan = plan_tokens(x.shape[1], max_positions, special_tokens, tokens, token_grid, name)
    if tokens == "special":
        return _pool_along_t(x[:, :special_tokens], plan.special_pooled_to)
    if tokens == "all" and plan.patches_pooled_to is None:
        return x
    patches = x[:, special_tokens:] if special_tokens else x
    if plan.grid is not None and plan.patches_pooled_to is not None:
        (h, w), (ph, pw) = plan.grid, plan.patches_pooled_to
        grid = patches.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)
        patches = F.adaptive_avg_pool2d(grid, (ph, pw)).flatten(2).transpose(1, 2)
    elif plan.patches_pooled_to is not None:
        patches = _pool_along_t(patches, plan.patches_pooled_to[0])
    return torch.cat([x[:, : plan.special], patches], dim=1) if plan.special else patches


def _pool_along_t(x: Tensor, positions: int | None) -> Tensor:
    if positions is None or x.shape[1] <= positions:
        return x
    return F.adaptive_avg_pool1d(x.transpose(1, 2), positions).transpose(1, 2)


class TokenPlan(NamedTuple):
    """What :func:`to_concepts` does with the T tokens of an ``(N, T, D)`` layer.

    ``special``: leading special tokens kept as they are; ``patches``: patch tokens kept (0
    with ``tokens="special"``); ``grid``: their ``(h, w)`` grid, or None when they are treated
    as a sequence; ``patches_pooled_to``: the pooled grid ``(h, w)`` (or ``(positions,)``
    along T), None without pooling; ``special_pooled_to``: positions the special tokens are
    pooled to along T with ``tokens="special"`` (None without pooling).
    """

    special: int
    patches: int
    grid: tuple[int, int] | None
    patches_pooled_to: tuple[int, ...] | None
    special_pooled_to: int | None


def plan_tokens(
    t: int,
    max_positions: int | None,
    special_tokens: int = 0,
    tokens: str = "all",
    token_grid: TokenGrid = None,
    name: str = "x",
) -> TokenPlan:
    """Which of T tokens are kept, and how they are pooled (see :func:`to_concepts`).

    Raises:
        ValueError: If there are not more than ``special_tokens`` tokens (at least as many
            with ``tokens="special"``), or an explicit ``token_grid`` does not fit the patches.

    Example:
        >>> plan_tokens(197, 64, special_tokens=1, token_grid="auto")
        TokenPlan(special=1, patches=196, grid=(14, 14), patches_pooled_to=(8, 8), \
special_pooled_to=None)
    """
    minimum = special_tokens if tokens == "special" else special_tokens + 1
    if t < minimum:
        raise ValueError(
            f"Expected `{name}` to have at least {minimum} tokens with `special_tokens` = "
            f"{special_tokens} and `tokens={tokens!r}`, but got T = {t}."
        )
    if tokens == "special":
        pooled = (
            max_positions if max_positions is not None and special_tokens > max_positions else None
        )
        return TokenPlan(special_tokens, 0, None, None, pooled)
    n = t - special_tokens
    keep = special_tokens if tokens == "all" else 0
    grid = _patch_grid(n, token_grid, name)
    budget = max_positions
    if budget is None or n <= budget:
        return TokenPlan(keep, n, grid, None, None)
    pooled = (budget,) if grid is None else _pooled_grid(*grid, budget)
    return TokenPlan(keep, n, grid, pooled, None)


def _patch_grid(n: int, token_grid: TokenGrid, name: str) -> tuple[int, int] | None:
    if token_grid is None:
        return None
    if token_grid == "auto":
        side = math.isqrt(n)
        return (side, side) if side * side == n and side > 1 else None
    h, w = token_grid
    if h * w != n:
        raise ValueError(
            f"Expected `token_grid` = {token_grid} to hold the {n} patch tokens of `{name}`, "
            f"but {h} x {w} = {h * w}."
        )
    return h, w


def describe_token_pooling(
    t: int,
    max_positions: int | None,
    special_tokens: int = 0,
    tokens: str = "all",
    token_grid: TokenGrid = None,
    name: str = "x",
) -> str | None:
    """A sentence on how the T tokens of layer ``name`` are pooled, or None if they are not.

    Example:
        >>> describe_token_pooling(65, 64, name="encoder")
        "Layer 'encoder' has 65 tokens, more than `max_positions` = 64: they are average-pooled \
along T to 64, so neighbouring tokens are mixed (65 = 1 + 8 x 8: if its first token is a CLS \
token, pass `special_tokens=1` to keep it out of the pooling)."
    """
    plan = plan_tokens(t, max_positions, special_tokens, tokens, token_grid, name)
    if plan.special_pooled_to is not None:
        return (
            f"Layer {name!r} has {special_tokens} special tokens, more than `max_positions` = "
            f"{max_positions}: they are average-pooled along T to {plan.special_pooled_to}."
        )
    if plan.patches_pooled_to is None:
        return None
    what = "they are"
    if special_tokens:
        kept = "kept apart" if plan.special else "left out"
        what = (
            f"its {special_tokens} special token(s) are {kept} and its {plan.patches} patches are"
        )
    if plan.grid is not None:
        (h, w), (ph, pw) = plan.grid, plan.patches_pooled_to
        how = f"{what} average-pooled as a {h} x {w} grid to {ph} x {pw}"
    else:
        how = f"{what} average-pooled along T to {plan.patches_pooled_to[0]}"
        how += ", so neighbouring tokens are mixed"
    message = f"Layer {name!r} has {t} tokens, more than `max_positions` = {max_positions}: {how}"
    hint = _special_token_hint(t) if not special_tokens else None
    return f"{message}{f' ({hint})' if hint else ''}."


def _special_token_hint(t: int) -> str | None:
    """A hint when T is a few tokens more than a square: a CLS token (and registers) + a grid."""
    for k in range(1, 9):
        side = math.isqrt(t - k)
        if side > 1 and side * side == t - k:
            first = "first token is a CLS token" if k == 1 else f"first {k} tokens are special"
            return (
                f"{t} = {k} + {side} x {side}: if its {first}, pass `special_tokens={k}` to keep "
                f"{'it' if k == 1 else 'them'} out of the pooling"
            )
    return None
