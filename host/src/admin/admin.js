// chanhost operator page: renders the snapshots of /admin/api/stream and runs the operator actions.
// Server data (room names, user ids, plugin errors…) is attacker-controlled: it only ever reaches
// the DOM through textContent, append(string) and setAttribute — never innerHTML.
// Loaded as a module: strict, deferred, and its names stay out of the global scope.
const STREAM = '/admin/api/stream';
const SVGNS = 'http://www.w3.org/2000/svg';
const $ = (id) => document.getElementById(id);
const meta = (name) => document.querySelector(`meta[name="${name}"]`)?.getAttribute('content') ?? '';
const CSRF = meta('csrf-token');

let es = null;            // the EventSource
let retryTimer = 0;       // our own reconnect, when EventSource gave up (HTTP error)
let retryDelay = 2000;
let ended = false;        // the session ended: no more requests
let last = null;          // latest snapshot
let searching = false;    // the rooms table shows a search result, not the top rooms

class SessionEnded extends Error {
  constructor() { super('session ended'); this.name = 'SessionEnded'; }
}

// ---- DOM helpers

// Creates an element; props: {text, ...attributes}; children: nodes or strings (as text).
function el(tag, props, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (v == null || v === false) continue;
    if (k === 'text') e.textContent = String(v);
    else e.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children) if (c != null && c !== false) e.append(c instanceof Node ? c : String(c));
  return e;
}

function svgEl(tag, attrs, text) {
  const e = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
  if (text != null) e.textContent = String(text);
  return e;
}

function setText(id, text) {
  const e = $(id);
  if (e && e.textContent !== text) e.textContent = text;
}

// A state badge: its text says the state, data-state lets CSS colour it.
function setBadge(e, state) {
  const s = state == null ? 'unknown' : String(state);
  if (e.dataset.state !== s) { e.dataset.state = s; e.textContent = s; }
}
const badge = (state) => { const e = el('span', { class: 'badge' }); setBadge(e, state); return e; };

// <dl class="fields"> from [label, value] pairs; a value is a node or a string.
const fields = (rows) => el('dl', { class: 'fields' },
  ...rows.flatMap(([k, v]) => [el('dt', { text: k }), el('dd', {}, v == null || v === '' ? '–' : v)]));

// True while the user has selected text inside `box`: re-rendering would drop the selection.
function selecting(box) {
  const s = window.getSelection();
  return !!s && !s.isCollapsed && box.contains(s.anchorNode);
}

// Status messages for the actions and the room search (aria-live regions).
function say(id, text, kind) {
  const e = $(id);
  e.textContent = text;
  if (kind) e.dataset.kind = kind; else delete e.dataset.kind;
}
const status = (text, kind) => say('action-status', text, kind);
// Reports a failed request in #action-status (a SessionEnded is already shown by its banner).
function fail(what, err) {
  if (!(err instanceof SessionEnded)) status(`${what}: ${trimDot(err.message)}.`, 'error');
}

// ---- formatting

const arr = (v) => (Array.isArray(v) ? v : []);
const int = (v) => (Number.isFinite(v) ? String(Math.round(v)) : '–');
const plural = (n, one, many) => `${int(n)} ${n === 1 ? one : many}`;
const list = (v) => (arr(v).length ? arr(v).join(', ') : 'none');
const trimDot = (s) => String(s).replace(/\.$/, '');

function duration(ms) {
  if (!Number.isFinite(ms) || ms < 0) return '–';
  const s = Math.floor(ms / 1000), d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600);
  const m = Math.floor((s % 3600) / 60);
  if (d) return `${d}d ${h}h ${m}m`;
  if (h) return `${h}h ${m}m`;
  if (m) return `${m}m ${s % 60}s`;
  return `${s}s`;
}

const ago = (ms) => (!Number.isFinite(ms) ? 'unknown' : ms < 1000 ? `${Math.round(ms)} ms ago` : `${duration(ms)} ago`);

