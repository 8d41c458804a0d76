"""Batched, certified auction solver for blocks of linear assignment problems (LAPs).

For each of B score matrices ``scores[b]`` of shape ``(S, S)`` the solver looks for a
permutation ``P`` that maximises ``sum_s scores[b, s, P(s)]``. All B problems advance together
with a handful of tensor operations per bidding round, so the solver runs wherever ``scores``
lives (CPU or CUDA) with no Python loop per problem or per pair.

Every result is certified. Any price vector ``p`` gives, by weak LP duality, the upper bound::

    upper(p) = sum_j p_j + sum_i max_j (scores[i, j] - p_j)  >=  max_P sum_i scores[i, P(i)]

and the permutation found gives the lower bound ``value = sum_i scores[i, P(i)]``, so the
optimum lies in ``[value, upper]``. Auction prices that satisfy epsilon-complementary slackness
make ``upper - value <= S * epsilon``; epsilon-scaling shrinks epsilon until the gap is at most
the requested tolerance.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_rsm.functional.checks import check_scores
from lightning_rsm.functional.matching.assignment import Assignment

# Epsilon shrinks by this factor from one scaling phase to the next (Bertsekas suggests 4 to 10).
_EPS_FACTOR = 7.0
# Epsilon never goes below this fraction of max |score|: smaller steps would be lost to rounding
# in float64 prices. A tolerance that would need smaller steps is met only if the gap allows.
_EPS_FLOOR = 2.0**-40


def _check_options(scores: Tensor, tol: object, max_iter: object) -> None:
    """Raise if ``tol`` or ``max_iter`` of :func:`auction_assignment` is invalid."""
    if isinstance(tol, Tensor):
        if tol.ndim > 1 or (tol.ndim == 1 and tol.shape[0] != scores.shape[0]):
            raise ValueError(
                f"Expected `tol` to be a scalar or a tensor of shape ({scores.shape[0]},), "
                f"but got shape {tuple(tol.shape)}."
            )
        if tol.dtype == torch.bool or tol.is_complex():
            raise TypeError(f"Expected `tol` to have a real dtype, but got {tol.dtype}.")
        bad = ~(torch.isfinite(tol) & (tol > 0))
        if bool(bad.any()):
            raise ValueError(
                f"Expected `tol` to be positive and finite, but got {tol[bad].flatten()[0].item()}."
            )
    elif not (
        isinstance(tol, (int, float))
        and not isinstance(tol, bool)
        and math.isfinite(tol)
        and tol > 0
    ):
        raise ValueError(f"Expected `tol` to be a positive finite number, but got {tol!r}.")
    if max_iter is not None and not (
        isinstance(max_iter, int) and not isinstance(max_iter, bool) and max_iter >= 0
    ):
        raise ValueError(f"Expected `max_iter` to be None or an int >= 0, but got {max_iter!r}.")


def _certificate(
    scores: Tensor, price: Tensor, assignment: Tensor, best: Tensor
) -> tuple[Tensor, Tensor]:
    """Primal value of ``assignment`` and the dual bound of ``price`` (float64, shape ``(B,)``).

    ``best`` is ``(scores - price[:, None, :]).amax(dim=2)``, shape ``(B, S)``.
    """
    value = scores.gather(2, assignment.unsqueeze(2)).sum(dim=(1, 2))
    upper = price.sum(dim=1) + best.sum(dim=1)
    return value, upper


class _Auction:
    """State of B auctions (rows are bidders, columns are objects), kept in flat index form.

    ``assigned[b * S + i]`` is the flat object ``b * S + j`` held by row ``i`` of problem ``b``
    (or -1); ``owner`` is its inverse. Invariant: every assigned row satisfies
    ``epsilon``-complementary slackness: ``scores[i, j] - price[j] >= max_k (scores[i, k] -
    price[k]) - eps``.
    """

    def __init__(self, scores: Tensor, tol: Tensor) -> None:
        batch, size, _ = scores.shape
        self.scores, self.tol, self.batch, self.size = scores, tol, batch, size
        self.rows = scores.reshape(batch * size, size)
        device = scores.device
        self.price = torch.zeros(batch, size, dtype=scores.dtype, device=device)
        self.assigned = torch.full((batch * size,), -1, dtype=torch.long, device=device)
        self.owner = torch.full_like(self.assigned, -1)
        self.offset = torch.arange(batch, device=device) * size
        scale = scores.abs().amax(dim=(1, 2))
        spread = scores.amax(dim=(1, 2)) - scores.amin(dim=(1, 2))
        self.eps_floor = (scale * _EPS_FLOOR).clamp_min(torch.finfo(scores.dtype).tiny)
        # S * eps_min < tol, so the last phase certifies the tolerance without relying on luck.
        # Capped at the spread (then any permutation is within tol) so that prices stay on the
        # scale of the scores and the certificate does not drown in their rounding.
        self.eps_min = torch.maximum(torch.minimum(tol / (size + 1), spread), self.eps_floor)
        # Start at the geometric mean of spread / 4 (Bertsekas' usual start) and eps_min: on
        # score matrices of trained features (many near-identical concept vectors) this halves
        # the bids at S = 49 and divides them by 3 at S = 196; random ones barely notice.
        # (A product of square roots neither underflows nor overflows.)
        self.eps = torch.maximum(spread / 4, self.eps_min).sqrt() * self.eps_min.sqrt()
        self.eps = torch.maximum(self.eps, self.eps_min)
        self.active = torch.ones(batch, dtype=torch.bool, device=device)
        # Scratch buffers for the per-object maximum bid; reset after each round.
        self.best_bid = torch.full((batch * size,), -math.inf, dtype=scores.dtype, device=device)
        self.best_row = torch.full_like(self.assigned, batch * size)

    def _shrink(self, eps: Tensor, problems: Tensor) -> Tensor:
        """Next epsilon of each problem: down by the factor, to ``eps_min``, then to the floor."""
        eps_min = self.eps_min[problems]
        lowest = torch.where(eps > eps_min, eps_min, self.eps_floor[problems])
        return torch.maximum(eps / _EPS_FACTOR, lowest)

    def end_phases(self, problems: Tensor) -> Tensor:
        """Problems whose rows are all assigned: stop them if certified, else shrink epsilon.

        Epsilon shrinks until some row breaks the tighter complementary slackness (shrinking
        further while every row still satisfies it changes nothing else). Rows that break it are
        freed, with their objects, for the next phase; the rest keep their objects. A problem
        also stops when epsilon is at its floor. Returns the freed rows (flat indices).
        """
        size = self.size
        scores, price = self.scores[problems], self.price[problems]
        flat = self.assigned.view(self.batch, size)[problems]
        local = flat - self.offset[problems].unsqueeze(1)
        reduced = scores - price.unsqueeze(1)
        best = reduced.amax(dim=2)
        slack = best - reduced.gather(2, local.unsqueeze(2)).squeeze(2)
        del reduced  # the largest temporary: (Q, S, S)
        worst = slack.amax(dim=1)
        value, upper = _certificate(scores, price, local, best)
        done = upper - value <= self.tol[problems]
        eps = self.eps[problems]
        shrinking = ~done
        while bool(shrinking.any()):
            stuck = shrinking & (eps <= self.eps_floor[problems])
            done |= stuck
            shrinking &= ~stuck
            eps = torch.where(shrinking, self._shrink(eps, problems), eps)
            shrinking &= worst <= eps
        self.eps[problems] = eps
        self.active[problems[done]] = False
        loose = (slack > eps.unsqueeze(1)) & ~done.unsqueeze(1)
        self.owner[flat[loose]] = -1
        rows = (self.offset[problems].unsqueeze(1) + torch.arange(size, device=flat.device))[loose]
        self.assigned[rows] = -1
        return rows

    def bid(self, bidders: Tensor) -> Tensor:
        """One Jacobi round: every unassigned row bids at once; each object takes its best bid.

        Returns the rows unassigned after the round: the outbid bidders and the rows that lost
        their objects to a higher bid.
        """
        size, empty = self.size, self.batch * self.size
        problem = bidders // size
        price = self.price.view(-1)
        reduced = self.rows.index_select(0, bidders)
        reduced -= self.price.index_select(0, problem)
        first, choice = reduced.max(dim=1)
        second = reduced.scatter_(1, choice.unsqueeze(1), -math.inf).amax(dim=1)
        target = self.offset.index_select(0, problem) + choice
        bid = price.index_select(0, target) + (first - second) + self.eps.index_select(0, problem)
        self.best_bid.scatter_reduce_(0, target, bid, "amax")
        top = bid == self.best_bid.index_select(0, target)
        self.best_row.scatter_reduce_(0, target, torch.where(top, bidders, empty), "amin")
        won = bidders == self.best_row.index_select(0, target)
        self.best_bid.index_fill_(0, target, -math.inf)
        self.best_row.index_fill_(0, target, empty)
        won_at, lost_at = won.nonzero().squeeze(1), (~won).nonzero().squeeze(1)
        winners, objects = bidders.index_select(0, won_at), target.index_select(0, won_at)
        previous = self.owner.index_select(0, objects)
        previous = previous.index_select(0, (previous >= 0).nonzero().squeeze(1))
        self.assigned.index_fill_(0, previous, -1)
        self.owner.index_copy_(0, objects, winners)
        self.assigned.index_copy_(0, winners, objects)
        price.index_copy_(0, objects, bid.index_select(0, won_at))
        return torch.cat([bidders.index_select(0, lost_at), previous])

    def complete(self) -> None:
        """Give the unassigned rows the free objects in index order (after ``max_iter``)."""
        size = self.size
        free_rows = (self.assigned < 0).view(self.batch, size)
        free_objects = (self.owner < 0).view(self.batch, size)
        rows = free_rows.to(torch.int8).argsort(dim=1, descending=True, stable=True)
        objects = free_objects.to(torch.int8).argsort(dim=1, descending=True, stable=True)
        take = torch.arange(size, device=rows.device) < free_rows.sum(dim=1, keepdim=True)
        offset = self.offset.unsqueeze(1)
        self.assigned[(rows + offset)[take]] = (objects + offset)[take]

    def run(self, max_iter: int | None) -> None:
        """Bid until every problem is certified or ``max_iter`` rounds have run."""
        free = torch.arange(self.batch * self.size, device=self.assigned.device)
        rounds = 0
        while True:
            has_free = torch.zeros_like(self.active).index_fill_(0, free // self.size, True)
            ended = self.active & ~has_free
            if bool(ended.any()):
                free = torch.cat([free, self.end_phases(ended.nonzero().squeeze(1))])
            if free.numel() == 0:
                return
            if max_iter is not None and rounds >= max_iter:
                self.complete()
                return
            free = self.bid(free)
            rounds += 1


def auction_assignment(
    scores: Tensor, *, tol: float | Tensor = 1e-4, max_iter: int | None = None
) -> Assignment:
    """Maximum-score assignment of a batch of square matrices, with a certified optimality gap.

    Solves, for every ``b``, ``max_P sum_s scores[b, s, P(s)]`` over permutations ``P`` with the
    auction algorithm and epsilon-scaling (Bertsekas), in its Jacobi form: in each bidding
    round every unassigned row of every unfinished problem bids at once and each object goes to
    its highest bid. All problems advance together; finished ones drop out. Prices are kept in
    float64.

    The result is certified: ``value`` is the score of the returned permutation (a lower bound
    on the optimum) and ``upper`` is the dual bound ``sum_j p_j + sum_i max_j (scores[b, i, j] -
    p_j)`` of the final prices ``p`` (valid for any prices by weak duality), so
    ``value <= optimum <= upper``. A problem stops once ``upper - value <= tol``. If the gap is
    zero the permutation is optimal.

    .. note:: ``tol`` is absolute, in the units of ``scores``; scale it yourself for
        normalised quantities (for a cosine ``v / (n_x * n_y)`` within ``t``, pass
        ``tol = t * n_x * n_y``). A tolerance below about ``S * 2**-40 * max |scores|`` is
        beyond what float64 prices resolve: the solver then stops at that resolution and the
        returned gap says how close it got. Both bounds are computed in float64 from the
        (float64-converted) input, so they hold up to float64 rounding of sums of S terms.

    Args:
        scores: real tensor of shape ``(B, S, S)`` on any device; ``B`` may be 0.
        tol: positive absolute tolerance on ``upper - value``: a number, or a tensor of shape
            ``(B,)`` with one tolerance per problem.
        max_iter: most bidding rounds (each round: every unassigned row of every unfinished
            problem bids once). ``None`` runs to the tolerance, which the auction always
            reaches. When the limit stops a problem early, its unassigned rows get the free
            columns in index order; the result is still a permutation and the bounds still hold,
            but the gap may exceed ``tol``.

    Returns:
        :class:`~lightning_rsm.functional.matching.assignment.Assignment` on the device of
        ``scores``: ``value`` and ``upper``, float64 tensors of shape ``(B,)`` with
        ``value <= optimum <= upper``, and the ``permutation``, a long tensor of shape
        ``(B, S)`` with ``permutation[b, s] = P(s)``.

    Raises:
        TypeError: If ``scores`` is not a tensor of a real dtype, or ``tol`` is a bool or
            complex tensor.
        ValueError: If ``scores`` is not of shape ``(B, S, S)`` with ``S >= 1`` or holds
            NaN/Inf, if ``tol`` is not positive and finite or has the wrong shape, or if
            ``max_iter`` is not None or an int >= 0.

    References:
        D. P. Bertsekas, "The auction algorithm: A distributed relaxation method for the
        assignment problem", Annals of Operations Research 14, 1988.
        https://doi.org/10.1007/BF02186476

    Example:
        >>> import torch
        >>> scores = torch.tensor([[[3.0, 1.0], [1.0, 0.0]], [[1.0, 5.0], [4.0, 1.0]]])
        >>> result = auction_assignment(scores, tol=1e-6)
        >>> result.value
        tensor([3., 9.], dtype=torch.float64)
        >>> bool((result.gap <= 1e-6).all())
        True
        >>> result.permutation
        tensor([[0, 1],
                [1, 0]])
    """
    check_scores(scores)
    _check_options(scores, tol, max_iter)
    device = scores.device
    work = scores.detach().to(torch.float64)
    batch, size, _ = work.shape
    tol = torch.as_tensor(tol, dtype=torch.float64, device=device).expand(batch).clone()
    if size == 1 or batch == 0:
        assignment = torch.zeros(batch, size, dtype=torch.long, device=device)
        value = work.sum(dim=(1, 2))
        return Assignment(value, value.clone(), assignment)
    auction = _Auction(work, tol)
    auction.run(max_iter)
    assignment = auction.assigned.view(batch, size) - auction.offset.unsqueeze(1)
    best = (work - auction.price.unsqueeze(1)).amax(dim=2)
    value, upper = _certificate(work, auction.price, assignment, best)
    return Assignment(value, upper, assignment)
