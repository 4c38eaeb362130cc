import { startHost, sleep, until, API_KEY } from '/work/main/tests/e2e/helpers.mjs';
import { io as connect } from 'socket.io-client';
import { once } from 'node:events';
const host = await startHost({ plugins: ['socketio-conformance'], env: { CHANHOST_LOG: 'chanhost=debug' }, config: `[socketio]\nping_interval_ms = 200\nping_timeout_ms = 300\n[socketio.recovery]\n` });
const s = connect(host.url, { auth: { room: 'busy' }, transports: ['websocket'], forceNew: true, reconnectionDelay: 700, reconnectionDelayMax: 700, randomizationFactor: 0 });
s.got = []; s.onAny((e, d) => { if (e === 'tick') s.got.push(d.n); });
s.on('disconnect', (r) => console.log(Date.now() % 100000, 'disconnect', r, s.got.length));
s.on('connect', () => console.log(Date.now() % 100000, 'connect', s.recovered, s.got.length));
await once(s, 'connect');
let n = 0;
const t0 = Date.now();
while (Date.now() - t0 < 8000) {
  n++;
  await fetch(`${host.url}/api/publish`, { method: 'POST', headers: { 'content-type': 'application/json', authorization: `Bearer ${API_KEY}` }, body: JSON.stringify({ room: 'busy', event: 'tick', data: { n } }) });
  await sleep(5);
}
await sleep(1000);
console.log('n', n, 'got', s.got.length, 'first gap', s.got.findIndex((v, i) => v !== i + 1));
s.close();
console.log(host.stderr.split('\n').filter(l => /recover|session closed/.test(l)).slice(-10).join('\n'));
await host.stop();