// Latency given in µs, shown in µs, ms or s.
function micros(us) {
  if (!Number.isFinite(us)) return 'n/a';
  if (us < 1000) return `${Math.round(us)} µs`;
  if (us < 1e6) return `${(us / 1000).toFixed(us < 1e4 ? 2 : 1)} ms`;
  return `${(us / 1e6).toFixed(2)} s`;
}

function timeEl(ms) {
  if (!Number.isFinite(ms)) return '–';
  const d = new Date(ms);
  return el('time', { datetime: d.toISOString(), text: d.toLocaleString() });
}

// ---- snapshot rendering

function render(s) {
  last = s;
  for (const fn of [renderNode, renderSummary, renderChart, renderTopRooms, renderPlugins, renderCluster]) {
    try { fn(s); } catch (err) { console.error(`chanhost admin: ${fn.name} failed`, err); }
  }
}

// Header: node id, version, uptime, listen address, time of the snapshot.
function renderNode(s) {
  const n = s.node || {};
  setText('node-id', String(n.id ?? '–'));
  setText('node-version', String(n.version ?? '–'));
  setText('node-listen', String(n.listen ?? '–'));
  setText('node-uptime', duration(n.now - n.started_at));
  if (Number.isFinite(n.started_at)) $('node-uptime').title = `Started ${new Date(n.started_at).toLocaleString()}`;
  setText('node-updated', Number.isFinite(n.now) ? new Date(n.now).toLocaleTimeString() : '–');
  if (n.id != null) document.title = `${n.id} · chanhost operator`;
}

// Summary cards and the totals under the chart.
function renderSummary(s) {
  const c = s.connections || {}, t = s.totals || {};
  const values = {
    'conn-total': c.total, 'conn-misskey': c.misskey, 'conn-sio-ws': c.socketio_websocket,
    'conn-sio-polling': c.socketio_polling, 'users-online': s.users_online, instances: s.instances,
    publishes: t.publishes, 'slow-closes': t.slow_consumer_closes, refused: t.refused_connections,
    'total-in': t.messages_in, 'total-out': t.frames_out,
  };
  for (const [id, v] of Object.entries(values)) setText(id, int(v));
}

// Rounds a maximum up to 1, 2 or 5 × 10^k so the scale label reads well.
function niceMax(v) {
  if (!(v > 0)) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  return [1, 2, 5, 10].map((m) => m * p).find((x) => x >= v);
}

