#include "transport.h"

#include <string.h>

#ifdef _WIN32
#include <ws2tcpip.h>
#else
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>
#endif

#if !defined(_WIN32) && defined(MSG_NOSIGNAL)
#define L2D_SEND_FLAGS MSG_NOSIGNAL
#else
#define L2D_SEND_FLAGS 0
#endif

void l2d_net_init(void)
{
#ifdef _WIN32
	WSADATA wsa;
	WSAStartup(MAKEWORD(2, 2), &wsa);
#endif
}

l2d_socket_t l2d_connect(uint16_t port)
{
	l2d_socket_t s = socket(AF_INET, SOCK_STREAM, IPPROTO_TCP);
	if (s == L2D_NO_SOCKET)
		return L2D_NO_SOCKET;
	struct sockaddr_in addr;
	memset(&addr, 0, sizeof(addr));
	addr.sin_family = AF_INET;
	addr.sin_port = htons(port);
	addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK); /* the engine on this machine, never beyond it */
	if (connect(s, (struct sockaddr *)&addr, sizeof(addr)) != 0) {
		l2d_close(s);
		return L2D_NO_SOCKET;
	}
	int one = 1;
	setsockopt(s, IPPROTO_TCP, TCP_NODELAY, (const char *)&one, sizeof(one));
#ifdef SO_NOSIGPIPE /* macOS: a closed engine is an error from send, not SIGPIPE (Linux: MSG_NOSIGNAL) */
	setsockopt(s, SOL_SOCKET, SO_NOSIGPIPE, &one, sizeof(one));
#endif
	/* A stalled engine must not hold the sender forever: after this long the connection is
	 * given up and made again. */
#ifdef _WIN32
	DWORD ms = 3000;
	setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, (const char *)&ms, sizeof(ms));
#else
	struct timeval tv = {3, 0};
	setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
#endif
	return s;
}

void l2d_close(l2d_socket_t s)
{
	if (s == L2D_NO_SOCKET)
		return;
#ifdef _WIN32
	closesocket(s);
#else
	close(s);
#endif
}

void l2d_shutdown(l2d_socket_t s)
{
	if (s == L2D_NO_SOCKET)
		return;
#ifdef _WIN32
	shutdown(s, SD_BOTH);
#else
	shutdown(s, SHUT_RDWR);
#endif
}

bool l2d_send_all(l2d_socket_t s, const void *data, size_t size)
{
	const char *p = data;
	while (size) {
		int chunk = size > (1u << 30) ? (1 << 30) : (int)size;
#ifdef _WIN32
		int n = send(s, p, chunk, 0);
#else
		ssize_t n = send(s, p, (size_t)chunk, L2D_SEND_FLAGS);
		if (n < 0 && errno == EINTR)
			continue;
#endif
		if (n <= 0)
			return false;
		p += n;
		size -= (size_t)n;
	}
	return true;
}

bool l2d_recv_all(l2d_socket_t s, void *data, size_t size)
{
	char *p = data;
	while (size) {
		int chunk = size > (1u << 30) ? (1 << 30) : (int)size;
#ifdef _WIN32
		int n = recv(s, p, chunk, 0);
#else
		ssize_t n = recv(s, p, (size_t)chunk, 0);
		if (n < 0 && errno == EINTR)
			continue;
#endif
		if (n <= 0)
			return false;
		p += n;
		size -= (size_t)n;
	}
	return true;
}

static void put32(uint8_t *p, uint32_t v)
{
	for (int i = 0; i < 4; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}

static uint32_t get32(const uint8_t *p)
{
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

void l2d_pack_header(uint8_t out[L2D_HEADER_BYTES], const struct l2d_header *h)
{
	memcpy(out, "L2DF", 4);
	put32(out + 4, h->kind);
	put32(out + 8, h->width);
	put32(out + 12, h->height);
	put32(out + 16, (uint32_t)h->stamp);
	put32(out + 20, (uint32_t)(h->stamp >> 32));
	put32(out + 24, h->length);
	put32(out + 28, L2D_VERSION);
}

bool l2d_unpack_header(const uint8_t in[L2D_HEADER_BYTES], struct l2d_header *h)
{
	if (memcmp(in, "L2DF", 4) != 0 || get32(in + 28) != L2D_VERSION)
		return false;
	h->kind = get32(in + 4);
	h->width = get32(in + 8);
	h->height = get32(in + 12);
	h->stamp = (uint64_t)get32(in + 16) | (uint64_t)get32(in + 20) << 32;
	h->length = get32(in + 24);
	if (h->kind == L2D_KIND_FRAME)
		return h->width && h->height && h->width <= L2D_MAX_SIDE && h->height <= L2D_MAX_SIDE &&
		       (uint64_t)h->length == (uint64_t)h->width * h->height * 4u;
	if (h->kind == L2D_KIND_JSON)
		return h->length <= L2D_MAX_JSON;
	return false;
}
