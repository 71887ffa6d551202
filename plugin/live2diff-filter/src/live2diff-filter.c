/* "Live2Diff": an OBS video filter that stylises any source through the local Live2Diff engine.
 *
 * The render thread never waits for the engine:
 *   - each frame the source is rendered at the model's size into a texrender and staged into one
 *     of two staging surfaces; the surface staged the frame before is mapped and copied into the
 *     "to send" buffer (latest wins: if the sender is still busy the frame is simply not sent);
 *   - a network thread connects to the engine (127.0.0.1, reconnecting by itself), sends the
 *     newest frame and the queued commands; a reader thread takes the stylised frames coming back;
 *   - the render thread uploads the newest stylised frame (when one came) and draws it at the
 *     source's size. With no engine, or none fresh enough, it draws the source unchanged, or
 *     holds the last stylised frame when "hold" is set.
 */
/* first: on Windows winsock2.h must come before anything that includes windows.h */
#include "transport.h"

#include <obs-module.h>
#include <graphics/graphics.h>
#include <util/bmem.h>
#include <util/dstr.h>
#include <util/platform.h>
#include <util/threading.h>

#include <stdio.h>
#include <string.h>

OBS_DECLARE_MODULE()
OBS_MODULE_USE_DEFAULT_LOCALE("live2diff-filter", "en-US")

MODULE_EXPORT const char *obs_module_description(void)
{
	return "Live2Diff: live video-to-video diffusion on any source, through the local Live2Diff engine";
}

#define DEFAULT_PORT 8766
#define DEFAULT_SIDE 512
#define STALE_NS 1000000000ull /* a stylised frame older than this is not shown (unless held) */
#define MAX_COMMANDS 16
#define MAX_STYLES 64

struct l2d_filter {
	obs_source_t *context;

	/* render thread only */
	gs_texrender_t *texrender;
	gs_stagesurf_t *stage[2];
	uint64_t stage_stamp[2];
	bool staged[2];
	int stage_next;
	uint32_t stage_w, stage_h;
	gs_texture_t *out_tex;
	uint32_t out_w, out_h;
	uint64_t out_arrived; /* os_gettime_ns when the shown frame came */
	bool captured;        /* this frame's capture is done (the filter may render several times a
	                       * frame: preview, projectors, screenshots); reset by the tick */

	pthread_mutex_t lock; /* guards everything below */
	/* to the engine */
	uint8_t *send_buf;
	size_t send_cap;
	uint8_t *sending_buf; /* the network thread's own (swapped with send_buf) */
	size_t sending_cap;
	bool send_ready;
	uint32_t send_w, send_h;
	uint64_t send_stamp;
	char *commands[MAX_COMMANDS];
	int n_commands;
	/* from the engine */
	uint8_t *recv_buf;
	size_t recv_cap;
	bool recv_new;
	uint32_t recv_w, recv_h;
	uint64_t recv_stamp, recv_arrived;
	char *styles[MAX_STYLES];
	int n_styles;
	bool styles_changed;
	char engine_state[64];
	char engine_error[160];
	/* figures for the status line */
	uint32_t frames_back; /* stylised frames received since the last status line */
	double latency_ms;    /* moving average: capture -> stylised frame back */
	uint64_t frames_sent;
	uint64_t frames_skipped; /* the sender was busy: not sent (OBS never waits) */

	volatile long connected;
	volatile long model_w, model_h;
	volatile bool paused, hold_last;
	volatile uint16_t port;

	/* settings as last seen, to send only what changed */
	char *last_style;
	double last_strength;
	long long last_steps, last_seed;
	bool last_paused;
	bool settings_seen;

	/* network threads */
	pthread_t net_thread;
	bool net_started;
	volatile bool stopping;
	os_event_t *wake;
	l2d_socket_t sock;

	/* status line (tick) */
	uint64_t last_status_ns;
	long was_connected;
};

/* ---------------------------------------------------------------------------------------------
 * commands: the engine's schema ({"app": "live2diff", "v": 1, "kind": "command", "cmd": ...}) */

