"""The dashboard in a real headless Chromium (Debian's ``chromium``, driven by Playwright).

A ``LocalCluster`` of two workers (with Blender where there is one) and its gateway's
dashboard; each test logs in with a fresh one-time link from ``pilot dashboard``'s request and
looks at the page as a person would: jobs submitted after the page loaded appear and advance
without a reload, a render job's thumbnails fill in, a training job's curve gains points, the
cancel button cancels, a hostile job name is text, and nothing is open without a login. Every
page's console errors fail the test. A screenshot of each page is kept under the test's tmp
directory (and copied to ``$PILOT_SCREENSHOTS`` when set: ``docs/img`` is made that way).
"""

from __future__ import annotations

import html
import http.cookiejar
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import pilot
from gateway.client import dashboard_link
from gateway.protocol import Status
from gateway.server._dash_feed import STORM_BATCHES, STORM_ROWS
from tests_support import TEST_TIMEOUTS

playwright = pytest.importorskip("playwright.sync_api")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
BLENDER = shutil.which("blender")
pytestmark = [
    pytest.mark.system,
    pytest.mark.slow,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="apt-get install chromium"),
]
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
]
HOSTILE = '<img src=x onerror="document.title=123">'
UI_TIMEOUT_MS = 30_000  # a live update on a loaded 2-core machine
JOB_TIMEOUT_S = 120.0


def quick(x: int) -> int:
    return x


def slow_item(x: int) -> int:
    time.sleep(0.15)
    return x


def sleeps(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def fails_on_three(x: int) -> int:
    if x == 3:
        raise ValueError(f"item {x} is {HOSTILE}")
    return x


def reports_steps(steps: int) -> int:
    import math

    import pilot.train as pt

    for step in range(steps):
        pt.report(step=step, loss=math.exp(-step / 10), accuracy=1 - math.exp(-step / 7))
        time.sleep(0.1)
    return steps


@pytest.fixture(scope="module")
def cluster() -> Iterator[pilot.LocalCluster]:
    with pilot.LocalCluster(workers=2, timeouts=TEST_TIMEOUTS) as c:
        yield c


@pytest.fixture(scope="module")
def client(cluster: pilot.LocalCluster) -> Iterator[pilot.Client]:
    with cluster.client() as c:
        yield c


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("screenshots")


class Watched:
    """A logged-in page whose console errors and uncaught exceptions are collected."""

    def __init__(self, browser: Any, link: str) -> None:
        self.context = browser.new_context(viewport={"width": 1280, "height": 800})
        self.page = self.context.new_page()
        self.page.set_default_timeout(UI_TIMEOUT_MS)
        self.errors: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("dialog", lambda d: d.accept())  # the cancel button asks first
        self.page.goto(link)
        self.page.wait_for_selector("#live:not(.off)")  # the feed is open

    def shot(self, shots: Path, name: str) -> Path:
        path = shots / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        keep = os.environ.get("PILOT_SCREENSHOTS")
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, Path(keep) / path.name)
        return path

    def close(self) -> None:
        self.context.close()
        assert not self.errors, f"console errors: {self.errors}"


@pytest.fixture
def page(browser: Any, client: pilot.Client) -> Iterator[Watched]:
    w = Watched(browser, dashboard_link(client).url)
    yield w
    w.close()


def base_url(client: pilot.Client) -> str:
    return str(client.connection.http_url).rstrip("/")


def job_row(page: Any, job_id: str) -> Any:
    return page.locator(f'tr[data-job="{job_id}"]')


# -- logging in ---------------------------------------------------------------------------------


