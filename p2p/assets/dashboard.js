// The dashboard of a diloco peer: polls this server's /status, /history and /peers every two
// seconds and draws cards, SVG line charts and a peer table. No library, no network beyond
// this server (the page's Content-Security-Policy forbids it). Every string that comes from
// a remote peer (peer ids, agent versions, addresses) is set with textContent, never parsed
// as HTML.
'use strict';

const POLL_MS = 2000;
const SVG = 'http://www.w3.org/2000/svg';
const COLORS = ['#2f6fdf', '#e0742a', '#2a9d5b', '#9b4dca'];
const $ = (id) => document.getElementById(id);

const state = { kind: null, rounds: [], since: null, samples: [], renders: 0 };

function reportError(msg) {
  const box = $('errors');
  box.hidden = false;
  box.textContent += msg + '\n';
  document.body.dataset.errors = String((Number(document.body.dataset.errors) || 0) + 1);
}
window.addEventListener('error', (e) => reportError('error: ' + e.message));
window.addEventListener('unhandledrejection', (e) => reportError('error: ' + e.reason));

async function getJSON(path) {
  const r = await fetch(path, { cache: 'no-store' });
  if (!r.ok) throw new Error(path + ': HTTP ' + r.status);
  return r.json();
}

function setText(id, v) { $(id).textContent = v === null || v === undefined || v === '' ? '–' : String(v); }
function num(v, digits) { return typeof v === 'number' && isFinite(v) ? v.toFixed(digits) : null; }
function short(id, n) { return id ? (id.length > n ? '…' + id.slice(-n) : id) : ''; }

function bytes(n) {
  if (typeof n !== 'number') return null;
  const units = ['B', 'KB', 'MB', 'GB', 'TB'];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return (i === 0 ? n.toFixed(0) : n.toFixed(1)) + ' ' + units[i];
}

function duration(s) {
  if (typeof s !== 'number') return null;
  if (s < 60) return s.toFixed(0) + ' s';
  if (s < 3600) return (s / 60).toFixed(1) + ' min';
  return (s / 3600).toFixed(1) + ' h';
}

function tick(v) {
  const a = Math.abs(v);
  if (Number.isInteger(v) && a < 1e4) return String(v);
  if (a >= 1e9) return (v / 1e9).toFixed(1) + 'G';
  if (a >= 1e6) return (v / 1e6).toFixed(1) + 'M';
  if (a >= 1e4) return (v / 1e3).toFixed(0) + 'k';
  if (a >= 100) return v.toFixed(0);
  if (a >= 10) return v.toFixed(1);
  return v.toFixed(2);
}

function el(name, attrs, text) {
  const e = document.createElementNS(SVG, name);
  for (const k in attrs) e.setAttribute(k, attrs[k]);
  if (text !== undefined) e.textContent = text;
  return e;
}

