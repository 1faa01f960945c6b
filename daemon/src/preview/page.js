// rigd live preview: plain JS + canvas, no dependencies.
// Data comes from /events (Server-Sent Events; each message is a JSON update,
// the first a full snapshot with "reset": true) or, with ?poll=1, from
// polling /api/state (each a full snapshot).
(function () {
  "use strict";
  var LEVER_WINDOW_US = 10e6, DFF_WINDOW_US = 60e6, DFF_BIN_US = 1e5;
  var S = { now: 0, lever: [], trials: [], dffT: [], dff: [], rois: null, image: null,
            health: null, updates: 0, trialCount: 0, rewarded: 0, leverTotal: 0, dffTotal: 0 };
  var body = document.body;

  function $(id) { return document.getElementById(id); }
  function fmt(x, d) { return (x === null || x === undefined || !isFinite(x)) ? "?" : Number(x).toFixed(d); }

  function apply(u) {
    if (u.reset) { S.lever = []; S.trials = []; S.dffT = []; S.dff = []; S.rois = null; S.image = null; }
    S.now = u.now_us;
    var i;
    for (i = 0; i < u.lever.length; i++) S.lever.push(u.lever[i]);
    for (i = 0; i < u.trials.length; i++) S.trials.push(u.trials[i]);
    for (i = 0; i < u.dff.length; i++) { S.dffT.push(u.dff_t_us[i]); S.dff.push(u.dff[i]); }
    if (u.rois) S.rois = u.rois;
    if (u.mean_image) S.image = decodeImage(u.mean_image);
    S.health = u.health;
    if (u.last_qc) {
      var q = $("qc"); q.textContent = u.last_qc;
      q.className = u.last_qc.indexOf("qc: clean") === 0 ? "ok" : "warn";
      body.dataset.qc = u.last_qc.indexOf("qc: clean") === 0 ? "clean" : "not-clean";
    }
    S.trialCount = u.trial_count; S.rewarded = u.rewarded_count;
    S.leverTotal = u.lever_total; S.dffTotal = u.dff_total;
    // Trim to the windows.
    var cut = S.now - LEVER_WINDOW_US, k = 0;
    while (k < S.lever.length && S.lever[k][0] < cut) k++;
    if (k) S.lever.splice(0, k);
    cut = S.now - DFF_WINDOW_US; k = 0;
    while (k < S.dffT.length && S.dffT[k] < cut) k++;
    if (k) { S.dffT.splice(0, k); S.dff.splice(0, k); }
    if (S.trials.length > 2000) S.trials.splice(0, S.trials.length - 2000);
    S.updates++;
    draw();
    body.dataset.trials = S.trialCount;
    body.dataset.rewarded = S.rewarded;
    body.dataset.leverPoints = S.leverTotal;
    body.dataset.leverShown = S.lever.length;
    body.dataset.heatmapRows = S.dffTotal;
    body.dataset.heatmapShown = S.dff.length;
    body.dataset.rois = S.rois ? S.rois.n : 0;
    body.dataset.nowUs = S.now;
    body.dataset.updates = S.updates;
  }

  function decodeImage(m) {
    var c = document.createElement("canvas");
    c.width = m.w; c.height = m.h;
    var ctx = c.getContext("2d"), id = ctx.createImageData(m.w, m.h), n = m.w * m.h;
    for (var i = 0; i < n; i++) {
      var v = parseInt(m.hex.substr(2 * i, 2), 16);
      id.data[4 * i] = v; id.data[4 * i + 1] = v; id.data[4 * i + 2] = v; id.data[4 * i + 3] = 255;
    }
    ctx.putImageData(id, 0, 0);
    return { canvas: c, srcW: m.src_w, srcH: m.src_h };
  }

  function draw() {
    drawLever(); drawRaster(); drawHeatmap(); drawImage(); drawHealth();
  }

  function drawLever() {
    var c = $("lever"), ctx = c.getContext("2d"), W = c.width, H = c.height;
    ctx.clearRect(0, 0, W, H);
    var lo = 0, hi = 1, i;
    for (i = 0; i < S.lever.length; i++) { lo = Math.min(lo, S.lever[i][1]); hi = Math.max(hi, S.lever[i][1]); }
    ctx.strokeStyle = "#333"; ctx.beginPath();
    for (i = 0; i <= 10; i++) { var gx = W * i / 10; ctx.moveTo(gx, 0); ctx.lineTo(gx, H); }
    ctx.stroke();
    var t0 = S.now - LEVER_WINDOW_US;
    // Cue ticks.
    ctx.strokeStyle = "#6af"; ctx.beginPath();
    for (i = 0; i < S.trials.length; i++) {
      var tc = S.trials[i].t_us;
      if (tc >= t0) { var x0 = (tc - t0) / LEVER_WINDOW_US * W; ctx.moveTo(x0, 0); ctx.lineTo(x0, H); }
    }
    ctx.stroke();
    ctx.strokeStyle = "#fc4"; ctx.lineWidth = 1.5; ctx.beginPath();
    for (i = 0; i < S.lever.length; i++) {
      var x = (S.lever[i][0] - t0) / LEVER_WINDOW_US * W;
      var y = H - 4 - (S.lever[i][1] - lo) / (hi - lo) * (H - 8);
      if (i) ctx.lineTo(x, y); else ctx.moveTo(x, y);
    }
    ctx.stroke(); ctx.lineWidth = 1;
    ctx.fillStyle = "#99a"; ctx.fillText(fmt(hi, 1) + " mm", 4, 12); ctx.fillText("-10 s", 4, H - 4);
  }

  function drawRaster() {
    var c = $("raster"), ctx = c.getContext("2d"), W = c.width, H = c.height;
    ctx.clearRect(0, 0, W, H);
    var N = 150, tr = S.trials.slice(-N), w = W / N, i, hits = 0;
    for (i = 0; i < tr.length; i++) {
      var ok = tr[i].outcome === "rewarded";
      ctx.fillStyle = ok ? "#4c4" : "#c44";
      ctx.fillRect(i * w + 1, ok ? 4 : H / 2, Math.max(1, w - 2), H / 2 - 8);
    }
    // Running success rate over the last 20 trials.
    ctx.strokeStyle = "#fff"; ctx.beginPath();
    for (i = 0; i < tr.length; i++) {
      var a = Math.max(0, i - 19), h = 0;
      for (var j = a; j <= i; j++) if (tr[j].outcome === "rewarded") h++;
      var y = H - 2 - h / (i - a + 1) * (H - 4);
      if (i) ctx.lineTo(i * w + w / 2, y); else ctx.moveTo(w / 2, y);
    }
    ctx.stroke();
    for (i = 0; i < tr.length; i++) if (tr[i].outcome === "rewarded") hits++;
    var all = S.trialCount ? (100 * S.rewarded / S.trialCount) : NaN;
    var last = tr.length ? 100 * hits / tr.length : NaN;
    $("success").textContent = "— " + S.trialCount + " trials, success " + fmt(all, 0) +
      "% (last " + tr.length + ": " + fmt(last, 0) + "%)";
  }

  function color(v) {
    // dF/F -0.2 → dark blue, 0 → black, 1.5+ → yellow/white.
    if (v === null) return [60, 60, 60];
    if (v < 0) { var b = Math.min(1, -v / 0.2); return [0, 0, Math.round(160 * b)]; }
    var t = Math.min(1, v / 1.5);
    return [Math.round(255 * Math.min(1, 2 * t)), Math.round(255 * Math.max(0, 2 * t - 0.5) / 1.5), Math.round(255 * Math.max(0, 2 * t - 1.4))];
  }

  function drawHeatmap() {
    var c = $("heatmap"), ctx = c.getContext("2d"), W = c.width, H = c.height;
    ctx.fillStyle = "#0e0f12"; ctx.fillRect(0, 0, W, H);
    var nR = 0, i;
    for (i = 0; i < S.dff.length; i++) nR = Math.max(nR, S.dff[i].length);
    $("nrois").textContent = S.rois ? S.rois.n : nR;
    var t0 = S.now - DFF_WINDOW_US, cols = Math.round(DFF_WINDOW_US / DFF_BIN_US);
    if (nR > 0) {
      var off = document.createElement("canvas"); off.width = cols; off.height = nR;
      var octx = off.getContext("2d"), id = octx.createImageData(cols, nR);
      for (i = 0; i < S.dff.length; i++) {
        var col = Math.floor((S.dffT[i] - t0) / DFF_BIN_US);
        if (col < 0 || col >= cols) continue;
        var row = S.dff[i];
        for (var r = 0; r < row.length; r++) {
          var rgb = color(row[r]), p = 4 * (r * cols + col);
          id.data[p] = rgb[0]; id.data[p + 1] = rgb[1]; id.data[p + 2] = rgb[2]; id.data[p + 3] = 255;
        }
      }
      octx.putImageData(id, 0, 0);
      ctx.imageSmoothingEnabled = false;
      ctx.drawImage(off, 0, 0, W, H);
    }
    // Trial events: cue (blue) and reward (green) ticks.
    for (i = 0; i < S.trials.length; i++) {
      var t = S.trials[i];
      if (t.t_us >= t0) { ctx.fillStyle = "#6af"; ctx.fillRect((t.t_us - t0) / DFF_WINDOW_US * W, 0, 1.5, H); }
      if (t.outcome === "rewarded" && t.reaction_s !== null) {
        var tr = t.t_us + t.reaction_s * 1e6;
        if (tr >= t0) { ctx.fillStyle = "#6d6"; ctx.fillRect((tr - t0) / DFF_WINDOW_US * W, 0, 1.5, H); }
      }
    }
  }

  function drawImage() {
    var c = $("image"), ctx = c.getContext("2d"), W = c.width, H = c.height;
    ctx.fillStyle = "#0e0f12"; ctx.fillRect(0, 0, W, H);
    var sw = S.image ? S.image.srcW : 512, sh = S.image ? S.image.srcH : 512;
    var sc = Math.min(W / sw, H / sh);
    if (S.image) { ctx.imageSmoothingEnabled = false; ctx.drawImage(S.image.canvas, 0, 0, sw * sc, sh * sc); }
    else { ctx.fillStyle = "#667"; ctx.fillText("no mean image yet", 10, 20); }
    if (!S.rois) return;
    for (var i = 0; i < S.rois.outlines.length; i++) {
      var o = S.rois.outlines[i];
      if (o.length < 2) continue;
      ctx.strokeStyle = S.rois.kinds[i] === "inhibitory" ? "#f6a" : "#5df";
      ctx.beginPath();
      for (var k = 0; k < o.length; k++) {
        var x = (o[k][0] + 0.5) * sc, y = (o[k][1] + 0.5) * sc;
        if (k) ctx.lineTo(x, y); else ctx.moveTo(x, y);
      }
      ctx.closePath(); ctx.stroke();
    }
  }

  function drawHealth() {
    var h = S.health;
    if (!h) return;
    var link = $("h-link");
    link.textContent = h.link || "?";
    link.className = h.link === "up" ? "ok" : "bad";
    $("h-frames").textContent = h.frames;
    var d = $("h-drops"); d.textContent = h.drops; d.className = h.drops > 0 ? "warn" : "ok";
    $("h-latency").textContent = fmt(h.latency_p50_us / 1000, 2) + " / " + fmt(h.latency_p99_us / 1000, 2) + " ms";
    $("h-clock").textContent = "±" + fmt(h.clock_band_us, 1) + " µs";
    $("h-trials").textContent = h.trials + " / " + h.rewards;
    $("h-water").textContent = fmt(h.water_ul, 1) + " µl";
    $("session").textContent = h.session ? "session " + h.session : "no session";
  }

  function setConn(ok, text) {
    var c = $("conn"); c.textContent = text; c.className = ok ? "ok" : "bad";
    body.dataset.connected = ok ? "1" : "0";
  }

  function poll() {
    fetch("/api/state", { cache: "no-store" })
      .then(function (r) { if (!r.ok) throw new Error("HTTP " + r.status); return r.json(); })
      .then(function (u) { setConn(true, "live (polling)"); apply(u); })
      .catch(function (e) { setConn(false, "disconnected: " + e.message); })
      .then(function () { setTimeout(poll, 500); });
  }

  var m = /[?&]close_after=(\d+)/.exec(location.search), closeAfter = m ? parseInt(m[1], 10) : 0;
  var polling = /(^|[?&])poll=1(&|$)/.test(location.search) || typeof EventSource === "undefined";
  body.dataset.mode = polling ? "poll" : "sse";
  if (polling) { poll(); return; }
  function openStream() {
    var es = new EventSource("/events");
    es.onopen = function () { setConn(true, "live"); };
    // After an error the browser reconnects; the new stream starts with a snapshot.
    es.onerror = function () { setConn(false, "reconnecting"); };
    es.onmessage = function (ev) {
      try { apply(JSON.parse(ev.data)); } catch (e) { body.dataset.error = String(e); }
      // ?close_after=N (for headless tests): stop after N messages, so a
      // browser waiting for the network to go idle can finish.
      if (closeAfter > 0 && S.updates >= closeAfter) { es.close(); setConn(true, "closed after " + S.updates); body.dataset.closed = "1"; }
    };
  }
  // Open the stream once the page has loaded, so the never-ending request
  // does not hold the load event.
  if (document.readyState === "complete") openStream();
  else window.addEventListener("load", function () { setTimeout(openStream, 0); });
})();
