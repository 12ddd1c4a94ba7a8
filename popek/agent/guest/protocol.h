/* popek guest agent protocol constants: docs/agent-protocol.md is the specification, popek/agent/protocol.py
 * the host's copy (tests/unit/agent/test_protocol.py checks that both agree with each other). */
#ifndef POPEK_AGENT_PROTOCOL_H
#define POPEK_AGENT_PROTOCOL_H

#define PA_VERSION_MAJOR 1
#define PA_VERSION_MINOR 0

#define PA_HEADER_SIZE 4 /* u32 length */
#define PA_MAX_FRAME (1u << 20)
#define PA_CHUNK (64u << 10)
#define PA_MAX_ARGS 4096
#define PA_MAX_ENV 4096
#define PA_MAX_STRING (128u << 10)
#define PA_MAX_PATH 4095
#define PA_MAX_ENTROPY 512
#define PA_STDIN_WINDOW (256u << 10)
#define PA_HANDSHAKE_MS 10000
#define PA_IO_IDLE_MS 30000
#define PA_LINGER_MS 2000
#define PA_MAX_CONNECTIONS 128
#define PA_DEFAULT_KILL_GRACE_MS 2000
#define PA_PTY_LINGER_MS 100
#define PA_MAX_REMOVE_DEPTH 256
#define PA_FILE_RECORD_SIZE 28
#define PA_DEFAULT_FILE_MODE 0644
#define PA_DEFAULT_DIR_MODE 0755

/* frame types */
#define PA_HELLO 0x01
#define PA_ERROR 0x02
#define PA_OK 0x03
#define PA_PING 0x10
#define PA_EXEC 0x11
#define PA_READ 0x12
#define PA_WRITE 0x13
#define PA_LIST 0x14
#define PA_STAT 0x15
#define PA_REMOVE 0x16
#define PA_MKDIR 0x17
#define PA_REFRESH 0x18
#define PA_STARTED 0x20
#define PA_STDIN 0x21
#define PA_STDIN_EOF 0x22
#define PA_STDOUT 0x23
#define PA_STDERR 0x24
#define PA_SIGNAL 0x25
#define PA_RESIZE 0x26
#define PA_CREDIT 0x27
#define PA_EXIT 0x28
#define PA_DATA 0x30
#define PA_DATA_END 0x31
#define PA_INFO 0x32
#define PA_ENTRIES 0x33

/* TLV tags; bit 15 marks a tag the receiver must understand */
#define PA_TAG_CRITICAL 0x8000
#define PA_TAG_ARG 0x8001
#define PA_TAG_SHELL 0x8002
#define PA_TAG_ENV 0x8003
#define PA_TAG_CLEAR_ENV 0x8004
#define PA_TAG_CWD 0x8005
#define PA_TAG_STDIN 0x8006
#define PA_TAG_TIMEOUT_MS 0x8007
#define PA_TAG_KILL_GRACE_MS 0x0008
#define PA_TAG_PTY 0x8009
#define PA_TAG_PATH 0x8010
#define PA_TAG_OFFSET 0x8011
#define PA_TAG_LENGTH 0x8012
#define PA_TAG_MODE 0x8013
#define PA_TAG_FLAGS 0x8014
#define PA_TAG_TIME_NS 0x8015
#define PA_TAG_ENTROPY 0x8016
#define PA_TAG_MAC 0x8017

/* ERROR kinds */
#define PA_ERR_PROTOCOL 1
#define PA_ERR_VERSION 2
#define PA_ERR_OS 3
#define PA_ERR_LIMIT 4
#define PA_ERR_UNSUPPORTED 5
#define PA_ERR_BUSY 6

/* FLAGS bits */
#define PA_WRITE_CREATE 1
#define PA_WRITE_TRUNCATE 2
#define PA_WRITE_APPEND 4
#define PA_WRITE_EXCLUSIVE 8
#define PA_STAT_NOFOLLOW 1
#define PA_REMOVE_RECURSIVE 1
#define PA_MKDIR_PARENTS 1

/* EXIT */
#define PA_EXIT_EXITED 0
#define PA_EXIT_SIGNALED 1
#define PA_EXIT_TIMED_OUT 1
#define PA_EXIT_CORE_DUMPED 2

#endif
