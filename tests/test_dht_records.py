"""Signed, namespaced DHT records: unit checks and a real 3-host Kademlia on 127.0.0.1."""

from __future__ import annotations

import time

import pytest
import trio

from peerlearn import wire
from peerlearn.errors import NetworkError, RemoteProtocolError
from peerlearn.gossip import records
from peerlearn.identity import Identity
from peerlearn.node.host import open_host

ALICE, MALLORY = Identity.generate(), Identity.generate()
NOW = time.time()


def test_peer_record_round_trip_and_newest_wins() -> None:
    key, old = records.make_peer_record(ALICE, "s", ["/ip4/127.0.0.1/tcp/1"], seq=1, now=NOW)
    _, new = records.make_peer_record(ALICE, "s", ["/ip4/127.0.0.1/tcp/2"], seq=2, now=NOW)
    assert records.validate_record(key, new).body["addrs"] == ["/ip4/127.0.0.1/tcp/2"]
    assert records.select_record(key, [old, new, b"junk"]) == 1


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        ("/other/s/peer/x", "outside"),
        ("plainkey", "outside"),
        (records.peer_record_key("s", ALICE.peer_id), "signed by the peer"),
        (records.peer_record_key("t", MALLORY.peer_id), "another key"),
    ],
)
def test_invalid_records_are_refused(key: str, reason: str) -> None:
    _, value = records.make_peer_record(MALLORY, "s", [], seq=1, now=NOW)
    if reason == "signed by the peer":  # Mallory signs a record about Alice
        body = {"key": key, "addrs": []}
        value = wire.seal(MALLORY, records.RECORD_TYPE, body, seq=1, timestamp=time.time())
    with pytest.raises(RemoteProtocolError, match=reason):
        records.validate_record(key, value)


@pytest.mark.integration
def test_kademlia_stores_signed_records_and_rejects_others() -> None:
    async def main() -> None:
        with trio.fail_after(60):
            listen = ["/ip4/127.0.0.1/tcp/0"]
            async with (
                open_host(ALICE, listen, swarm_services=True) as a,
                open_host(Identity.generate(), listen, swarm_services=True) as b,
                open_host(Identity.generate(), listen, swarm_services=True) as c,
            ):
                await b.connect(a.addrs()[0])
                await c.connect(a.addrs()[0])
                key, value = records.make_peer_record(ALICE, "s", a.addrs(), seq=7, now=time.time())
                await a.put_value(key, value)
                fetched = await c.get_value(key)
                assert fetched is not None
                assert records.validate_record(key, fetched).seq == 7
                with pytest.raises(NetworkError):
                    await a.put_value("/other/namespace", b"anything")
                swarm_key = records.swarm_provider_key("s")
                assert await a.provide(swarm_key)
                providers = await b.find_providers(swarm_key)
                assert [p for p, _ in providers] == [a.peer_id]  # deduplicated

    trio.run(main)
