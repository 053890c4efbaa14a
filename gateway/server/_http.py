"""The gateway's HTTP side: a JSON status API and a small live dashboard.

Runs on the gateway's own asyncio loop (tornado). Read-only: it never changes state.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import tornado.httpserver
import tornado.netutil
import tornado.web

if TYPE_CHECKING:
    from gateway.server._server import Gateway

__all__ = ["start_http"]

_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>Parallel Pilot</title>
<style>body{font:14px system-ui;margin:2em}table{border-collapse:collapse;margin-bottom:2em}
td,th{padding:4px 10px;border-bottom:1px solid #ddd;text-align:left}</style></head><body>
<h1>Parallel Pilot</h1><h2>Workers</h2><table id="workers"></table>
<h2>Jobs</h2><table id="jobs"></table>
<script>
const STATES=["queued","running","done","failed","cancelled"];
function table(el, head, rows){el.innerHTML="<tr>"+head.map(h=>"<th>"+h+"</th>").join("")+"</tr>"+
 rows.map(r=>"<tr>"+r.map(c=>"<td>"+c+"</td>").join("")+"</tr>").join("");}
async function refresh(){const s=await (await fetch("api/status")).json();
 table(document.getElementById("workers"),
  ["name","slots","GPUs","tags","running","done","Slurm job"],
  s.workers.map(w=>[w.name,w.slots,w.gpus.length,w.tags.join(","),w.running,w.tasks_done,
   w.slurm_job_id||""]));
 table(document.getElementById("jobs"),["job","name","state","done","failed","tasks"],
  s.jobs.map(j=>[j.job_id,j.name,STATES[j.state],j.done,j.failed,j.n_tasks]));}
refresh();setInterval(refresh,1000);
</script></body></html>"""


class _Status(tornado.web.RequestHandler):
    def initialize(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def get(self) -> None:
        reply = self.gateway.status_reply()
        recent = self.gateway.store.jobs(20)
        running = {j.job_id for j in reply.jobs}
        jobs = [asdict(j) for j in reply.jobs] + [
            asdict(j) for j in recent if j.job_id not in running
        ]
        self.set_header("Content-Type", "application/json")
        self.write(
            json.dumps(
                {
                    "gateway_id": reply.gateway_id,
                    "workers": [asdict(w) for w in reply.workers],
                    "jobs": jobs,
                    "counters": reply.counters,
                }
            )
        )


class _Page(tornado.web.RequestHandler):
    def get(self) -> None:
        self.write(_PAGE)


def start_http(gateway: Gateway, host: str, port: int) -> tuple[Any, str]:
    """Start listening; return (server, url). The caller stops the server."""
    app = tornado.web.Application([(r"/", _Page), (r"/api/status", _Status, {"gateway": gateway})])
    server = tornado.httpserver.HTTPServer(app)
    sockets = tornado.netutil.bind_sockets(port, host)
    server.add_sockets(sockets)
    bound = sockets[0].getsockname()[1]
    return server, f"http://{host}:{bound}/"
