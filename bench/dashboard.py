"""The gateway's task rate with and without dashboards open (issue 13: at least 0.95x).

A ``LocalCluster`` (a gateway and ``--workers`` workers of one slot) runs the same workload
``--repeats`` times without and with ``--viewers`` dashboards open, alternating in ABBA order
(off, on, on, off, off, on...) so that a drift of the machine or an order effect hits both
sides alike. A dashboard is a plain WebSocket
client of the live feed (logged in with its own one-time link, reading every update), or with
``--chromium`` a real page in headless Chromium that draws every update. To see where the
pages' cost is, ``--pages quiet`` closes each page's feed once it is drawn (the page stays,
with its clock that redraws it every second, but gets no update) and ``--pages blank`` sends
each page to ``about:blank`` once logged in (three idle browsers). The viewers run in a
process of their own, and their CPU time while a run is on (with the browser's processes) is
printed in cores: on a machine as small as two cores the browsers compete with the gateway
and its workers for them. A run with viewers starts once they have settled (at most
``--settle-cores`` over a second: a Chromium page goes on working for seconds after it is
drawn, which is the cost of opening a dashboard, not of having one open); ``--settle-cores 0``
starts it as soon as the pages are drawn, as this bench did before 2026-12-02.

Workloads: ``noop``: ``--n`` no-op ``submit``s then gather (each a job of one task: the
heaviest case for the feed, whose job list changes all the time); ``map``: ``--n`` items of
``x + 1`` in chunks of 10 (one job, many tasks). The figure is tasks per second; the table
shows the median of each side, the ratio of the medians, and the worst ratio of a pair (an
"on" run against the "off" run next to it). Everything also goes to a JSON file.

    .venv/bin/python bench/dashboard.py                      # noop, 10,000 tasks, 3 viewers
    .venv/bin/python bench/dashboard.py --workload map --n 100000
    .venv/bin/python bench/dashboard.py --chromium --repeats 3
    .venv/bin/python bench/dashboard.py --chromium --repeats 3 --pages quiet
"""

from __future__ import annotations

import argparse
import http.cookiejar
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._baselines import inc, noop  # noqa: E402
from bench._table import print_table, write_json  # noqa: E402

DEFAULT_OUT = ROOT / "bench" / "results" / "dashboard.json"
BATCH_S = 0.25  # the feed's batch period (gateway/server/_dash_feed.py)
QUIET = {"PILOT_LOG_LEVEL": "WARNING"}
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
]
TASK_TIMEOUT_S = 300.0
VIEWERS_READY_S = 60.0
SETTLE_WINDOW_S = 1.0  # the viewers have settled when a window this long...
SETTLE_MAX_S = 30.0  # ...took at most --settle-cores of CPU, or after this long anyway


def _cookie_for(link: str) -> str:
    """Log in with ``link``; the session cookie as a ``Cookie`` header value."""
    jar = http.cookiejar.CookieJar()
    urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar)).open(link, timeout=30)
    return "; ".join(f"{c.name}={c.value}" for c in jar)


COUNT_UPDATES = """
window.__updates = 0;
const PageSocket = window.WebSocket;
window.WebSocket = class extends PageSocket {
  constructor(...args) {
    super(...args);
    this.addEventListener("message", () => window.__updates++);
  }
};
"""


def _updates(tab: Any) -> int:
    """The feed's messages ``tab`` got so far (0 on about:blank)."""
    return int(tab.evaluate("window.__updates || 0"))