static obs_data_t *command_new(const char *cmd)
{
	obs_data_t *d = obs_data_create();
	obs_data_set_string(d, "app", "live2diff");
	obs_data_set_int(d, "v", 1);
	obs_data_set_string(d, "kind", "command");
	obs_data_set_string(d, "cmd", cmd);
	return d;
}

static void queue_command(struct l2d_filter *f, obs_data_t *d)
{
	const char *json = obs_data_get_json(d);
	pthread_mutex_lock(&f->lock);
	if (f->n_commands < MAX_COMMANDS)
		f->commands[f->n_commands++] = bstrdup(json);
	else
		blog(LOG_WARNING, "[live2diff] too many commands waiting for the engine; dropped one");
	pthread_mutex_unlock(&f->lock);
	obs_data_release(d);
	os_event_signal(f->wake);
}

static void send_prompt(struct l2d_filter *f, const char *prompt)
{
	obs_data_t *d = command_new("set_prompt");
	obs_data_set_string(d, "prompt", prompt ? prompt : "");
	queue_command(f, d);
}

/* ---------------------------------------------------------------------------------------------
 * the engine's status (JSON objects only: obs_data keeps arrays of objects) */

static void take_status(struct l2d_filter *f, const char *json)
{
	obs_data_t *d = obs_data_create_from_json(json);
	if (!d)
		return;
	const char *kind = obs_data_get_string(d, "kind");
	if (strcmp(kind, "status") == 0) {
		long long w = obs_data_get_int(d, "width"), h = obs_data_get_int(d, "height");
		if (w >= 8 && h >= 8 && w <= L2D_MAX_SIDE && h <= L2D_MAX_SIDE) {
			os_atomic_set_long(&f->model_w, (long)w);
			os_atomic_set_long(&f->model_h, (long)h);
		}
		pthread_mutex_lock(&f->lock);
		snprintf(f->engine_state, sizeof(f->engine_state), "%s", obs_data_get_string(d, "state"));
		obs_data_array_t *arr = obs_data_get_array(d, "styles");
		if (arr) {
			size_t n = obs_data_array_count(arr);
			bool same = (int)n == f->n_styles;
			char *names[MAX_STYLES];
			int count = 0;
			for (size_t i = 0; i < n && count < MAX_STYLES; i++) {
				obs_data_t *item = obs_data_array_item(arr, i);
				const char *name = obs_data_get_string(item, "name");
				if (name && *name) {
					if (same && (count >= f->n_styles || strcmp(f->styles[count], name) != 0))
						same = false;
					names[count++] = bstrdup(name);
				}
				obs_data_release(item);
			}
			if (same && count == f->n_styles) {
				for (int i = 0; i < count; i++)
					bfree(names[i]);
			} else {
				for (int i = 0; i < f->n_styles; i++)
					bfree(f->styles[i]);
				memcpy(f->styles, names, sizeof(char *) * (size_t)count);
				f->n_styles = count;
				f->styles_changed = true;
			}
			obs_data_array_release(arr);
		}
		pthread_mutex_unlock(&f->lock);
	} else if (strcmp(kind, "reply") == 0 && !obs_data_get_bool(d, "ok")) {
		pthread_mutex_lock(&f->lock);
		snprintf(f->engine_error, sizeof(f->engine_error), "%s", obs_data_get_string(d, "error"));
		pthread_mutex_unlock(&f->lock);
		blog(LOG_WARNING, "[live2diff] the engine refused a command: %s", obs_data_get_string(d, "error"));
	}
	obs_data_release(d);
}

/* ---------------------------------------------------------------------------------------------
 * network threads */

struct reader_args {
	struct l2d_filter *f;
	l2d_socket_t sock;
	volatile bool done;
};

