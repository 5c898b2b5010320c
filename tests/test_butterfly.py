"""The butterfly all-reduce core: its plan, what it accepts from peers, its fallbacks."""

from __future__ import annotations

import itertools
from typing import Any, cast

import pytest
import torch
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from peerlearn.buffers import Segments, chunks, to_bytes
from peerlearn.errors import LocalProtocolError, RemoteProtocolError
from peerlearn.gossip.butterfly import Butterfly, PartMessage, Phase, part_bounds
from peerlearn.learning import parts
from peerlearn.learning.choices import Compression
from peerlearn.learning.robust import mean
from peerlearn.node.allreduce import PART_ROUNDS, AllReduce, PartCompression, PartsBox, Received
from peerlearn.tensors import state_dict_from_bytes, state_dict_segments, state_dict_to_bytes

GROUP = ["a", "b", "c", "d"]


def test_each_member_reduces_one_part_and_sends_every_other_part_once() -> None:
    plan = Butterfly(GROUP[1:], "a", 5)
    assert (plan.group, plan.index, plan.size) == (GROUP, 0, 4)
    assert plan.reduce_sends() == [("b", 1), ("c", 2), ("d", 3)]
    assert plan.gather_sends() == [("b", 0), ("c", 0), ("d", 0)]
    assert plan.message(Phase.REDUCE, 2).meta() == {
        "round": 5, "butterfly": "reduce", "part": 2, "of": 4}  # fmt: skip


def test_a_round_in_which_every_part_comes() -> None:
    plan = Butterfly(GROUP, "b", 0)
    for sender in ("a", "c", "d"):
        assert plan.receive(sender, PartMessage(0, Phase.REDUCE, 1, 4))
    assert plan.reduce_done
    plan.gather()
    for sender, part in (("a", 0), ("c", 2), ("d", 3)):
        assert plan.receive(sender, PartMessage(0, Phase.GATHER, part, 4))
    assert plan.gather_done
    assert plan.finish() == []
    assert plan.phase is Phase.DONE


def test_missing_parts_fall_back_and_late_ones_are_counted_not_used() -> None:
    plan = Butterfly(GROUP, "a", 0)
    assert plan.receive("d", PartMessage(0, Phase.GATHER, 3, 4))  # before our reduce ended
    plan.receive("b", PartMessage(0, Phase.REDUCE, 0, 4))
    plan.gather()
    assert not plan.receive("c", PartMessage(0, Phase.REDUCE, 0, 4))
    assert (plan.reduced_from, plan.late) == (["b"], 1)
    assert plan.finish() == [1, 2]


@pytest.mark.parametrize(
    ("sender", "message", "error"),
    [
        ("b", PartMessage(1, Phase.REDUCE, 0, 4), "round 1"),
        ("b", PartMessage(0, Phase.REDUCE, 0, 3), "of 3"),
        ("e", PartMessage(0, Phase.REDUCE, 0, 4), "not in this all-reduce group"),
        ("a", PartMessage(0, Phase.REDUCE, 0, 4), "not in this all-reduce group"),
        ("b", PartMessage(0, Phase.REDUCE, 2, 4), "we reduce 0"),
        ("b", PartMessage(0, Phase.GATHER, 2, 4), "reduces another"),
    ],
)
def test_parts_that_do_not_fit_the_plan_are_protocol_errors(
    sender: str, message: PartMessage, error: str
) -> None:
    with pytest.raises(RemoteProtocolError, match=error):
        Butterfly(GROUP, "a", 0).receive(sender, message)


def test_a_part_sent_twice_is_a_protocol_error() -> None:
    plan = Butterfly(GROUP, "a", 0)
    for message in (PartMessage(0, Phase.REDUCE, 0, 4), PartMessage(0, Phase.GATHER, 1, 4)):
        plan.receive("b", message)
        with pytest.raises(RemoteProtocolError, match="twice"):
            plan.receive("b", message)


def test_phases_go_in_order_and_groups_have_two_members_or_more() -> None:
    plan = Butterfly(GROUP, "a", 0)
    with pytest.raises(LocalProtocolError):
        plan.finish()
    plan.gather()
    with pytest.raises(LocalProtocolError):
        plan.gather()
    with pytest.raises(LocalProtocolError):
        Butterfly([], "a", 0)


KEYS = st.sampled_from(["round", "butterfly", "part", "of", "x"])
VALUES = st.one_of(st.integers(-3, 300), st.sampled_from(["reduce", "gather", "x"]), st.none())


@given(st.dictionaries(KEYS, VALUES))
def test_part_metadata_decodes_to_a_part_none_or_a_protocol_error(meta: dict[str, object]) -> None:
    try:
        message = PartMessage.from_meta(meta)
    except RemoteProtocolError:
        return
    if message is None:
        assert "butterfly" not in meta
    else:
        assert message.meta() == {k: meta[k] for k in ("round", "butterfly", "part", "of")}


@given(st.integers(0, 10_000), st.integers(2, 256))
def test_parts_cover_the_vector_in_order_with_sizes_within_one(elements: int, n: int) -> None:
    bounds = part_bounds(elements, n)
    assert (bounds[0][0], bounds[-1][1]) == (0, elements)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
    sizes = {end - start for start, end in bounds}
    assert max(sizes) - min(sizes) <= 1


