"""Compression of sent models: the codecs' error and size, error feedback, the decoder at the
trust boundary, and the simulator's bytes and accuracy with and without it."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peerlearn.errors import LocalProtocolError, RemoteProtocolError
from peerlearn.learning.choices import Compression
from peerlearn.learning.compression import (
    BLOCK,
    CHUNK,
    LAYOUT_KEY,
    ErrorFeedback,
    _quantize,
    decode,
    layout,
    like_from_layout,
)
from peerlearn.sim.simulator import SimConfig, run_simulation
from peerlearn.tensors import state_dict_and_metadata, state_dict_from_bytes, state_dict_to_bytes

CODECS = ("int8", "int4", "topk:0.1")


def _model(seed: int = 0, size: int = 3000) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(size // 10, 10, generator=generator),
        "half": torch.randn(77, generator=generator).half(),
        "steps": torch.tensor(7),
        "mask": torch.ones(3, dtype=torch.bool),
        "empty": torch.zeros(0, 4),
    }


def _sent(codec: str, model: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    wire, _ = ErrorFeedback(Compression.parse(codec)).encode(model)
    return wire


@pytest.mark.parametrize(("codec", "levels"), [("int8", 127), ("int4", 7)])
def test_quantization_errs_by_at_most_half_a_step_of_each_block(codec: str, levels: int) -> None:
    model = _model()
    _, rebuilt = ErrorFeedback(Compression.parse(codec)).encode(model)
    flat = model["w"].reshape(-1)
    for block in range(math.ceil(flat.numel() / BLOCK)):
        span = slice(block * BLOCK, (block + 1) * BLOCK)
        step = float(flat[span].abs().max()) / levels
        error = (rebuilt["w"].reshape(-1)[span] - flat[span]).abs().max()
        assert float(error) <= step / 2 + 1e-6
    assert torch.equal(rebuilt["steps"], model["steps"])
    assert torch.equal(rebuilt["mask"], model["mask"])
    assert rebuilt["half"].dtype == torch.float16


def test_top_k_sends_the_largest_entries_exactly_and_zero_elsewhere() -> None:
    model = _model()
    _, rebuilt = ErrorFeedback(Compression.parse("topk:0.1")).encode(model)
    flat, kept = model["w"].reshape(-1), rebuilt["w"].reshape(-1)
    sent = kept != 0
    assert int(sent.sum()) == math.ceil(0.1 * flat.numel())
    assert torch.equal(kept[sent], flat[sent])
    assert float(flat[~sent].abs().max()) <= float(flat[sent].abs().min())


@pytest.mark.parametrize(("codec", "fewer"), [("int8", 3.9), ("int4", 7.5), ("topk:0.01", 30)])
def test_encoded_sizes(codec: str, fewer: float) -> None:
    model = {"w": torch.randn(2**20, generator=torch.Generator().manual_seed(1))}
    whole = len(state_dict_to_bytes(model))
    assert whole / len(state_dict_to_bytes(_sent(codec, model))) >= fewer


@pytest.mark.parametrize("codec", CODECS)
def test_error_feedback_delivers_what_single_messages_leave_out(codec: str) -> None:
    """Sending one model again and again: the mean of what receivers rebuilt converges to
    it, because each message carries what the ones before left out."""
    model = {"w": torch.randn(1000, generator=torch.Generator().manual_seed(2))}
    feedback = ErrorFeedback(Compression.parse(codec))
    first = feedback.encode(model)[1]["w"]
    total = first.clone()
    sends = 200
    for _ in range(sends - 1):
        total += feedback.encode(model)[1]["w"]
    single = (first - model["w"]).abs().max()
    mean_error = (total / sends - model["w"]).abs().max()
    assert float(mean_error) < float(single) / 10


def test_changes_are_sent_against_a_reference_both_sides_hold() -> None:
    start = _model(seed=3)
    trained = {name: t + 0.01 if t.is_floating_point() else t for name, t in start.items()}
    compression = Compression.parse("topk:0.1")
    wire, rebuilt = ErrorFeedback(compression).encode(trained, reference=start)
    received = decode(
        state_dict_from_bytes(state_dict_to_bytes(wire), 2**20), start, compression, start
    )
    assert all(torch.equal(received[name], rebuilt[name]) for name in start)
    assert float((received["w"] - trained["w"]).abs().max()) <= 0.01 + 1e-6


@pytest.mark.parametrize("codec", CODECS)
def test_a_peer_rebuilds_exactly_what_the_sender_expects(codec: str) -> None:
    model = _model(seed=4)
    compression = Compression.parse(codec)
    wire, rebuilt = ErrorFeedback(compression).encode(model)
    received = decode(state_dict_from_bytes(state_dict_to_bytes(wire), 2**20), model, compression)
    assert all(torch.equal(received[name], rebuilt[name]) for name in model)


@pytest.mark.parametrize(("codec", "bits"), [("int8", 8), ("int4", 4)])
def test_tensors_larger_than_a_chunk_are_quantized_as_one(codec: str, bits: int) -> None:
    """Quantization goes CHUNK values at a time (small temporaries); blocks never straddle
    chunks, so the bytes are those of the whole tensor at once, and so is the rebuild."""
    generator = torch.Generator().manual_seed(6)
    model = {"big": torch.randn(2 * CHUNK + 300, generator=generator)}
    compression = Compression.parse(codec)
    feedback = ErrorFeedback(compression)
    wire, rebuilt = feedback.encode(model)
    q, scale = _quantize(model["big"], bits)
    assert torch.equal(wire["big/q"], q)
    assert torch.equal(wire["big/scale"], scale)
    assert torch.equal(decode(wire, model, compression)["big"], rebuilt["big"])
    residual = feedback.residual["big"].clone()
    assert torch.allclose(residual, model["big"] - rebuilt["big"])
    again, _ = feedback.encode(model)  # the residual (overwritten in place) goes out next
    assert torch.equal(again["big/q"], _quantize(model["big"] + residual, bits)[0])


@pytest.mark.parametrize("codec", CODECS)
def test_a_peer_holding_no_model_rebuilds_it_in_the_layout_the_bytes_state(codec: str) -> None:
    model = _model(seed=5)
    compression = Compression.parse(codec)
    feedback = ErrorFeedback(compression)
    encoded = feedback.encode_bytes(model)
    wire, metadata = state_dict_and_metadata(encoded, 2**20)
    like = like_from_layout(metadata, max_bytes=2**20)
    assert list(like) == list(model)  # the sender's order
    assert all(t.device.type == "meta" for t in like.values())  # no memory
    received = decode(wire, like, compression)
    expected = decode(wire, model, compression)  # a learner decodes against its own model
    assert all(torch.equal(received[name], expected[name]) for name in model)
    assert all(received[n].dtype == model[n].dtype for n in model)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (None, "without its layout"),
        ("[", "not JSON"),
        ("[1]", "not a map"),
        ('{"w": ["F99", [3]]}', "malformed"),
        ('{"w": [["F32"], [3]]}', "malformed"),
        ('{"w": ["F32", [-3]]}', "invalid shape"),
        ('{"w": ["F32", [3, "a"]]}', "invalid shape"),
        ('{"": ["F32", [3]]}', "malformed"),
        ('{"w": ["F32", [1000, 1000]]}', "more than 1000000 bytes"),
        ('{"w": ["F32", [1600, 100]], "v": ["F32", [1600, 100]]}', "more than 1000000 bytes"),
    ],
)
def test_a_stated_layout_is_checked_and_bounded_before_anything_is_allocated(
    text: str | None, error: str
) -> None:
    metadata = {} if text is None else {LAYOUT_KEY: text}
    with pytest.raises(RemoteProtocolError, match=error):
        like_from_layout(metadata, max_bytes=1_000_000)


def test_a_peer_naming_no_codec_for_a_model_is_refused() -> None:
    with pytest.raises(RemoteProtocolError, match="'none' named"):
        Compression.from_peer("none")
    assert layout({"w": torch.zeros(2, 3)}) == {LAYOUT_KEY: '{"w":["F32",[2,3]]}'}


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("zip", "none, int8, int4 or topk"),
        ("int8:2", "takes no"),
        ("topk", "0 < F < 0.5"),
        ("topk:0.5", "0 < F < 0.5"),
        ("topk:nan", "0 < F < 0.5"),
        ("topk:-1", "0 < F < 0.5"),
    ],
)
def test_settings_that_name_no_codec_are_refused_in_one_line(text: str, error: str) -> None:
    with pytest.raises(LocalProtocolError, match=error):
        Compression.parse(text)
    with pytest.raises(RemoteProtocolError):
        Compression.from_peer(text)


def test_top_k_is_refused_where_nodes_share_no_start() -> None:
    assert Compression.parse("topk:0.1").unsuited_to("gossip") is not None
    assert Compression.parse("topk:0.1").unsuited_to("modest") is None
    assert Compression.parse("int4").unsuited_to("gossip") is None
    with pytest.raises(LocalProtocolError, match="a model both sides hold"):
        run_simulation(SimConfig(algo="dpsgd", compression="topk:0.1", rounds=1))


# -- the decoder at the trust boundary -------------------------------------------------------


def _mutations(codec: str) -> list[tuple[str, object]]:
    """(wire tensor to change, how): each makes a compressed model malformed."""
    if codec == "topk:0.1":
        return [
            ("w/index", lambda t: t.flip(0)),
            ("w/index", lambda t: t + 3000),
            ("w/index", lambda t: t - 1 - t[0]),
            ("w/index", lambda t: t.long()),
            ("w/value", lambda t: torch.full_like(t, math.nan)),
            ("w/value", lambda t: t[:-1]),
            ("w/value", lambda t: t.double()),
        ]
    mutations: list[tuple[str, object]] = [
        ("w/scale", lambda t: torch.full_like(t, math.inf)),
        ("w/scale", lambda t: -t),
        ("w/scale", lambda t: torch.cat((t, t))),
        ("w/q", lambda t: t[1:]),
        ("w/q", lambda t: t.reshape(2, -1)),
        ("w/q", lambda t: t.to(torch.int16)),
        ("steps", lambda t: t.reshape(1)),
        ("mask", lambda t: t.to(torch.uint8)),
    ]
    if codec == "int8":
        mutations.append(("w/q", lambda t: torch.full_like(t, -128)))
    else:
        mutations.append(("w/q", lambda t: t & 0xF0))
    return mutations


@pytest.mark.parametrize("codec", CODECS)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_malformed_compressed_models_are_declared_peer_errors(
    codec: str, data: st.DataObject
) -> None:
    model = _model()
    wire = _sent(codec, model)
    mutations = _mutations(codec)
    key, change = data.draw(st.sampled_from(mutations))
    bad = dict(wire)
    bad[key] = change(bad[key])  # type: ignore[operator]
    with pytest.raises(RemoteProtocolError):
        decode(bad, model, Compression.parse(codec))


@pytest.mark.parametrize("codec", CODECS)
def test_missing_or_extra_wire_tensors_are_refused(codec: str) -> None:
    model = _model()
    wire = _sent(codec, model)
    for name in wire:
        with pytest.raises(RemoteProtocolError):
            decode({k: v for k, v in wire.items() if k != name}, model, Compression.parse(codec))
    with pytest.raises(RemoteProtocolError, match="tensors, expected"):
        decode({**wire, "extra": torch.zeros(1)}, model, Compression.parse(codec))


@pytest.mark.parametrize("codec", CODECS)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_mutated_encodings_decode_or_raise_the_declared_error(
    codec: str, data: st.DataObject
) -> None:
    model = _model(size=600)
    encoded = bytearray(state_dict_to_bytes(_sent(codec, model)))
    for _ in range(data.draw(st.integers(1, 8))):
        encoded[data.draw(st.integers(0, len(encoded) - 1))] = data.draw(st.integers(0, 255))
    try:
        rebuilt = decode(state_dict_from_bytes(encoded, 2**20), model, Compression.parse(codec))
    except RemoteProtocolError:
        return
    assert all(
        rebuilt[n].shape == model[n].shape and rebuilt[n].dtype == model[n].dtype for n in model
    )
    assert all(bool(torch.isfinite(rebuilt[n].float()).all()) for n in model)


# -- the simulator ---------------------------------------------------------------------------


@pytest.mark.parametrize(("algo", "codec"), [("gossip-vca", "int4"), ("modest", "int8")])
def test_simulated_compression_sends_fewer_bytes_for_the_same_accuracy(
    algo: str, codec: str
) -> None:
    base = SimConfig(algo=algo, nodes=8, rounds=12, sample_size=4)
    plain = run_simulation(base)
    compressed = run_simulation(SimConfig(**{**base.__dict__, "compression": codec}))
    assert plain.records[-1].bytes_sent / compressed.records[-1].bytes_sent > 2.5
    assert compressed.final() >= plain.final() - 0.02


def test_a_non_finite_model_of_our_own_is_still_encoded_for_the_receiver_to_judge() -> None:
    """Our own model is not a peer's input: it is compressed as it is (the receiver refuses
    it), never raised as a peer's offence in the sender."""
    model = {"w": torch.tensor([1.0, math.nan, 2.0])}
    for codec in CODECS:
        wire, _ = ErrorFeedback(Compression.parse(codec)).encode(model)
        with pytest.raises(RemoteProtocolError, match="non-finite"):
            decode(wire, model, Compression.parse(codec))


@pytest.mark.parametrize("codec", CODECS)
def test_a_non_finite_model_does_not_poison_the_messages_after_it(codec: str) -> None:
    feedback = ErrorFeedback(Compression.parse(codec))
    feedback.encode({"w": torch.tensor([1.0, math.nan, 2.0])})
    wire, rebuilt = feedback.encode({"w": torch.tensor([1.0, 3.0, 2.0])})
    assert bool(torch.isfinite(rebuilt["w"]).all())
    decode(wire, {"w": torch.zeros(3)}, Compression.parse(codec))
