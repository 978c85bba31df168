// deltasync dashboard: renders the snapshots the server pushes over
// Server-Sent Events; no reloads.
"use strict";

const $ = (id) => document.getElementById(id);

function bytes(n) {
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return (i === 0 ? n.toFixed(0) : n.toFixed(1)) + " " + u[i];
}
// Framing makes a full transfer a hair larger than the file: show that as 0.
const pct = (x) => (Math.max(0, x) * 100).toFixed(1) + " %";
const time = (t) => new Date(t * 1000).toLocaleTimeString();
const secs = (s) => (s == null ? "–" : s < 1 ? "<1 s" : Math.round(s) + " s");

function cell(text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

function fill(tableId, rows, render) {
  const body = $(tableId).querySelector("tbody");
  body.replaceChildren(...rows.map((r) => {
    const tr = document.createElement("tr");
    render(r, tr);
    return tr;
  }));
}

function chart(id, label, color) {
  return new Chart($(id), {
    type: "line",
    data: { labels: [], datasets: [{ label, data: [], borderColor: color, backgroundColor: color + "33", fill: true, pointRadius: 0, tension: 0.2 }] },
    options: { animation: false, responsive: true, maintainAspectRatio: false, plugins: { legend: { display: false } }, scales: { x: { ticks: { maxTicksLimit: 6 } } } },
  });
}

const rateChart = chart("rate-chart", "bytes/s", "#2563eb");
const savingChart = chart("saving-chart", "saving %", "#16a34a");

function render(s) {
  const t = s.totals;
  $("saving").textContent = pct(t.saving);
  $("wire").textContent = bytes(t.wire_in + t.wire_out);
  $("full").textContent = bytes(t.full_bytes);
  $("count").textContent = Object.values(t.transfers).reduce((a, b) => a + b, 0);
  $("clients-count").textContent = s.clients.length;
  $("authfail").textContent = t.auth_failures;

  fill("active", s.active, (a, tr) => {
    tr.append(cell(a.name), cell(a.key), cell(a.direction), cell(a.mode));
    const td = document.createElement("td");
    const bar = document.createElement("span");
    bar.className = "bar";
    const inner = document.createElement("span");
    inner.style.width = (a.total ? (100 * a.done) / a.total : 100) + "%";
    bar.append(inner);
    td.append(bar, " " + bytes(a.done) + " / " + bytes(a.total));
    tr.append(td, cell(bytes(a.rate) + "/s"), cell(secs(a.eta)));
  });
  fill("recent", s.recent, (r, tr) => {
    if (r.direction === "error" || r.result === "integrity") tr.className = "error";
    tr.append(cell(time(r.at)), cell(r.name || "–"), cell(r.key || "–"), cell(r.direction), cell(r.result),
      cell(r.direction === "error" ? "–" : bytes(r.wire_bytes) + " / " + bytes(r.file_bytes)),
      cell(r.direction === "error" ? "–" : pct(r.saving)), cell(r.duration_ms + " ms"));
  });
  fill("trees", s.trees || [], (t, tr) => {
    tr.append(cell(time(t.since)), cell(t.root || "/"), cell(t.key || "–"), cell(t.running ? "running" : "done"),
      cell(t.files), cell(bytes(t.file_bytes)), cell(bytes(t.wire_bytes)), cell(t.last.join(", ")));
  });
  fill("clients", s.clients, (c, tr) => {
    tr.append(cell(c.id), cell(c.addr), cell(c.identity), cell(time(c.since)), cell(bytes(c.bytes_in)), cell(bytes(c.bytes_out)));
  });
  if (s.files) {
    fill("files", s.files, (f, tr) => {
      tr.append(cell(f.name), cell(bytes(f.size)), cell(time(f.modified)), cell(f.sha256.slice(0, 16) + "…", "hash"));
    });
  }
  for (const [c, key] of [[rateChart, "rate"], [savingChart, "saving"]]) {
    c.data.labels = s.series.map((p) => time(p.t));
    c.data.datasets[0].data = s.series.map((p) => p[key]);
    c.update();
  }
}

function connect() {
  const es = new EventSource("events");
  es.onopen = () => { $("status").textContent = "live"; };
  es.onmessage = (e) => { render(JSON.parse(e.data)); document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1); };
  es.onerror = () => { $("status").textContent = "reconnecting…"; };
}
connect();
