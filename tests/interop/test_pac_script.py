"""The PAC file pytunnel serves, run in a real JavaScript engine: which hosts go DIRECT,
and which proxies the rest are sent to.

The engine is node when installed, else headless Chromium evaluating a local page (no
network: a file:// URL). The PAC helpers a browser provides are defined here as the
Netscape specification words them; the ones that look a name up (dnsResolve, isInNet,
isResolvable) throw, so a PAC that would make a browser resolve a name locally fails
the test instead of leaking the name.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from fixtures.pytunnel_proc import clean_env

from tunnel.http import pac_file

pytestmark = pytest.mark.timeout(120)

ENGINE_TIMEOUT = 60.0
LISTENER = "127.0.0.1:1080"
THROUGH = f"SOCKS5 {LISTENER}; PROXY {LISTENER}"
THROUGH_WITH_PASSWORD = f"PROXY {LISTENER}"

# The helpers the PAC may use, and the ones that would resolve names, which must not run.
HELPERS = r"""
// As old browsers define it: IPv6 literals have no dot either, so they count as plain.
function isPlainHostName(host) { return host.indexOf(".") == -1; }
function shExpMatch(text, glob) {
  var pattern = glob.replace(/[.+^${}()|[\]\\]/g, "\\$&")
    .replace(/\*/g, ".*").replace(/\?/g, ".");
  return new RegExp("^" + pattern + "$").test(text);
}
function lookedUp(name) { throw new Error("the PAC file looked up " + name); }
function dnsResolve(host) { lookedUp(host); }
function isResolvable(host) { lookedUp(host); }
function isInNet(host, pattern, mask) { lookedUp(host); }
function myIpAddress() { return "192.0.2.1"; }
"""

DIRECT = [
    "localhost",
    "LOCALHOST",
    "127.0.0.1",
    "127.0.0.2",
    "127.1.2.3",
    "127.255.255.255",
    "::1",
    "[::1]",
    "intranet",  # plain host names stay direct, as the README says
]
TUNNELED = [
    "example.com",
    "127.evil.example",
    "127.0.0.1.evil.example",
    "127.0.0.1.nip.io",
    "localhost.evil.example",
    "evil-localhost.example",
    "127.0.0.256",
    "127.0.0",
    "1127.0.0.1",
    "0.0.0.0",
    "10.0.0.1",
    "128.0.0.1",
    "::2",
    "fe80::1",
    "[2001:db8::1]",
]


def evaluate(tmp_path: Path, pac: bytes, hosts: list[str]) -> dict[str, str]:
    """FindProxyForURL for each host, run by a real JavaScript engine."""
    calls = json.dumps(hosts)
    body = (
        f"{HELPERS}\n{pac.decode('ascii')}\n"
        f"var answers = {{}}; var hosts = {calls};\n"
        "for (var i = 0; i < hosts.length; i++) {\n"
        "  try { answers[hosts[i]] = FindProxyForURL('http://' + hosts[i] + '/', hosts[i]); }\n"
        "  catch (e) { answers[hosts[i]] = 'ERROR ' + e.message; }\n"
        "}\n"
    )
    node = shutil.which("node") or shutil.which("nodejs")
    if node is not None:
        script = body + "process.stdout.write(JSON.stringify(answers));\n"
        done = subprocess.run(
            [node, "-e", script], capture_output=True, text=True, timeout=ENGINE_TIMEOUT
        )
        assert done.returncode == 0, done.stderr
        return dict(json.loads(done.stdout))
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("no JavaScript engine: install node or chromium")
    page = tmp_path / "pac.html"
    page.write_text(
        "<html><body><pre id=out></pre><script>\n"
        + body
        + "document.getElementById('out').textContent = JSON.stringify(answers);\n"
        "</script></body></html>\n"
    )
    done = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=ENGINE_TIMEOUT,
        env=clean_env({"HOME": str(tmp_path)}),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    text = done.stdout.split('<pre id="out">', 1)[1].split("</pre>", 1)[0]
    return dict(json.loads(text.replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")))


def test_loopback_and_plain_names_go_direct(tmp_path: Path) -> None:
    answers = evaluate(tmp_path, pac_file(LISTENER), DIRECT)
    assert answers == dict.fromkeys(DIRECT, "DIRECT")


def test_names_that_only_look_like_loopback_go_through_the_tunnel(tmp_path: Path) -> None:
    answers = evaluate(tmp_path, pac_file(LISTENER), TUNNELED)
    assert answers == dict.fromkeys(TUNNELED, THROUGH)


def test_no_socks4_entry_which_browsers_resolve_locally(tmp_path: Path) -> None:
    [answer] = evaluate(tmp_path, pac_file(LISTENER), ["example.com"]).values()
    kinds = [entry.split()[0] for entry in answer.split(";")]
    assert kinds == ["SOCKS5", "PROXY"]


def test_with_a_password_browsers_are_sent_to_the_http_proxy(tmp_path: Path) -> None:
    answers = evaluate(tmp_path, pac_file(LISTENER, auth=True), [*TUNNELED, *DIRECT])
    assert answers == {
        **dict.fromkeys(TUNNELED, THROUGH_WITH_PASSWORD),
        **dict.fromkeys(DIRECT, "DIRECT"),
    }


def test_ipv6_listener_is_named_with_brackets(tmp_path: Path) -> None:
    answers = evaluate(tmp_path, pac_file("[::1]:1080"), ["example.com"])
    assert answers == {"example.com": "SOCKS5 [::1]:1080; PROXY [::1]:1080"}