// Chart: messages in (left scale) and frames out (right scale) per second, newest on the right.
// The viewBox follows the rendered width so labels stay at 13 CSS pixels on any screen.
function renderChart(s) {
  const r = s.rates || {};
  const every = Number.isFinite(r.every_ms) && r.every_ms > 0 ? r.every_ms : 1000;
  const clean = (v) => arr(v).map((n) => (Number.isFinite(n) && n > 0 ? n : 0));
  const ins = clean(r.messages_in), outs = clean(r.frames_out);
  const svg = $('chart');
  const W = Math.max(280, Math.round(svg.getBoundingClientRect().width) || 600), H = 200;
  const L = 52, R = 52, T = 14, B = 28;
  const slots = Math.max(300, ins.length, outs.length);
  const peakIn = Math.max(0, ...ins), peakOut = Math.max(0, ...outs);
  const maxIn = niceMax(peakIn), maxOut = niceMax(peakOut);
  const x = (i, n) => L + ((W - L - R) * (slots - n + i)) / (slots - 1);
  const y = (v, max) => H - B - ((H - T - B) * Math.min(Math.max(v, 0), max)) / max;
  const points = (vals, max) => vals.map((v, i) => `${x(i, vals.length).toFixed(1)},${y(v, max).toFixed(1)}`).join(' ');
  const mid = (T + H - B) / 2;
  const span = Math.round((slots * every) / 60000);
  svg.setAttribute('viewBox', `0 0 ${W} ${H}`);
  svg.replaceChildren(
    svgEl('line', { class: 'grid', x1: L, x2: W - R, y1: T, y2: T }),
    svgEl('line', { class: 'grid', x1: L, x2: W - R, y1: mid, y2: mid }),
    svgEl('line', { class: 'axis', x1: L, x2: L, y1: T, y2: H - B }),
    svgEl('line', { class: 'axis', x1: W - R, x2: W - R, y1: T, y2: H - B }),
    svgEl('line', { class: 'axis', x1: L, x2: W - R, y1: H - B, y2: H - B }),
    svgEl('text', { class: 'label-in', x: L - 6, y: T + 5, 'text-anchor': 'end' }, maxIn),
    svgEl('text', { x: L - 6, y: H - B + 4, 'text-anchor': 'end' }, 0),
    svgEl('text', { class: 'label-out', x: W - R + 6, y: T + 5 }, maxOut),
    svgEl('text', { x: W - R + 6, y: H - B + 4 }, 0),
    svgEl('text', { x: L, y: H - 8 }, span >= 1 ? `${span} min ago` : `${Math.round((slots * every) / 1000)} s ago`),
    svgEl('text', { x: W - R, y: H - 8, 'text-anchor': 'end' }, 'now'),
    svgEl('polyline', { class: 'line-in', points: points(ins, maxIn) }),
    svgEl('polyline', { class: 'line-out', points: points(outs, maxOut) }),
  );
  const latest = (v) => (v.length ? v[v.length - 1] : 0);
  svg.setAttribute('aria-label',
    `Messages in and frames out per second over the last ${span >= 1 ? `${span} minutes` : 'minute'}. ` +
    `Latest second: ${latest(ins)} messages in, ${latest(outs)} frames out. ` +
    `Peak: ${peakIn} messages in, ${peakOut} frames out.`);
}

// Rooms table body from a list of {name, members}.
let roomsKey = '';
function showRooms(rooms, caption) {
  const body = $('rooms');
  if (selecting(body.parentNode)) return;
  const key = JSON.stringify([caption, rooms]);
  if (key === roomsKey) return;
  roomsKey = key;
  setText('rooms-caption', caption);
  body.replaceChildren(...(rooms.length
    ? rooms.map((r) => el('tr', { 'data-room': String(r.name) },
      el('th', { scope: 'row', text: r.name }), el('td', { class: 'num', text: int(r.members) })))
    : [el('tr', {}, el('td', { colspan: 2, text: 'No rooms.' }))]));
}

// The largest rooms of the snapshot (unless a search result is shown).
function renderTopRooms(s) {
  const r = s.rooms || {};
  setText('rooms-count', int(r.count));
  if (searching) return;
  const top = arr(r.top);
  showRooms(top, `Largest rooms (${top.length} of ${int(r.count)})`);
}

// Plugins: one <article data-plugin> each; an article is rebuilt only when its data changed.
let pluginCache = [];   // [{json, node}] in server order
const noPlugins = el('p', { class: 'muted', text: 'No plugins loaded.' });
function renderPlugins(s) {
  const box = $('plugins');
  if (selecting(box)) return;
  const plugins = arr(s.plugins);
  pluginCache = plugins.map((p, i) => {
    const json = JSON.stringify(p);
    const old = pluginCache[i];
    return old && old.json === json ? old : { json, node: pluginCard(p) };
  });
  const nodes = plugins.length ? pluginCache.map((c) => c.node) : [noPlugins];
  if (nodes.length !== box.children.length || nodes.some((n, i) => box.children[i] !== n)) box.replaceChildren(...nodes);
}

