"""A refused stream: the peer can read why before the stream is reset, and a peer that
keeps sending cannot hold it open (in-process hosts, in virtual time)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path

import pytest
import trio
import trio.testing

from peerlearn.errors import NetworkError, Offence, RemoteProtocolError
from peerlearn.identity import Identity
from peerlearn.node.config import NodeConfig
from peerlearn.node.host_api import REFUSAL_DRAIN, REFUSAL_GRACE, Host, OpenGate, Stream
from tests.memory_host import MemoryNetwork, MemoryStream, RecordingGate

PROTOCOL = "/peerlearn/test/1"
REASON = b"your model has a NaN in layer3"


async def refuse(stream: Stream) -> None:  # the handler: reads the input, says why, refuses
    await stream.receive_some(100)
    await stream.send_all(REASON)
    raise RemoteProtocolError("not finite", Offence.BAD_MODEL)


def run(test: Callable[[Path], Awaitable[None]], tmp_path: Path) -> None:
    trio.run(test, tmp_path, clock=trio.testing.MockClock(autojump_threshold=0))


@asynccontextmanager
async def pair(
    tmp_path: Path, gate: RecordingGate
) -> AsyncIterator[tuple[Host, Host, list[MemoryStream]]]:
    """Sender a, and b serving PROTOCOL with ``refuse`` (its inbound streams listed)."""
    network = MemoryNetwork()
    config = NodeConfig(data_dir=tmp_path, swarm="")
    async with (
        network.open_host(Identity.generate(), config, OpenGate()) as a,
        network.open_host(Identity.generate(), config, gate) as b,
    ):
        served: list[MemoryStream] = []

        async def handler(stream: Stream) -> None:
            assert isinstance(stream, MemoryStream)
            served.append(stream)
            await refuse(stream)

        b.set_handler(PROTOCOL, handler)
        await a.connect(b.addrs()[0])
        yield a, b, served


def test_the_peer_reads_why_before_the_stream_is_reset(tmp_path: Path) -> None:
    async def main(tmp_path: Path) -> None:
        gate = RecordingGate()
        async with pair(tmp_path, gate) as (a, b, served):
            stream = await a.open_stream(b.peer_id, PROTOCOL)
            await stream.send_all(b"a model")
            await trio.sleep(1.0)  # the refusal has long been made
            assert await stream.receive_some() == REASON
            assert await stream.receive_some() == b""  # then the end of it, not a reset
            assert [offence for _, offence, _ in gate.rejections] == [Offence.BAD_MODEL]
            await stream.close()
            await trio.sleep(0.01)
            assert served[0].done

    run(main, tmp_path)


@pytest.mark.parametrize("flood", [False, True])
def test_a_refused_peer_cannot_hold_the_stream_open(tmp_path: Path, flood: bool) -> None:
    async def main(tmp_path: Path) -> None:
        async with pair(tmp_path, RecordingGate()) as (a, b, served):
            stream = await a.open_stream(b.peer_id, PROTOCOL)
            await stream.send_all(b"a model")
            started = trio.current_time()
            sent = 0

            async def keep_on() -> None:  # silent (never closing), or sending on and on
                nonlocal sent
                with trio.fail_after(REFUSAL_GRACE + 1):
                    while not (served and served[0].done):
                        if flood and sent < 4 * REFUSAL_DRAIN:  # (a bound for the test)
                            await stream.send_all(bytes(4096))  # NetworkError once reset
                            sent += 4096
                        else:
                            await trio.sleep(0.1)

            with suppress(NetworkError):
                await keep_on()
            assert served[0].done
            assert trio.current_time() - started <= REFUSAL_GRACE + 0.1
            assert sent <= REFUSAL_DRAIN + 2 * 4096 + 100

    run(main, tmp_path)