static void *reader_main(void *param)
{
	struct reader_args *r = param;
	struct l2d_filter *f = r->f;
	uint8_t head[L2D_HEADER_BYTES];
	uint8_t *buf = NULL;
	size_t cap = 0;
	os_set_thread_name("live2diff-recv");
	for (;;) {
		struct l2d_header h;
		if (!l2d_recv_all(r->sock, head, sizeof(head)))
			break;
		if (!l2d_unpack_header(head, &h)) {
			blog(LOG_WARNING, "[live2diff] the engine sent something that is not a Live2Diff message; reconnecting");
			break;
		}
		if (cap < (size_t)h.length + 1) {
			cap = (size_t)h.length + 1;
			buf = brealloc(buf, cap);
		}
		if (h.length && !l2d_recv_all(r->sock, buf, h.length))
			break;
		if (h.kind == L2D_KIND_JSON) {
			buf[h.length] = 0;
			take_status(f, (const char *)buf);
			continue;
		}
		uint64_t now = os_gettime_ns();
		pthread_mutex_lock(&f->lock);
		/* latest wins: swap buffers with the one the render thread reads */
		uint8_t *old = f->recv_buf;
		size_t old_cap = f->recv_cap;
		f->recv_buf = buf;
		f->recv_cap = cap;
		buf = old;
		cap = old_cap;
		f->recv_new = true;
		f->recv_w = h.width;
		f->recv_h = h.height;
		f->recv_stamp = h.stamp;
		f->recv_arrived = now;
		f->frames_back++;
		if (now > h.stamp && h.stamp) {
			double ms = (double)(now - h.stamp) / 1e6;
			f->latency_ms = f->latency_ms > 0 ? 0.9 * f->latency_ms + 0.1 * ms : ms;
		}
		pthread_mutex_unlock(&f->lock);
	}
	bfree(buf);
	r->done = true;
	os_event_signal(f->wake);
	return NULL;
}

static bool send_pending(struct l2d_filter *f, l2d_socket_t s)
{
	for (;;) {
		char *cmd = NULL;
		pthread_mutex_lock(&f->lock);
		if (f->n_commands) {
			cmd = f->commands[0];
			memmove(f->commands, f->commands + 1, sizeof(char *) * (size_t)(f->n_commands - 1));
			f->n_commands--;
		}
		pthread_mutex_unlock(&f->lock);
		if (!cmd)
			break;
		uint8_t head[L2D_HEADER_BYTES];
		struct l2d_header h = {L2D_KIND_JSON, 0, 0, 0, (uint32_t)strlen(cmd)};
		l2d_pack_header(head, &h);
		bool ok = l2d_send_all(s, head, sizeof(head)) && l2d_send_all(s, cmd, h.length);
		bfree(cmd);
		if (!ok)
			return false;
	}
	/* The newest frame is swapped into the sender's own buffer (a pointer swap under the lock)
	 * and sent without the lock: the render thread and the tick never wait for the engine. */
	uint32_t w, h;
	uint64_t stamp;
	pthread_mutex_lock(&f->lock);
	if (!f->send_ready) {
		pthread_mutex_unlock(&f->lock);
		return true;
	}
	uint8_t *tmp = f->send_buf;
	size_t tmp_cap = f->send_cap;
	f->send_buf = f->sending_buf;
	f->send_cap = f->sending_cap;
	f->sending_buf = tmp;
	f->sending_cap = tmp_cap;
	w = f->send_w;
	h = f->send_h;
	stamp = f->send_stamp;
	f->send_ready = false;
	f->frames_sent++;
	pthread_mutex_unlock(&f->lock);
	uint8_t head[L2D_HEADER_BYTES];
	struct l2d_header hd = {L2D_KIND_FRAME, w, h, stamp, w * h * 4u};
	l2d_pack_header(head, &hd);
	return l2d_send_all(s, head, sizeof(head)) && l2d_send_all(s, f->sending_buf, hd.length);
}

