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


# -- routes: what --route sends direct, the PAC sends DIRECT where it can say so ---------

# isInNet as browsers run it on an address literal (no lookup); a name still fails.
IS_IN_NET = rb"""
function isInNet(host, pattern, mask) {
  if (!/^[0-9]{1,3}(\.[0-9]{1,3}){3}$/.test(host)) lookedUp(host);
  function n(a) {
    var p = a.split(".");
    return ((+p[0] << 24) >>> 0) + (+p[1] << 16) + (+p[2] << 8) + (+p[3]);
  }
  return ((n(host) & n(mask)) >>> 0) == ((n(pattern) & n(mask)) >>> 0);
}
"""

ROUTES = [
    "*.ads.example=reject",
    "*.lab:22=a",
    "10.0.0.0/8=direct",
    "*.corp.example=direct",
    "*.lab=a,b",
    "192.168.1.5=direct",
    "[fd00::]/8=direct",
    "host[0-9].example=a",
    "*.example=direct",
    "*:8080=direct",
]
ROUTE_HOSTS = [
    "x.ads.example", "web.lab", "web.lab.", "10.1.2.3", "10.255.0.1", "11.0.0.1",
    "wiki.corp.example", "WIKI.CORP.EXAMPLE", "192.168.1.5", "192.168.1.6", "fd00::1",
    "[fd00::1]", "host1.example", "hostx.example", "a.example", "example.org", "0.0.0.0",
    "db.evil", "lab", "::ffff:10.0.0.1", "10.example",
]  # fmt: skip


def oracle(host: str, port: int = 80) -> str:
    """The way the proxy sends a request (the router's order: --deny, then the routes)."""
    from tunnel.config import parse_destination
    from tunnel.names import normalize_host
    from tunnel.rules import Action, parse_route, parse_rules

    name = normalize_host(host.strip("[]").rstrip("."))
    if parse_rules([(Action.DENY, "*.evil")]).denies(name, port) is not None:
        return "reject"
    for text in ROUTES:
        route = parse_route(text, "r", parse_destination)
        if route.rule.matches(name, port):
            return route.label
    return "main"


def test_routes_to_direct_go_direct_and_nothing_else_does(tmp_path: Path) -> None:
    from tunnel.config import parse_destination
    from tunnel.rules import Action, parse_route, parse_rule

    routes = [parse_route(text, "r", parse_destination) for text in ROUTES]
    pac = pac_file(LISTENER, denied=[parse_rule(Action.DENY, "*.evil")], routes=routes)
    answers = evaluate(tmp_path, IS_IN_NET + pac, ROUTE_HOSTS)
    for host, answer in answers.items():
        assert answer in ("DIRECT", THROUGH), (host, answer)
        if answer == "DIRECT" and host != "lab":  # plain names are direct, routes or not
            # Never DIRECT what the proxy would send through SSH or refuse.
            assert oracle(host) == "direct", host
    direct = {host for host, answer in answers.items() if answer == "DIRECT"}
    # What a PAC can say: names by glob, IPv4 literals by block or address (the plain
    # name "lab" is direct as before routes).
    assert direct == {
        "10.1.2.3", "10.255.0.1", "wiki.corp.example", "WIKI.CORP.EXAMPLE", "192.168.1.5",
        "a.example", "10.example", "lab",
    }  # fmt: skip
    # The rest that the routes send direct goes to the proxy, which sends it direct:
    # an IPv6 block, a route by port, and a name an earlier route's [class] might
    # match (the PAC widens it to "?", to the proxy's side).
    assert oracle("hostx.example") == "direct"
    assert answers["hostx.example"] == THROUGH
    assert oracle("fd00::1") == "direct"
    assert answers["fd00::1"] == THROUGH


def test_an_earlier_allow_lets_a_direct_route_through_a_later_deny(tmp_path: Path) -> None:
    from tunnel.config import parse_destination
    from tunnel.rules import Action, parse_route, parse_rules

    rules = parse_rules([(Action.ALLOW, "*.corp.example"), (Action.DENY, "*")]).rules
    routes = [parse_route("*.example=direct", "r", parse_destination)]
    answers = evaluate(
        tmp_path, pac_file(LISTENER, denied=rules, routes=routes), ["a.corp.example", "b.example"]
    )
    # b.example is denied (the proxy refuses it); a.corp.example is allowed, then direct.
    assert answers == {"a.corp.example": "DIRECT", "b.example": THROUGH}


def test_without_direct_routes_the_pac_is_as_before() -> None:
    from tunnel.config import parse_destination
    from tunnel.rules import parse_route

    routes = [parse_route("*.lab=a", "r", parse_destination)]
    assert pac_file(LISTENER, routes=routes) == pac_file(LISTENER)
