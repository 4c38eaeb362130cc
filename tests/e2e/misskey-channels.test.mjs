// Misskey's channel catalog (plugins `misskey` and `misskey-streams`)
// against a running host, with misskey-js and raw frames, and a double of
// the Misskey API endpoints the plugins call (misskey-backend.mjs).
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  startHost, barrier, collect, until, rawStream, sendJson, frame, note, touchPlugin,
} from './helpers.mjs';
import { startBackend } from './misskey-backend.mjs';

const POLICIES = { ltlAvailable: true, gtlAvailable: true };
const user = (id, extra = {}) => ({ id, username: id, host: null, isModerator: false, isAdmin: false, mutedInstances: [], policies: POLICIES, ...extra });

/** A packed note by `userId` (a local user unless `host` is given). */
function by(userId, overrides = {}, host = null) {
  return note({ userId, user: { id: userId, username: userId, host }, ...overrides });
}

/** Publishes notes (Misskey's bus shape) and then a sentinel every channel
 * in `chans` receives; returns the ids each got before the sentinel. */
async function timeline(host, chans, notes, sentinel) {
  const got = Object.fromEntries(Object.entries(chans).map(([k, c]) => [k, collect(c, 'note')]));
  await host.publish([...notes, sentinel].map((n) => ({ channel: 'notesStream', message: n })));
  await until(() => Object.values(got).every((g) => g.some((n) => n.id === sentinel.id)), 10000, 'the sentinel everywhere');
  const ids = {};
  for (const [k, g] of Object.entries(got)) ids[k] = g.filter((n) => n.id !== sentinel.id).map((n) => n.id);
  return { ids, got };
}

/** Names of `notes` (an object name -> note) whose ids are in `ids`, in order. */
const names = (notes, ids) => ids.map((id) => Object.keys(notes).find((k) => notes[k].id === id) ?? id);

/** Whether a channel opens on a new stream: connect with pong, then a probe
 * connect; the host handles a stream's frames in order. */
async function opens(host, token, channel, params = {}) {
  const ws = await rawStream(host, token ? `?i=${token}` : '');
  sendJson(ws, { type: 'connect', body: { channel, id: 'x', params, pong: true } });
  sendJson(ws, { type: 'connect', body: { channel: 'probe', id: 'p', params: {}, pong: true } });
  await frame(ws, (f) => f.type === 'connected' && f.body.id === 'p');
  const ok = ws.frames.some((f) => { const j = JSON.parse(f); return j.type === 'connected' && j.body.id === 'x'; });
  ws.terminate();
  return ok;
}