// One plugin: state, fields, hooks table, last error.
function pluginCard(p) {
  const sha = String(p.sha256 ?? '');
  const err = p.last_error;
  return el('article', { class: 'plugin', 'data-plugin': String(p.name), 'data-state': p.state },
    el('h3', { text: p.name }),
    el('p', {}, 'State: ', badge(p.state)),
    fields([
      ['Version', p.version],
      ['File', el('code', { text: p.file })],
      ['SHA-256', sha ? el('code', { title: sha, text: sha.length > 12 ? `${sha.slice(0, 12)}…` : sha }) : null],
      ['WIT', p.wit],
      ['Channels', list(p.channels)],
      ['Namespaces', list(p.namespaces)],
      ['Loaded', timeEl(p.loaded_at)],
      ['Reloads', int(p.reloads)],
      ['Failures', int(p.failures)],
      ['Queue', int(p.queue)],
    ]),
    hooksTable(p.name, arr(p.hooks)),
    err
      ? el('div', { class: 'last-error' }, el('h4', {}, 'Last error, ', timeEl(err.at)), el('pre', { text: err.text }))
      : el('p', { class: 'muted', text: 'Last error: none.' }));
}

// Per-hook statistics of one plugin.
function hooksTable(name, hooks) {
  if (!hooks.length) return el('p', { class: 'muted', text: 'No hooks.' });
  const num = (text, bad) => el('td', { class: bad ? 'num bad' : 'num', text });
  return el('div', { class: 'scroll' }, el('table', { class: 'hooks' },
    el('caption', { text: `Hooks of ${name}` }),
    el('thead', {}, el('tr', {}, ...['Hook', 'Calls', 'Errors', 'Calls/s', 'p50', 'p99']
      .map((h, i) => el('th', { scope: 'col', class: i ? 'num' : null, text: h })))),
    el('tbody', {}, ...hooks.map((h) => el('tr', { 'data-hook': String(h.hook) },
      el('th', { scope: 'row', text: h.hook }),
      num(int(h.calls)),
      num(int(h.errors), h.errors > 0),
      num(Number.isFinite(h.per_sec) ? h.per_sec.toFixed(1) : '–'),
      num(micros(h.p50_us)),
      num(micros(h.p99_us)))))));
}

// Cluster: Redis, Misskey bus and Socket.IO adapter states, then the nodes table.
function renderCluster(s) {
  const c = s.cluster || {};
  setBadge($('cluster-redis'), c.redis);
  setBadge($('cluster-bus'), c.misskey_bus);
  setBadge($('cluster-adapter'), c.socketio_adapter);
  const body = $('cluster-nodes');
  if (selecting(body)) return;
  const nodes = arr(c.nodes);
  body.replaceChildren(...(nodes.length
    ? nodes.map((n) => el('tr', { 'data-node': String(n.id), 'data-self': n.self ? 'true' : null },
      el('th', { scope: 'row' }, String(n.id), n.self ? ' ' : null, n.self ? el('span', { class: 'tag', text: 'this node' }) : null),
      el('td', { text: ago(n.heartbeat_ms_ago) }),
      el('td', { class: 'num', text: n.connections == null ? 'unknown' : int(n.connections) })))
    : [el('tr', {}, el('td', { colspan: 3, text: 'No other nodes known.' }))]));
}

// ---- stream

function setStream(state, text) {
  const e = $('stream-state');
  if (e.dataset.state !== state) { e.dataset.state = state; e.textContent = text; }
}

function connect() {
  if (ended) return;
  es = new EventSource(STREAM);
  es.addEventListener('snapshot', (ev) => {
    setStream('live', 'live');
    retryDelay = 2000;
    let s;
    try { s = JSON.parse(ev.data); } catch (err) { console.error('chanhost admin: bad snapshot', err); return; }
    if (s && typeof s === 'object') render(s);
  });
  es.addEventListener('error', () => {
    if (ended) return;
    setStream('reconnecting', 'reconnecting…');
    // EventSource retries network errors by itself, but gives up on an HTTP error status.
    if (es.readyState === EventSource.CLOSED) { es.close(); probe(); }
  });
}

