// The Node socket.io peer of the benchmarks: the same broadcast server as
// chanhost's `bench` plugin. WebSocket transport only, no per-message
// deflate, the HTTP request object dropped to save memory (as the
// socket.io docs advise for many connections).
// usage: node server.mjs PORT [REDIS_URL]
// With REDIS_URL, the server is one node of a cluster on
// @socket.io/redis-adapter (node-redis as its client), as its docs set it up.
// With RECOVERY_WINDOW_MS in the environment, connection state recovery is
// on (the in-memory adapter's; one node only).
import { createServer } from 'node:http';
import { Server } from 'socket.io';

const port = Number(process.argv[2] ?? 3001);
const redisUrl = process.argv[3];
const http = createServer();
const recoveryWindow = Number(process.env.RECOVERY_WINDOW_MS ?? 0);
const io = new Server(http, {
  transports: ['websocket'],
  perMessageDeflate: false,
  serveClient: false,
  ...(recoveryWindow > 0 ? { connectionStateRecovery: { maxDisconnectionDuration: recoveryWindow } } : {}),
});

if (redisUrl) {
  const { createClient } = await import('redis');
  const { createAdapter } = await import('@socket.io/redis-adapter');
  const pub = createClient({ url: redisUrl });
  const sub = pub.duplicate();
  await Promise.all([pub.connect(), sub.connect()]);
  io.adapter(createAdapter(pub, sub));
}

io.engine.on('connection', (raw) => { raw.request = null; });
io.use((socket, next) => {
  const room = socket.handshake.auth?.room;
  if (typeof room === 'string') socket.join(room);
  next();
});
io.on('connection', (socket) => {
  socket.on('publish', (msg) => {
    if (msg && typeof msg.room === 'string') io.to(msg.room).emit('message', msg.data);
  });
});
http.listen(port, '127.0.0.1', () => console.log(`listening on 127.0.0.1:${port}`));