describe('misskey channel catalog', () => {
  let host;
  let backend;
  before(async () => {
    backend = await startBackend();
    const { db } = backend;
    db.tokens = {
      'mk-me': { user: user('m1', { mutedInstances: ['muted.example'] }) },
      'mk-other': { user: user('m2') },
      'mk-mod': { user: user('mod', { isModerator: true }) },
      'mk-app': { user: user('m1', { mutedInstances: ['muted.example'] }), permissions: ['read:account'] },
      'mk-noltl': { user: user('m3', { policies: { ltlAvailable: false, gtlAvailable: true } }) },
      'mk-many': { user: user('m4') },
      'mk-slow': { user: user('m5') },
    };
    const bulk = Array.from({ length: 150 }, (_, i) => ({ id: `bulk${i}` }));
    db.relations = {
      m1: { following: [{ id: 'f1' }, { id: 'f2', withReplies: true }, { id: 'rmu' }, ...bulk], mutes: ['mu'], renoteMutes: ['rmu'], channels: ['ch1'] },
      m4: { following: [{ id: 'f1' }], mutes: [], renoteMutes: [], channels: [] },
    };
    db.lists = { l1: { userId: 'm1', userIds: ['f1', 'x1'] }, l2: { userId: 'm2', userIds: ['f1'] } };
    db.antennas = { a1: { userId: 'm1' }, a2: { userId: 'm2' } };
    db.roles = { r1: { isPublic: true, isExplorable: true }, r2: { isPublic: true, isExplorable: false }, r3: { isPublic: true, isExplorable: true } };
    db.rooms = { room1: { ownerId: 'm2', members: ['m1'] }, room2: { ownerId: 'm2', members: [] } };
    // Visitors may not see the global timeline on this instance.
    db.basePolicies = { ltlAvailable: true, gtlAvailable: false };
    db.withReplies = { 'm1:s7': true };
    host = await startHost({ plugins: ['misskey', 'misskey-streams', 'probe'], config: backend.config() });
    db.host = host;
  });
  after(async () => { await host.stop(); backend.close(); });

  test('homeTimeline: followed users, oneself and followed channels, with Misskey\'s visibility, reply and mute rules', async () => {
    const me = host.stream('mk-me');
    const chans = {
      home: me.useChannel('homeTimeline', {}),
      noRenotes: me.useChannel('homeTimeline', { withRenotes: false }),
      files: me.useChannel('homeTimeline', { withFiles: true }),
    };
    await barrier(me);
    const s1Followers = by('s1', { visibility: 'followers', text: 'secret', fileIds: ['f9'] });
    const notes = {
      followed: by('f1'),
      stranger: by('s1'),
      mine: by('m1'),
      followedFollowersOnly: by('f1', { visibility: 'followers' }),
      strangerFollowersOnly: by('s1', { visibility: 'followers' }),
      specifiedToMe: by('f1', { visibility: 'specified', visibleUserIds: ['m1'] }),
      specifiedToOther: by('f1', { visibility: 'specified', visibleUserIds: ['x9'] }),
      replyToStranger: by('f1', { replyId: 'r', reply: by('s1') }),
      replyWithRepliesOn: by('f2', { replyId: 'r', reply: by('s1') }),
      replyToMe: by('f1', { replyId: 'r', reply: by('m1') }),
      selfReply: by('f1', { replyId: 'r', reply: by('f1') }),
      replyToUnseenFollowersOnly: by('f2', { replyId: 'r', reply: by('s1', { visibility: 'followers' }) }),
      renoteOfMuted: by('f1', { text: null, renoteId: 'x', renote: by('mu') }),
      renote: by('f1', { text: null, renoteId: 'x', renote: by('s1') }),
      followedChannel: by('s1', { channelId: 'ch1' }),
      otherChannel: by('s1', { channelId: 'ch2' }),
      withFiles: by('f1', { fileIds: ['f1'] }),
      secondPageFollowee: by('bulk140'),
      renoteMutedRenote: by('rmu', { text: null, renoteId: 'x', renote: by('s1') }),
      renoteMutedQuote: by('rmu', { text: 'q', renoteId: 'x', renote: by('s1') }),
      quoteOfUnseen: by('f1', { text: 'look', renoteId: s1Followers.id, renote: s1Followers }),
    };
    const { ids, got } = await timeline(host, chans, Object.values(notes), by('f1', { fileIds: ['f2'] }));
    const seen = ['followed', 'mine', 'followedFollowersOnly', 'specifiedToMe', 'replyWithRepliesOn', 'replyToMe', 'selfReply', 'renote', 'followedChannel', 'withFiles', 'secondPageFollowee', 'renoteMutedQuote', 'quoteOfUnseen'];
    assert.deepEqual(names(notes, ids.home), seen);
    assert.deepEqual(names(notes, ids.noRenotes), seen.filter((n) => n !== 'renote'));
    assert.deepEqual(names(notes, ids.files), ['withFiles']);
    // The followers-only note inside the quote is blanked, as Misskey hides it.
    const quote = got.home.find((n) => n.id === notes.quoteOfUnseen.id);
    assert.equal(quote.text, 'look');
    assert.equal(quote.renote.isHidden, true);
    assert.equal(quote.renote.text, null);
    assert.deepEqual(quote.renote.fileIds, []);
  });

  test('localTimeline and hybridTimeline: anonymous and signed-in viewers, withReplies, renote mutes, requireSigninToViewContents', async () => {
    const anon = host.stream();
    const me = host.stream('mk-me');
    const other = host.stream('mk-other');
    const chans = {
      anon: anon.useChannel('localTimeline', {}),
      me: me.useChannel('localTimeline', {}),
      meReplies: me.useChannel('localTimeline', { withReplies: true }),
      hybrid: me.useChannel('hybridTimeline', {}),
      other: other.useChannel('localTimeline', {}),
    };
    for (const s of [anon, me, other]) await barrier(s);
    const notes = {
      local: by('s1'),
      remote: by('s1', {}, 'remote.example'),
      followedRemote: by('f1', {}, 'remote.example'),
      home: by('s1', { visibility: 'home' }),
      inChannel: by('s1', { channelId: 'ch2' }),
      signinOnly: by('s1', { user: { id: 's1', username: 's1', host: null, requireSigninToViewContents: true } }),
      replyBetweenOthers: by('s1', { replyId: 'r', reply: by('s2') }),
      renoteMutedRenote: by('rmu', { text: null, renoteId: 'x', renote: by('s1') }),
      muted: by('mu'),
    };
    const { ids } = await timeline(host, chans, Object.values(notes), by('s1'));
    assert.deepEqual(names(notes, ids.anon), ['local', 'replyBetweenOthers', 'renoteMutedRenote', 'muted']);
    assert.deepEqual(names(notes, ids.me), ['local', 'signinOnly']);
    assert.deepEqual(names(notes, ids.meReplies), ['local', 'signinOnly', 'replyBetweenOthers']);
    assert.deepEqual(names(notes, ids.hybrid), ['local', 'followedRemote', 'signinOnly']);
    assert.deepEqual(names(notes, ids.other), ['local', 'signinOnly', 'renoteMutedRenote', 'muted']);
    // A role without the local timeline cannot open it (Misskey's ltlAvailable policy).
    assert.equal(await opens(host, 'mk-noltl', 'localTimeline'), false);
    assert.equal(await opens(host, 'mk-noltl', 'hybridTimeline'), false);
    assert.equal(await opens(host, 'mk-noltl', 'globalTimeline'), true);
    // Visitors get the instance's default policies.
    assert.equal(await opens(host, null, 'globalTimeline'), false);
    assert.equal(await opens(host, null, 'localTimeline'), true);
  });

  test('relations follow Misskey\'s internal events: follow, mute, blocks, muted instances, followed channels', async () => {
    const me = host.stream('mk-me');
    const other = host.stream('mk-other');
    const chans = { home: me.useChannel('homeTimeline', {}), gtl: me.useChannel('globalTimeline', {}), otherGtl: other.useChannel('globalTimeline', {}) };
    await barrier(me);
    await barrier(other);
    const internal = (type, body) => ({ channel: 'internal', message: { type, body } });
    await host.publish([
      internal('follow', { followerId: 'm1', followeeId: 's7' }),
      internal('mute', { muterId: 'm1', muteeId: 's8' }),
      internal('blockingCreated', { blockerId: 'bl', blockeeId: 'm1' }),
      internal('followChannel', { userId: 'm1', channelId: 'ch7' }),
      internal('unfollow', { followerId: 'm1', followeeId: 'f1' }),
    ]);
    // Whether the new follow includes replies is looked up (users/show)
    // without holding up the plugin: it applies once the answer is in.
    await until(async () => {
      const reply = by('s7', { replyId: 'r', reply: by('s1') });
      return (await timeline(host, { home: chans.home }, [reply], by('m1'))).ids.home.length === 1;
    }, 5000, 'the follow\'s withReplies looked up');
    const notes = {
      newlyFollowed: by('s7'),
      replyByNewFolloweeWithReplies: by('s7', { replyId: 'r', reply: by('s1') }),
      newlyMuted: by('s8'),
      blocker: by('bl'),
      mutedInstance: by('r1', {}, 'muted.example'),
      replyToMuted: by('s1', { replyId: 'r', reply: by('mu') }),
      newChannel: by('s1', { channelId: 'ch7' }),
      unfollowed: by('f1'),
    };
    const { ids } = await timeline(host, chans, Object.values(notes), by('m1'));
    assert.deepEqual(names(notes, ids.home), ['newlyFollowed', 'replyByNewFolloweeWithReplies', 'newChannel']);
    assert.deepEqual(names(notes, ids.gtl), ['newlyFollowed', 'replyByNewFolloweeWithReplies', 'unfollowed']);
    assert.deepEqual(names(notes, ids.otherGtl), ['newlyFollowed', 'replyByNewFolloweeWithReplies', 'newlyMuted', 'blocker', 'mutedInstance', 'replyToMuted', 'unfollowed']);
    await host.publish([
      internal('blockingDeleted', { blockerId: 'bl', blockeeId: 'm1' }),
      internal('updateUserProfile', { userId: 'm1', mutedInstances: [] }),
      internal('follow', { followerId: 'm1', followeeId: 'f1' }),
    ]);
    const again = { blocker: by('bl'), formerlyMutedInstance: by('r1', {}, 'muted.example') };
    const second = await timeline(host, { gtl: chans.gtl }, Object.values(again), by('f1'));
    assert.deepEqual(names(again, second.ids.gtl), ['blocker', 'formerlyMutedInstance']);
    await host.publish(internal('updateUserProfile', { userId: 'm1', mutedInstances: ['muted.example'] }));
  });

  test('the per-user stream of older Misskey versions keeps relations current too', async () => {
    const s = host.stream('mk-many');
    const home = s.useChannel('homeTimeline', {});
    await barrier(s);
    const user = (type, body) => ({ channel: 'user:m4', message: { type, body } });
    await host.publish([user('follow', { id: 's3', username: 's3' }), user('unfollow', { id: 'f1' }), user('followChannel', { id: 'ch3' })]);
    const notes = { followed: by('s3'), unfollowed: by('f1'), channel: by('s1', { channelId: 'ch3' }) };
    const { ids } = await timeline(host, { home }, Object.values(notes), by('m4'));
    assert.deepEqual(names(notes, ids.home), ['followed', 'channel']);
    await host.publish(user('follow', { id: 'f1' }));
  });

  test('userList: the list\'s members, kept current; only the owner may open it', async () => {
    const me = host.stream('mk-me');
    const list = me.useChannel('userList', { listId: 'l1' });
    const noRenotes = me.useChannel('userList', { listId: 'l1', withRenotes: false });
    await barrier(me);
    const added = collect(list, 'userAdded');
    await host.publish([
      { channel: 'internal', message: { type: 'userListMemberAdded', body: { userListId: 'l1', memberId: 's5' } } },
      { channel: 'userListStream:l1', message: { type: 'userAdded', body: { id: 's5', username: 's5' } } },
    ]);
    const notes = {
      member: by('f1'),
      otherMember: by('x1'),
      nonMember: by('s1'),
      memberInChannel: by('f1', { channelId: 'ch1' }),
      newMember: by('s5'),
      memberRenote: by('x1', { text: null, renoteId: 'z', renote: by('s1') }),
      memberReplyToOther: by('x1', { replyId: 'r', reply: by('s1') }),
    };
    const { ids } = await timeline(host, { list, noRenotes }, Object.values(notes), by('f1'));
    assert.deepEqual(names(notes, ids.list), ['member', 'otherMember', 'newMember', 'memberRenote']);
    assert.deepEqual(names(notes, ids.noRenotes), ['member', 'otherMember', 'newMember']);
    assert.deepEqual(added, [{ id: 's5', username: 's5' }]);
    assert.equal(await opens(host, 'mk-me', 'userList', { listId: 'l2' }), false, 'another user\'s list');
    assert.equal(await opens(host, 'mk-me', 'userList', {}), false, 'no listId');
    assert.equal(await opens(host, null, 'userList', { listId: 'l1' }), false, 'anonymous');
  });

  test('hashtag: an OR of AND groups, case-insensitive; visibility; invalid queries refused', async () => {
    const anon = host.stream();
    const me = host.stream('mk-me');
    const q = [['a', 'b'], ['C']];
    const chans = { anon: anon.useChannel('hashtag', { q }), me: me.useChannel('hashtag', { q }), onlyB: me.useChannel('hashtag', { q: [['b']] }) };
    await barrier(anon);
    await barrier(me);
    const notes = {
      both: by('s1', { tags: ['a', 'b'] }),
      onlyA: by('s1', { tags: ['a'] }),
      upperC: by('s1', { tags: ['c'] }),
      followersOnlyOfFollowed: by('f1', { tags: ['c'], visibility: 'followers' }),
      muted: by('mu', { tags: ['c'] }),
      none: by('s1'),
    };
    const { ids } = await timeline(host, chans, Object.values(notes), by('s1', { tags: ['a', 'b', 'c'] }));
    assert.deepEqual(names(notes, ids.anon), ['both', 'upperC', 'muted']);
    assert.deepEqual(names(notes, ids.me), ['both', 'upperC', 'followersOnlyOfFollowed']);
    assert.deepEqual(names(notes, ids.onlyB), ['both']);
    for (const bad of [{}, { q: 'a' }, { q: [[]] }, { q: [[1]] }]) {
      assert.equal(await opens(host, null, 'hashtag', bad), false, JSON.stringify(bad));
    }
  });

  test('roleTimeline: public notes of an explorable role until Misskey says it is not', async () => {
    const anon = host.stream();
    const role = anon.useChannel('roleTimeline', { roleId: 'r1' });
    const sentinelRole = anon.useChannel('roleTimeline', { roleId: 'r3' });
    await barrier(anon);
    const got = collect(role, 'note');
    const sentinels = collect(sentinelRole, 'note');
    const pub = (roleId, n) => ({ channel: `roleTimelineStream:${roleId}`, message: { type: 'note', body: n } });
    const open = by('s1');
    await host.publish([pub('r1', by('s1', { visibility: 'followers' })), pub('r1', open), pub('r3', by('s1'))]);
    await until(() => sentinels.length === 1);
    assert.deepEqual(got.map((n) => n.id), [open.id]);
    await host.publish([
      { channel: 'internal', message: { type: 'roleUpdated', body: { id: 'r1', isExplorable: false } } },
      pub('r1', by('s1')),
      pub('r3', by('s1')),
    ]);
    await until(() => sentinels.length === 2);
    assert.equal(got.length, 1, 'no note once the role is no longer explorable');
    assert.equal(await opens(host, null, 'roleTimeline', { roleId: 'r2' }), false, 'not explorable');
    assert.equal(await opens(host, null, 'roleTimeline', { roleId: 'nope' }), false, 'unknown role');
  });

  test('antenna: Misskey\'s bare note record is packed for the owner through the API; only the owner may open it', async () => {
    const me = host.stream('mk-me');
    const antenna = me.useChannel('antenna', { antennaId: 'a1' });
    await barrier(me);
    const got = collect(antenna, 'note');
    const packed = by('x1', { text: 'packed for m1' });
    backend.db.notes[packed.id] = packed;
    await host.publish({ channel: 'antennaStream:a1', message: { type: 'note', body: { id: packed.id, userId: 'x1', text: 'raw record' } } });
    await until(() => got.length === 1);
    assert.deepEqual(got[0], packed);
    assert.ok(backend.calls('notes/show').some((c) => c.params.i === 'mk-me' && c.params.noteId === packed.id));
    assert.equal(await opens(host, 'mk-me', 'antenna', { antennaId: 'a2' }), false, 'another user\'s antenna');
    assert.equal(await opens(host, null, 'antenna', { antennaId: 'a1' }), false, 'anonymous');
  });

  test('channel: the channel\'s notes, with requireSigninToViewContents and mutes', async () => {
    const anon = host.stream();
    const me = host.stream('mk-me');
    const chans = { anon: anon.useChannel('channel', { channelId: 'ch9' }), me: me.useChannel('channel', { channelId: 'ch9' }) };
    await barrier(anon);
    await barrier(me);
    const notes = {
      inChannel: by('s1', { channelId: 'ch9' }),
      elsewhere: by('s1', { channelId: 'ch8' }),
      outside: by('s1'),
      signinOnly: by('s1', { channelId: 'ch9', user: { id: 's1', username: 's1', host: null, requireSigninToViewContents: true } }),
      muted: by('mu', { channelId: 'ch9' }),
    };
    const { ids } = await timeline(host, chans, Object.values(notes), by('s2', { channelId: 'ch9' }));
    assert.deepEqual(names(notes, ids.anon), ['inChannel', 'muted']);
    assert.deepEqual(names(notes, ids.me), ['inChannel', 'signinOnly']);
  });

  test('main: notifications and mentions from muted users and instances are dropped; the rest passes unchanged', async () => {
    const me = host.stream('mk-me');
    const main = me.useChannel('main');
    await barrier(me);
    const got = [];
    for (const ev of ['notification', 'mention', 'followed', 'meUpdated']) main.on(ev, (b) => got.push([ev, b.id]));
    const m = (type, body) => ({ channel: 'mainStream:m1', message: { type, body } });
    // Notes Misskey publishes hidden are packed again for the user.
    const full = by('f1', { id: 'hidden-note', text: 'for m1', visibility: 'followers' });
    backend.db.notes[full.id] = full;
    const notifications = collect(main, 'notification');
    const mentions = collect(main, 'mention');
    await host.publish([
      m('notification', { id: 'n-hidden', userId: 'f1', user: { id: 'f1', host: null }, note: { ...full, text: null, isHidden: true } }),
      m('mention', { ...full, text: null, isHidden: true }),
    ]);
    await until(() => notifications.length === 1 && mentions.length === 1);
    assert.deepEqual(notifications[0].note, full);
    assert.deepEqual(mentions[0], full);
    got.length = 0;
    await host.publish([
      m('notification', { id: 'n-muted', userId: 'mu', user: { id: 'mu', host: null } }),
      m('notification', { id: 'n-instance', userId: 'r9', user: { id: 'r9', host: 'muted.example' } }),
      m('notification', { id: 'n-ok', userId: 's1', user: { id: 's1', host: null } }),
      m('mention', by('mu', { id: 'mention-muted' })),
      m('mention', by('r9', { id: 'mention-instance' }, 'muted.example')),
      m('mention', by('s1', { id: 'mention-ok' })),
      m('followed', { id: 's1' }),
      m('meUpdated', { id: 'm1' }),
    ]);
    await until(() => got.some(([e]) => e === 'meUpdated'));
    assert.deepEqual(got, [['notification', 'n-ok'], ['mention', 'mention-ok'], ['followed', 's1'], ['meUpdated', 'm1']]);
    // readNotification marks every notification read through the API.
    me.send('readNotification');
    await until(() => backend.calls('notifications/mark-all-as-read').some((c) => c.params.i === 'mk-me'));
  });

  test('noteUpdated of followers-only and specified notes reaches only who may see them', async () => {
    const me = host.stream('mk-me');
    const other = host.stream('mk-other');
    const anon = host.stream();
    const ups = {};
    for (const [k, s] of Object.entries({ me, other, anon })) {
      for (const id of ['nf', 'ns', 'np']) s.send('s', { id });
      await barrier(s);
      ups[k] = collect(s, 'noteUpdated');
    }
    const upd = (id, visibility, visibleUserIds, type) => ({
      channel: `noteStream:${id}`, message: { type, body: { id, userId: 'f1', visibility, visibleUserIds, body: { reaction: type } } },
    });
    await host.publish([
      upd('nf', 'followers', [], 'followers'),
      upd('ns', 'specified', ['m2'], 'specified'),
      upd('np', 'public', [], 'public'),
    ]);
    await until(() => Object.values(ups).every((u) => u.some((x) => x.id === 'np')));
    const kinds = (k) => ups[k].map((u) => u.type);
    assert.deepEqual(kinds('me'), ['followers', 'public']);
    assert.deepEqual(kinds('other'), ['specified', 'public']);
    assert.deepEqual(kinds('anon'), ['public']);
    assert.deepEqual(ups.me[0], { id: 'nf', type: 'followers', body: { reaction: 'followers' } });
  });

  test('drive, admin and reversi relay the user\'s own streams; admin is for moderators', async () => {
    const me = host.stream('mk-me');
    const mod = host.stream('mk-mod');
    const drive = me.useChannel('drive');
    const reversi = me.useChannel('reversi');
    const admin = mod.useChannel('admin');
    await barrier(me);
    await barrier(mod);
    const got = { drive: collect(drive, 'fileCreated'), reversi: collect(reversi, 'invited'), admin: collect(admin, 'newAbuseUserReport') };
    await host.publish([
      { channel: 'driveStream:m2', message: { type: 'fileCreated', body: { id: 'not-mine' } } },
      { channel: 'driveStream:m1', message: { type: 'fileCreated', body: { id: 'file1' } } },
      { channel: 'reversiStream:m1', message: { type: 'invited', body: { user: { id: 's1' } } } },
      { channel: 'adminStream:mod', message: { type: 'newAbuseUserReport', body: { id: 'rep1', targetUserId: 's1', reporterId: 'm1', comment: 'x' } } },
    ]);
    await until(() => Object.values(got).every((g) => g.length === 1));
    assert.deepEqual(got.drive, [{ id: 'file1' }]);
    assert.deepEqual(got.reversi, [{ user: { id: 's1' } }]);
    assert.equal(got.admin[0].id, 'rep1');
    assert.equal(await opens(host, 'mk-me', 'admin'), false, 'not a moderator');
    for (const ch of ['main', 'drive', 'reversi', 'admin', 'homeTimeline', 'hybridTimeline', 'chatUser', 'chatRoom']) {
      assert.equal(await opens(host, null, ch, {}), false, `${ch} needs a user`);
    }
  });

  test('serverStats reports the host\'s machine in Misskey\'s shape and answers requestLog; queueStats relays the backend\'s figures', async () => {
    const s = host.stream();
    const server = s.useChannel('serverStats');
    const queue = s.useChannel('queueStats');
    await barrier(s);
    const stats = collect(server, 'stats');
    await until(() => stats.length >= 1, 10000, 'a serverStats sample');
    const st = stats[0];
    assert.ok(st.cpu >= 0 && st.cpu <= 1, JSON.stringify(st));
    assert.ok(st.mem.used > 0 && st.mem.active >= 0);
    for (const k of ['rx', 'tx']) assert.ok(st.net[k] >= 0);
    for (const k of ['r', 'w']) assert.ok(st.fs[k] >= 0);
    const logs = collect(server, 'statsLog');
    server.send('requestLog', { id: 'a', length: 1 });
    await until(() => logs.length === 1);
    assert.equal(logs[0].length, 1);
    assert.deepEqual(Object.keys(logs[0][0]).sort(), ['cpu', 'fs', 'mem', 'net']);

    const q = collect(queue, 'stats');
    const qs = (n) => ({ deliver: { activeSincePrevTick: n, active: 1, waiting: 2, delayed: 3 }, inbox: { activeSincePrevTick: 0, active: 0, waiting: 0, delayed: 0 } });
    await host.publish([{ room: 'queueStats', event: 'stats', data: qs(1) }, { room: 'queueStats', event: 'stats', data: qs(2) }]);
    await until(() => q.length === 2);
    assert.deepEqual(q[1], qs(2));
    const qlog = collect(queue, 'statsLog');
    queue.send('requestLog', { id: 7, length: 5 }); // Misskey drops a numeric id
    queue.send('requestLog', { id: 'b', length: 5 });
    await until(() => qlog.length >= 1);
    await barrier(s);
    assert.deepEqual(qlog, [[qs(2), qs(1)]], 'newest first, one answer');
  });

  test('reversiGame: anyone may watch; a player\'s valid moves reach the backend and its answer reaches the game', async () => {
    const watcher = host.stream();
    const player = host.stream('mk-me');
    const w = watcher.useChannel('reversiGame', { gameId: 'g1' });
    const p = player.useChannel('reversiGame', { gameId: 'g1' });
    await barrier(watcher);
    await barrier(player);
    const seen = collect(w, 'log');
    const forwarded = () => backend.calls('chanhost/reversi-game');
    p.send('putStone', { pos: 'nine', id: 'bad' });
    p.send('updateSettings', { key: 'nope', value: 1 });
    p.send('ready', 'yes');
    watcher.useChannel('reversiGame', { gameId: 'g1' }).send('putStone', { pos: 3, id: 'anon' });
    p.send('updateSettings', { key: 'bw', value: 'random' });
    p.send('putStone', { pos: 9, id: 'mv1' });
    await until(() => seen.length === 1);
    assert.deepEqual(seen[0], { time: 0, player: true, operation: 'put', pos: 9, id: 'mv1' });
    assert.deepEqual(forwarded().map((c) => [c.params.i, c.params.gameId, c.params.type, c.params.body]), [
      ['mk-me', 'g1', 'updateSettings', { key: 'bw', value: 'random' }],
      ['mk-me', 'g1', 'putStone', { pos: 9, id: 'mv1' }],
    ]);
    const game = collect(w, 'started');
    await host.publish({ channel: 'reversiGameStream:g1', message: { type: 'started', body: { game: { id: 'g1' } } } });
    await until(() => game.length === 1);
  });

  test('chatUser and chatRoom: permission and membership checked through the API; read marks the conversation read', async () => {
    const me = host.stream('mk-me');
    const withM2 = me.useChannel('chatUser', { otherId: 'm2' });
    const room = me.useChannel('chatRoom', { roomId: 'room1' });
    await barrier(me);
    const msgs = { user: collect(withM2, 'message'), room: collect(room, 'message') };
    await host.publish([
      { channel: 'chatUserStream:m2-m1', message: { type: 'message', body: { id: 'not-my-side' } } },
      { channel: 'chatUserStream:m1-m2', message: { type: 'message', body: { id: 'dm1' } } },
      { channel: 'chatRoomStream:room1', message: { type: 'message', body: { id: 'rm1' } } },
    ]);
    await until(() => msgs.user.length === 1 && msgs.room.length === 1);
    assert.deepEqual(msgs.user, [{ id: 'dm1' }]);
    withM2.send('read', { id: 'dm1' });
    room.send('read', { id: 'rm1' });
    // Opening the room did not mark it read; `read` does.
    await until(() => backend.calls('chat/messages/user-timeline').length === 1 && backend.calls('chat/messages/room-timeline').length === 1);
    assert.deepEqual(backend.calls('chat/messages/user-timeline')[0].params, { userId: 'm2', limit: 1, i: 'mk-me' });
    assert.equal(await opens(host, 'mk-me', 'chatUser', { otherId: 'm1' }), false, 'oneself');
    assert.equal(await opens(host, 'mk-app', 'chatUser', { otherId: 'm2' }), false, 'a token without read:chat');
    assert.equal(await opens(host, 'mk-other', 'chatRoom', { roomId: 'room2' }), true, 'the owner');
    assert.equal(await opens(host, 'mk-me', 'chatRoom', { roomId: 'room2' }), false, 'not a member');
    assert.equal(await opens(host, 'mk-mod', 'chatRoom', { roomId: 'room2' }), true, 'a moderator');
    assert.equal(await opens(host, 'mk-me', 'chatRoom', { roomId: 'nope' }), false, 'no such room');
    // An app token without read:mutes still opens timelines (its mutes unread).
    assert.equal(await opens(host, 'mk-app', 'homeTimeline'), true);
  });

  test('waiting on a slow backend does not count against the plugin\'s call time limit', async () => {
    const key = 'chanhost_plugin_errors_total{plugin="misskey",hook="connect"}';
    const before = (await host.metrics())[key];
    backend.db.delays['users/following'] = 600; // the call limit is 200 ms
    try {
      assert.equal(await opens(host, 'mk-slow', 'homeTimeline'), true);
    } finally {
      delete backend.db.delays['users/following'];
    }
    assert.equal((await host.metrics())[key], before);
  });

  test('a hot reload of the plugin keeps every channel delivering, listens to per-user and per-role streams included', async () => {
    const me = host.stream('mk-me');
    const main = me.useChannel('main');
    const role = me.useChannel('roleTimeline', { roleId: 'r3' });
    const home = me.useChannel('homeTimeline', {});
    await barrier(me);
    const got = { main: collect(main, 'meUpdated'), role: collect(role, 'note'), home: collect(home, 'note') };
    const reloads = async () => (await host.metrics())['chanhost_plugin_reloads_total{result="ok"}'];
    const before = await reloads();
    touchPlugin(host.pluginsDir, 'misskey');
    await until(async () => (await reloads()) > before, 20000, 'the reload');
    await host.publish([
      { channel: 'mainStream:m1', message: { type: 'meUpdated', body: { id: 'm1' } } },
      { channel: 'roleTimelineStream:r3', message: { type: 'note', body: by('s1') } },
      { channel: 'internal', message: { type: 'follow', body: { followerId: 'm1', followeeId: 's6' } } },
      { channel: 'notesStream', message: by('s6') },
    ]);
    await until(() => Object.values(got).every((g) => g.length === 1), 10000, 'deliveries after the reload');
  });

  test('a filtered room of 1,000 signed-in subscribers gives the plugin each note once', async () => {
    const sockets = [];
    let received = 0;
    for (let i = 0; i < 1000; i += 100) {
      await Promise.all(Array.from({ length: 100 }, async () => {
        const ws = await rawStream(host, '?i=mk-many');
        sockets.push(ws);
        ws.on('message', (d) => { if (JSON.parse(d.toString()).body?.type === 'note') received++; });
        sendJson(ws, { type: 'connect', body: { channel: 'homeTimeline', id: 'h', params: {}, pong: true } });
        await frame(ws, (f) => f.type === 'connected');
      }));
    }
    const key = 'chanhost_plugin_items_total{plugin="misskey",hook="event"}';
    const before = (await host.metrics())[key];
    // Two notes by a followed user reach everyone, one by a stranger nobody.
    await host.publish([by('f1'), by('s1'), by('f1')].map((n) => ({ channel: 'notesStream', message: n })));
    await until(() => received === 2000, 20000, `2000 deliveries (got ${received})`);
    assert.equal((await host.metrics())[key] - before, 3);
    // The relations were read once for the user, not once per connection.
    assert.equal(backend.calls('users/following').filter((c) => c.params.i === 'mk-many').length, 1);
    for (const ws of sockets) ws.terminate();
  });
});
