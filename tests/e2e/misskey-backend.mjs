// A double of the few Misskey API endpoints the Misskey plugins call
// (`POST /api/<endpoint>` with the user's token as `i`), backed by plain
// objects a test fills in. It answers like Misskey: 200 with JSON, 400
// with {error} for a missing object, 401 for an unknown token, 403 when
// the token lacks the endpoint's permission. Every call is recorded.
import http from 'node:http';
import { once } from 'node:events';

/** Token permissions (`kind`) the endpoints require, as Misskey declares them. */
const KIND = {
  i: 'read:account',
  'mute/list': 'read:mutes',
  'renote-mute/list': 'read:mutes',
  'channels/followed': 'read:channels',
  'users/lists/show': 'read:account',
  'antennas/show': 'read:account',
  'chat/history': 'read:chat',
  'chat/rooms/show': 'read:chat',
  'chat/rooms/members': 'read:chat',
  'notifications/mark-all-as-read': 'write:notifications',
  'chat/messages/user-timeline': 'read:chat',
  'chat/messages/room-timeline': 'read:chat',
};

function page(items, { limit = 10, untilId } = {}) {
  // Misskey pages newest first (ids descending); untilId excludes newer ones.
  const sorted = [...items].sort((a, b) => (a.id < b.id ? 1 : -1));
  const from = untilId ? sorted.filter((x) => x.id < untilId) : sorted;
  return from.slice(0, Math.min(limit, 100));
}

