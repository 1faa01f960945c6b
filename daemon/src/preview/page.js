// rigd live preview: plain JS + canvas, no dependencies.
// Data comes from /events (Server-Sent Events; each message is a JSON update,
// the first a full snapshot with "reset": true) or, with ?poll=1, from
// polling /api/state (each a full snapshot).
(function () {
  "use strict";
  var LEVER_WINDOW_US = 10e6, DFF_WINDOW_US = 60e6, DFF_BIN_US = 1e5;
  // Trial-aligned lever: from 1 s before the cue to 3 s after.
  var OV_PRE_US = 1e6, OV_POST_US = 3e6, OV_KEEP = 30;
  // Cue-aligned licks: from 1 s before the cue to 4 s after.
  var LR_PRE_US = 1e6, LR_POST_US = 4e6, LR_KEEP = 30, LICK_WINDOW_US = 120e6;
  // The task engine's states (daemon/src/task.rs, TaskState::as_str).
  var TASK_MEANING = {
    waiting: "waiting for a still lever (its rest position is not known yet)",
    iti: "inter-trial interval",
    quiescence: "trial started: waiting for the lever to be still before the cue",
    response: "cue on: response window open",
    link_down: "serial link down: the task waits for it",
    finished: "the session is over"
  };
  var S = { now: 0, lever: [], trials: [], dffT: [], dff: [], rois: null, image: null,
            health: null, session: null, updates: 0, trialCount: 0, rewarded: 0,
            leverTotal: 0, dffTotal: 0, overlays: [], overlaid: {}, selected: -1,
            outlineCover: 0, dffNow: 0, sessionKey: null, licks: [], lickTotal: 0,
            lickFloor: 0, lickRows: [], lickSeen: {}, motion: [], motionTotal: 0,
            task: null, counters: null };
  var body = document.body;

  function $(id) { return document.getElementById(id); }
  function fmt(x, d) { return (x === null || x === undefined || !isFinite(x)) ? "?" : Number(x).toFixed(d); }
  function mmss(s) {
    if (!isFinite(s)) return "?";
    s = Math.max(0, Math.round(s));
    var m = Math.floor(s / 60), r = s % 60;
    return m + ":" + (r < 10 ? "0" : "") + r;
  }

  function apply(u) {
    if (u.reset) {
      S.lever = []; S.trials = []; S.dffT = []; S.dff = []; S.rois = null; S.image = null;
      S.licks = []; S.motion = [];
    }
    if (u.session !== undefined) {
      S.session = u.session;
      S.ref = u.session && u.session.reference_image ? decodeImage(u.session.reference_image) : null;
      showFov(u.session ? u.session.fov_check : null);
      // The trial-aligned lever is built up here from the stream: kept
      // across snapshots of the same session (polling gets one each time),
      // started afresh by a new session.
      var key = u.session ? u.session.mouse + "@" + u.session.t0_us : S.sessionKey;
      if (key !== S.sessionKey) {
        S.overlays = []; S.overlaid = {}; S.lickRows = []; S.lickSeen = {}; S.sessionKey = key;
      }
    }
    S.now = u.now_us;
    var i;
    for (i = 0; i < u.lever.length; i++) S.lever.push(u.lever[i]);
    for (i = 0; i < u.trials.length; i++) S.trials.push(u.trials[i]);
    for (i = 0; i < u.dff.length; i++) { S.dffT.push(u.dff_t_us[i]); S.dff.push(u.dff[i]); }
    for (i = 0; i < u.licks.length; i++) S.licks.push(u.licks[i]);
    for (i = 0; i < u.motion.length; i++) S.motion.push(u.motion[i]);
    S.lickTotal = u.lick_total; S.lickFloor = u.lick_floor_us; S.motionTotal = u.motion_total;
    S.task = u.task; S.counters = u.counters;
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
    captureOverlays();
    captureLickRows();
    // Trim to the windows.
    var cut = S.now - LEVER_WINDOW_US, k = 0;
    while (k < S.lever.length && S.lever[k][0] < cut) k++;
    if (k) S.lever.splice(0, k);
    // The heatmap ends at the newest dF/F row: imaging may run behind the
    // lever (a busy machine); the page says by how much.
    S.dffNow = S.dffT.length ? S.dffT[S.dffT.length - 1] : S.now;
    cut = S.dffNow - DFF_WINDOW_US; k = 0;
    while (k < S.dffT.length && S.dffT[k] < cut) k++;
    if (k) { S.dffT.splice(0, k); S.dff.splice(0, k); }
    k = 0;
    while (k < S.motion.length && S.motion[k][0] < cut) k++;
    if (k) S.motion.splice(0, k);
    cut = S.now - LICK_WINDOW_US; k = 0;
    while (k < S.licks.length && S.licks[k] < cut) k++;
    if (k) { S.lickFloor = Math.max(S.lickFloor, S.licks[k - 1] + 1); S.licks.splice(0, k); }
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
    body.dataset.overlays = S.overlays.length;
    body.dataset.selectedRoi = S.selected;
    body.dataset.session = S.session ? S.session.mouse : "";
    body.dataset.thresholdMm = S.session ? S.session.threshold_mm : "";
    body.dataset.outlineCover = S.outlineCover.toFixed(4);
    body.dataset.t0Us = S.session ? S.session.t0_us : "";
    body.dataset.licks = S.lickTotal;
    body.dataset.licksShown = S.licks.length;
    body.dataset.lickTimes = S.licks.slice(-200).join(",");
    body.dataset.lickRows = S.lickRows.length;
    body.dataset.lickRowLicks = S.lickRows.reduce(function (a, r) { return a + r.licks.length; }, 0);
    body.dataset.motionPoints = S.motionTotal;
    body.dataset.motionShown = S.motion.length;
    body.dataset.motionFirstUs = S.motion.length ? S.motion[0][0] : "";
    body.dataset.taskState = S.task ? S.task.state : "";
    body.dataset.taskChanges = S.task ? S.task.changes : "";
    body.dataset.taskSinceUs = S.task ? S.task.since_us : "";
  }

  // The licks around each cue, kept once the 4 s after it have arrived, for
  // trials whose 1 s before the cue is still within the licks kept.
  function captureLickRows() {
    for (var i = 0; i < S.trials.length; i++) {
      var t = S.trials[i], key = t.trial + ":" + t.t_us;
      if (S.lickSeen[key] || t.t_us + LR_POST_US > S.now) continue;
      S.lickSeen[key] = true;
      if (t.t_us - LR_PRE_US < S.lickFloor) continue;
      var dts = [];
      for (var k = 0; k < S.licks.length; k++) {
        var dt = S.licks[k] - t.t_us;
        if (dt >= -LR_PRE_US && dt <= LR_POST_US) dts.push(dt);
      }
      S.lickRows.push({ rewarded: t.outcome === "rewarded", rt: t.reaction_s, licks: dts });
    }
    if (S.lickRows.length > LR_KEEP) S.lickRows.splice(0, S.lickRows.length - LR_KEEP);
  }

  // The lever around each cue, kept once the 3 s after it have arrived
  // (while the 1 s before it is still in the 10 s window).
  function captureOverlays() {
    for (var i = 0; i < S.trials.length; i++) {
      var t = S.trials[i], key = t.trial + ":" + t.t_us;
      if (S.overlaid[key] || t.t_us + OV_POST_US > S.now) continue;
      S.overlaid[key] = true;
      if (!S.lever.length || S.lever[0][0] > t.t_us - OV_PRE_US) continue;
      var pts = [];
      for (var k = 0; k < S.lever.length; k++) {
        var dt = S.lever[k][0] - t.t_us;
        if (dt >= -OV_PRE_US && dt <= OV_POST_US) pts.push([dt, S.lever[k][1]]);
      }
      if (pts.length) S.overlays.push({ rewarded: t.outcome === "rewarded", pts: pts });
    }
    if (S.overlays.length > OV_KEEP) S.overlays.splice(0, S.overlays.length - OV_KEEP);
  }

  function decodeImage(m) {
    var c = document.createElement("canvas");
    c.width = m.w; c.height = m.h;
    var ctx = c.getContext("2d"), id = ctx.createImageData(m.w, m.h), n = m.w * m.h;
    var vals = new Uint8Array(n);
    for (var i = 0; i < n; i++) {
      var v = parseInt(m.hex.substr(2 * i, 2), 16);
      vals[i] = v;
      id.data[4 * i] = v; id.data[4 * i + 1] = v; id.data[4 * i + 2] = v; id.data[4 * i + 3] = 255;
    }
    ctx.putImageData(id, 0, 0);
    return { canvas: c, srcW: m.src_w, srcH: m.src_h, w: m.w, h: m.h, vals: vals };
  }

  // The session's mean image (green) over the reference (magenta).
  function overlayImage(now, ref) {
    if (!now || !ref || now.w !== ref.w || now.h !== ref.h) return null;
    var c = document.createElement("canvas");
    c.width = now.w; c.height = now.h;
    var ctx = c.getContext("2d"), id = ctx.createImageData(now.w, now.h), n = now.w * now.h;
    for (var i = 0; i < n; i++) {
      id.data[4 * i] = ref.vals[i]; id.data[4 * i + 1] = now.vals[i];
      id.data[4 * i + 2] = ref.vals[i]; id.data[4 * i + 3] = 255;
    }
    ctx.putImageData(id, 0, 0);
    return c;
  }

  function showFov(f) {
    var el = $("fov");
    body.dataset.fovVerdict = f ? f.verdict : "";
    body.dataset.fovDx = f && f.dx_px != null ? f.dx_px : "";
    body.dataset.fovDy = f && f.dy_px != null ? f.dy_px : "";
    if (!f) { el.textContent = "no field-of-view check (no reference for this mouse)"; el.className = ""; return; }
    var num = function (v, d) { return v == null ? "–" : (v >= 0 ? "+" : "") + v.toFixed(d); };
    var txt = "field of view vs " + f.reference + " reference: " + f.verdict;
    if (f.dx_px != null) {
      txt += " — shift dx " + num(f.dx_px, 1) + " px, dy " + num(f.dy_px, 1) + " px";
      if (f.shift_um != null) txt += " (" + f.shift_um.toFixed(1) + " µm)";
      txt += ", rotation " + num(f.rotation_deg, 1) + "°, r = " + f.correlation.toFixed(2);
    }
    if (f.problems && f.problems.length) txt += " — " + f.problems.join("; ");
    el.textContent = txt;
    el.className = f.verdict === "pass" ? "ok" : "bad";
  }

  function draw() {
    drawLever(); drawRaster(); drawHeatmap(); drawTrace(); drawImage(); drawOverlay();
    drawRt(); drawHealth(); drawMotion(); drawLickRaster(); drawTask();
  }

  // The lever's fixed range: a little below rest to past the threshold.
  function leverRange() {
    var thr = S.session ? S.session.threshold_mm : 1.5;
    var hi = Math.max(2 * thr, thr + 1);
    if (S.session && S.session.lever_travel_mm > 0) hi = Math.min(hi, S.session.lever_travel_mm);
    return [-0.5, Math.max(hi, thr * 1.1)];
  }

  function yAxis(ctx, H, lo, hi, ticks, unit) {
    ctx.fillStyle = "#99a"; ctx.font = "11px system-ui, sans-serif";
    for (var i = 0; i < ticks.length; i++) {
      var y = H - 4 - (ticks[i] - lo) / (hi - lo) * (H - 8);
      ctx.fillText(ticks[i] + (i === ticks.length - 1 ? " " + unit : ""), 2, y + 4);
    }
  }

  function drawLever() {
    var c = $("lever"), ctx = c.getContext("2d"), W = c.width, H = c.height, i;
    ctx.clearRect(0, 0, W, H);
    var r = leverRange(), lo = r[0], hi = r[1];
    var L = 40, PW = W - L;
    var ty = function (v) { return H - 4 - (Math.min(hi, Math.max(lo, v)) - lo) / (hi - lo) * (H - 8); };
    ctx.strokeStyle = "#2a2e36"; ctx.beginPath();
    for (i = 0; i <= 10; i++) { var gx = L + PW * i / 10; ctx.moveTo(gx, 0); ctx.lineTo(gx, H); }
    ctx.moveTo(L, ty(0)); ctx.lineTo(W, ty(0));
    ctx.stroke();
    var t0 = S.now - LEVER_WINDOW_US;
    var tx = function (t) { return L + (t - t0) / LEVER_WINDOW_US * PW; };
    // Cue (blue) and reward (green) ticks.
    for (i = 0; i < S.trials.length; i++) {
      var t = S.trials[i];
      if (t.t_us >= t0) { ctx.fillStyle = "#6af"; ctx.fillRect(tx(t.t_us), 0, 1.5, H); }
      if (t.outcome === "rewarded" && t.reaction_s !== null) {
        var tr = t.t_us + t.reaction_s * 1e6;
        if (tr >= t0) { ctx.fillStyle = "#6d6"; ctx.fillRect(tx(tr), 0, 1.5, H); }
      }
    }
    // The threshold.
    if (S.session) {
      ctx.strokeStyle = "#f84"; ctx.setLineDash([6, 4]); ctx.beginPath();
      ctx.moveTo(L, ty(S.session.threshold_mm)); ctx.lineTo(W, ty(S.session.threshold_mm));
      ctx.stroke(); ctx.setLineDash([]);
    }
    // Lick onsets: marks along the top.
    ctx.fillStyle = "#e6e";
    for (i = 0; i < S.licks.length; i++) {
      if (S.licks[i] < t0) continue;
      var lx = tx(S.licks[i]);
      ctx.beginPath(); ctx.moveTo(lx - 3, 0); ctx.lineTo(lx + 3, 0); ctx.lineTo(lx, 7); ctx.fill();
    }
    ctx.strokeStyle = "#fc4"; ctx.lineWidth = 1.5; ctx.beginPath();
    for (i = 0; i < S.lever.length; i++) {
      var x = tx(S.lever[i][0]), y = ty(S.lever[i][1]);
      if (i) ctx.lineTo(x, y); else ctx.moveTo(x, y);
    }
    ctx.stroke(); ctx.lineWidth = 1;
    var ticks = [0, Math.round(hi * 2) / 2];
    if (S.session) ticks.splice(1, 0, S.session.threshold_mm);
    yAxis(ctx, H, lo, hi, ticks, "mm");
    ctx.fillText("-10 s", L + 2, H - 2); ctx.fillText("now", W - 24, H - 2);
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
    $("success").textContent = "— " + S.trialCount + " trials this session, success " + fmt(all, 0) +
      "% (last " + tr.length + ": " + fmt(last, 0) + "%)";
  }

  // v in 0..1 (above the ROI's baseline, in units of its own 99th
  // percentile) -> a perceptual dark-to-yellow ramp; below 0 -> blue.
  function ramp(v) {
    if (v === null) return [60, 60, 60];
    if (v < 0) { var b = Math.min(1, -v / 0.5); return [0, 0, Math.round(170 * b)]; }
    var t = Math.min(1, v);
    return [Math.round(255 * Math.min(1, 1.8 * t)), Math.round(230 * Math.max(0, 1.6 * t - 0.45)),
            Math.round(200 * Math.max(0, 2.5 * t - 1.6))];
  }

  // Each ROI's 99th percentile of positive dF/F in the window (at least
  // 0.1): one scale per ROI, so quiet and bright cells both show.
  function roiScales(nR) {
    var sc = [], r, i, vals;
    for (r = 0; r < nR; r++) {
      vals = [];
      for (i = 0; i < S.dff.length; i++) { var v = S.dff[i][r]; if (v !== null && v > 0) vals.push(v); }
      vals.sort(function (a, b) { return a - b; });
      sc.push(Math.max(0.1, vals.length ? vals[Math.floor(0.99 * (vals.length - 1))] : 0.1));
    }
    return sc;
  }

  function drawHeatmap() {
    var c = $("heatmap"), ctx = c.getContext("2d"), W = c.width, H = c.height;
    ctx.fillStyle = "#0e0f12"; ctx.fillRect(0, 0, W, H);
    var L = 40, R = 50, B = 24, PW = W - L - R, PH = H - B;
    var nR = 0, i;
    for (i = 0; i < S.dff.length; i++) nR = Math.max(nR, S.dff[i].length);
    $("nrois").textContent = S.rois ? S.rois.n : nR;
    var t0 = S.dffNow - DFF_WINDOW_US, cols = Math.round(DFF_WINDOW_US / DFF_BIN_US);
    var lag = (S.now - S.dffNow) / 1e6;
    $("dff-lag").textContent = lag > 2 ? " — imaging " + fmt(lag, 0) + " s behind the lever" : "";
    if (nR > 0) {
      var sc = roiScales(nR);
      var off = document.createElement("canvas"); off.width = cols; off.height = nR;
      var octx = off.getContext("2d"), id = octx.createImageData(cols, nR);
      for (i = 0; i < S.dff.length; i++) {
        var col = Math.floor((S.dffT[i] - t0) / DFF_BIN_US);
        if (col < 0 || col >= cols) continue;
        var row = S.dff[i];
        for (var r = 0; r < row.length; r++) {
          var rgb = ramp(row[r] === null ? null : row[r] / sc[r]), p = 4 * (r * cols + col);
          id.data[p] = rgb[0]; id.data[p + 1] = rgb[1]; id.data[p + 2] = rgb[2]; id.data[p + 3] = 255;
        }
      }
      octx.putImageData(id, 0, 0);
      ctx.imageSmoothingEnabled = false;
      ctx.drawImage(off, L, 0, PW, PH);
      if (S.selected >= 0 && S.selected < nR) {
        ctx.strokeStyle = "#fff"; ctx.strokeRect(L - 0.5, S.selected * PH / nR, PW + 1, Math.max(1, PH / nR));
      }
    }
    // Trial events: cue (blue) and reward (green) ticks.
    for (i = 0; i < S.trials.length; i++) {
      var t = S.trials[i];
      if (t.t_us >= t0) { ctx.fillStyle = "#6af"; ctx.fillRect(L + (t.t_us - t0) / DFF_WINDOW_US * PW, 0, 1.5, PH); }
      if (t.outcome === "rewarded" && t.reaction_s !== null) {
        var tr = t.t_us + t.reaction_s * 1e6;
        if (tr >= t0) { ctx.fillStyle = "#6d6"; ctx.fillRect(L + (tr - t0) / DFF_WINDOW_US * PW, 0, 1.5, PH); }
      }
    }
    // Lick onsets: a strip just under the plot, on its time axis.
    ctx.fillStyle = "#e6e";
    for (i = 0; i < S.licks.length; i++) {
      if (S.licks[i] >= t0 && S.licks[i] <= S.dffNow) ctx.fillRect(L + (S.licks[i] - t0) / DFF_WINDOW_US * PW, PH + 1, 1.5, 6);
    }
    // Axes: ROI numbers, seconds, and the colour bar.
    ctx.fillStyle = "#99a"; ctx.font = "11px system-ui, sans-serif";
    if (nR > 0) { ctx.fillText("ROI 1", 2, 10); ctx.fillText(String(nR), 2, PH - 2); }
    ctx.fillText("licks", 2, PH + 8);
    for (i = 0; i <= 6; i++) {
      var x = L + PW * i / 6;
      ctx.fillRect(x, PH + 8, 1, 3);
      ctx.fillText(i === 6 ? "now" : (i * 10 - 60) + " s", x - (i === 6 ? 20 : 10), H - 1);
    }
    var bx = W - R + 12, bw = 10;
    for (i = 0; i < PH; i++) {
      var v = 1 - i / (PH - 1) * 1.5, rgbb = ramp(v);
      ctx.fillStyle = "rgb(" + rgbb[0] + "," + rgbb[1] + "," + rgbb[2] + ")";
      ctx.fillRect(bx, i, bw, 1);
    }
    ctx.fillStyle = "#99a";
    ctx.fillText("p99", bx + bw + 2, 9);
    ctx.fillText("0", bx + bw + 2, PH * (1 / 1.5) + 4);
    ctx.fillText("-", bx + bw + 2, PH - 2);
  }

  function drawTrace() {
    var c = $("trace"), ctx = c.getContext("2d"), W = c.width, H = c.height, i;
    ctx.clearRect(0, 0, W, H);
    var k = S.selected;
    body.dataset.selectedRoi = k;
    $("trace-title").textContent = k >= 0 ? "ROI " + (k + 1) + " dF/F (last 60 s of imaging)" :
      "ROI trace: click an ROI on the mean image";
    if (k < 0) return;
    var L = 40, PW = W - L, t0 = S.dffNow - DFF_WINDOW_US, lo = 0, hi = 0.2, v;
    for (i = 0; i < S.dff.length; i++) {
      v = S.dff[i][k];
      if (v !== null && v !== undefined) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
    }
    var ty = function (x) { return H - 4 - (x - lo) / (hi - lo) * (H - 8); };
    ctx.strokeStyle = "#2a2e36"; ctx.beginPath(); ctx.moveTo(L, ty(0)); ctx.lineTo(W, ty(0)); ctx.stroke();
    for (i = 0; i < S.trials.length; i++) {
      var t = S.trials[i];
      if (t.t_us >= t0) { ctx.fillStyle = "#6af"; ctx.fillRect(L + (t.t_us - t0) / DFF_WINDOW_US * PW, 0, 1.5, H); }
    }
    ctx.strokeStyle = "#5df"; ctx.beginPath();
    var started = false;
    for (i = 0; i < S.dff.length; i++) {
      v = S.dff[i][k];
      if (v === null || v === undefined) { started = false; continue; }
      var x = L + (S.dffT[i] - t0) / DFF_WINDOW_US * PW;
      if (started) ctx.lineTo(x, ty(v)); else { ctx.moveTo(x, ty(v)); started = true; }
    }
    ctx.stroke();
    yAxis(ctx, H, lo, hi, [0, Math.round(hi * 10) / 10], "dF/F");
  }

  // The image's placement on its canvas.
  function imageBox() {
    var c = $("image"), W = c.width, H = c.height;
    var sw = S.image ? S.image.srcW : 512, sh = S.image ? S.image.srcH : 512;
    var sc = Math.min(W / sw, H / sh);
    return { sc: sc, sw: sw, sh: sh, W: W, H: H };
  }

  function outlinePath(ctx, o, sc) {
    ctx.beginPath();
    for (var k = 0; k < o.length; k++) {
      var x = o[k][0] * sc, y = o[k][1] * sc;
      if (k) ctx.lineTo(x, y); else ctx.moveTo(x, y);
    }
    ctx.closePath();
  }

  function drawImage() {
    var c = $("image"), ctx = c.getContext("2d"), b = imageBox(), sc = b.sc, i;
    ctx.fillStyle = "#0e0f12"; ctx.fillRect(0, 0, b.W, b.H);
    var ov = $("ref-overlay").checked ? overlayImage(S.image, S.ref) : null;
    body.dataset.refOverlay = ov ? "on" : "off";
    if (ov) { ctx.imageSmoothingEnabled = false; ctx.drawImage(ov, 0, 0, b.sw * sc, b.sh * sc); }
    else if (S.image) { ctx.imageSmoothingEnabled = false; ctx.drawImage(S.image.canvas, 0, 0, b.sw * sc, b.sh * sc); }
    else { ctx.fillStyle = "#667"; ctx.fillText("no mean image yet", 10, 20); }
    if (!S.rois) return;
    // Outlines: thin lines at the ROIs' borders, so the image shows through.
    // ROIs are drawn on the reference; the mean image is of the raw frames,
    // whose content sits where the registration found it: move the outlines
    // by the recent median shift so they lie on their cells.
    var shift = roiShift();
    body.dataset.roiShift = shift.x.toFixed(2) + "," + shift.y.toFixed(2);
    var off = document.createElement("canvas"); off.width = b.W; off.height = b.H;
    var octx = off.getContext("2d");
    octx.translate(shift.x * sc, shift.y * sc);
    octx.lineWidth = 1;
    for (i = 0; i < S.rois.outlines.length; i++) {
      var o = S.rois.outlines[i];
      if (o.length < 2) continue;
      octx.strokeStyle = i === S.selected ? "#fff" : (S.rois.kinds[i] === "inhibitory" ? "#f6a" : "#5df");
      octx.globalAlpha = i === S.selected ? 1 : 0.7;
      outlinePath(octx, o, sc); octx.stroke();
    }
    ctx.drawImage(off, 0, 0);
    // How much of the image the outlines cover (a test reads it).
    var area = Math.max(1, Math.floor(b.sw * sc) * Math.floor(b.sh * sc));
    var px = octx.getImageData(0, 0, Math.floor(b.sw * sc) || 1, Math.floor(b.sh * sc) || 1).data, n = 0;
    for (i = 3; i < px.length; i += 4) if (px[i] > 0) n++;
    S.outlineCover = n / area;
  }

  // Median rigid shift (px) of the last 10 s of unflagged motion bins: where
  // the reference's content lies in the raw frames now.
  function roiShift() {
    var xs = [], ys = [], cut = S.motion.length ? S.motion[S.motion.length - 1][0] - 10e6 : 0;
    for (var k = 0; k < S.motion.length; k++) {
      var m = S.motion[k];
      if (m[0] >= cut && m[4] === 0) { xs.push(m[1]); ys.push(m[2]); }
    }
    var med = function (v) { v.sort(function (a, b) { return a - b; }); return v.length ? v[v.length >> 1] : 0; };
    return { x: med(xs), y: med(ys) };
  }

  function pickRoi(ev) {
    if (!S.rois) return;
    var c = $("image"), rect = c.getBoundingClientRect(), b = imageBox(), shift = roiShift();
    var x = (ev.clientX - rect.left) * c.width / rect.width / b.sc - shift.x;
    var y = (ev.clientY - rect.top) * c.height / rect.height / b.sc - shift.y;
    var ctx = document.createElement("canvas").getContext("2d"), hit = -1;
    for (var i = 0; i < S.rois.outlines.length && hit < 0; i++) {
      var o = S.rois.outlines[i];
      if (o.length < 3) continue;
      outlinePath(ctx, o, 1);
      if (ctx.isPointInPath(x, y)) hit = i;
    }
    selectRoi(hit);
  }

  function selectRoi(k) {
    S.selected = k;
    draw();
  }

  function drawOverlay() {
    var c = $("overlay"), ctx = c.getContext("2d"), W = c.width, H = c.height, i, k;
    ctx.clearRect(0, 0, W, H);
    var r = leverRange(), lo = r[0], hi = r[1], span = OV_PRE_US + OV_POST_US;
    var tx = function (dt) { return (dt + OV_PRE_US) / span * W; };
    var ty = function (v) { return H - 4 - (Math.min(hi, Math.max(lo, v)) - lo) / (hi - lo) * (H - 8); };
    ctx.fillStyle = "#6af"; ctx.fillRect(tx(0), 0, 1.5, H);
    if (S.session) {
      ctx.strokeStyle = "#f84"; ctx.setLineDash([6, 4]); ctx.beginPath();
      ctx.moveTo(0, ty(S.session.threshold_mm)); ctx.lineTo(W, ty(S.session.threshold_mm));
      ctx.stroke(); ctx.setLineDash([]);
    }
    for (i = 0; i < S.overlays.length; i++) {
      var ov = S.overlays[i];
      ctx.strokeStyle = ov.rewarded ? "rgba(120,220,120,0.55)" : "rgba(220,90,90,0.55)";
      ctx.beginPath();
      for (k = 0; k < ov.pts.length; k++) {
        if (k) ctx.lineTo(tx(ov.pts[k][0]), ty(ov.pts[k][1])); else ctx.moveTo(tx(ov.pts[k][0]), ty(ov.pts[k][1]));
      }
      ctx.stroke();
    }
    ctx.fillStyle = "#99a"; ctx.font = "11px system-ui, sans-serif";
    ctx.fillText("-1 s", 2, H - 2); ctx.fillText("cue", tx(0) + 3, 10); ctx.fillText("+3 s", W - 26, H - 2);
    if (!S.overlays.length) ctx.fillText("no trial yet", W / 2 - 30, H / 2);
  }

  function drawRt() {
    var c = $("rthist"), ctx = c.getContext("2d"), W = c.width, H = c.height, i;
    ctx.clearRect(0, 0, W, H);
    var win = S.session && S.session.response_window_s ? S.session.response_window_s : 10;
    var NB = 20, bins = [], n = 0, maxS = 0;
    for (i = 0; i < NB; i++) bins.push(0);
    for (i = 0; i < S.trials.length; i++) {
      var rt = S.trials[i].reaction_s;
      if (rt === null || rt === undefined || !isFinite(rt)) continue;
      maxS = Math.max(maxS, rt);
    }
    var top = Math.max(1, Math.min(win, Math.ceil(maxS)));
    for (i = 0; i < S.trials.length; i++) {
      var v = S.trials[i].reaction_s;
      if (v === null || v === undefined || !isFinite(v)) continue;
      bins[Math.min(NB - 1, Math.floor(v / top * NB))]++; n++;
    }
    var most = Math.max(1, Math.max.apply(null, bins)), bw = W / NB;
    ctx.fillStyle = "#6d6";
    for (i = 0; i < NB; i++) {
      var h = bins[i] / most * (H - 16);
      ctx.fillRect(i * bw + 1, H - 12 - h, bw - 2, h);
    }
    ctx.fillStyle = "#99a"; ctx.font = "11px system-ui, sans-serif";
    ctx.fillText("0", 1, H - 1); ctx.fillText(top + " s", W - 24, H - 1);
    ctx.fillText("tallest bar: " + most, W - 90, 10);
    $("rt-n").textContent = n;
    body.dataset.rtCount = n;
  }

  function drawHealth() {
    var h = S.health, s = S.session;
    if (!h) return;
    var link = $("h-link");
    link.textContent = h.link || "?";
    link.className = h.link === "up" ? "ok" : "bad";
    var d = $("h-frames"); d.textContent = h.frames + " / " + h.drops; d.className = h.drops > 0 ? "warn" : "";
    $("h-latency").textContent = h.latency_p99_us > 0 ?
      fmt(h.latency_p50_us, 0) + " / " + fmt(h.latency_p99_us, 0) : "no reward yet";
    $("h-clock").textContent = fmt(h.clock_band_us, 1);
    var c = S.counters || { samples_lost: 0, records_dropped: 0 };
    var lost = $("h-lost"); lost.textContent = c.samples_lost; lost.className = c.samples_lost > 0 ? "warn" : "";
    var rec = $("h-records"); rec.textContent = c.records_dropped; rec.className = c.records_dropped > 0 ? "bad" : "";
    body.dataset.samplesLost = c.samples_lost; body.dataset.recordsDropped = c.records_dropped;
    var fl = 0;
    for (var mi = 0; mi < S.motion.length; mi++) fl += S.motion[mi][4];
    var hf = $("h-flagged"); hf.textContent = S.motion.length ? String(fl) : "–"; hf.className = fl > 0 ? "warn" : "";
    $("h-trials").textContent = h.trials + " / " + h.rewards +
      (s && s.max_trials ? " (cap " + s.max_trials + ")" : "");
    $("h-water").textContent = fmt(h.water_ul, 1) + (s ? " / " + fmt(s.max_water_session_ul, 0) : "");
    if (s) {
      var today = s.water_before_today_ul + h.water_ul;
      $("h-day").textContent = fmt(today, 0) + " / " + fmt(s.max_water_day_ul, 0) +
        (s.daily_water_target_ul ? ", target " + fmt(s.daily_water_target_ul, 0) : "");
    } else {
      $("h-day").textContent = "–";
    }
    $("h-state").textContent = s ? "running" : (h.session ? "stopping" : "idle");
    $("session").textContent = h.session ? "session " + h.session : (s ? "mouse " + s.mouse : "no session");
    var clock = "";
    if (s && S.now >= s.t0_us) {
      var el = (S.now - s.t0_us) / 1e6;
      clock = "elapsed " + mmss(el);
      if (s.max_duration_s) clock += ", left " + mmss(s.max_duration_s - el);
    }
    $("clock").textContent = clock;
  }

  // The rigid shift per 100 ms bin over the last 60 s of imaging: x and y
  // lines, flagged bins as red marks along the top.
  function drawMotion() {
    var c = $("motion"), ctx = c.getContext("2d"), W = c.width, H = c.height, i;
    ctx.clearRect(0, 0, W, H);
    var L = 40, PW = W - L, t0 = S.dffNow - DFF_WINDOW_US, r = 1, minPeak = Infinity;
    for (i = 0; i < S.motion.length; i++) {
      r = Math.max(r, Math.abs(S.motion[i][1]), Math.abs(S.motion[i][2]));
      minPeak = Math.min(minPeak, S.motion[i][3]);
    }
    r = Math.ceil(r);
    var ty = function (v) { return H / 2 - v / r * (H / 2 - 10); };
    var tx = function (t) { return L + (t - t0) / DFF_WINDOW_US * PW; };
    ctx.strokeStyle = "#2a2e36"; ctx.beginPath(); ctx.moveTo(L, ty(0)); ctx.lineTo(W, ty(0)); ctx.stroke();
    ctx.fillStyle = "#f66";
    for (i = 0; i < S.motion.length; i++) if (S.motion[i][4] > 0) ctx.fillRect(tx(S.motion[i][0]), 0, 1.5, 6);
    [[1, "#5df"], [2, "#fa5"]].forEach(function (d) {
      ctx.strokeStyle = d[1]; ctx.beginPath();
      for (var j = 0; j < S.motion.length; j++) {
        var x = tx(S.motion[j][0]), y = ty(S.motion[j][d[0]]);
        if (j) ctx.lineTo(x, y); else ctx.moveTo(x, y);
      }
      ctx.stroke();
    });
    ctx.fillStyle = "#99a"; ctx.font = "11px system-ui, sans-serif";
    ctx.fillText("+" + r + " px", 2, ty(r) + 4); ctx.fillText("0", 2, ty(0) + 4); ctx.fillText("-" + r, 2, ty(-r));
    ctx.fillText("-60 s", L + 2, H - 2); ctx.fillText("now", W - 24, H - 2);
    var note = S.motion.length ? "— weakest match (peak, 1 = perfect) " + fmt(minPeak, 2) :
      "— no shifts yet: motion correction is off, or its reference is being built from the first frames";
    $("motion-note").textContent = note;
  }

  function drawLickRaster() {
    var c = $("lickraster"), ctx = c.getContext("2d"), W = c.width, H = c.height, i, k;
    ctx.clearRect(0, 0, W, H);
    var span = LR_PRE_US + LR_POST_US, B = 12, PH = H - B;
    var tx = function (dt) { return 6 + (dt + LR_PRE_US) / span * (W - 6); };
    ctx.fillStyle = "#6af"; ctx.fillRect(tx(0), 0, 1.5, PH);
    var n = S.lickRows.length, rh = PH / LR_KEEP;
    for (i = 0; i < n; i++) {
      var row = S.lickRows[i], y = PH - (n - i) * rh;
      ctx.fillStyle = row.rewarded ? "#4c4" : "#c44"; ctx.fillRect(0, y + 1, 4, Math.max(1, rh - 2));
      if (row.rewarded && row.rt !== null && row.rt !== undefined) {
        ctx.fillStyle = "#6d6"; ctx.fillRect(tx(row.rt * 1e6) - 1.5, y + rh / 2 - 1.5, 3, 3);
      }
      ctx.fillStyle = "#e6e";
      for (k = 0; k < row.licks.length; k++) ctx.fillRect(tx(row.licks[k]), y + 0.5, 1.5, Math.max(1, rh - 1));
    }
    ctx.fillStyle = "#99a"; ctx.font = "11px system-ui, sans-serif";
    ctx.fillText("-1 s", 6, H - 1); ctx.fillText("cue", tx(0) + 3, H - 1); ctx.fillText("+4 s", W - 26, H - 1);
    if (!n) ctx.fillText("no trial yet", W / 2 - 30, PH / 2);
  }

  function drawTask() {
    var el = $("task-state"), t = S.task;
    if (!t) { el.textContent = "–"; el.className = "taskstate"; return; }
    var dt = Math.max(0, (S.now - t.since_us) / 1e6);
    el.textContent = t.state.replace("_", " ") + "  " + (dt < 60 ? fmt(dt, 1) + " s" : mmss(dt));
    el.className = "taskstate " + t.state;
    $("task-meaning").textContent = TASK_MEANING[t.state] || t.state;
    var last = S.trials.slice(-20), hits = 0;
    for (var i = 0; i < last.length; i++) if (last[i].outcome === "rewarded") hits++;
    $("task-success").textContent = last.length ?
      "success, last " + last.length + " trials: " + fmt(100 * hits / last.length, 0) + " % (" + hits + "/" + last.length + ")" :
      "no trial yet";
    body.dataset.success20 = last.length ? fmt(100 * hits / last.length, 0) : "";
  }

  $("image").addEventListener("click", pickRoi);
  // ?roi=N (for tests): select ROI N (1-based) as a click would.
  var mr = /[?&]roi=(\d+)/.exec(location.search);
  if (mr) S.selected = parseInt(mr[1], 10) - 1;
  // ?overlay=1: the reference overlay on, as ticking the box does.
  if (/[?&]overlay=1/.test(location.search)) $("ref-overlay").checked = true;
  $("ref-overlay").addEventListener("change", function () { draw(); });

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