def test_a_model_cut_into_parts_and_joined_is_the_same_model() -> None:
    model = {
        "w": torch.randn(5, 7),
        "half": torch.randn(11).to(torch.bfloat16),
        "bn.running_mean": torch.randn(3),
        "steps": torch.tensor(4),
    }
    vectors = parts.flat_vectors(model)
    assert set(vectors) == {"float32", "bfloat16"}
    for key, vector in vectors.items():
        assert torch.equal(torch.cat([parts.cut(vectors, i, 3)[key] for i in range(3)]), vector)
    rebuilt = parts.rebuild(vectors, model)
    assert all(torch.equal(rebuilt[k], model[k]) for k in model)


def part(sender: str, round_: int, phase: Phase = Phase.REDUCE, nbytes: int = 400) -> Received:
    return Received(sender, PartMessage(round_, phase, 0, 4), {"float32": torch.zeros(nbytes // 4)})


def held(box: PartsBox, sender: str) -> set[int]:
    return {k[0] for k in box._held if k[1] == sender}


def test_a_peer_flooding_parts_only_fills_its_own_slots() -> None:
    box = PartsBox(total=100_000, per_sender=100_000)
    for round_ in range(100, 110):  # far-future rounds: only PART_ROUNDS kept
        box.deliver(part("mallory", round_))
    assert held(box, "mallory") == set(range(100, 100 + PART_ROUNDS))
    box.deliver(part("mallory", 5))  # a nearer round pushes out its farthest
    assert held(box, "mallory") == {5, *range(100, 100 + PART_ROUNDS - 1)}
    for _ in range(3):
        box.deliver(part("mallory", 5))  # one part per phase
    box.deliver(part("alice", 5))
    box.deliver(part("alice", 5, Phase.GATHER))
    taken = {(r.sender, r.message.phase) for r in box.take(5)}
    assert taken == {("mallory", Phase.REDUCE), ("alice", Phase.REDUCE), ("alice", Phase.GATHER)}
    assert box.dropped == 6 + 1 + 3


def test_parts_stay_within_their_byte_budgets_and_rounds_that_ended_take_none() -> None:
    box = PartsBox(total=1_000, per_sender=800)
    box.deliver(part("alice", 1))
    box.deliver(part("alice", 2))
    box.deliver(part("alice", 3))  # alice would hold 1,200 bytes
    box.deliver(part("bob", 1))  # all would hold 1,200 bytes
    assert (held(box, "alice"), held(box, "bob"), box.dropped) == ({1, 2}, set(), 2)
    box.close_round(1)
    box.deliver(part("bob", 1))
    assert (box.take(1), box.dropped) == ([], 3)


def test_an_average_that_comes_while_our_values_are_still_going_out_waits_for_them() -> None:
    """Parts are sent from the flat copy averages are written into: a reducer that gave up
    waiting for our values must not have its average overwrite them mid-send."""
    vectors = parts.flat_vectors({"w": torch.zeros(8)})
    plan = Butterfly(["a", "b"], "a", 0)
    run = AllReduce(
        cast(Any, None), PartsBox(2**20, 2**20), plan, vectors, mean, 0.0, lambda *_: None
    )
    gate, sent = trio.Event(), []

    async def slow_send(peers: Any, phase: Phase, index: int, data: Segments) -> None:
        await gate.wait()
        sent.append(to_bytes(data))

    run.send = slow_send  # type: ignore[method-assign]

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            run.sending.add(1)
            nursery.start_soon(run.reduce_send, "b", 1, state_dict_segments(run.own_part(1)))
            await trio.testing.wait_all_tasks_blocked()
            run.absorb(Received("b", plan.message(Phase.GATHER, 1), {"float32": torch.ones(4)}))
            assert float(vectors["float32"].sum()) == 0.0  # not settled while sending
            gate.set()
        assert vectors["float32"].tolist() == [0.0] * 4 + [1.0] * 4

    trio.run(main)
    assert state_dict_from_bytes(sent[0], 2**20)["float32"].tolist() == [0.0] * 4


def test_a_model_is_sent_from_its_tensors_as_the_bytes_it_encodes_to() -> None:
    state = {
        "b": torch.arange(6.0).reshape(2, 3).t(),
        "a": torch.ones(3).half(),
        "e": torch.zeros(0),
    }
    segments = state_dict_segments(state)
    sent = b"".join(bytes(c) for c in chunks(segments, 5))
    assert sent == bytes(state_dict_to_bytes(state))
    assert len(segments) == len(sent)
    assert all(len(c) <= 5 for c in chunks(segments, 5))


def test_compressed_parts_keep_error_feedback_for_one_group_size_only() -> None:
    """Residuals follow a part from round to round; a group of another size cuts other
    parts, so the earlier ones go (at most one float32 copy of the model is kept)."""
    compression = PartCompression(Compression.parse("int8"))
    part = {"float32": torch.randn(1000, generator=torch.Generator().manual_seed(0))}
    variances = {"vca.variances": torch.ones(2, dtype=torch.float64)}
    first = compression.encode((Phase.REDUCE, 1, 4), part, variances)
    compression.encode((Phase.GATHER, 2, 4), part, {})
    assert len(compression._feedback) == 2
    again = compression.encode((Phase.REDUCE, 1, 4), part, variances)
    assert bytes(again) != bytes(first)  # the residual of the first went with the second
    compression.encode((Phase.REDUCE, 1, 5), part, variances)
    assert list(compression._feedback) == [(Phase.REDUCE, 1, 5)]
    decoded = state_dict_from_bytes(first, 2**20)
    assert torch.equal(decoded["vca.variances"], variances["vca.variances"])  # as it was