static void *net_main(void *param)
{
	struct l2d_filter *f = param;
	bool told_absent = false;
	os_set_thread_name("live2diff-net");
	while (!f->stopping) {
		l2d_socket_t s = l2d_connect(f->port);
		if (s == L2D_NO_SOCKET) {
			if (!told_absent)
				blog(LOG_INFO, "[live2diff] no engine on 127.0.0.1:%u; showing the source as it is and retrying",
				     (unsigned)f->port);
			told_absent = true;
			os_event_timedwait(f->wake, 500);
			continue;
		}
		told_absent = false;
		blog(LOG_INFO, "[live2diff] connected to the engine on 127.0.0.1:%u", (unsigned)f->port);
		struct reader_args r = {f, s, false};
		pthread_t reader;
		if (pthread_create(&reader, NULL, reader_main, &r) != 0) {
			l2d_close(s);
			os_event_timedwait(f->wake, 500);
			continue;
		}
		pthread_mutex_lock(&f->lock);
		f->sock = s;
		f->send_ready = false; /* a frame staged for the previous engine is stale */
		pthread_mutex_unlock(&f->lock);
		os_atomic_set_long(&f->connected, 1);
		while (!f->stopping && !r.done) {
			if (!send_pending(f, s))
				break;
			os_event_timedwait(f->wake, 100);
		}
		os_atomic_set_long(&f->connected, 0);
		l2d_shutdown(s);
		pthread_join(reader, NULL);
		pthread_mutex_lock(&f->lock);
		f->sock = L2D_NO_SOCKET;
		pthread_mutex_unlock(&f->lock);
		l2d_close(s);
		blog(LOG_INFO, "[live2diff] the engine went away; showing the source as it is and reconnecting");
	}
	return NULL;
}

/* ---------------------------------------------------------------------------------------------
 * OBS source callbacks */

static const char *l2d_get_name(void *unused)
{
	UNUSED_PARAMETER(unused);
	return "Live2Diff";
}

static void l2d_update(void *data, obs_data_t *settings)
{
	struct l2d_filter *f = data;
	const char *style = obs_data_get_string(settings, "style");
	double strength = obs_data_get_double(settings, "strength");
	long long steps = obs_data_get_int(settings, "steps");
	long long seed = obs_data_get_int(settings, "seed");
	bool paused = obs_data_get_bool(settings, "pause");
	long long port = obs_data_get_int(settings, "port");
	f->hold_last = obs_data_get_bool(settings, "hold_last");
	if (port > 0 && port < 65536 && (uint16_t)port != f->port) {
		f->port = (uint16_t)port;
		pthread_mutex_lock(&f->lock);
		if (f->sock != L2D_NO_SOCKET)
			l2d_shutdown(f->sock); /* reconnect on the new port */
		pthread_mutex_unlock(&f->lock);
	}
	if (f->settings_seen) {
		/* only what the user changed goes to the engine: it may have been set elsewhere (the dock) */
		if (*style && (!f->last_style || strcmp(style, f->last_style) != 0)) {
			obs_data_t *d = command_new("set_style");
			obs_data_set_string(d, "style", style);
			queue_command(f, d);
		}
		if (strength != f->last_strength) {
			obs_data_t *d = command_new("set_strength");
			obs_data_set_double(d, "strength", strength);
			queue_command(f, d);
		}
		if (steps != f->last_steps) {
			obs_data_t *d = command_new("set_steps");
			obs_data_set_int(d, "steps", steps);
			queue_command(f, d);
		}
		if (seed != f->last_seed) {
			obs_data_t *d = command_new("set_seed");
			obs_data_set_int(d, "seed", seed);
			queue_command(f, d);
		}
		if (paused != f->last_paused)
			queue_command(f, command_new(paused ? "pause" : "resume"));
	}
	bfree(f->last_style);
	f->last_style = bstrdup(style);
	f->last_strength = strength;
	f->last_steps = steps;
	f->last_seed = seed;
	f->last_paused = paused;
	f->paused = paused;
	f->settings_seen = true;
}

static bool apply_prompt_clicked(obs_properties_t *props, obs_property_t *p, void *data)
{
	UNUSED_PARAMETER(props);
	UNUSED_PARAMETER(p);
	struct l2d_filter *f = data;
	obs_data_t *settings = obs_source_get_settings(f->context);
	send_prompt(f, obs_data_get_string(settings, "prompt"));
	obs_data_release(settings);
	return false;
}

