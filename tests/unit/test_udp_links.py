"""The DNS links of one UDP association (tunnel.udp), with a fake upstream and no sockets:
how many there may be, what counts toward the connection limit, and when one goes."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from fixtures.fake_upstream import FakeUpstream
from fixtures.udp_targets import build_query

import tunnel.udp as udp_module
from tunnel import events
from tunnel.rules import Rules
from tunnel.socks import build_datagram
from tunnel.udp import Drop, UdpAssociation, UdpSettings

CLIENT = ("127.0.0.1", 40000)


def association_with(
    opener: FakeUpstream, seen: list[events.Event], room: bool = True
) -> tuple[UdpAssociation, UdpSettings]:
    settings = UdpSettings(upstream=opener, runner=None, rules=Rules(), emit=seen.append)
    settings.room = lambda: room
    info = events.ConnectionInfo(id=1, client="127.0.0.1:40000", started=0.0)
    # These tests look at links, not at who owns their opens: the loop may run them.
    spawn = asyncio.get_running_loop().create_task
    return UdpAssociation(settings, info, CLIENT, spawn=spawn), settings


def query_to(association: UdpAssociation, host: str, qid: int = 1) -> None:
    packet = build_datagram(host, 53, build_query("www.example.test", qid))
    association.datagram_received(packet, CLIENT)


async def settle() -> None:
    """Let the open tasks the queries started run to their end."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_links_per_association_are_capped_and_the_rest_dropped() -> None:
    opener, seen = FakeUpstream(), []
    association, settings = association_with(opener, seen)
    cap = udp_module.MAX_DNS_LINKS
    for number in range(cap + 12):
        query_to(association, f"127.0.1.{number + 1}", qid=number)
    await settle()
    assert len(opener.opened) == cap
    assert settings.links == cap
    assert association.info.dropped == 12
    [dropped] = [e for e in seen if isinstance(e, events.DatagramsDropped)]
    assert dropped.reason == Drop.LINKS
    # A resolver it already has is still served.
    query_to(association, "127.0.1.1", qid=99)
    assert association.info.dropped == 12
    association.close()
    assert settings.links == 0
    assert all(channel.closed for channel in opener.channels)


async def test_no_link_without_room_under_the_connection_limit() -> None:
    opener, seen = FakeUpstream(), []
    association, settings = association_with(opener, seen, room=False)
    query_to(association, "127.0.1.1")
    await settle()
    assert opener.opened == []
    assert settings.links == 0
    assert association.info.dropped == 1
    [dropped] = [e for e in seen if isinstance(e, events.DatagramsDropped)]
    assert dropped.reason == Drop.LIMIT
    association.close()


async def test_a_link_that_cannot_open_gives_its_place_back() -> None:
    opener, seen = FakeUpstream.refusing(), []
    association, settings = association_with(opener, seen)
    cap = udp_module.MAX_DNS_LINKS
    # Twice as many refusing resolvers as places, one after the other: none is kept.
    for number in range(2 * cap):
        query_to(association, f"127.0.1.{number + 1}", qid=number)
        await settle()
    assert len(opener.opened) == 2 * cap
    assert settings.links == 0
    assert {e.reason for e in seen if isinstance(e, events.DatagramsDropped)} == {Drop.DNS_FAILED}
    association.close()


async def test_link_opens_are_tasks_of_the_owner_it_was_given() -> None:
    opener, seen = FakeUpstream(), []
    settings = UdpSettings(upstream=opener, runner=None, rules=Rules(), emit=seen.append)
    info = events.ConnectionInfo(id=1, client="127.0.0.1:40000", started=0.0)
    owned: list[asyncio.Task[None]] = []

    def spawn(work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(work)
        owned.append(task)
        return task

    association = UdpAssociation(settings, info, CLIENT, user="carol", spawn=spawn)
    query_to(association, "127.0.1.1")
    await settle()
    [task] = owned
    assert task.done()
    # The DNS channel's request carries the association's user and protocol.
    [request] = opener.requests
    assert (request.host, request.port, request.protocol, request.user, request.origin) == (
        "127.0.1.1",
        53,
        "socks5-udp",
        "carol",
        CLIENT,
    )
    association.close()
