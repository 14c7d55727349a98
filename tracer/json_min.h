/*
 * Just enough JSON for the trace header: validate a document, walk the members of an object
 * (keys and values as raw text spans), and quote strings. RFC 8259 grammar; nesting is
 * limited to 64 levels.
 */
#ifndef MEMTRACE_JSON_MIN_H
#define MEMTRACE_JSON_MIN_H

#include <stddef.h>

/* Returns a pointer just past the JSON value at p (leading white space allowed), or NULL. */
const char *json_skip_value(const char *p, const char *end);

/*
 * Calls fn for each member of the object spanning [p, end) (surrounding white space allowed):
 * key is the raw text between the quotes (escapes not decoded), value the raw value text.
 * Returns 0, or -1 if the text is not exactly one JSON object (fn may have been called).
 */
typedef void (*json_member_fn)(void *ctx, const char *key, size_t key_len, const char *value,
                               size_t value_len);
int json_object_members(const char *p, const char *end, json_member_fn fn, void *ctx);

/* Appends s as a JSON string literal (quotes included) to the glib GString out. */
struct _GString;
void json_append_string(struct _GString *out, const char *s);

#endif