def test_without_a_login_the_page_its_api_its_feed_and_metrics_refuse(
    client: pilot.Client, browser: Any
) -> None:
    base = base_url(client)
    for path in ("/", "/static/app.js", "/api/status", "/api/session", "/metrics", "/api/feed"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(base + path, timeout=10)
        assert refused.value.code == 401, path
    cancel = urllib.request.Request(base + "/api/jobs/x/cancel", data=b"", method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(cancel, timeout=10)
    assert refused.value.code == 401
    context = browser.new_context()
    try:
        page = context.new_page()
        reply = page.goto(base + "/")
        assert reply.status == 401
        assert "pilot dashboard" in page.inner_text("body")
        with pytest.raises(playwright.Error):  # the WebSocket upgrade is refused too
            page.evaluate(
                """url => new Promise((ok, fail) => { const ws = new WebSocket(url);
                ws.onopen = () => ok(1); ws.onerror = () => fail(new Error("refused")); })""",
                base.replace("http", "ws") + "/api/feed",
            )
    finally:
        context.close()


def test_a_login_link_works_once_and_becomes_an_httponly_strict_cookie(
    client: pilot.Client, browser: Any
) -> None:
    link = dashboard_link(client).url
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(link)
        assert page.url == base_url(client) + "/"  # the token left the address bar
        page.wait_for_selector("#live:not(.off)")
        (cookie,) = context.cookies()
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        assert cookie["name"].startswith("pilot-session-")
        metrics = page.request.get(base_url(client) + "/metrics")  # the cookie opens /metrics
        assert metrics.status == 200 and "pilot_tasks_finished_total" in metrics.text()
    finally:
        context.close()
    with pytest.raises(urllib.error.HTTPError) as used:
        urllib.request.urlopen(link, timeout=10)
    assert used.value.code == 403


def test_a_cross_site_post_is_refused_and_the_scrape_token_reads_metrics_only(
    client: pilot.Client,
) -> None:
    base = base_url(client)
    link = dashboard_link(client, scrape=True)
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    opener.open(link.url, timeout=10)
    csrf = json.loads(opener.open(base + "/api/session", timeout=10).read())["csrf"]
    job = client.map(slow_item, range(40))
    try:
        for headers in (
            {},
            {"X-Pilot-CSRF": "wrong"},
            {"X-Pilot-CSRF": csrf, "Origin": "http://evil.example"},
        ):
            post = urllib.request.Request(
                f"{base}/api/jobs/{job.id}/cancel", data=b"", method="POST", headers=headers
            )
            with pytest.raises(urllib.error.HTTPError) as refused:
                opener.open(post, timeout=10)
            assert refused.value.code == 403, headers
        assert not job.done()
    finally:
        job.cancel()
    bearer = {"Authorization": f"Bearer {link.scrape_token}"}
    scrape = urllib.request.Request(base + "/metrics", headers=bearer)
    assert b"pilot_task_latency_seconds_bucket" in urllib.request.urlopen(scrape).read()
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(urllib.request.Request(base + "/api/status", headers=bearer))
    assert refused.value.code == 401


# -- what the pages show ------------------------------------------------------------------------


def test_a_hostile_job_name_is_shown_as_text_and_never_runs(
    client: pilot.Client, page: Watched, shots: Path
) -> None:
    job = client.map(fails_on_three, range(6), name=HOSTILE)
    with pytest.raises(pilot.PilotError):  # item 3 failed
        job.wait(JOB_TIMEOUT_S)
        job.results  # noqa: B018
    p = page.page
    row = job_row(p, job.id)
    row.wait_for()
    assert row.locator("td.name").inner_text() == HOSTILE
    assert p.locator("td.name img").count() == 0
    row.click()
    p.wait_for_selector("pre.traceback")
    assert HOSTILE in p.locator("pre.traceback").first.inner_text()
    assert p.locator("main img[src='x']").count() == 0
    page.shot(shots, "job-failed")
    assert p.title() == "Parallel Pilot"


def test_a_job_submitted_after_the_page_loaded_appears_and_advances_without_a_reload(
    client: pilot.Client, page: Watched, shots: Path
) -> None:
    p = page.page
    p.evaluate("window.__loaded_once = true")
    job = client.map(slow_item, range(60), chunk=2, name="live progress")
    row = job_row(p, job.id)
    row.wait_for()
    first = _done(row)
    p.wait_for_function(
        "([id, n]) => { const r = document.querySelector(`tr[data-job='${id}']`);"
        " return r && parseInt(r.children[5].innerText) > n; }",
        arg=[job.id, first],
    )
    page.shot(shots, "jobs")
    assert p.evaluate("window.__loaded_once") is True  # the same page: no reload
    job.wait(JOB_TIMEOUT_S)
    p.wait_for_function(
        "id => document.querySelector(`tr[data-job='${id}'] .badge`).innerText === 'done'",
        arg=job.id,
    )


def _done(row: Any) -> int:
    return int(row.locator("td").nth(5).inner_text().split("/")[0])


def test_the_cancel_button_cancels_the_job(client: pilot.Client, page: Watched) -> None:
    job = client.map(sleeps, [1.0] * 30, name="to cancel")
    p = page.page
    button = p.locator(f'button[data-cancel="{job.id}"]')
    button.click()
    p.wait_for_function(
        "id => document.querySelector(`tr[data-job='${id}'] .badge`).innerText === 'cancelled'",
        arg=job.id,
    )
    with pytest.raises(pilot.JobCancelled):
        job.wait(JOB_TIMEOUT_S)
        job.results  # noqa: B018
    assert job.state == Status.CANCELLED
    assert p.locator(f'button[data-cancel="{job.id}"]').count() == 0


def test_the_jobs_list_shows_the_latest_25_and_25_more_per_click(
    client: pilot.Client, page: Watched
) -> None:
    jobs = [client.submit(slow_item, i) for i in range(30)]
    for job in jobs:
        job.result(JOB_TIMEOUT_S)
    p = page.page
    job_row(p, jobs[-1].id).wait_for()
    rows = p.locator("tr[data-job]")
    p.wait_for_function("() => document.querySelectorAll('tr[data-job]').length === 25")
    assert job_row(p, jobs[0].id).count() == 0  # the 30th latest: not shown yet
    known = int(re.search(r"of the latest (\d+)", p.inner_text("p.more")).group(1))
    assert known >= 30
    p.click("#more")
    job_row(p, jobs[0].id).wait_for()
    assert rows.count() == min(50, known)


def test_a_page_that_did_not_change_is_left_alone_between_updates(
    client: pilot.Client, page: Watched
) -> None:
    """The page patches its DOM: feed messages that change nothing it shows change no node (a
    page rebuilt at each message is laid out and painted four times a second for nothing)."""
    client.map(slow_item, range(4)).wait(JOB_TIMEOUT_S)
    p = page.page
    p.wait_for_function(  # every job shown has ended: nothing on the page moves any more
        "() => document.querySelector('tr[data-job]') &&"
        " !document.querySelector('tr[data-job] .badge.running, tr[data-job] .badge.queued')"
    )
    assert _mutations_over_four_batches(p, "main") == []


def _mutations_over_four_batches(p: Any, element_id: str) -> list[str]:
    """The DOM mutations under the element ``element_id`` while the page handles four feed
    messages (and renders them)."""
    return p.evaluate(
        """(id) => new Promise((resolve) => {
            const seen = [];
            const watch = new MutationObserver((ms) => {
                for (const m of ms) seen.push(`${m.type} in ${m.target.nodeName}`);
            });
            watch.observe(document.getElementById(id),
                { subtree: true, childList: true, characterData: true, attributes: true });
            const ws = S.ws, handle = ws.onmessage;
            let n = 0;
            ws.onmessage = (m) => {
                handle(m);
                if (++n === 4) {  // four batches, then two frames for their renders
                    requestAnimationFrame(() => requestAnimationFrame(() => {
                        watch.disconnect();
                        ws.onmessage = handle;
                        resolve(seen);
                    }));
                }
            };
        })""",
        element_id,
    )


def test_in_a_storm_of_jobs_a_page_gets_an_update_a_second_then_four_again(
    client: pilot.Client, page: Watched
) -> None:
    """Thousands of small jobs change the whole list every batch: the page then gets one
    update a second (``STORM_BATCHES``), each the difference from what it last got, and four a
    second once the storm is over."""
    p = page.page
    p.evaluate(
        """() => { window.seen = []; const ws = S.ws, handle = ws.onmessage;
            ws.onmessage = (m) => { const d = JSON.parse(m.data);
                if (d.t === "delta") seen.push([d.b, Object.keys(d.jobs || {}).length]);
                handle(m); }; }"""
    )
    jobs = [client.submit(quick, i) for i in range(3000)]
    for job in jobs:
        job.result(JOB_TIMEOUT_S)
    p.wait_for_function(  # after the storm: four calm updates in a row
        f"() => seen.length > 4 && seen.slice(-4).every(([, n]) => n <= {STORM_ROWS})"
    )
    seen = p.evaluate("() => seen")
    pairs = list(itertools.pairwise(seen))
    stormy = [(a, b) for a, b in pairs if a[1] > STORM_ROWS]
    assert stormy, f"no update changed more than {STORM_ROWS} rows: {seen}"
    assert all(b[0] - a[0] >= STORM_BATCHES for a, b in stormy), seen
    assert [b[0] - a[0] for a, b in pairs[-3:]] == [1, 1, 1], f"calm again: {seen}"
    assert p.locator(f'tr[data-job="{jobs[-1].id}"]').count() == 1, "the list caught up"


def test_the_pool_and_the_gateway_pages(
    cluster: pilot.LocalCluster, client: pilot.Client, page: Watched, shots: Path
) -> None:
    p = page.page
    p.goto(base_url(client) + "/#/pool")
    p.wait_for_selector("tr[data-worker]")
    names = p.locator("tr[data-worker] td.name").all_inner_texts()
    assert sorted(names) == ["local-0", "local-1"]
    p.wait_for_function(
        "() => document.querySelectorAll('tr[data-worker] td')[8].innerText.endsWith('%')"
    )
    page.shot(shots, "pool")
    client.map(slow_item, range(20), chunk=1).wait(JOB_TIMEOUT_S)
    p.goto(base_url(client) + "/#/gateway")
    p.wait_for_selector("#figures .card")
    assert "task rate" in p.inner_text("#figures")
    page.shot(shots, "gateway")


def test_a_training_jobs_curve_gains_points_live(
    client: pilot.Client, page: Watched, shots: Path
) -> None:
    job = client.train(reports_steps, 60, ranks=1, name="curve")
    p = page.page
    p.goto(f"{base_url(client)}/#/jobs/{job.id}")
    p.wait_for_selector("#points")
    p.wait_for_function("() => parseInt(document.getElementById('points').innerText) >= 3")
    seen = int(p.inner_text("#points").split()[0])
    p.wait_for_function(
        "n => parseInt(document.getElementById('points').innerText) > n + 5", arg=seen
    )
    page.shot(shots, "training")
    job.wait(JOB_TIMEOUT_S)


@pytest.mark.skipif(BLENDER is None, reason="no `blender` on PATH: apt-get install blender")
def test_a_render_jobs_thumbnails_fill_in_live(
    client: pilot.Client, page: Watched, shots: Path, tmp_path: Path
) -> None:
    from blender_scenes import make_animated_scene

    scene = make_animated_scene(tmp_path / "scene.blend")
    job = client.render(scene, frames="1-6", chunk=2)
    p = page.page
    p.goto(f"{base_url(client)}/#/jobs/{job.id}")
    p.wait_for_selector("#gallery img", timeout=JOB_TIMEOUT_S * 1000)
    p.wait_for_function(
        "() => document.querySelectorAll('#gallery img').length === 6", timeout=JOB_TIMEOUT_S * 1000
    )
    width = p.evaluate("document.querySelector('#gallery img').naturalWidth")
    assert width > 0  # a real PNG, decoded
    job.wait(JOB_TIMEOUT_S)
    link = p.locator("#video")
    link.wait_for()  # once the job has ended, its frames as a video
    # every frame is in: the gallery is left alone (not emptied and filled at each update)
    assert _mutations_over_four_batches(p, "gallery") == []
    page.shot(shots, "render")
    video = p.request.get(base_url(client) + link.get_attribute("href"))
    assert video.status == 200 and video.headers["content-type"] == "video/mp4"
    assert video.body()[4:8] == b"ftyp"


def test_stats_per_attempt_and_per_worker(client: pilot.Client) -> None:
    job = client.map(slow_item, range(8), chunk=1)
    job.wait(JOB_TIMEOUT_S)
    stats = job.stats()
    assert stats.n_tasks == 8 and len(stats.attempts) == 8
    assert {w.worker for w in stats.workers} <= {"local-0", "local-1"}
    assert sum(w.ok for w in stats.workers) == 8
    assert stats.task_s >= 8 * 0.15 * 0.9
    assert stats.wall_s > 0 and 0 < stats.speedup <= 2.2
    for a in stats.attempts:
        assert a.assigned <= a.started + 1e-3 <= a.finished + 2e-3


# -- the command line and the notebook ----------------------------------------------------------


def _pilot(cluster: pilot.LocalCluster, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PILOT_HOME": str(cluster.home), "PILOT_LOG_LEVEL": "WARNING"}
    return subprocess.run(
        [sys.executable, "-m", "pilot", *args], env=env, capture_output=True, text=True, timeout=60
    )


def test_pilot_dashboard_prints_a_link_that_logs_in_and_pilot_stats_prints_timings(
    cluster: pilot.LocalCluster, client: pilot.Client
) -> None:
    done = _pilot(cluster, "dashboard", "--scrape-token", "--json")
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    assert opener.open(printed["url"], timeout=10).status == 200
    assert printed["scrape_token"]
    job = client.map(slow_item, range(4), chunk=1)
    job.wait(JOB_TIMEOUT_S)
    text = _pilot(cluster, "stats", job.id)
    assert text.returncode == 0, text.stderr
    assert "speed-up" in text.stdout and "local-" in text.stdout
    assert "4 attempts (4 OK, 0 retries)" in text.stdout
    as_json = json.loads(_pilot(cluster, "stats", job.id, "--json").stdout)
    assert len(as_json["attempts"]) == 4 and as_json["n_tasks"] == 4
    missing = _pilot(cluster, "stats", "no-such-job")
    assert missing.returncode == 1 and "no-such-job" in missing.stderr


def test_the_magic_shows_a_link_and_an_embedded_dashboard(
    cluster: pilot.LocalCluster, tmp_path: Path
) -> None:
    from tests_support import KernelDriver

    k = KernelDriver(env={"PILOT_HOME": str(cluster.home), "IPYTHONDIR": str(tmp_path)})
    try:
        assert k.run("%load_ext pilot_magics").status == "ok"
        ex = k.run("%pilot dashboard")
        assert ex.status == "ok", ex.messages
        (shown,) = ex.of("display_data")
        page = shown["content"]["data"]["text/html"]
        links = re.findall(r'(?:href|src)="([^"]+)"', page)
        assert len(links) == 2 and "<iframe" in page
        for link in links:  # each logs in, once
            link = html.unescape(link)
            jar = http.cookiejar.CookieJar()
            opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
            assert opener.open(link, timeout=10).status == 200
    finally:
        k.shutdown()


# -- users --------------------------------------------------------------------------------------


def test_a_user_sees_only_their_jobs_the_cancel_button_only_on_their_own_and_is_out_once_removed(
    browser: Any, tmp_path: Path
) -> None:
    with pilot.LocalCluster(workers=1, secure=True, timeouts=TEST_TIMEOUTS) as secure:
        added = _pilot(secure, "user", "add", "alice", "--out", str(tmp_path / "alice.json"))
        assert added.returncode == 0, added.stderr
        with secure.client() as admin, pilot.connect(tmp_path / "alice.json") as alice:
            theirs = alice.map(sleeps, [1.0] * 20, name="alice's job")
            ours = admin.map(sleeps, [1.0] * 20, name="admin's job")
            try:
                as_alice = Watched(browser, dashboard_link(alice).url)
                row = job_row(as_alice.page, theirs.id)
                row.wait_for()
                assert row.locator("button[data-cancel]").count() == 1
                assert job_row(as_alice.page, ours.id).count() == 0
                base = base_url(alice)
                other = as_alice.page.request.get(f"{base}/api/jobs/{ours.id}")
                assert other.status == 404
                csrf = as_alice.page.request.get(f"{base}/api/session").json()["csrf"]
                refused = as_alice.page.request.post(
                    f"{base}/api/jobs/{ours.id}/cancel", headers={"X-Pilot-CSRF": csrf}
                )
                assert refused.status == 404 and not ours.done()
                as_alice.close()
                as_admin = Watched(browser, dashboard_link(admin).url)
                job_row(as_admin.page, theirs.id).wait_for()
                job_row(as_admin.page, ours.id).wait_for()
                owners = {
                    job_id: job_row(as_admin.page, job_id).locator("td").nth(2).inner_text()
                    for job_id in (theirs.id, ours.id)
                }
                assert owners == {theirs.id: "alice", ours.id: "admin"}
                assert job_row(as_admin.page, theirs.id).locator("button").count() == 0
                assert job_row(as_admin.page, ours.id).locator("button").count() == 1
                as_admin.close()
                jar = http.cookiejar.CookieJar()
                opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
                opener.open(dashboard_link(alice).url, timeout=10)
                assert opener.open(f"{base}/api/session", timeout=10).status == 200
                removed = _pilot(secure, "user", "remove", "alice")
                assert removed.returncode == 0, removed.stderr
                with pytest.raises(urllib.error.HTTPError) as out:  # logged out at once
                    opener.open(f"{base}/api/session", timeout=10)
                assert out.value.code == 401
            finally:
                theirs.cancel()
                ours.cancel()
