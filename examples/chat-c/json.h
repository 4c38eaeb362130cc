// Just enough JSON for the chat plugin: read a string member of an object
// (or of the first element of an array), and write strings escaped.
#ifndef CHAT_JSON_H
#define CHAT_JSON_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
  const char *p, *end;
} json_in_t;

static void json_ws(json_in_t *in) {
  while (in->p < in->end && (*in->p == ' ' || *in->p == '\t' || *in->p == '\n' || *in->p == '\r')) in->p++;
}

static int json_hex(json_in_t *in, unsigned *out) {
  unsigned v = 0;
  for (int i = 0; i < 4; i++) {
    if (in->p >= in->end) return 0;
    char c = *in->p++;
    v <<= 4;
    if (c >= '0' && c <= '9') v |= (unsigned)(c - '0');
    else if (c >= 'a' && c <= 'f') v |= (unsigned)(c - 'a' + 10);
    else if (c >= 'A' && c <= 'F') v |= (unsigned)(c - 'A' + 10);
    else return 0;
  }
  *out = v;
  return 1;
}

static void json_utf8(char **w, unsigned cp) {
  char *o = *w;
  if (cp < 0x80) *o++ = (char)cp;
  else if (cp < 0x800) { *o++ = (char)(0xC0 | (cp >> 6)); *o++ = (char)(0x80 | (cp & 0x3F)); }
  else if (cp < 0x10000) { *o++ = (char)(0xE0 | (cp >> 12)); *o++ = (char)(0x80 | ((cp >> 6) & 0x3F)); *o++ = (char)(0x80 | (cp & 0x3F)); }
  else { *o++ = (char)(0xF0 | (cp >> 18)); *o++ = (char)(0x80 | ((cp >> 12) & 0x3F)); *o++ = (char)(0x80 | ((cp >> 6) & 0x3F)); *o++ = (char)(0x80 | (cp & 0x3F)); }
  *w = o;
}

// Parses a string at the cursor. With `keep`, returns a malloc'ed copy;
// without, a non-NULL pointer not to be freed. NULL if it is not a valid string.
static char *json_string(json_in_t *in, int keep) {
  if (in->p >= in->end || *in->p != '"') return NULL;
  in->p++;
  char *buf = keep ? malloc((size_t)(in->end - in->p) + 1) : NULL, *w = buf;
  while (in->p < in->end && *in->p != '"') {
    char c = *in->p++;
    if ((unsigned char)c < 0x20) { free(buf); return NULL; }
    if (c != '\\') { if (w) *w++ = c; continue; }
    if (in->p >= in->end) { free(buf); return NULL; }
    char e = *in->p++;
    unsigned cp;
    switch (e) {
      case '"': case '\\': case '/': if (w) *w++ = e; break;
      case 'b': if (w) *w++ = '\b'; break;
      case 'f': if (w) *w++ = '\f'; break;
      case 'n': if (w) *w++ = '\n'; break;
      case 'r': if (w) *w++ = '\r'; break;
      case 't': if (w) *w++ = '\t'; break;
      case 'u':
        if (!json_hex(in, &cp)) { free(buf); return NULL; }
        if (cp >= 0xD800 && cp < 0xDC00 && in->end - in->p >= 6 && in->p[0] == '\\' && in->p[1] == 'u') {
          unsigned lo;
          in->p += 2;
          if (!json_hex(in, &lo) || lo < 0xDC00 || lo > 0xDFFF) { free(buf); return NULL; }
          cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
        }
        if (w) json_utf8(&w, cp);
        break;
      default: free(buf); return NULL;
    }
  }
  if (in->p >= in->end) { free(buf); return NULL; }
  in->p++;
  if (w) *w = 0;
  return keep ? buf : (char *)in->p;
}

// Skips any value; 0 if malformed.
static int json_skip(json_in_t *in, int depth) {
  json_ws(in);
  if (in->p >= in->end || depth > 64) return 0;
  char c = *in->p;
  if (c == '"') return json_string(in, 0) != NULL;
  if (c == '{' || c == '[') {
    char close = c == '{' ? '}' : ']';
    in->p++;
    json_ws(in);
    if (in->p < in->end && *in->p == close) { in->p++; return 1; }
    for (;;) {
      if (c == '{') {
        json_ws(in);
        if (json_string(in, 0) == NULL) return 0;
        json_ws(in);
        if (in->p >= in->end || *in->p++ != ':') return 0;
      }
      if (!json_skip(in, depth + 1)) return 0;
      json_ws(in);
      if (in->p >= in->end) return 0;
      if (*in->p == ',') { in->p++; continue; }
      if (*in->p == close) { in->p++; return 1; }
      return 0;
    }
  }
  while (in->p < in->end && strchr("-+.0123456789eEtrufalsn", *in->p)) in->p++;
  return 1;
}

// The string member `key` of the object in `json` (or of the first element
// when `json` is an array), malloc'ed; NULL when absent or not a string.
static char *json_get_string(const char *json, size_t len, const char *key) {
  json_in_t in = {json, json + len};
  json_ws(&in);
  if (in.p < in.end && *in.p == '[') { in.p++; json_ws(&in); }
  if (in.p >= in.end || *in.p != '{') return NULL;
  in.p++;
  json_ws(&in);
  if (in.p < in.end && *in.p == '}') return NULL;
  for (;;) {
    json_ws(&in);
    char *k = json_string(&in, 1);
    if (k == NULL) return NULL;
    json_ws(&in);
    if (in.p >= in.end || *in.p++ != ':') { free(k); return NULL; }
    json_ws(&in);
    int match = strcmp(k, key) == 0;
    free(k);
    if (match) return json_string(&in, 1);
    if (!json_skip(&in, 0)) return NULL;
    json_ws(&in);
    if (in.p >= in.end || *in.p != ',') return NULL;
    in.p++;
  }
}

typedef struct {
  char *ptr;
  size_t len, cap;
} json_buf_t;

static void json_putn(json_buf_t *b, const char *s, size_t n) {
  if (b->len + n + 1 > b->cap) {
    b->cap = (b->len + n + 1) * 2;
    b->ptr = realloc(b->ptr, b->cap);
  }
  memcpy(b->ptr + b->len, s, n);
  b->len += n;
}

static void json_put(json_buf_t *b, const char *s) { json_putn(b, s, strlen(s)); }

static void json_put_string(json_buf_t *b, const char *s) {
  static const char hex[] = "0123456789abcdef";
  json_put(b, "\"");
  for (; *s; s++) {
    unsigned char c = (unsigned char)*s;
    if (c == '"' || c == '\\') { char e[2] = {'\\', (char)c}; json_putn(b, e, 2); }
    else if (c < 0x20) { char e[6] = {'\\', 'u', '0', '0', hex[c >> 4], hex[c & 15]}; json_putn(b, e, 6); }
    else json_putn(b, (const char *)&c, 1);
  }
  json_put(b, "\"");
}

#endif
