// elbasy's status page: polls /status.json and draws it. No framework, no
// external asset; every value from the document goes in as text, never HTML.
"use strict";

(function () {
  const POLL_MS = 1500;
  const WINDOW_S = 600; // the chart's span: the history's ten minutes
  const SVG = "http://www.w3.org/2000/svg";
  const $ = (id) => document.getElementById(id);

  let updates = 0;
  let errors = 0;
  let last = null; // the last document, redrawn on resize
  let previous = null; // [time, requests_total] of the poll before, for the rate
  let caChecked = false;

  function recordError(message) {
    errors += 1;
    document.body.dataset.jsErrors = String(errors);
    const box = $("js-errors");
    box.hidden = false;
    box.textContent += message + "\n";
  }
  window.addEventListener("error", (e) => recordError("error: " + e.message));
  window.addEventListener("unhandledrejection", (e) => recordError("rejection: " + e.reason));

  // ---- formatting

  function int(n) {
    return n === null || n === undefined ? "\u2013" : Math.round(n).toLocaleString("en-US");
  }

  function wait(s) {
    if (s === null || s === undefined) return "\u2013";
    if (s === 0) return "0";
    if (s < 0.001) return "<1 ms";
    if (s < 0.01) return (s * 1000).toFixed(1) + " ms";
    if (s < 1) return Math.round(s * 1000) + " ms";
    if (s < 10) return s.toFixed(2) + " s";
    if (s < 120) return s.toFixed(1) + " s";
    return (s / 60).toFixed(1) + " min";
  }

  function bytes(n) {
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) {
      n /= 1024;
      i += 1;
    }
    return (i === 0 ? String(n) : n.toFixed(1)) + " " + units[i];
  }

  function duration(s) {
    s = Math.max(0, Math.floor(s));
    const d = Math.floor(s / 86400);
    const h = Math.floor((s % 86400) / 3600);
    const m = Math.floor((s % 3600) / 60);
    if (d) return d + "d " + h + "h";
    if (h) return h + "h " + m + "m";
    if (m) return m + "m " + (s % 60) + "s";
    return s + "s";
  }

  function setValue(id, value, text) {
    const el = $(id);
    el.dataset.value = String(value);
    el.textContent = text === undefined ? int(value) : text;
  }

  function cell(row, text, cls) {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    row.appendChild(td);
    return td;
  }

  // ---- the parts of the page

  function renderTiles(doc) {
    const throttled = doc.throttled_total;
    setValue("throttled-total", throttled);
    const tile = $("tile-throttled");
    tile.className = "tile " + (throttled > 0 ? "seen" : "zero");
    $("throttled-note").textContent =
      throttled > 0 ? "the upstream refused requests: see the rules below" : "should stay at 0";

    setValue("requests-total", doc.requests_total);
    const now = Date.now() / 1000;
    if (previous && now > previous[0]) {
      const rate = (doc.requests_total - previous[1]) / (now - previous[0]);
      $("requests-rate").textContent = Math.max(0, rate).toFixed(1) + " / s";
    }
    previous = [now, doc.requests_total];

    const held = doc.rules.reduce((sum, r) => sum + r.queue_depth, 0);
    setValue("queued-total", held);
    setValue("shed-total", doc.shed_total);
    setValue("connections-open", doc.connections_open);
    $("tunnels-open").textContent = int(doc.tunnels_open) + " tunnels open";
    setValue("workers", doc.workers);
    $("uptime").textContent = "up " + duration(doc.uptime_seconds);
    $("bytes").textContent = bytes(doc.bytes_up) + " / " + bytes(doc.bytes_down);
    $("version").textContent = doc.version;
  }

  function renderRules(doc) {
    const body = $("rules").tBodies[0];
    body.replaceChildren();
    for (const r of doc.rules) {
      const row = document.createElement("tr");
      row.dataset.rule = r.id;
      cell(row, r.id);
      cell(row, r.hosts.join(", "), "hosts");
      cell(row, int(r.requests), "num requests");
      cell(row, int(r.queue_depth), "num");
      cell(row, int(r.throttled), r.throttled > 0 ? "num bad" : "num");
      cell(row, int(r.shed), "num");
      cell(row, wait(r.wait_p50), "num");
      cell(row, wait(r.wait_p90), "num");
      cell(row, wait(r.wait_p99), "num");
      body.appendChild(row);
    }
  }

  function report(td, a) {
    if (a.server_remaining === null) {
      td.textContent = "\u2013";
      return;
    }
    if (a.server_limit) {
      const share = Math.max(0, Math.min(1, a.server_remaining / a.server_limit));
      const meter = document.createElement("span");
      meter.className = "meter";
      const fill = document.createElement("span");
      fill.style.width = (share * 100).toFixed(0) + "%";
      fill.className = share < 0.05 ? "empty" : share < 0.25 ? "low" : "";
      meter.appendChild(fill);
      td.appendChild(meter);
    }
    let text = int(a.server_remaining) + (a.server_limit ? " / " + int(a.server_limit) : "") + " left";
    if (a.reported_at !== null) {
      text += ", " + duration(Date.now() / 1000 - a.reported_at) + " ago";
      td.title = new Date(a.reported_at * 1000).toISOString();
    }
    td.appendChild(document.createTextNode(text));
  }

  function renderAccounts(doc) {
    const body = $("accounts").tBodies[0];
    body.replaceChildren();
    for (const a of doc.accounts) {
      const row = document.createElement("tr");
      const prefix = a.rule + "|";
      cell(row, a.rule);
      cell(row, a.account.startsWith(prefix) ? a.account.slice(prefix.length) : a.account, "account");
      cell(row, int(a.queue_depth), "num");
      cell(row, int(a.requests), "num");
      cell(row, wait(a.wait_seconds_total), "num");
      cell(row, wait(a.wait_p50), "num");
      cell(row, wait(a.wait_p99), "num");
      report(cell(row, ""), a);
      body.appendChild(row);
    }
    $("accounts-empty").hidden = doc.accounts.length > 0;
  }

  function renderUse(doc) {
    const url = doc.proxy_url;
    let host = "example.com";
    for (const r of doc.rules) {
      if (r.hosts.length) {
        host = r.hosts[0].replace(/^\*\./, "example.").replace(/\*/g, "example");
        break;
      }
    }
    $("cmd-ca").textContent = "curl -fsS -o elbasy-ca.pem " + url + "/ca.pem";
    $("cmd-trust").textContent = [
      "sudo cp elbasy-ca.pem /usr/local/share/ca-certificates/elbasy.crt",
      "sudo update-ca-certificates",
      "export REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt  # Python requests",
      "export NODE_EXTRA_CA_CERTS=$PWD/elbasy-ca.pem                  # Node.js",
    ].join("\n");
    $("cmd-proxy").textContent = [
      "export HTTPS_PROXY=" + url + " HTTP_PROXY=" + url,
      "curl -x " + url + " --cacert elbasy-ca.pem https://" + host + "/",
    ].join("\n");
  }

  // ---- the chart: wait percentiles per 5 s interval on a log scale

  function el(name, attrs, parent) {
    const node = document.createElementNS(SVG, name);
    for (const k in attrs) node.setAttribute(k, attrs[k]);
    if (parent) parent.appendChild(node);
    return node;
  }

  function decadeLabel(v) {
    if (v < 1) return Math.round(v * 1000) + " ms";
    return v + " s";
  }

  function renderChart(doc) {
    const box = $("chart");
    const width = Math.max(300, box.clientWidth - 8);
    const height = Math.max(160, box.clientHeight - 8);
    const m = { left: 56, right: 12, top: 10, bottom: 22 };
    const pw = width - m.left - m.right;
    const ph = height - m.top - m.bottom;
    const svg = el("svg", { viewBox: "0 0 " + width + " " + height, width: width, height: height });
    const history = doc.wait_history;
    const end = history.length ? history[history.length - 1].t : Date.now() / 1000;
    // the history's span, from one minute (a young elbasy) to its ten
    const span = Math.min(WINDOW_S, Math.max(60, history.length ? end - history[0].t + 5 : 0));
    const start = end - span;
    const shown = history.filter((h) => h.t > start);
    $("chart-span").textContent = span >= 120 ? Math.round(span / 60) + " minutes" : Math.round(span) + " s";

    const FLOOR = 0.001; // waits under a millisecond are drawn at it
    let top = 1;
    for (const h of shown) if (h.p99 !== null && h.p99 > top) top = h.p99;
    const lo = Math.log10(FLOOR);
    const hi = Math.ceil(Math.log10(top));
    const x = (t) => m.left + ((t - start) / span) * pw;
    const y = (v) => m.top + ph - ((Math.log10(Math.max(v, FLOOR)) - lo) / (hi - lo)) * ph;

    for (let d = lo; d <= hi; d++) {
      const v = Math.pow(10, d);
      const yy = y(v);
      el("line", { x1: m.left, x2: m.left + pw, y1: yy, y2: yy, class: "grid" }, svg);
      const label = el("text", { x: m.left - 6, y: yy + 4, "text-anchor": "end", class: "axis" }, svg);
      label.textContent = (d === lo ? "\u2264" : "") + decadeLabel(Number(v.toPrecision(1)));
    }
    const step = [10, 15, 30, 60, 120].find((st) => span / st <= 6) || 120;
    for (let k = 0; k * step <= span + 0.001; k++) {
      const ago = k * step;
      const xx = x(end - ago);
      el("line", { x1: xx, x2: xx, y1: m.top, y2: m.top + ph, class: "grid" }, svg);
      const label = el("text", { x: xx, y: height - 6, "text-anchor": "middle", class: "axis" }, svg);
      label.textContent =
        ago === 0 ? "now" : "\u2212" + (ago % 60 ? ago + " s" : ago / 60 + " min");
    }

    // requests per interval: light bars along the bottom quarter
    const most = shown.reduce((mx, h) => Math.max(mx, h.count), 0);
    const bw = Math.max(1, (pw * 5) / span - 1);
    for (const h of shown) {
      if (!h.count) continue;
      const bh = (h.count / most) * ph * 0.25;
      el("rect", { x: x(h.t) - bw, y: m.top + ph - bh, width: bw, height: bh, class: "bar" }, svg);
    }

    for (const q of ["p50", "p90", "p99"]) {
      let run = [];
      const flush = () => {
        if (run.length === 1) {
          el("circle", { cx: run[0][0], cy: run[0][1], r: 2.5, class: "dot " + q }, svg);
        } else if (run.length > 1) {
          const points = run.map((p) => p[0].toFixed(1) + "," + p[1].toFixed(1)).join(" ");
          el("polyline", { points: points, class: "series " + q }, svg);
        }
        run = [];
      };
      for (const h of shown) {
        if (h[q] === null) flush();
        else run.push([x(h.t), y(h[q])]);
      }
      flush();
    }
    if (!shown.some((h) => h.count)) {
      const note = el("text", { x: m.left + pw / 2, y: m.top + ph / 2, "text-anchor": "middle", class: "empty" }, svg);
      note.textContent = "no paced request in this span";
    }
    box.replaceChildren(svg);
  }

  // ---- polling

  function render(doc) {
    last = doc;
    renderTiles(doc);
    renderRules(doc);
    renderAccounts(doc);
    renderUse(doc);
    renderChart(doc);
    updates += 1;
    document.body.dataset.updates = String(updates);
    $("updated").textContent = "updated " + new Date().toLocaleTimeString("en-GB");
  }

  function live(ok, why) {
    const pill = $("live");
    pill.className = "pill " + (ok ? "ok" : "bad");
    pill.textContent = ok ? "live" : "no data: " + why;
  }

  async function checkCA() {
    let r;
    try {
      r = await fetch("/ca.pem", { method: "HEAD", cache: "no-store" });
    } catch (e) {
      return; // asked again after the next poll
    }
    caChecked = true;
    if (r.status === 404) {
      $("ca-link").hidden = true;
      $("ca-note").textContent = "(elbasy intercepts no host here, so there is no CA to trust)";
    }
  }

  async function poll() {
    let doc = null;
    try {
      const r = await fetch("/status.json", { cache: "no-store" });
      if (!r.ok) throw new Error("HTTP " + r.status);
      doc = await r.json();
      live(true);
    } catch (e) {
      live(false, e.message);
    }
    try {
      if (doc !== null) {
        render(doc);
        if (!caChecked) await checkCA();
      }
    } finally {
      setTimeout(poll, POLL_MS);
    }
  }

  window.addEventListener("resize", () => {
    if (last) renderChart(last);
  });
  poll();
})();