static obs_properties_t *l2d_properties(void *data)
{
	struct l2d_filter *f = data;
	obs_properties_t *props = obs_properties_create();
	obs_properties_add_text(props, "prompt", "Prompt", OBS_TEXT_MULTILINE);
	obs_properties_add_button(props, "apply_prompt", "Apply prompt", apply_prompt_clicked);
	obs_property_t *style =
		obs_properties_add_list(props, "style", "Style", OBS_COMBO_TYPE_LIST, OBS_COMBO_FORMAT_STRING);
	obs_property_list_add_string(style, "(as the engine has it)", "");
	if (f) {
		pthread_mutex_lock(&f->lock);
		for (int i = 0; i < f->n_styles; i++)
			obs_property_list_add_string(style, f->styles[i], f->styles[i]);
		pthread_mutex_unlock(&f->lock);
	}
	obs_properties_add_float_slider(props, "strength", "Strength", 0.05, 1.0, 0.05);
	obs_properties_add_int(props, "steps", "Denoising steps", 1, 4, 1);
	obs_properties_add_int(props, "seed", "Seed", 0, 2147483647, 1);
	obs_properties_add_bool(props, "pause", "Pause (show the source as it is)");
	obs_properties_add_bool(props, "hold_last", "Hold the last stylised frame while the engine is away or slow");
	obs_properties_add_int(props, "port", "Engine port (127.0.0.1)", 1, 65535, 1);
	obs_properties_add_text(props, "status", "Status", OBS_TEXT_INFO);
	return props;
}

static void l2d_defaults(obs_data_t *settings)
{
	obs_data_set_default_string(settings, "prompt", "");
	obs_data_set_default_string(settings, "style", "");
	obs_data_set_default_double(settings, "strength", 0.5);
	obs_data_set_default_int(settings, "steps", 2);
	obs_data_set_default_int(settings, "seed", 2);
	obs_data_set_default_bool(settings, "pause", false);
	obs_data_set_default_bool(settings, "hold_last", false);
	obs_data_set_default_int(settings, "port", DEFAULT_PORT);
	obs_data_set_default_string(settings, "status", "not connected");
}

static void *l2d_create(obs_data_t *settings, obs_source_t *source)
{
	struct l2d_filter *f = bzalloc(sizeof(*f));
	f->context = source;
	f->sock = L2D_NO_SOCKET;
	f->model_w = DEFAULT_SIDE;
	f->model_h = DEFAULT_SIDE;
	f->port = DEFAULT_PORT;
	pthread_mutex_init_value(&f->lock);
	if (pthread_mutex_init(&f->lock, NULL) != 0 || os_event_init(&f->wake, OS_EVENT_TYPE_AUTO) != 0) {
		bfree(f);
		return NULL;
	}
	l2d_update(f, settings);
	obs_enter_graphics();
	f->texrender = gs_texrender_create(GS_RGBA, GS_ZS_NONE);
	obs_leave_graphics();
	f->net_started = pthread_create(&f->net_thread, NULL, net_main, f) == 0;
	return f;
}

static void l2d_destroy(void *data)
{
	struct l2d_filter *f = data;
	f->stopping = true;
	pthread_mutex_lock(&f->lock);
	if (f->sock != L2D_NO_SOCKET)
		l2d_shutdown(f->sock);
	pthread_mutex_unlock(&f->lock);
	os_event_signal(f->wake);
	if (f->net_started)
		pthread_join(f->net_thread, NULL);
	obs_enter_graphics();
	gs_texrender_destroy(f->texrender);
	gs_stagesurface_destroy(f->stage[0]);
	gs_stagesurface_destroy(f->stage[1]);
	gs_texture_destroy(f->out_tex);
	obs_leave_graphics();
	for (int i = 0; i < f->n_commands; i++)
		bfree(f->commands[i]);
	for (int i = 0; i < f->n_styles; i++)
		bfree(f->styles[i]);
	bfree(f->send_buf);
	bfree(f->sending_buf);
	bfree(f->recv_buf);
	bfree(f->last_style);
	os_event_destroy(f->wake);
	pthread_mutex_destroy(&f->lock);
	bfree(f);
}

