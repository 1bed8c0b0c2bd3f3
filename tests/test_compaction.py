"""The pure compaction function: which tokens stay, the ragged filler, the order."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokencomp.compaction import compact


@st.composite
def rows(draw):
    B = draw(st.integers(1, 4))
    S = draw(st.integers(1, 12))
    stay = torch.tensor(draw(st.lists(st.lists(st.booleans(), min_size=S, max_size=S), min_size=B, max_size=B)))
    rank = torch.tensor(draw(st.lists(st.lists(st.sampled_from([-1e30, -1.0, 0.0, 0.5, 2.0]), min_size=S, max_size=S), min_size=B, max_size=B)))
    return stay, rank


@given(rows())
@settings(max_examples=300, deadline=None)
def test_compact_keeps_every_staying_token_once_in_order_and_fills_from_spares(case):
    stay, rank = case
    spare = ~stay
    order, alive = compact(stay, spare, rank)
    width = int(stay.sum(1).max())
    assert order.shape == alive.shape == (stay.shape[0], width)
    for b in range(stay.shape[0]):
        idx = order[b].tolist()
        assert idx == sorted(set(idx))  # ascending, no repeats: original order kept
        assert set(i for i, a in zip(idx, alive[b].tolist()) if a) == set(torch.nonzero(stay[b]).flatten().tolist())
        fillers = [i for i, a in zip(idx, alive[b].tolist()) if not a]
        assert all(bool(spare[b, i]) for i in fillers)
        # fillers are the best-ranked spares (ties: earlier)
        spares = sorted(torch.nonzero(spare[b]).flatten().tolist(), key=lambda i: (-float(rank[b, i]), i))
        assert sorted(fillers) == sorted(spares[: len(fillers)])
        assert len(fillers) == width - int(stay[b].sum())


def test_compact_without_raggedness_is_a_plain_selection():
    stay = torch.tensor([[True, False, True, False], [False, True, True, False]])
    order, alive = compact(stay, ~stay, torch.zeros(2, 4))
    assert order.tolist() == [[0, 2], [1, 2]] and alive.all()