export async function startBackend() {
  const db = {
    /** token -> { user, permissions? (an app token's kinds; absent = every kind) } */
    tokens: {},
    /** userId -> { following: [{id, withReplies}], mutes: [], renoteMutes: [], channels: [] } */
    relations: {},
    lists: {}, // listId -> { userId, userIds }
    antennas: {}, // antennaId -> { userId }
    roles: {}, // roleId -> { isPublic, isExplorable }
    notes: {}, // noteId -> packed note
    rooms: {}, // roomId -> { ownerId, members: [] }
    basePolicies: {}, // the default role policies (`meta`)
    withReplies: {}, // "<follower>:<followee>" -> the follow's withReplies
    calls: [],
    delays: {}, // endpoint -> ms to wait before answering
    host: null, // the chanhost under test, for endpoints that publish back
  };
  const rel = (id) => db.relations[id] ?? { following: [], mutes: [], renoteMutes: [], channels: [] };
  const handlers = {
    i: (me) => me,
    meta: () => ({ policies: db.basePolicies }),
    'users/show': (me, p) => ({ id: p.userId, withReplies: !!db.withReplies[`${me.id}:${p.userId}`] }),
    'chat/rooms/show': (me, p) => (db.rooms[p.roomId] ? { id: p.roomId, ownerId: db.rooms[p.roomId].ownerId } : [400, { error: { code: 'NO_SUCH_ROOM' } }]),
    'chat/rooms/members': (me, p) => page((db.rooms[p.roomId]?.members ?? []).map((u, n) => ({ id: `mb${n}`, userId: u, user: { id: u } })), p),
    'users/following': (me, p) => page(rel(p.userId).following.map((f, n) => ({
      id: `fw${String(n).padStart(6, '0')}`, followerId: p.userId, followeeId: f.id, followee: { id: f.id, withReplies: !!f.withReplies },
    })), p),
    'mute/list': (me, p) => page(rel(me.id).mutes.map((u, n) => ({ id: `mu${n}`, muteeId: u })), p),
    'renote-mute/list': (me, p) => page(rel(me.id).renoteMutes.map((u, n) => ({ id: `rm${n}`, muteeId: u })), p),
    'channels/followed': (me, p) => page(rel(me.id).channels.map((c) => ({ id: c, name: c })), p),
    'users/lists/show': (me, p) => {
      const l = db.lists[p.listId];
      if (!l || l.userId !== me.id) return [400, { error: { code: 'NO_SUCH_LIST' } }];
      return { id: p.listId, name: p.listId, userIds: l.userIds, isPublic: false };
    },
    'antennas/show': (me, p) => {
      const a = db.antennas[p.antennaId];
      if (!a || a.userId !== me.id) return [400, { error: { code: 'NO_SUCH_ANTENNA' } }];
      return { id: p.antennaId };
    },
    'roles/show': (me, p) => {
      const r = db.roles[p.roleId];
      if (!r || !r.isPublic) return [400, { error: { code: 'NO_SUCH_ROLE' } }];
      return { id: p.roleId, ...r };
    },
    'notes/show': (me, p) => db.notes[p.noteId] ?? [400, { error: { code: 'NO_SUCH_NOTE' } }],
    'notifications/mark-all-as-read': () => null,
    'chat/history': () => [],
    'chat/messages/user-timeline': () => [],
    'chat/messages/room-timeline': (me, p) => {
      const r = db.rooms[p.roomId];
      if (!r || !(r.ownerId === me.id || r.members.includes(me.id))) return [400, { error: { code: 'NO_SUCH_ROOM' } }];
      return [];
    },
    // Not a Misskey endpoint: what an operator adds so reversi moves made
    // over the stream reach the game (Misskey takes them only over its own
    // stream). This one records the move and publishes Misskey's answer.
    'chanhost/reversi-game': async (me, p) => {
      if (p.type === 'putStone') {
        await db.host.publish({ channel: `reversiGameStream:${p.gameId}`, message: { type: 'log', body: { time: 0, player: true, operation: 'put', pos: p.body.pos, id: p.body.id } } });
      }
      return null;
    },
  };
  const server = http.createServer((req, res) => {
    let body = '';
    req.on('data', (d) => { body += d; });
    req.on('end', async () => {
      const endpoint = req.url.replace(/^\/api\//, '');
      const send = (status, obj) => {
        if (obj === null || obj === undefined) { res.writeHead(204).end(); return; }
        res.writeHead(status, { 'content-type': 'application/json' }).end(JSON.stringify(obj));
      };
      let p;
      try { p = JSON.parse(body || '{}'); } catch { send(400, { error: { code: 'INVALID_JSON' } }); return; }
      db.calls.push({ endpoint, params: p });
      if (db.delays[endpoint]) await new Promise((r) => setTimeout(r, db.delays[endpoint]));
      const handler = handlers[endpoint];
      if (!handler) { send(404, { error: { code: 'NO_SUCH_ENDPOINT' } }); return; }
      const token = db.tokens[p.i];
      const needsUser = !['roles/show', 'users/following', 'notes/show', 'meta', 'users/show'].includes(endpoint);
      if (needsUser && !token) { send(401, { error: { code: 'CREDENTIAL_REQUIRED' } }); return; }
      const kind = KIND[endpoint];
      if (token?.permissions && kind && !token.permissions.includes(kind)) { send(403, { error: { code: 'PERMISSION_DENIED' } }); return; }
      const out = await handler(token?.user, p);
      if (Array.isArray(out) && typeof out[0] === 'number') send(out[0], out[1]);
      else send(200, out);
    });
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const origin = `http://127.0.0.1:${server.address().port}`;
  return {
    db,
    origin,
    /** Calls made to an endpoint so far. */
    calls: (endpoint) => db.calls.filter((c) => c.endpoint === endpoint),
    /** Host config pointing auth and the Misskey plugins at this double;
     * `misskey`: more keys of `[plugins.misskey]`, `extra`: more TOML. */
    config: (extra = '', misskey = '') => `[auth.backend]
url = "${origin}/api/i"
[plugins.misskey]
backend = "${origin}"
allow_http = ["${origin}"]
${misskey}
[plugins.misskey-streams]
backend = "${origin}"
allow_http = ["${origin}"]
reversi_endpoint = "chanhost/reversi-game"
${extra}`,
    close: () => server.close(),
  };
}