/* The frame staged a frame ago, mapped now (its copy is done by then: no stall), into the send
 * buffer unless the sender still has the previous one. */
static void take_staged(struct l2d_filter *f, int i)
{
	uint8_t *data;
	uint32_t linesize;
	if (!f->staged[i] || !gs_stagesurface_map(f->stage[i], &data, &linesize))
		return;
	f->staged[i] = false;
	if (pthread_mutex_trylock(&f->lock) == 0) {
		size_t row = (size_t)f->stage_w * 4u, need = row * f->stage_h;
		if (f->send_cap < need) {
			f->send_buf = brealloc(f->send_buf, need);
			f->send_cap = need;
		}
		for (uint32_t y = 0; y < f->stage_h; y++)
			memcpy(f->send_buf + row * y, data + (size_t)linesize * y, row);
		if (f->send_ready)
			f->frames_skipped++;
		f->send_ready = true;
		f->send_w = f->stage_w;
		f->send_h = f->stage_h;
		f->send_stamp = f->stage_stamp[i];
		pthread_mutex_unlock(&f->lock);
		os_event_signal(f->wake);
	} else {
		f->frames_skipped++;
	}
	gs_stagesurface_unmap(f->stage[i]);
}

static void capture(struct l2d_filter *f, obs_source_t *target, uint32_t cx, uint32_t cy)
{
	uint32_t w = (uint32_t)os_atomic_load_long(&f->model_w), h = (uint32_t)os_atomic_load_long(&f->model_h);
	if (w != f->stage_w || h != f->stage_h) {
		gs_stagesurface_destroy(f->stage[0]);
		gs_stagesurface_destroy(f->stage[1]);
		f->stage[0] = gs_stagesurface_create(w, h, GS_RGBA);
		f->stage[1] = gs_stagesurface_create(w, h, GS_RGBA);
		f->staged[0] = f->staged[1] = false;
		f->stage_w = w;
		f->stage_h = h;
	}
	int i = f->stage_next;
	take_staged(f, i); /* staged two renders ago on this surface: one frame for the copy */
	gs_texrender_reset(f->texrender);
	if (!gs_texrender_begin(f->texrender, w, h))
		return;
	struct vec4 clear;
	vec4_zero(&clear);
	gs_clear(GS_CLEAR_COLOR, &clear, 0.0f, 0);
	gs_ortho(0.0f, (float)cx, 0.0f, (float)cy, -100.0f, 100.0f);
	gs_blend_state_push();
	gs_blend_function(GS_BLEND_ONE, GS_BLEND_ZERO);
	obs_source_video_render(target);
	gs_blend_state_pop();
	gs_texrender_end(f->texrender);
	gs_stage_texture(f->stage[i], gs_texrender_get_texture(f->texrender));
	f->stage_stamp[i] = os_gettime_ns();
	f->staged[i] = true;
	f->stage_next = i ^ 1;
}

static void upload_latest(struct l2d_filter *f)
{
	if (pthread_mutex_trylock(&f->lock) != 0)
		return; /* the reader is swapping a frame in: next frame */
	if (f->recv_new) {
		if (!f->out_tex || f->out_w != f->recv_w || f->out_h != f->recv_h) {
			gs_texture_destroy(f->out_tex);
			f->out_tex = gs_texture_create(f->recv_w, f->recv_h, GS_RGBA, 1, NULL, GS_DYNAMIC);
			f->out_w = f->recv_w;
			f->out_h = f->recv_h;
		}
		if (f->out_tex)
			gs_texture_set_image(f->out_tex, f->recv_buf, f->recv_w * 4u, false);
		f->out_arrived = f->recv_arrived;
		f->recv_new = false;
	}
	pthread_mutex_unlock(&f->lock);
}