// Draws `series` ([{name, points: [[x, y], ...]}]) into the <svg id=id>; sets data-points to
// the number of points drawn, so a test can tell an empty chart from a drawn one. `zero`: the
// y axis starts at 0 (counts, sizes, times); otherwise it fits the data (losses).
function chart(id, series, xLabel, zero) {
  const svg = $(id);
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  const W = 600, H = 220, L = 52, R = 12, T = 22, B = 28;
  const pts = series.flatMap((s) => s.points).filter((p) => isFinite(p[0]) && isFinite(p[1]));
  svg.dataset.points = String(pts.length);
  if (pts.length === 0) {
    svg.appendChild(el('text', { x: W / 2, y: H / 2, 'text-anchor': 'middle' }, 'no data yet'));
    return;
  }
  let x0 = Math.min(...pts.map((p) => p[0])), x1 = Math.max(...pts.map((p) => p[0]));
  let y0 = Math.min(...pts.map((p) => p[1])), y1 = Math.max(...pts.map((p) => p[1]));
  if (x1 === x0) { x0 -= 1; x1 += 1; }
  if (zero) y0 = Math.min(0, y0);
  if (y1 === y0) { const d = Math.abs(y0) * 0.1 || 1; y0 -= zero ? 0 : d; y1 += d; }
  const pad = (y1 - y0) * 0.05; y0 -= zero && y0 === 0 ? 0 : pad; y1 += pad;
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const sy = (y) => H - B - ((y - y0) / (y1 - y0)) * (H - T - B);
  svg.appendChild(el('line', { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: '#aab' }));
  svg.appendChild(el('line', { x1: L, y1: T, x2: L, y2: H - B, stroke: '#aab' }));
  for (let i = 0; i <= 4; i++) {
    const y = y0 + ((y1 - y0) * i) / 4;
    svg.appendChild(el('line', { x1: L, y1: sy(y), x2: W - R, y2: sy(y), stroke: '#eef' }));
    svg.appendChild(el('text', { x: L - 4, y: sy(y) + 4, 'text-anchor': 'end' }, tick(y)));
  }
  // Rounds are whole numbers: label whole numbers only (at most five of them).
  const whole = pts.every((p) => Number.isInteger(p[0]));
  const steps = whole ? Math.max(1, Math.min(4, x1 - x0)) : 4;
  for (let i = 0; i <= steps; i++) {
    let x = x0 + ((x1 - x0) * i) / steps;
    if (whole) x = Math.round(x);
    svg.appendChild(el('text', { x: sx(x), y: H - B + 14, 'text-anchor': 'middle' }, tick(x)));
  }
  svg.appendChild(el('text', { x: W - R, y: H - 2, 'text-anchor': 'end' }, xLabel));
  series.forEach((s, i) => {
    const color = COLORS[i % COLORS.length];
    const ps = s.points.filter((p) => isFinite(p[0]) && isFinite(p[1]));
    if (ps.length > 1) {
      svg.appendChild(el('polyline', {
        points: ps.map((p) => sx(p[0]).toFixed(1) + ',' + sy(p[1]).toFixed(1)).join(' '),
        fill: 'none', stroke: color, 'stroke-width': 2,
      }));
    }
    for (const p of ps.length <= 60 ? ps : ps.slice(-1)) {
      svg.appendChild(el('circle', { cx: sx(p[0]), cy: sy(p[1]), r: 2.5, fill: color }));
    }
    const last = ps[ps.length - 1];
    const label = s.name + (last ? ' ' + tick(last[1]) : '');
    svg.appendChild(el('rect', { x: L + 8 + i * 150, y: 6, width: 10, height: 10, fill: color }));
    svg.appendChild(el('text', { x: L + 22 + i * 150, y: 15 }, label));
  });
}

function series(name, rows, x, y) {
  return { name, points: rows.filter((r) => typeof r[y] === 'number').map((r) => [r[x], r[y]]) };
}

function cell(tr, text, cls) {
  const td = document.createElement('td');
  td.textContent = text === null || text === undefined ? '–' : String(text);
  if (cls) td.className = cls;
  tr.appendChild(td);
}

function table(id, rows, cols) {
  const body = $(id);
  while (body.firstChild) body.removeChild(body.firstChild);
  for (const r of rows) {
    const tr = document.createElement('tr');
    for (const [f, cls] of cols) cell(tr, f(r), cls);
    body.appendChild(tr);
  }
  body.dataset.rows = String(rows.length);
}

