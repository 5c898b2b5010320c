"""A live dashboard in the browser: swarm topology (direct and relayed links), each node's
metric over time, and faults as they happen.

``Dashboard`` keeps a bounded history of snapshots and serves one self-contained page (no
script or style from the network) plus ``/data.json`` from a small HTTP server in a thread of
its own. Whoever observes the swarm (``testnet up``, ``node start``) calls ``update`` with plain
rows; the server thread only ever reads the finished JSON bytes, under a lock.
"""

from __future__ import annotations

import json
import threading
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

from peerlearn.errors import ConfigError
from peerlearn.node.config import parse_host_port

HISTORY = 900  # points kept per node (15 minutes at one a second)
MAX_EVENTS = 200


@dataclass(frozen=True)
class NodeRow:
    """One node as the dashboard draws it."""

    name: str
    state: str  # "up", "down" or "attacker"
    round: int
    metric: float | None
    peers: int
    mb_out: float


class Dashboard:
    """History, snapshot and the HTTP server of one dashboard."""

    def __init__(self, title: str, listen: str, metric: str = "accuracy") -> None:
        self.title, self.metric = title, metric
        self.host, self.port = parse_host_port(listen, "the dashboard address", "127.0.0.1:8080")
        self._series: dict[str, deque[tuple[float, float | None]]] = {}
        self._events: deque[tuple[float, str]] = deque(maxlen=MAX_EVENTS)
        self._snapshot = b"{}"
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def event(self, t: float, what: str) -> None:
        self._events.append((round(t, 1), what))

    def update(self, t: float, nodes: list[NodeRow], links: dict[tuple[str, str], str]) -> None:
        """A new observation: every node's row, and the links as {(a, b): "direct"|"relayed"}."""
        for row in nodes:
            series = self._series.setdefault(row.name, deque(maxlen=HISTORY))
            series.append((round(t, 1), row.metric if row.state != "down" else None))
        data = {
            "title": self.title,
            "metric": self.metric,
            "t": round(t, 1),
            "nodes": [row.__dict__ for row in nodes],
            "links": [{"a": a, "b": b, "path": path} for (a, b), path in sorted(links.items())],
            "series": {name: list(points) for name, points in self._series.items()},
            "events": list(self._events),
        }
        encoded = json.dumps(data).encode()
        with self._lock:
            self._snapshot = encoded

    def _data(self) -> bytes:
        with self._lock:
            return self._snapshot

    def __enter__(self) -> Dashboard:
        dashboard = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path in ("/", "/index.html"):
                    body, kind = PAGE.encode(), "text/html; charset=utf-8"
                elif self.path == "/data.json":
                    body, kind = dashboard._data(), "application/json"
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return  # the terminal shows the live table, not access logs

        try:
            self._server = ThreadingHTTPServer((self.host, self.port), Handler)
        except OSError as exc:
            raise ConfigError(f"cannot serve the dashboard on {self.url}: {exc.strerror}") from None
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="peerlearn-dashboard", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>peerlearn</title>
<style>
body { font: 14px system-ui, sans-serif; margin: 16px; color: #222; }
h1 { font-size: 18px; margin: 0 0 8px; }
#summary { color: #555; margin-bottom: 12px; }
.panels { display: flex; gap: 16px; flex-wrap: wrap; }
.panel { border: 1px solid #ddd; border-radius: 6px; padding: 8px; }
svg text { font-size: 11px; }
table { border-collapse: collapse; }
td, th { padding: 2px 8px; text-align: right; border-bottom: 1px solid #eee; }
#events { max-height: 200px; overflow-y: auto; margin: 0; padding-left: 18px; }
.legend span { margin-right: 12px; }
</style></head>
<body>
<h1 id="title">peerlearn</h1>
<div id="summary">waiting for data...</div>
<div class="panels">
  <div class="panel"><b>Topology</b>
    <div class="legend"><span>&#9472; direct</span><span style="color:#d80">- - relayed</span>
    <span style="color:#2a7">&#9679; up</span><span style="color:#999">&#9679; down</span>
    <span style="color:#c22">&#9679; attacker</span></div>
    <svg id="topology" width="360" height="360"></svg></div>
  <div class="panel"><b id="chart-title">metric over time</b>
    <div class="legend">gaps: the node was down</div>
    <svg id="chart" width="560" height="300"></svg></div>
</div>
<div class="panels">
  <div class="panel"><b>Nodes</b><table id="nodes"></table></div>
  <div class="panel"><b>Faults and events</b><ul id="events"></ul></div>
</div>
<script>
const NS = "http://www.w3.org/2000/svg";
const COLORS = ["#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
                "#7f7f7f", "#ff7f0e", "#393b79", "#637939", "#8c6d31"];
function el(name, attrs, parent) {
  const e = document.createElementNS(NS, name);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  parent.appendChild(e); return e;
}
function topology(data) {
  const svg = document.getElementById("topology"); svg.innerHTML = "";
  const n = data.nodes.length, pos = {};
  data.nodes.forEach((node, i) => {
    const a = 2 * Math.PI * i / Math.max(n, 1);
    pos[node.name] = [180 + 140 * Math.cos(a), 180 + 140 * Math.sin(a)];
  });
  for (const link of data.links) {
    if (!(link.a in pos) || !(link.b in pos)) continue;
    const [x1, y1] = pos[link.a], [x2, y2] = pos[link.b];
    el("line", {x1, y1, x2, y2, "data-path": link.path,
      stroke: link.path === "relayed" ? "#d80" : "#789",
      "stroke-dasharray": link.path === "relayed" ? "5,4" : "", "stroke-width": 1.2}, svg);
  }
  for (const node of data.nodes) {
    const [cx, cy] = pos[node.name];
    const fill = node.state === "down" ? "#bbb" : node.state === "attacker" ? "#c22" : "#2a7";
    el("circle", {cx, cy, r: 14, fill, stroke: "#333", "data-node": node.name,
      "data-state": node.state}, svg);
    el("text", {x: cx, y: cy + 4, "text-anchor": "middle", fill: "#fff"}, svg).textContent =
      node.name.replace("node", "");
  }
}
function chart(data) {
  const svg = document.getElementById("chart"); svg.innerHTML = "";
  document.getElementById("chart-title").textContent = data.metric + " over time";
  const W = 560, H = 300, L = 40, B = 24, tMax = Math.max(data.t, 1);
  const x = t => L + (W - L - 10) * t / tMax, y = v => H - B - (H - B - 10) * v;
  el("line", {x1: L, y1: H - B, x2: W - 10, y2: H - B, stroke: "#999"}, svg);
  el("line", {x1: L, y1: 10, x2: L, y2: H - B, stroke: "#999"}, svg);
  for (const v of [0, 0.5, 1]) el("text", {x: 6, y: y(v) + 4}, svg).textContent = v.toFixed(1);
  el("text", {x: W - 90, y: H - 6}, svg).textContent = tMax.toFixed(0) + " s";
  for (const [t, what] of data.events) {
    el("line", {x1: x(t), y1: 10, x2: x(t), y2: H - B, stroke: "#aaa",
      "stroke-dasharray": "2,3", "data-event": what}, svg);
  }
  Object.entries(data.series).forEach(([name, points], i) => {
    const node = data.nodes.find(r => r.name === name);
    const color = node && node.state === "attacker" ? "#c22" : COLORS[i % COLORS.length];
    let run = [];
    const flush = () => {
      if (run.length) el("polyline", {points: run.join(" "), fill: "none", stroke: color,
        "stroke-width": 1.3, "data-node": name}, svg);
      run = [];
    };
    for (const [t, v] of points) { if (v === null) flush(); else run.push(x(t) + "," + y(v)); }
    flush();
  });
}
function tables(data) {
  const rows = ["<tr><th>node</th><th>state</th><th>round</th><th>" + data.metric +
    "</th><th>peers</th><th>MB out</th></tr>"];
  for (const r of data.nodes) rows.push("<tr data-node='" + r.name + "'><td>" + r.name +
    "</td><td>" + r.state + "</td><td>" + r.round + "</td><td>" +
    (r.metric === null ? "-" : r.metric.toFixed(3)) + "</td><td>" + r.peers + "</td><td>" +
    r.mb_out.toFixed(1) + "</td></tr>");
  document.getElementById("nodes").innerHTML = rows.join("");
  document.getElementById("events").innerHTML = data.events.slice().reverse().map(
    ([t, what]) => "<li>t=" + t.toFixed(1) + " s: " + what + "</li>").join("");
  const up = data.nodes.filter(r => r.state !== "down").length;
  const direct = data.links.filter(l => l.path === "direct").length;
  document.getElementById("title").textContent = data.title;
  document.getElementById("summary").textContent = "t=" + data.t.toFixed(0) + " s, " + up +
    " of " + data.nodes.length + " nodes up, " + data.links.length + " links (" + direct +
    " direct, " + (data.links.length - direct) + " relayed)";
}
async function refresh() {
  try {
    const data = await (await fetch("/data.json", {cache: "no-store"})).json();
    if (data.nodes) { topology(data); chart(data); tables(data); }
  } catch (e) { document.getElementById("summary").textContent = "no data: " + e; }
}
refresh(); setInterval(refresh, 1000);
</script></body></html>
"""