// Asks the stream URL once why it failed: 401/403 (or a login page) ends the session,
// anything else schedules a new EventSource with a growing delay.
async function probe() {
  const ctl = new AbortController();
  try {
    const res = await fetch(STREAM, { signal: ctl.signal, cache: 'no-store', headers: { accept: 'text/event-stream' } });
    const type = res.headers.get('content-type') || '';
    ctl.abort();
    if (res.status === 401 || res.status === 403 || res.redirected || (res.ok && !type.startsWith('text/event-stream'))) {
      endSession();
      return;
    }
  } catch { /* network down: retry below */ }
  clearTimeout(retryTimer);
  retryTimer = setTimeout(connect, retryDelay);
  retryDelay = Math.min(retryDelay * 2, 30000);
}

// The session is over: stop everything and offer a link to log in again (once).
function endSession() {
  if (ended) return;
  ended = true;
  es?.close();
  clearTimeout(retryTimer);
  setStream('ended', 'session ended');
  $('session-ended').replaceChildren('Your session has ended. ', el('a', { href: '/admin', text: 'Log in again' }), '.');
}

// JSON request to /admin/api; throws SessionEnded on 401/403, Error(server message) on other failures.
async function api(path, init = {}) {
  if (ended) throw new SessionEnded();
  const res = await fetch(path, { cache: 'no-store', ...init, headers: { accept: 'application/json', ...init.headers } });
  if (res.status === 401 || res.status === 403 || res.redirected) { endSession(); throw new SessionEnded(); }
  let body = null;
  try { body = await res.json(); } catch { /* not JSON */ }
  if (!res.ok) throw new Error(body && typeof body.error === 'string' ? body.error : `HTTP ${res.status}`);
  if (body == null) throw new Error('the answer was not JSON');
  return body;
}

// ---- room search

let searchTimer = 0, searchCtl = null;

function onSearchInput() {
  clearTimeout(searchTimer);
  const q = $('room-search').value.trim();
  if (!q) {
    searchCtl?.abort();
    if (searching) say('rooms-status', 'Showing the largest rooms.');
    searching = false;
    if (last) renderTopRooms(last);
    return;
  }
  searchTimer = setTimeout(() => searchRooms(q), 250);
}

async function searchRooms(q) {
  searchCtl?.abort();
  searchCtl = new AbortController();
  try {
    const r = await api(`/admin/api/rooms?q=${encodeURIComponent(q)}&limit=50`, { signal: searchCtl.signal });
    if ($('room-search').value.trim() !== q) return;
    const rooms = arr(r.rooms), count = Number.isFinite(r.count) ? r.count : rooms.length;
    searching = true;
    showRooms(rooms, `Rooms matching “${q}” (${rooms.length} of ${count})`);
    say('rooms-status', `${plural(count, 'room matches', 'rooms match')} “${q}”.`);
  } catch (err) {
    if (err.name === 'AbortError' || err instanceof SessionEnded) return;
    say('rooms-status', `Search failed: ${trimDot(err.message)}.`, 'error');
  }
}

// ---- actions

// Runs an action once at a time; the button stays focusable (aria-disabled, not disabled).
async function busy(button, fn) {
  if (button.getAttribute('aria-disabled') === 'true') return;
  button.setAttribute('aria-disabled', 'true');
  try { await fn(); } finally { button.removeAttribute('aria-disabled'); }
}

function onDisconnect(ev) {
  ev.preventDefault();
  const input = $('disconnect-user'), user = input.value.trim();
  if (!user) { status('Enter the user id to disconnect.', 'error'); input.focus(); return; }
  busy($('disconnect-button'), async () => {
    if (!window.confirm(`Disconnect every connection of user “${user}” on all nodes?`)) {
      status('Nothing was disconnected.');
      return;
    }
    status(`Disconnecting ${user}…`);
    try {
      const r = await api('/admin/api/disconnect', {
        method: 'POST',
        headers: { 'content-type': 'application/json', 'x-csrf-token': CSRF },
        body: JSON.stringify({ user }),
      });
      const n = Number.isFinite(r.connections) ? r.connections : 0;
      status(`Disconnected ${plural(n, 'connection', 'connections')} of ${user}.`, 'ok');
    } catch (err) {
      fail(`Could not disconnect ${user}`, err);
    }
  });
}

