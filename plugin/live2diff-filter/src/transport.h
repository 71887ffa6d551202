/* The filter's side of the local transport to the engine (`live2diff-engine run --source obs-filter`).
 *
 * One loopback TCP connection. Every message is a 32-byte little-endian header and a payload:
 *
 *   offset 0  "L2DF"        magic
 *          4  u32 kind      1: an RGBA frame (width*height*4 bytes), 2: a JSON text (UTF-8)
 *          8  u32 width     frames only (0 for JSON)
 *         12  u32 height    frames only (0 for JSON)
 *         16  u64 stamp     the filter's capture time in ns (os_gettime_ns); a stylised frame
 *                           coming back carries the stamp of the frame it was made from
 *         24  u32 length    payload bytes
 *         28  u32 version   1
 *
 * Filter -> engine: frames, and commands of the engine's command schema (JSON).
 * Engine -> filter: stylised frames, and status messages (JSON).
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define L2D_HEADER_BYTES 32
#define L2D_KIND_FRAME 1u
#define L2D_KIND_JSON 2u
#define L2D_VERSION 1u
#define L2D_MAX_SIDE 4096u
#define L2D_MAX_JSON 65536u

#ifdef _WIN32
#ifndef WIN32_LEAN_AND_MEAN
#define WIN32_LEAN_AND_MEAN
#endif
#include <winsock2.h>
typedef SOCKET l2d_socket_t;
#define L2D_NO_SOCKET INVALID_SOCKET
#else
typedef int l2d_socket_t;
#define L2D_NO_SOCKET (-1)
#endif

struct l2d_header {
	uint32_t kind;
	uint32_t width;
	uint32_t height;
	uint64_t stamp;
	uint32_t length;
};

void l2d_net_init(void);
/* A connected socket to 127.0.0.1:port, or L2D_NO_SOCKET (no engine listening). */
l2d_socket_t l2d_connect(uint16_t port);
void l2d_close(l2d_socket_t s);
/* Unblocks a thread reading or writing the socket (it then sees an error). */
void l2d_shutdown(l2d_socket_t s);
bool l2d_send_all(l2d_socket_t s, const void *data, size_t size);
bool l2d_recv_all(l2d_socket_t s, void *data, size_t size);
void l2d_pack_header(uint8_t out[L2D_HEADER_BYTES], const struct l2d_header *h);
/* false when the bytes are not a header this filter understands (the connection is then dropped). */
bool l2d_unpack_header(const uint8_t in[L2D_HEADER_BYTES], struct l2d_header *h);
