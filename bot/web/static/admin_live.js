// The dashboard's live queue: an EventSource on /admin/queue/events redraws the tables from
// each `live` event (text only, never HTML), and the waits count up between events.
"use strict";
(() => {
  const status = document.getElementById("live-status");
  if (!status || !window.EventSource) return;
  let view = null;
  let received = 0;

  const clock = (seconds) => {
    const s = Math.max(0, Math.floor(seconds));
    return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
  };
  const row = (cells, job) => {
    const tr = document.createElement("tr");
    if (job !== undefined) tr.dataset.job = String(job);
    for (const value of cells) {
      const td = document.createElement("td");
      td.textContent = value === null || value === undefined ? "" : String(value);
      tr.appendChild(td);
    }
    return tr;
  };
  const fill = (id, rows, empty, columns) => {
    const table = document.getElementById(id);
    if (!table) return;
    const body = table.tBodies[0];
    body.replaceChildren(...rows);
    if (!rows.length) {
      const tr = row([empty]);
      tr.className = "empty";
      tr.firstChild.colSpan = columns;
      body.appendChild(tr);
    }
  };
  const gib = (bytes) => (bytes === null ? "" : `${(bytes / 1073741824).toFixed(1)} GiB`);

  const draw = (elapsed) => {
    if (!view) return;
    const counts = document.getElementById("queue-counts");
    if (counts) {
      counts.textContent = `${view.running.length} running, ${view.waiting.length} waiting, ${view.worker_slots} worker slot(s)`;
    }
    fill("waiting", view.waiting.map((w) => row(
      [w.position ?? "", w.job_id, w.user_id, w.kind, w.cost, clock(w.waited_s + elapsed)], w.job_id,
    )), "Nobody is waiting.", 6);
    fill("running", view.running.map((r) => row(
      [r.job_id, r.user_id, r.kind, r.cost, clock(r.running_s + elapsed), r.worker ?? ""], r.job_id,
    )), "Nothing is running.", 6);
    if (view.workers) {
      fill("workers", view.workers.map((w) => row([
        w.name, w.device ? `${w.node} · ${w.device}` : w.node, w.ready ? "ready" : "starting",
        w.jobs.join(", ") || "idle", w.models.join(", ") || "none yet", gib(w.gpu_memory_bytes),
      ])), "No worker: jobs wait in the queue until one is ready.", 6);
    }
    fill("failures", view.failures.map((f) => row(
      [f.job_id, f.user_id, f.kind, (f.finished_at || "").replace("T", " ").slice(0, 16), f.error],
    )), "No failures.", 5);
  };

  let since = Date.now();
  const source = new EventSource(status.dataset.events);
  source.addEventListener("live", (event) => {
    view = JSON.parse(event.data);
    since = Date.now();
    received += 1;
    status.dataset.updates = String(received);
    status.textContent = `live · updated ${new Date().toLocaleTimeString()}`;
    draw(0);
  });
  source.addEventListener("bye", () => {
    source.close();
    status.textContent = "not live: reload the page";
  });
  source.addEventListener("error", () => {
    status.textContent = "reconnecting…";
  });
  setInterval(() => draw((Date.now() - since) / 1000), 1000);
})();