function onInspect(ev) {
  ev.preventDefault();
  const id = $('inspect-connection').value.trim(), user = $('inspect-user').value.trim();
  if (!id && !user) { status('Enter a connection id or a user id.', 'error'); $('inspect-connection').focus(); return; }
  if (id && !/^\d+$/.test(id)) { status('A connection id is a whole number.', 'error'); $('inspect-connection').focus(); return; }
  busy($('inspect-button'), async () => {
    $('inspect-list').replaceChildren();
    $('inspect-detail').replaceChildren();
    if (user) await listConnections(user);
    if (id) await showConnection(id);
  });
}

// The connections of a user on this node, as buttons that open their details.
async function listConnections(user) {
  try {
    const conns = arr((await api(`/admin/api/connections?user=${encodeURIComponent(user)}`)).connections);
    const box = $('inspect-list');
    status(`${plural(conns.length, 'connection', 'connections')} of ${user} on this node.`);
    if (!conns.length) return;
    box.replaceChildren(el('h4', { text: `Connections of ${user}` }), el('ul', { class: 'conn-list' },
      ...conns.map((c) => {
        const b = el('button', { type: 'button', class: 'link', 'data-connection': String(c.id) },
          `#${c.id} · ${c.protocol} · ${c.transport}${c.user != null ? ` · ${c.user}` : ''}`);
        b.addEventListener('click', () => busy(b, async () => { (await showConnection(String(c.id)))?.focus(); }));
        return el('li', {}, b);
      })));
  } catch (err) {
    fail(`Could not list the connections of ${user}`, err);
  }
}

// One connection's details as a definition list; returns its heading (to move focus there).
async function showConnection(id) {
  const box = $('inspect-detail');
  try {
    const c = await api(`/admin/api/connections/${encodeURIComponent(id)}`);
    const who = c.identity, q = c.queue || {}, inst = arr(c.instances), rooms = arr(c.rooms);
    const h = el('h4', { tabindex: '-1', text: `Connection ${c.id}` });
    box.replaceChildren(h, fields([
      ['Id', String(c.id)],
      ['Protocol', c.protocol],
      ['Transport', c.transport],
      ['Address', c.address ?? 'unknown'],
      ['User', who ? (who.user ?? 'none') : 'anonymous'],
      ['Claims', who && who.claims != null ? el('pre', { text: JSON.stringify(who.claims, null, 2) }) : 'none'],
      ['Instances', inst.length
        ? el('ul', {}, ...inst.map((i) => el('li', {}, el('code', { text: i.id }), ` — plugin ${i.plugin}, channel ${i.channel}`)))
        : 'none'],
      ['Rooms', rooms.length ? el('ul', {}, ...rooms.map((r) => el('li', { text: r }))) : 'none'],
      ['Queue', `${plural(q.frames, 'frame', 'frames')}, ${plural(q.bytes, 'byte', 'bytes')}`],
    ]));
    status(`Showing connection ${c.id}.`);
    return h;
  } catch (err) {
    box.replaceChildren();
    fail(`Connection ${id}`, err);
    return null;
  }
}

// ---- start

// The logout form is in page.html, hidden; shown when the server says there is a session cookie.
const logout = $('logout');
logout.elements.namedItem('csrf').value = CSRF;
if (meta('chanhost-logout') === 'yes') logout.hidden = false;

$('room-search').addEventListener('input', onSearchInput);
$('room-search-form').addEventListener('submit', (ev) => {
  ev.preventDefault();
  clearTimeout(searchTimer);
  const q = $('room-search').value.trim();
  if (q) searchRooms(q); else onSearchInput();
});
$('disconnect-form').addEventListener('submit', onDisconnect);
$('inspect-form').addEventListener('submit', onInspect);
connect();
