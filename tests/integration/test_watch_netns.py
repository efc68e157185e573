"""The netlink watcher against the real kernel, inside a private network namespace
(``unshare --net``, as root): adding addresses is seen, and a burst gives one probe."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

# Runs inside the namespace: the watcher with a fake session that never answers, so
# each probe is recorded, then two network changes (a burst of five, then one more).
SCRIPT = textwrap.dedent(
    """
    import asyncio, json, subprocess
    from tunnel import watch

    probes, reconnects = [], []
    probed = asyncio.Condition()

    class Session:
        async def probe(self, within):
            async with probed:
                probes.append(within)
                probed.notify_all()
            return False

    class Keeper:
        def reconnect_now(self, cause):
            reconnects.append(cause)

    def ip(*commands):
        subprocess.run(["ip", "-batch", "-"], input="\\n".join(commands) + "\\n",
                       text=True, check=True)

    async def probes_reach(count):
        async with probed:
            await asyncio.wait_for(probed.wait_for(lambda: len(probes) >= count), 60)

    async def main():
        sock = watch.open_netlink()
        assert sock is not None
        wake = watch.Wake(Session(), Keeper(), lambda event: None, "srv")
        tasks = [asyncio.create_task(wake.run()),
                 asyncio.create_task(watch.watch_netlink(wake, sock))]
        ip("link set lo up", *(f"addr add 10.9.9.{n}/32 dev lo" for n in range(1, 6)))
        await probes_reach(1)
        after_burst = len(probes)
        ip("addr add 10.9.8.1/32 dev lo")
        await probes_reach(2)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        print(json.dumps({"after_burst": after_burst, "probes": len(probes),
                          "reconnects": reconnects}))

    asyncio.run(main())
    """
)


def test_netlink_changes_in_a_namespace_give_one_probe_per_burst() -> None:
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("needs root, unshare and ip for a private network namespace")
    done = subprocess.run(
        ["unshare", "--net", sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["after_burst"] == 1
    assert result["probes"] == 2
    assert result["reconnects"] == ["network", "network"]
