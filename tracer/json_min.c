/* Minimal JSON scanning: see json_min.h. */
#include "json_min.h"

#include <glib.h>
#include <string.h>

#define MAX_DEPTH 64

static const char *skip_ws(const char *p, const char *end)
{
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')) {
        p++;
    }
    return p;
}

static const char *skip_string(const char *p, const char *end)
{
    if (p >= end || *p != '"') {
        return NULL;
    }
    p++;
    while (p < end) {
        unsigned char c = (unsigned char)*p;
        if (c == '"') {
            return p + 1;
        }
        if (c < 0x20) {
            return NULL;
        }
        if (c == '\\') {
            p++;
            if (p >= end) {
                return NULL;
            }
            if (*p == 'u') {
                for (int i = 1; i <= 4; i++) {
                    if (p + i >= end || !g_ascii_isxdigit(p[i])) {
                        return NULL;
                    }
                }
                p += 4;
            } else if (!strchr("\"\\/bfnrt", *p)) {
                return NULL;
            }
        }
        p++;
    }
    return NULL;
}

static const char *skip_number(const char *p, const char *end)
{
    if (p < end && *p == '-') {
        p++;
    }
    if (p >= end || !g_ascii_isdigit(*p)) {
        return NULL;
    }
    if (*p == '0') {
        p++;
    } else {
        while (p < end && g_ascii_isdigit(*p)) {
            p++;
        }
    }
    if (p < end && *p == '.') {
        p++;
        if (p >= end || !g_ascii_isdigit(*p)) {
            return NULL;
        }
        while (p < end && g_ascii_isdigit(*p)) {
            p++;
        }
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
        p++;
        if (p < end && (*p == '+' || *p == '-')) {
            p++;
        }
        if (p >= end || !g_ascii_isdigit(*p)) {
            return NULL;
        }
        while (p < end && g_ascii_isdigit(*p)) {
            p++;
        }
    }
    return p;
}

static const char *skip_literal(const char *p, const char *end, const char *lit)
{
    size_t n = strlen(lit);
    if ((size_t)(end - p) < n || memcmp(p, lit, n) != 0) {
        return NULL;
    }
    return p + n;
}

static const char *skip_value(const char *p, const char *end, int depth)
{
    p = skip_ws(p, end);
    if (p >= end || depth > MAX_DEPTH) {
        return NULL;
    }
    switch (*p) {
    case '"':
        return skip_string(p, end);
    case '{':
    case '[': {
        char close = *p == '{' ? '}' : ']';
        int object = *p == '{';
        p = skip_ws(p + 1, end);
        if (p < end && *p == close) {
            return p + 1;
        }
        for (;;) {
            if (object) {
                p = skip_string(skip_ws(p, end), end);
                if (!p) {
                    return NULL;
                }
                p = skip_ws(p, end);
                if (p >= end || *p != ':') {
                    return NULL;
                }
                p++;
            }
            p = skip_value(p, end, depth + 1);
            if (!p) {
                return NULL;
            }
            p = skip_ws(p, end);
            if (p < end && *p == ',') {
                p++;
                continue;
            }
            if (p < end && *p == close) {
                return p + 1;
            }
            return NULL;
        }
    }
    case 't':
        return skip_literal(p, end, "true");
    case 'f':
        return skip_literal(p, end, "false");
    case 'n':
        return skip_literal(p, end, "null");
    default:
        return skip_number(p, end);
    }
}

const char *json_skip_value(const char *p, const char *end)
{
    return skip_value(p, end, 0);
}

int json_object_members(const char *p, const char *end, json_member_fn fn, void *ctx)
{
    const char *stop = json_skip_value(p, end);
    if (!stop || skip_ws(stop, end) != end) {
        return -1;
    }
    p = skip_ws(p, end);
    if (*p != '{') {
        return -1;
    }
    p = skip_ws(p + 1, end);
    if (*p == '}') {
        return 0;
    }
    for (;;) {
        const char *ks = skip_ws(p, end);
        const char *ke = skip_string(ks, end);
        p = skip_ws(ke, end) + 1; /* ':' (validated above) */
        const char *vs = skip_ws(p, end);
        const char *ve = json_skip_value(vs, end);
        fn(ctx, ks + 1, (size_t)(ke - ks - 2), vs, (size_t)(ve - vs));
        p = skip_ws(ve, end);
        if (*p == '}') {
            return 0;
        }
        p++; /* ',' */
    }
}

void json_append_string(GString *out, const char *str)
{
    char *s = g_utf8_make_valid(str, -1); /* the header must be UTF-8 */
    g_string_append_c(out, '"');
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        switch (*p) {
        case '"':
            g_string_append(out, "\\\"");
            break;
        case '\\':
            g_string_append(out, "\\\\");
            break;
        case '\n':
            g_string_append(out, "\\n");
            break;
        case '\t':
            g_string_append(out, "\\t");
            break;
        case '\r':
            g_string_append(out, "\\r");
            break;
        default:
            if (*p < 0x20) {
                g_string_append_printf(out, "\\u%04x", *p);
            } else {
                g_string_append_c(out, (char)*p);
            }
        }
    }
    g_string_append_c(out, '"');
    g_free(s);
}