async function pollNode(st) {
  const page = await getJSON('/history' + (state.since === null ? '' : '?since=' + state.since));
  const cap = page.capacity || 4096;
  for (const r of page.rounds) {
    // A node that abandoned a fork replays rounds: newer records replace older ones.
    while (state.rounds.length && state.rounds[state.rounds.length - 1].round >= r.round) state.rounds.pop();
    state.rounds.push(r);
  }
  if (state.rounds.length > cap) state.rounds.splice(0, state.rounds.length - cap);
  // Evals land after the decision: ask again for the last few rounds until they have one.
  const pending = state.rounds.slice(-3).find((r) => r.eval_loss === null || r.eval_loss === undefined);
  const newest = state.rounds.length ? state.rounds[state.rounds.length - 1].round : null;
  state.since = pending ? (pending.round > 0 ? pending.round - 1 : null) : newest;
  const peers = await getJSON('/peers');

  setText('kind', 'diloco-node');
  setText('round', st.round);
  setText('phase', st.phase);
  setText('role', st.role);
  setText('group', st.group_size);
  setText('tolerates', st.group_size ? st.tolerates : null);
  const stalled = typeof st.stalled_s === 'number';
  $('stalled').hidden = !stalled;
  if (stalled) {
    $('stalled').textContent = 'stalled: no decision for ' + duration(st.stalled_s) + ' — fewer than ' +
      st.quorum + ' of the ' + st.group_size + ' members answer; rounds resume when enough come back';
  }
  setText('hash', st.global_hash ? st.global_hash.slice(0, 12) : '');
  $('hash').title = st.global_hash || '';
  setText('eval', num(st.eval_loss, 4));
  setText('train', num(st.last_loss, 4));
  setText('connected', st.connected_peers);
  setText('run', st.run_id ? st.run_id.slice(0, 16) : '');
  setText('uptime', duration(st.uptime_s));
  setText('sent', bytes(st.bytes_sent));
  setText('received', bytes(st.bytes_received));
  setText('rejected', st.rejected);
  setText('banned', st.banned);

  const rs = state.rounds;
  chart('chart-loss', [series('eval', rs, 'round', 'eval_loss'), series('train', rs, 'round', 'train_loss')], 'round');
  chart('chart-tps', [series('tokens/s', rs, 'round', 'tokens_per_s')], 'round', true);
  chart('chart-avg', [series('averaging', rs, 'round', 'averaging_s'), series('whole round', rs, 'round', 'round_s')], 'round', true);
  chart('chart-bytes', [series('sent', rs, 'round', 'bytes_sent'), series('received', rs, 'round', 'bytes_received')], 'round', true);
  chart('chart-members', [series('members', rs, 'round', 'members'), series('contributors', rs, 'round', 'contributors')], 'round', true);
  const now = st.uptime_s;
  table('peers-node', peers, [
    [(p) => p.peer_id, 'mono'],
    [(p) => duration(Math.max(0, now - p.last_seen_s)) + ' ago'],
    [(p) => p.round],
    [(p) => (p.member ? 'yes' : 'no')],
    [(p) => p.contributions],
    [(p) => p.rejections],
  ]);
  document.body.dataset.round = String(st.round);
}

async function pollBootstrap(st) {
  const [page, peers] = await Promise.all([getJSON('/history'), getJSON('/peers')]);
  setText('kind', 'diloco-bootstrap');
  setText('b-connections', st.connections);
  setText('b-peers', st.peers);
  setText('b-reservations', st.reservations);
  setText('b-circuits', st.circuits);
  setText('b-uptime', duration(st.uptime_s));
  setText('b-listen', (st.listen || []).join('  '));
  const ss = page.samples || [];
  chart('chart-boot', [
    series('connections', ss, 'at_s', 'connections'),
    series('reservations', ss, 'at_s', 'reservations'),
    series('circuits', ss, 'at_s', 'circuits'),
  ], 'seconds since start', true);
  const now = st.uptime_s;
  table('peers-boot', peers, [
    [(p) => p.peer_id, 'mono'],
    [(p) => p.agent],
    [(p) => (p.connected ? 'yes' : 'no')],
    [(p) => duration(Math.max(0, now - p.since_s)) + ' ago'],
    [(p) => (p.relay ? 'reserved' : '')],
    [(p) => p.address, 'mono'],
  ]);
}

async function poll() {
  try {
    const st = await getJSON('/status');
    const kind = st.kind === 'bootstrap' ? 'bootstrap' : 'node';
    if (kind !== state.kind) {
      state.kind = kind;
      $('node-view').hidden = kind !== 'node';
      $('boot-view').hidden = kind !== 'bootstrap';
      $('metrics-link').hidden = kind !== 'node';
      document.body.dataset.kind = kind;
    }
    setText('peer', short(st.peer_id, 12));
    $('peer').title = st.peer_id || '';
    if (kind === 'node') await pollNode(st); else await pollBootstrap(st);
    $('conn').textContent = 'live';
    $('conn').className = 'badge ok';
    state.renders++;
    document.body.dataset.rendered = String(state.renders);
  } catch (e) {
    // The peer stopped or restarts: say so and keep trying; not a page error.
    $('conn').textContent = 'not answering (' + e.message + ')';
    $('conn').className = 'badge bad';
  }
  setTimeout(poll, POLL_MS);
}

poll();
