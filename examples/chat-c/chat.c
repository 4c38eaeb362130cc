// A chat-room channel: clients join a room by param, messages they post are
// broadcast to the room with the sender's user id, and the room's message
// count lives in the host's key-value store (so it survives a hot reload).
// The same plugin exists in Rust, JavaScript and Python beside this folder.
//
// - Misskey: channel `chat-c`, params `{room}`, send `post {text}`.
// - Socket.IO: namespace `/chat-c`, auth `{token, room}`, emit `post {text}`.
// - Every member of the room, sender included, receives `message {userId, text, n}`.
//
// Bindings come from `wit-bindgen c` (gen/plugin.h). Ownership, as the
// canonical ABI has it: arguments of an exported function belong to it
// (freed here), values it returns are malloc'ed (freed by the bindings),
// values an import returns belong to the caller (freed here).
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "plugin.h"
#include "json.h"

#define NAME "chat-c"

typedef plugin_string_t str_t;

static str_t lit(const char *s) {
  str_t r;
  plugin_string_set(&r, s);
  return r;
}

static str_t dup(const char *s) {
  str_t r;
  plugin_string_dup(&r, s);
  return r;
}

// A NUL-terminated copy of a WIT string (caller frees).
static char *cstr(const str_t *s) {
  char *c = malloc(s->len + 1);
  memcpy(c, s->ptr, s->len);
  c[s->len] = 0;
  return c;
}

static char *member_key(uint64_t connection, const str_t *id) {
  char *key = malloc(id->len + 48);
  int n = snprintf(key, id->len + 48, "member:%" PRIu64 ":", connection);
  memcpy(key + n, id->ptr, id->len);
  key[n + id->len] = 0;
  return key;
}

static char *room_name(const char *room) {
  size_t n = strlen(NAME) + strlen(room) + 2;
  char *r = malloc(n);
  snprintf(r, n, "%s:%s", NAME, room);
  return r;
}

void exports_chanhost_plugin_channel_describe(exports_chanhost_plugin_channel_manifest_t *ret) {
  ret->version = dup("1.0.0");
  ret->channels.len = 1;
  ret->channels.ptr = malloc(sizeof(chanhost_plugin_types_channel_spec_t));
  ret->channels.ptr[0].name = dup(NAME);
  ret->channels.ptr[0].requires_user = true;
  ret->channels.ptr[0].shared = false;
  ret->namespaces.len = 1;
  ret->namespaces.ptr = malloc(sizeof(chanhost_plugin_types_namespace_spec_t));
  ret->namespaces.ptr[0].name = dup("/" NAME);
  ret->frames.len = 0;
  ret->frames.ptr = NULL;
}

bool exports_chanhost_plugin_channel_init(str_t *config, str_t *err) {
  (void)err;
  plugin_string_free(config);
  return true;
}

static bool refuse(exports_chanhost_plugin_channel_rejection_t *err, const char *message) {
  err->message = dup(message);
  err->data.is_some = false;
  return false;
}

bool exports_chanhost_plugin_channel_connect(exports_chanhost_plugin_channel_connect_request_t *req,
                                             exports_chanhost_plugin_channel_rejection_t *err) {
  bool ok = false;
  char *room = json_get_string((const char *)req->params.ptr, req->params.len, "room");
  char *token = json_get_string((const char *)req->params.ptr, req->params.len, "token");
  if (room == NULL || room[0] == 0) {
    refuse(err, "a room is required");
    goto done;
  }
  if (req->protocol == CHANHOST_PLUGIN_TYPES_PROTOCOL_SOCKETIO) {
    // Socket.IO connections start anonymous: check the token.
    if (token == NULL) {
      refuse(err, "a token is required");
      goto done;
    }
    str_t t = lit(token);
    chanhost_plugin_host_identity_t who;
    str_t why;
    if (!chanhost_plugin_host_verify_token(&t, &who, &why)) {
      char *w = cstr(&why);
      size_t n = strlen(w) + 32;
      char *m = malloc(n);
      snprintf(m, n, "invalid token: %s", w);
      refuse(err, m);
      free(m);
      free(w);
      plugin_string_free(&why);
      goto done;
    }
    uint32_t count;
    if (!chanhost_plugin_host_set_identity(req->target.connection, &who, &count, &why)) {
      char *w = cstr(&why);
      refuse(err, w);
      free(w);
      plugin_string_free(&why);
      chanhost_plugin_host_identity_free(&who);
      goto done;
    }
    chanhost_plugin_host_identity_free(&who);
  }
  char *key = member_key(req->target.connection, &req->target.id);
  str_t k = lit(key), v = lit(room);
  chanhost_plugin_host_kv_set(&k, &v);
  free(key);
  char *name = room_name(room);
  str_t r = lit(name);
  chanhost_plugin_host_instance_t target = {req->target.connection, req->target.id};
  chanhost_plugin_host_join(&target, &r);
  free(name);
  ok = true;
done:
  free(room);
  free(token);
  exports_chanhost_plugin_channel_connect_request_free(req);
  return ok;
}