static void l2d_render(void *data, gs_effect_t *effect)
{
	UNUSED_PARAMETER(effect);
	struct l2d_filter *f = data;
	obs_source_t *target = obs_filter_get_target(f->context);
	uint32_t cx = target ? obs_source_get_base_width(target) : 0;
	uint32_t cy = target ? obs_source_get_base_height(target) : 0;
	bool connected = os_atomic_load_long(&f->connected) != 0;
	if (!cx || !cy || !f->texrender) {
		obs_source_skip_video_filter(f->context);
		return;
	}
	if (connected && !f->paused && !f->captured) {
		capture(f, target, cx, cy);
		f->captured = true;
	}
	upload_latest(f);
	bool fresh = connected && f->out_arrived && os_gettime_ns() - f->out_arrived < STALE_NS;
	if (f->paused || !f->out_tex || !(fresh || f->hold_last)) {
		obs_source_skip_video_filter(f->context);
		return;
	}
	gs_effect_t *e = obs_get_base_effect(OBS_EFFECT_DEFAULT);
	gs_eparam_t *image = gs_effect_get_param_by_name(e, "image");
	gs_effect_set_texture(image, f->out_tex);
	while (gs_effect_loop(e, "Draw"))
		gs_draw_sprite(f->out_tex, 0, cx, cy);
}

/* Once a second: the status line (FPS and latency of the stylised frames coming back), kept in
 * the filter's settings ("status"), so the properties window and obs-websocket show it. */
static void l2d_tick(void *data, float seconds)
{
	UNUSED_PARAMETER(seconds);
	struct l2d_filter *f = data;
	f->captured = false;
	uint64_t now = os_gettime_ns();
	if (now - f->last_status_ns < 1000000000ull)
		return;
	double span = f->last_status_ns ? (double)(now - f->last_status_ns) / 1e9 : 1.0;
	f->last_status_ns = now;
	long connected = os_atomic_load_long(&f->connected);
	char line[512];
	bool refresh;
	pthread_mutex_lock(&f->lock);
	double fps = f->frames_back / span;
	f->frames_back = 0;
	if (!connected)
		snprintf(line, sizeof(line), "no engine on 127.0.0.1:%u (start `live2diff-engine run --source obs-filter`); showing the source as it is",
			 (unsigned)f->port);
	else if (f->paused)
		snprintf(line, sizeof(line), "paused: showing the source as it is");
	else
		snprintf(line, sizeof(line), "engine %s | %.1f fps | latency %.0f ms | %ux%u | sent %llu, skipped %llu%s%s",
			 f->engine_state[0] ? f->engine_state : "connected", fps, f->latency_ms,
			 (unsigned)os_atomic_load_long(&f->model_w), (unsigned)os_atomic_load_long(&f->model_h),
			 (unsigned long long)f->frames_sent, (unsigned long long)f->frames_skipped,
			 f->engine_error[0] ? " | last refusal: " : "", f->engine_error);
	refresh = f->styles_changed || connected != f->was_connected;
	f->styles_changed = false;
	pthread_mutex_unlock(&f->lock);
	f->was_connected = connected;
	obs_data_t *settings = obs_source_get_settings(f->context);
	obs_data_set_string(settings, "status", line);
	obs_data_release(settings);
	if (refresh) /* the style list, or the connection, changed: an open properties window shows it */
		obs_source_update_properties(f->context);
}

static struct obs_source_info live2diff_filter = {
	.id = "live2diff_filter",
	.type = OBS_SOURCE_TYPE_FILTER,
	.output_flags = OBS_SOURCE_VIDEO,
	.get_name = l2d_get_name,
	.create = l2d_create,
	.destroy = l2d_destroy,
	.update = l2d_update,
	.get_defaults = l2d_defaults,
	.get_properties = l2d_properties,
	.video_render = l2d_render,
	.video_tick = l2d_tick,
};

bool obs_module_load(void)
{
	l2d_net_init();
	obs_register_source(&live2diff_filter);
	blog(LOG_INFO, "[live2diff] Live2Diff filter loaded (engine on 127.0.0.1, port %d by default)", DEFAULT_PORT);
	return true;
}
