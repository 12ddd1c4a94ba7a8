/* Request TLVs (docs/agent-protocol.md, "TLVs" and "Limits"): every item of a request is checked (its tag known
 * for this request or ignorable, its size, its count, no NUL inside a string) before the request is acted on. */
#define _GNU_SOURCE
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "agent.h"

struct tag_rule {
	uint16_t tag;
	const char *name;
	unsigned requests; /* bit (type - PA_EXEC) for each request that takes it */
	int repeatable;
	size_t min, max; /* the value's size */
	int string;      /* no NUL allowed */
};

#define IN_EXEC (1u << (PA_EXEC - PA_EXEC))
#define IN_READ (1u << (PA_READ - PA_EXEC))
#define IN_WRITE (1u << (PA_WRITE - PA_EXEC))
#define IN_LIST (1u << (PA_LIST - PA_EXEC))
#define IN_STAT (1u << (PA_STAT - PA_EXEC))
#define IN_REMOVE (1u << (PA_REMOVE - PA_EXEC))
#define IN_MKDIR (1u << (PA_MKDIR - PA_EXEC))
#define IN_REFRESH (1u << (PA_REFRESH - PA_EXEC))
#define IN_FILES (IN_READ | IN_WRITE | IN_LIST | IN_STAT | IN_REMOVE | IN_MKDIR)

static const struct tag_rule RULES[] = {
	{PA_TAG_ARG, "ARG", IN_EXEC, 1, 0, PA_MAX_STRING, 1},
	{PA_TAG_SHELL, "SHELL", IN_EXEC, 0, 0, PA_MAX_STRING, 1},
	{PA_TAG_ENV, "ENV", IN_EXEC, 1, 1, PA_MAX_STRING, 1},
	{PA_TAG_CLEAR_ENV, "CLEAR_ENV", IN_EXEC, 0, 0, 0, 0},
	{PA_TAG_CWD, "CWD", IN_EXEC, 0, 1, PA_MAX_PATH, 1},
	{PA_TAG_STDIN, "STDIN", IN_EXEC, 0, 0, 0, 0},
	{PA_TAG_TIMEOUT_MS, "TIMEOUT_MS", IN_EXEC, 0, 8, 8, 0},
	{PA_TAG_KILL_GRACE_MS, "KILL_GRACE_MS", IN_EXEC, 0, 4, 4, 0},
	{PA_TAG_PTY, "PTY", IN_EXEC, 0, 4, 4, 0},
	{PA_TAG_PATH, "PATH", IN_FILES, 0, 1, PA_MAX_PATH, 1},
	{PA_TAG_OFFSET, "OFFSET", IN_READ, 0, 8, 8, 0},
	{PA_TAG_LENGTH, "LENGTH", IN_READ, 0, 8, 8, 0},
	{PA_TAG_MODE, "MODE", IN_WRITE | IN_MKDIR, 0, 4, 4, 0},
	{PA_TAG_FLAGS, "FLAGS", IN_WRITE | IN_STAT | IN_REMOVE | IN_MKDIR, 0, 4, 4, 0},
	{PA_TAG_TIME_NS, "TIME_NS", IN_REFRESH, 0, 8, 8, 0},
	{PA_TAG_ENTROPY, "ENTROPY", IN_REFRESH, 0, 1, PA_MAX_ENTROPY, 0},
	{PA_TAG_MAC, "MAC", IN_REFRESH, 0, 12, 12, 0},
};

#define NRULES (sizeof(RULES) / sizeof(RULES[0]))

static uint32_t known_flags(uint8_t type)
{
	switch (type) {
	case PA_WRITE:
		return PA_WRITE_CREATE | PA_WRITE_TRUNCATE | PA_WRITE_APPEND | PA_WRITE_EXCLUSIVE;
	case PA_STAT:
		return PA_STAT_NOFOLLOW;
	case PA_REMOVE:
		return PA_REMOVE_RECURSIVE;
	case PA_MKDIR:
		return PA_MKDIR_PARENTS;
	default:
		return 0;
	}
}

static unsigned fail(char *why, size_t why_size, unsigned kind, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));

static unsigned fail(char *why, size_t why_size, unsigned kind, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(why, why_size, fmt, ap);
	va_end(ap);
	return kind;
}