def viewers_main(base: str, links: list[str], chromium: bool, pages: str = "live") -> None:
    """The viewers' process: open one dashboard per link, say READY, read until stdin closes,
    then print what they received as JSON."""
    if chromium:
        from playwright.sync_api import sync_playwright

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            tabs = [browser.new_page() for _ in links]
            for tab in tabs:  # count the updates each page gets
                tab.add_init_script(COUNT_UPDATES)
            for tab, link in zip(tabs, links, strict=True):
                tab.goto(link)
                tab.wait_for_selector("#live:not(.off)")
                if pages == "quiet":  # drawn, then no more updates (and no reconnecting)
                    tab.evaluate("S.ws.onclose = null; S.ws.close()")
                elif pages == "blank":
                    tab.goto("about:blank")
            before = [_updates(tab) for tab in tabs]
            print("READY", flush=True)
            sys.stdin.read()
            got = [_updates(tab) - n for tab, n in zip(tabs, before, strict=True)]
            browser.close()
        print(json.dumps({"viewers": len(links), "updates": got}), flush=True)
        return
    import asyncio

    from tornado.httpclient import HTTPRequest
    from tornado.websocket import websocket_connect

    async def run() -> dict[str, Any]:
        got: dict[str, Any] = {"messages": 0, "bytes": 0}
        url = base.replace("http", "ws", 1) + "/api/feed"
        conns = [
            await websocket_connect(HTTPRequest(url, headers={"Cookie": _cookie_for(link)}))
            for link in links
        ]

        async def read(conn: Any) -> None:
            while (msg := await conn.read_message()) is not None:
                got["messages"] += 1
                got["bytes"] += len(msg)
                got["feed_ms"] = json.loads(msg).get("gateway", {}).get("feed_ms", 0.0)

        readers = [asyncio.ensure_future(read(c)) for c in conns]
        print("READY", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        for c in conns:
            c.close()
        await asyncio.gather(*readers, return_exceptions=True)
        return got

    print(json.dumps(asyncio.run(run())), flush=True)


class Viewers:
    """``n`` dashboards in a child process, open between ``__enter__`` and ``__exit__``."""

    def __init__(
        self, client: Any, n: int, chromium: bool, pages: str = "live", settle: float = 0.0
    ) -> None:
        from gateway.client import dashboard_link

        self.links = [dashboard_link(client).url for _ in range(n)]
        self.base = self.links[0].split("/login", 1)[0]
        self.chromium = chromium
        self.pages = pages
        self.settle = settle
        self.settled_s: float | None = None  # how long they took to settle (None: not asked)
        self.stats: dict[str, Any] = {}

    def __enter__(self) -> Viewers:
        cmd = [sys.executable, __file__, "--viewers-child", self.base, *self.links]
        if self.chromium:
            cmd += ["--chromium", "--pages", self.pages]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        deadline = time.monotonic() + VIEWERS_READY_S
        line = self.proc.stdout.readline()
        if line.strip() != "READY" or time.monotonic() > deadline:
            raise RuntimeError(f"the viewers did not start: {line!r}")
        if self.settle > 0:
            self._wait_settled()
        return self

    def _wait_settled(self) -> None:
        """Wait until the viewers' CPU over ``SETTLE_WINDOW_S`` is at most ``settle`` cores
        (a page just loaded goes on working for seconds: parsing, compiling, first layouts),
        ``SETTLE_MAX_S`` at most; ``settled_s`` says how long it took (the deadline if never)."""
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < SETTLE_MAX_S:
            c0, w0 = self.cpu_s(), time.perf_counter()
            try:
                self.proc.wait(SETTLE_WINDOW_S)  # the window, or the viewers died
            except subprocess.TimeoutExpired:
                pass
            else:
                raise RuntimeError("the viewers exited while settling")
            if (self.cpu_s() - c0) / (time.perf_counter() - w0) <= self.settle:
                break
        self.settled_s = time.perf_counter() - t0

    def cpu_s(self) -> float:
        """CPU seconds used so far by the viewers' process and everything it started (the
        browser's processes too)."""
        import psutil

        top = psutil.Process(self.proc.pid)
        total = 0.0
        for p in [top, *top.children(recursive=True)]:
            try:
                t = p.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += t.user + t.system
        return total

    def __exit__(self, *exc: object) -> None:
        out, _ = self.proc.communicate("", timeout=60)
        self.stats = json.loads(out.strip().splitlines()[-1])


def run_once(client: Any, workload: str, n: int, gateway: Any = None) -> tuple[float, float]:
    """Tasks per second of one run of ``workload``, and the gateway process's CPU time per
    task in microseconds (``gateway``: its ``psutil.Process``; 0.0 without)."""
    cpu0 = sum(gateway.cpu_times()[:2]) if gateway is not None else 0.0
    t0 = time.perf_counter()
    if workload == "noop":
        jobs = [client.submit(noop, i) for i in range(n)]
        for job in jobs:
            job.result(TASK_TIMEOUT_S)
        tasks = n
    else:
        job = client.map(inc, range(n), chunk=10)
        job.wait(TASK_TIMEOUT_S)
        tasks = -(-n // 10)
    rate = tasks / (time.perf_counter() - t0)
    cpu = sum(gateway.cpu_times()[:2]) - cpu0 if gateway is not None else 0.0
    return rate, 1e6 * cpu / tasks


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", choices=("noop", "map"), default="noop")
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--viewers", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--chromium", action="store_true", help="real pages, not WebSocket clients")
    p.add_argument(
        "--pages",
        choices=("live", "quiet", "blank"),
        default="live",
        help="with --chromium: live pages, pages whose feed is closed once drawn, or about:blank",
    )
    p.add_argument(
        "--settle-cores",
        type=float,
        default=0.1,
        help="before a run with viewers, wait until they use at most this many cores over "
        f"{SETTLE_WINDOW_S:.0f} s ({SETTLE_MAX_S:.0f} s at most): dashboards that are open, "
        "not loading; 0: start the run as soon as the pages are drawn",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--viewers-child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.viewers_child:
        base, *links = args.viewers_child
        viewers_main(base, links, args.chromium, args.pages)
        return 0

    import psutil

    import pilot

    off: list[float] = []
    on: list[float] = []
    cpu_off: list[float] = []
    cpu_on: list[float] = []
    viewer_cores: list[float] = []  # the viewers' CPU while a run was on, in cores
    received: list[dict[str, Any]] = []
    settled: list[float | None] = []  # how long the viewers took to settle before each run
    with pilot.LocalCluster(workers=args.workers, env=QUIET) as cluster, cluster.client() as c:
        gateway = psutil.Process(cluster.gateway.pid)
        run_once(c, args.workload, min(args.n, 1000))  # warm up: processes, caches
        for i in range(args.repeats):
            for viewed in (False, True) if i % 2 == 0 else (True, False):  # ABBA: no order bias
                if not viewed:
                    rate, cpu = run_once(c, args.workload, args.n, gateway)
                    off.append(rate)
                    cpu_off.append(cpu)
                    continue
                with Viewers(c, args.viewers, args.chromium, args.pages, args.settle_cores) as v:
                    c0, t0 = v.cpu_s(), time.perf_counter()
                    rate, cpu = run_once(c, args.workload, args.n, gateway)
                    viewer_cores.append((v.cpu_s() - c0) / (time.perf_counter() - t0))
                on.append(rate)
                cpu_on.append(cpu)
                received.append(v.stats)
                settled.append(v.settled_s)
    pairs = [b / a for a, b in zip(off, on, strict=True)]
    kind = f"Chromium pages ({args.pages})" if args.chromium else "WebSocket viewers"
    viewers = f"{args.viewers} {kind}"
    rows = [
        {
            "side": "no dashboard",
            "median tasks/s": statistics.median(off),
            "worst": min(off),
            "gateway CPU us/task": statistics.median(cpu_off),
        },
        {
            "side": viewers,
            "median tasks/s": statistics.median(on),
            "worst": min(on),
            "gateway CPU us/task": statistics.median(cpu_on),
        },
    ]
    cpu_ratio = statistics.median(cpu_off) / statistics.median(cpu_on)
    ratio = statistics.median(on) / statistics.median(off)
    print(f"workload {args.workload}, n={args.n}, {args.repeats} runs per side")
    print_table(rows, ["side", "median tasks/s", "worst", "gateway CPU us/task"])
    print(
        f"ratio of medians {ratio:.3f}x, pairs median {statistics.median(pairs):.3f}x, "
        f"worst pair {min(pairs):.3f}x (target >= 0.95x)"
    )
    feed = [r["feed_ms"] for r in received if "feed_ms" in r]  # WebSocket viewers read it
    if feed:
        print(
            f"the feed's own CPU time per batch (every {BATCH_S * 1e3:.0f} ms): median "
            f"{statistics.median(feed):.2f} ms, worst {max(feed):.2f} ms, so "
            f"{100 * statistics.median(feed) / (BATCH_S * 1e3):.1f}% of one core"
        )
    print(
        f"the viewers' own CPU during a run: median {statistics.median(viewer_cores):.2f} cores, "
        f"worst {max(viewer_cores):.2f} (this machine has {os.cpu_count()})"
    )
    if waits := [w for w in settled if w is not None]:
        print(
            f"the viewers settled (at most {args.settle_cores:.2f} cores over "
            f"{SETTLE_WINDOW_S:.0f} s) before each run in: median {statistics.median(waits):.1f} "
            f"s, worst {max(waits):.1f} s (the limit: {SETTLE_MAX_S:.0f} s)"
        )
    print(
        f"gateway CPU per task, off/on: {cpu_ratio:.3f}x (the rate its own CPU allows, "
        "whatever else loads the machine)"
    )
    write_json(
        args.out,
        {
            "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
            "args": {k: v for k, v in vars(args).items() if k not in ("out", "viewers_child")},
            "off": off,
            "on": on,
            "pairs": pairs,
            "ratio_of_medians": ratio,
            "cpu_us_per_task_off": cpu_off,
            "cpu_us_per_task_on": cpu_on,
            "cpu_ratio": cpu_ratio,
            "viewer_cores": viewer_cores,
            "worst_pair": min(pairs),
            "received": received,
            "settled_s": settled,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
