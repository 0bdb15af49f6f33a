"""Headless Chromium for the tests: a page's DOM after it loads, and the DOM after signing in through a
form (driven over the DevTools protocol). No background networking: this machine reaches no outside host."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time

import requests

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert path, "Chromium is missing: `make setup` installs Debian's chromium (apt-get install chromium)"
    return path


def dump_dom(url: str, profile) -> subprocess.CompletedProcess:
    return subprocess.run([chromium(), *FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=5000", "--dump-dom",
                           url], capture_output=True, text=True, timeout=120)


def signed_in_dom(login_url: str, token: str, profile, timeout: float = 60) -> tuple[str, str]:
    """Open ``login_url``, type ``token`` into its form, submit; returns (final path, final DOM)."""
    from websockets.sync.client import connect

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([chromium(), *FLAGS, f"--user-data-dir={profile}", f"--remote-debugging-port={port}",
                             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + timeout
        while True:
            try:
                pages = [t for t in requests.get(f"http://127.0.0.1:{port}/json/list", timeout=2).json()
                         if t["type"] == "page"]
                if pages:
                    break
            except requests.RequestException:
                pass
            assert time.time() < deadline, "Chromium's DevTools endpoint did not come up"
            time.sleep(0.2)
        with connect(pages[0]["webSocketDebuggerUrl"], max_size=None, open_timeout=30) as ws:
            ids = iter(range(1, 10_000))

            def call(method, **params):
                n = next(ids)
                ws.send(json.dumps({"id": n, "method": method, "params": params}))
                while True:
                    msg = json.loads(ws.recv(timeout=timeout))
                    if msg.get("id") == n:
                        return msg.get("result", {})

            def js(expr):
                return call("Runtime.evaluate", expression=expr, returnByValue=True)["result"].get("value")

            def settle(pred):
                while not pred():
                    assert time.time() < deadline, f"page did not settle: {js('location.href')}"
                    time.sleep(0.2)

            call("Page.navigate", url=login_url)
            settle(lambda: js("document.readyState") == "complete" and js("!!document.getElementById('token')"))
            js(f"document.getElementById('token').value = {json.dumps(token)}; document.forms[0].submit(); 1")
            settle(lambda: js("location.pathname") != "/login" and js("document.readyState") == "complete")
            return js("location.pathname"), js("document.documentElement.outerHTML")
    finally:
        proc.kill()
        proc.wait()