void exports_chanhost_plugin_channel_message(exports_chanhost_plugin_channel_instance_t *target, str_t *event,
                                             exports_chanhost_plugin_channel_payload_t *data, uint64_t *ack_id) {
  (void)ack_id;
  // Socket.IO passes the event's arguments as an array: json_get_string
  // looks into its first element.
  char *text = NULL;
  if (event->len == 4 && memcmp(event->ptr, "post", 4) == 0)
    text = json_get_string((const char *)data->json.ptr, data->json.len, "text");
  if (text != NULL) {
    char *key = member_key(target->connection, &target->id);
    str_t k = lit(key), room;
    chanhost_plugin_host_identity_t who;
    if (chanhost_plugin_host_kv_get(&k, &room)) {
      if (chanhost_plugin_host_connection_identity(target->connection, &who)) {
        char *r = cstr(&room);
        size_t cn = strlen(r) + 8;
        char *count_key = malloc(cn);
        snprintf(count_key, cn, "count:%s", r);
        str_t ck = lit(count_key);
        int64_t n = chanhost_plugin_host_kv_incr(&ck, 1);
        char *user = cstr(&who.user_id);
        json_buf_t out = {0};
        json_put(&out, "{\"userId\":");
        json_put_string(&out, user);
        json_put(&out, ",\"text\":");
        json_put_string(&out, text);
        char num[32];
        snprintf(num, sizeof num, ",\"n\":%" PRId64 "}", n);
        json_put(&out, num);
        char *name = room_name(r);
        str_t rn = lit(name), ev = lit("message");
        chanhost_plugin_host_payload_t payload = {{(uint8_t *)out.ptr, out.len}, {NULL, 0}};
        chanhost_plugin_host_broadcast(&rn, &ev, &payload, NULL);
        free(name);
        free(out.ptr);
        free(user);
        free(count_key);
        free(r);
        chanhost_plugin_host_identity_free(&who);
      }
      plugin_string_free(&room);
    }
    free(key);
    free(text);
  }
  exports_chanhost_plugin_channel_instance_free(target);
  plugin_string_free(event);
  exports_chanhost_plugin_channel_payload_free(data);
}

void exports_chanhost_plugin_channel_disconnect(exports_chanhost_plugin_channel_instance_t *target,
                                                exports_chanhost_plugin_channel_disconnect_reason_t reason) {
  (void)reason;
  char *key = member_key(target->connection, &target->id);
  str_t k = lit(key);
  chanhost_plugin_host_kv_delete(&k);
  free(key);
  exports_chanhost_plugin_channel_instance_free(target);
}

void exports_chanhost_plugin_channel_event(str_t *room, str_t *event, exports_chanhost_plugin_channel_payload_t *data) {
  plugin_string_free(room);
  plugin_string_free(event);
  exports_chanhost_plugin_channel_payload_free(data);
}

void exports_chanhost_plugin_channel_frame(exports_chanhost_plugin_channel_connection_id_t connection, str_t *kind,
                                           str_t *body) {
  (void)connection;
  plugin_string_free(kind);
  plugin_string_free(body);
}