unsigned parse_request(uint8_t type, const unsigned char *p, size_t length, struct request *r, char *why,
		       size_t why_size)
{
	memset(r, 0, sizeof(*r));
	r->type = type;
	r->kill_grace_ms = PA_DEFAULT_KILL_GRACE_MS;
	if (type < PA_EXEC || type > PA_REFRESH)
		return fail(why, why_size, PA_ERR_UNSUPPORTED, "frame type %#x is not a request", type);
	unsigned bit = 1u << (type - PA_EXEC);
	uint32_t seen = 0; /* one bit per RULES index, for the non-repeatable tags */
	size_t at = 0;
	while (at < length) {
		if (length - at < 6)
			return fail(why, why_size, PA_ERR_PROTOCOL, "a TLV header is cut short at byte %zu", at);
		uint16_t tag = le16(p + at);
		uint32_t size = le32(p + at + 2);
		at += 6;
		if (size > length - at)
			return fail(why, why_size, PA_ERR_PROTOCOL, "a TLV value runs past the frame at byte %zu", at);
		const unsigned char *value = p + at;
		at += size;
		size_t i;
		for (i = 0; i < NRULES; i++)
			if (RULES[i].tag == tag && (RULES[i].requests & bit))
				break;
		if (i == NRULES) {
			if (tag & PA_TAG_CRITICAL)
				return fail(why, why_size, PA_ERR_UNSUPPORTED, "critical tag %#x is not known in this request",
					    tag);
			continue; /* an ignorable extension */
		}
		const struct tag_rule *rule = &RULES[i];
		if (!rule->repeatable) {
			if (seen & (1u << i))
				return fail(why, why_size, PA_ERR_PROTOCOL, "%s appears twice", rule->name);
			seen |= 1u << i;
		}
		if (size < rule->min || size > rule->max)
			return fail(why, why_size, size > rule->max && rule->string ? PA_ERR_LIMIT : PA_ERR_PROTOCOL,
				    "%s has a value of %u bytes, outside %zu..%zu", rule->name, size,
				    rule->min, rule->max);
		if (rule->string && memchr(value, 0, size))
			return fail(why, why_size, PA_ERR_PROTOCOL, "%s holds a NUL byte", rule->name);
		struct bytes b = {value, size};
		switch (tag) {
		case PA_TAG_ARG:
			if (r->nargs == PA_MAX_ARGS)
				return fail(why, why_size, PA_ERR_LIMIT, "more than %d ARG items", PA_MAX_ARGS);
			r->args[r->nargs++] = b;
			break;
		case PA_TAG_ENV:
			if (r->nenv == PA_MAX_ENV)
				return fail(why, why_size, PA_ERR_LIMIT, "more than %d ENV items", PA_MAX_ENV);
			if (value[0] == '=')
				return fail(why, why_size, PA_ERR_PROTOCOL, "an ENV item has an empty name");
			r->env[r->nenv++] = b;
			break;
		case PA_TAG_SHELL:
			r->shell = b;
			r->has_shell = 1;
			break;
		case PA_TAG_CLEAR_ENV:
			r->clear_env = 1;
			break;
		case PA_TAG_CWD:
			r->cwd = b;
			r->has_cwd = 1;
			break;
		case PA_TAG_STDIN:
			r->use_stdin = 1;
			break;
		case PA_TAG_TIMEOUT_MS:
			r->timeout_ms = le64(value);
			break;
		case PA_TAG_KILL_GRACE_MS:
			r->kill_grace_ms = le32(value);
			break;
		case PA_TAG_PTY:
			r->has_pty = 1;
			r->rows = le16(value);
			r->cols = le16(value + 2);
			break;
		case PA_TAG_PATH:
			r->path = b;
			r->has_path = 1;
			break;
		case PA_TAG_OFFSET:
			r->offset = le64(value);
			break;
		case PA_TAG_LENGTH:
			r->length = le64(value);
			r->has_length = 1;
			break;
		case PA_TAG_MODE:
			r->mode = le32(value);
			r->has_mode = 1;
			if (r->mode & ~07777u)
				return fail(why, why_size, PA_ERR_PROTOCOL, "MODE %#o has bits outside 07777", r->mode);
			break;
		case PA_TAG_FLAGS:
			r->flags = le32(value);
			if (r->flags & ~known_flags(type))
				return fail(why, why_size, PA_ERR_UNSUPPORTED, "FLAGS %#x has bits this request does not know",
					    r->flags);
			break;
		case PA_TAG_TIME_NS:
			r->time_ns = le64(value);
			r->has_time_ns = 1;
			break;
		case PA_TAG_ENTROPY:
			r->entropy = b;
			r->has_entropy = 1;
			break;
		case PA_TAG_MAC: {
			static const unsigned char zero[6];
			memcpy(r->mac_old, value, 6);
			memcpy(r->mac_new, value + 6, 6);
			r->has_mac = 1;
			if ((r->mac_new[0] & 1) || memcmp(r->mac_new, zero, 6) == 0)
				return fail(why, why_size, PA_ERR_PROTOCOL,
					    "MAC: %02x:%02x:%02x:%02x:%02x:%02x is not a unicast address an interface "
					    "can take",
					    r->mac_new[0], r->mac_new[1], r->mac_new[2], r->mac_new[3], r->mac_new[4],
					    r->mac_new[5]);
			break;
		}
		}
	}
	if (type == PA_EXEC) {
		if (r->has_shell == (r->nargs > 0))
			return fail(why, why_size, PA_ERR_PROTOCOL, "EXEC needs either SHELL or ARG items");
	} else if (type != PA_REFRESH && !r->has_path) {
		return fail(why, why_size, PA_ERR_PROTOCOL, "the request has no PATH");
	}
	return 0;
}

char *dup_bytes(struct bytes b)
{
	char *s = malloc(b.n + 1);
	if (s) {
		memcpy(s, b.p, b.n);
		s[b.n] = 0;
	}
	return s;
}
