// Live2Diff dock: status and controls over the engine's WebSocket (/api/ws).
// Plain script, no dependencies, no inline handlers (works under a strict CSP and offline).
(() => {
  'use strict';

  const $ = (id) => document.getElementById(id);
  // The token (the OBS script puts it in the dock's link) is traded once for the engine's HttpOnly,
  // SameSite=Strict cookie (POST /api/login), taken out of the address at once, and kept out of every
  // later URL (the WebSocket, /api/styles, uploads): URLs land in logs, cookies do not. An engine
  // without /api/login (older) still gets it in the query, as before.
  const params = new URLSearchParams(location.search);
  let linkToken = params.get('token') || '';
  if (params.has('token')) {
    params.delete('token');
    const rest = params.toString();
    window.history.replaceState(null, '', location.pathname + (rest ? '?' + rest : '') + location.hash);
  }
  let query = '';
  async function login() {
    if (!linkToken) return;
    const token = linkToken;
    try {
      const resp = await fetch('/api/login', { method: 'POST', headers: { Authorization: 'Bearer ' + token }, cache: 'no-store' });
      if (resp.ok) {
        linkToken = '';
        query = '';
        return;
      }
    } catch (e) { /* the engine is not up yet: connect() retries, and so does this */ return; }
    query = '?token=' + encodeURIComponent(token);  // an older engine, or a wrong token (the refusal shows as before)
  }
  const HISTORY_KEY = 'live2diff.dock.history';
  const HISTORY_MAX = 20;
  const REPLY_TIMEOUT_MS = 60000;
  // The engine sends status every second; ten missed in a row mean a frozen engine or a sleeping
  // machine. Fewer would also drop a healthy connection on a streaming PC busy encoding.
  const STALE_MS = 10000;
  const RETRY_MIN_MS = 500;
  const RETRY_MAX_MS = 10000;
  const TOAST_MS = 6000;
  const NAMES = {
    set_prompt: 'Prompt', set_negative_prompt: 'Negative prompt', set_style: 'Style',
    set_strength: 'Strength', set_steps: 'Steps', set_seed: 'Seed', set_guidance: 'Guidance',
    pause: 'Pause', resume: 'Resume', reset: 'Reset', download_style: 'Download',
    set_style_image_scale: 'Picture scale', clear_style_image: 'Clear picture',
  };
  const PICTURE_TYPES = ['image/png', 'image/jpeg', 'image/webp'];
  const PICTURE_MAX_BYTES = 8 * 1024 * 1024; // the engine's cap (it answers 413 beyond)

  const el = {
    conn: $('conn'), main: $('main'), controls: $('controls'),
    state: $('f-state'), fps: $('f-fps'), latency: $('f-latency'), style: $('f-style'), frames: $('f-frames'),
    lastError: $('last-error'), toast: $('toast'), about: $('about'), obsSource: $('obs-source'), link: $('link'),
    prompt: $('prompt'), promptApply: $('prompt-apply'),
    transition: $('transition'), transitionValue: $('transition-value'), transitionProgress: $('transition-progress'),
    prompt2: $('prompt2'), blend: $('blend'), blendValue: $('blend-value'), blendBox: $('blend-box'), history: $('history'), historyEmpty: $('history-empty'),
    negative: $('negative'), negativeApply: $('negative-apply'),
    guidance: $('guidance'), guidanceApply: $('guidance-apply'),
    styles: $('styles'), strength: $('strength'), strengthValue: $('strength-value'),
    steps: $('steps'), seed: $('seed'), seedApply: $('seed-apply'),
    pause: $('pause'), reset: $('reset'),
    fetch: $('style-fetch'), fetchText: $('style-fetch-text'), fetchCommand: $('style-fetch-command'),
    fetchNote: $('style-fetch-note'), download: $('style-download'), fetchClose: $('style-fetch-close'),
    dl: $('download'), dlText: $('download-text'), dlProgress: $('download-progress'),
    styleLoading: $('style-loading'),
    pictureDrop: $('picture-drop'), pictureFile: $('picture-file'), pictureState: $('picture-state'),
    pictureScale: $('picture-scale'), pictureScaleValue: $('picture-scale-value'), pictureClear: $('picture-clear'),
  };

  let ws = null;
  let live = false;
  let retryMs = RETRY_MIN_MS;
  let retryTimer = 0;
  let countdownTimer = 0;
  let lastMessageAt = 0;
  let nextId = 0;
  let status = null;
  let shownStyles = null;
  let fetchStyle = null; // the missing style whose "how to get it" box is open
  let lastDownload = null;
  let descriptions = {};
  let dragging = false;
  let toastTimer = 0;
  let uploading = false; // a style picture on its way to the engine (or being encoded there)
  const pending = new Map(); // id -> {cmd, onReply, timer}
  const dirty = new Set(); // fields edited by the user and not applied yet

  // -- connection ------------------------------------------------------------------------------

  function setConn(kind, text) {
    el.conn.className = 'conn conn-' + kind;
    el.conn.textContent = text;
    el.conn.dataset.state = kind;
  }

  function setLive(on) {
    live = on;
    el.main.classList.toggle('stale', !on);
    for (const b of el.controls.querySelectorAll('button, select, input[type="range"]')) {
      b.disabled = !on;
    }
  }

  function connect() {
    clearTimeout(retryTimer);
    clearInterval(countdownTimer);
    if (!location.host) {
      setConn('disconnected', 'disconnected');
      toast('Open this page from the engine: http://127.0.0.1:8765/dock');
      return;
    }
    setConn('connecting', 'connecting\u2026');
    const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
    let sock;
    try {
      sock = new WebSocket(`${proto}//${location.host}/api/ws${query}`);
    } catch (e) {
      retry();
      return;
    }
    ws = sock;
    sock.addEventListener('open', () => {
      if (sock !== ws) return;
      retryMs = RETRY_MIN_MS;
      lastMessageAt = Date.now();
      setConn('connected', 'connected');
      setLive(true);
      loadDescriptions();
    });
    sock.addEventListener('message', (ev) => {
      if (sock !== ws) return;
      lastMessageAt = Date.now();
      let msg;
      try {
        msg = JSON.parse(ev.data);
      } catch (e) {
        return;
      }
      if (!msg || msg.app !== 'live2diff') return;
      if (msg.kind === 'status') render(msg);
      else if (msg.kind === 'reply') onReply(msg);
    });
    sock.addEventListener('close', () => dropped(sock));
    sock.addEventListener('error', () => dropped(sock));
  }

  function dropped(sock) {
    if (sock !== ws) return;
    ws = null;
    try {
      sock.close();
    } catch (e) { /* already closed */ }
    const lost = pending.size > 0;
    for (const [id, p] of pending) {
      pending.delete(id);
      clearTimeout(p.timer);
      if (p.onReply) p.onReply({ ok: false, error: 'connection lost' });
    }
    if (lost) toast('Connection lost before the engine answered');
    setLive(false);
    figures({}); // no frame rate or latency from an engine not heard from
    retry();
  }

  function retry() {
    const delay = Math.min(retryMs, RETRY_MAX_MS);
    retryMs = Math.min(retryMs * 2, RETRY_MAX_MS);
    const at = Date.now() + delay;
    const show = () => {
      const s = Math.max(0, Math.ceil((at - Date.now()) / 1000));
      setConn('disconnected', `disconnected \u00b7 retry in ${s} s`);
    };
    show();
    countdownTimer = setInterval(show, 1000);
    retryTimer = setTimeout(() => login().then(connect), delay);
  }

  // A connection that went quiet (engine frozen, machine asleep) is replaced.
  setInterval(() => {
    if (ws && ws.readyState === WebSocket.OPEN && Date.now() - lastMessageAt > STALE_MS) dropped(ws);
  }, 1000);

  function loadDescriptions() {
    if (!window.fetch) return;
    fetch('/api/styles' + query, { cache: 'no-store' })
      .then((r) => (r.ok ? r.json() : null))
      .then((data) => {
        if (!data || !Array.isArray(data.styles)) return;
        descriptions = {};
        for (const s of data.styles) if (s && s.name) descriptions[s.name] = s.description || '';
        for (const b of el.styles.children) styleTitle(b);
      })
      .catch(() => {});
  }

  // -- commands --------------------------------------------------------------------------------

  function send(cmd, args, onReply) {
    if (!ws || ws.readyState !== WebSocket.OPEN) {
      toast('Not connected to the engine');
      if (onReply) onReply({ ok: false, error: 'not connected' });
      return false;
    }
    const id = ++nextId;
    const timer = setTimeout(() => {
      const p = pending.get(id);
      if (!p) return;
      pending.delete(id);
      toast(`${NAMES[cmd] || cmd}: no answer from the engine`);
      if (p.onReply) p.onReply({ ok: false, error: 'timeout' });
    }, REPLY_TIMEOUT_MS);
    pending.set(id, { cmd, onReply, timer });
    ws.send(JSON.stringify(Object.assign({ app: 'live2diff', v: 1, kind: 'command', cmd, id }, args || {})));
    return true;
  }

  function onReply(msg) {
    const p = pending.get(msg.id);
    if (!p) {
      if (!msg.ok && msg.error) toast(msg.error);
      return;
    }
    pending.delete(msg.id);
    clearTimeout(p.timer);
    if (!msg.ok) toast(`${NAMES[p.cmd] || p.cmd}: ${msg.error || 'refused'}`);
    if (p.onReply) p.onReply(msg);
  }

  function busy(cmd) {
    for (const p of pending.values()) if (p.cmd === cmd) return true;
    return false;
  }

  function toast(text, kind) {
    el.toast.textContent = text;
    el.toast.className = 'toast' + (kind ? ' ' + kind : '');
    el.toast.hidden = false;
    clearTimeout(toastTimer);
    // Long enough to read: a few seconds more for a long reason.
    toastTimer = setTimeout(() => { el.toast.hidden = true; }, Math.min(TOAST_MS + 40 * text.length, 15000));
  }

  // A text field the user has edited keeps its text until it is applied (or Escape is pressed).
  function applyField(input, cmd, key, value, after) {
    const sent = input.value;
    const args = { [key]: value };
    const t = transitionSeconds();
    if (t > 0 && TRANSITIONS.has(cmd)) args.transition_s = t;
    return send(cmd, args, (r) => {
      if (r.ok && input.value === sent) dirty.delete(input.id);
      if (after) after(r);
    });
  }

  // Commands that take a transition (the slider beside Apply): the look moves in over that time.
  const TRANSITIONS = new Set(['set_prompt', 'set_negative_prompt', 'set_style', 'set_seed']);

  function transitionSeconds() {
    const t = Number(el.transition.value);
    return Number.isFinite(t) && t > 0 ? Math.min(t, 10) : 0;
  }

  // The prompt, or a blend of it with the second prompt (weights: 1 - mix and mix).
  function promptValue() {
    const text = el.prompt.value;
    const second = el.prompt2.value.trim();
    const mix = Number(el.blend.value);
    if (!second || !(mix > 0)) return text;
    if (mix >= 1) return [{ text: second, weight: 1 }];
    return [{ text: text, weight: 1 - mix }, { text: second, weight: mix }];
  }

  function applyPrompt() {
    const text = el.prompt.value;
    const sent2 = el.prompt2.value;
    applyField(el.prompt, 'set_prompt', 'prompt', promptValue(), (r) => {
      if (r.ok) {
        remember(text.trim());
        if (el.prompt2.value === sent2) dirty.delete(el.prompt2.id);
        dirty.delete(el.blend.id);
      }
    });
  }

  function applyNegative() {
    applyField(el.negative, 'set_negative_prompt', 'negative_prompt', el.negative.value);
  }

  function applyGuidance() {
    const raw = el.guidance.value.trim();
    const g = Number(raw);
    if (raw === '' || !Number.isFinite(g) || g < 1 || g > 20) {
      toast('Guidance: a number from 1 (none) to 20');
      return;
    }
    applyField(el.guidance, 'set_guidance', 'guidance', g);
  }

  function applySeed() {
    const raw = el.seed.value.trim();
    const seed = Number(raw);
    if (raw === '' || !Number.isInteger(seed) || seed < 0 || seed > 4294967295) {
      toast('Seed: a whole number from 0 to 4294967295');
      return;
    }
    applyField(el.seed, 'set_seed', 'seed', seed);
  }

  function setField(input, value) {
    if (value === undefined || value === null) return;
    if (document.activeElement === input || dirty.has(input.id)) return;
    const text = String(value);
    if (input.value !== text) input.value = text;
  }

  // -- prompt history --------------------------------------------------------------------------

  function loadHistory() {
    try {
      const list = JSON.parse(localStorage.getItem(HISTORY_KEY) || '[]');
      return Array.isArray(list) ? list.filter((x) => typeof x === 'string' && x).slice(0, HISTORY_MAX) : [];
    } catch (e) {
      return [];
    }
  }

  function saveHistory(list) {
    try {
      localStorage.setItem(HISTORY_KEY, JSON.stringify(list));
    } catch (e) { /* storage off or full: the list lives for this session only */ }
  }

  let history = loadHistory();

  function remember(text) {
    if (!text) return;
    history = [text].concat(history.filter((x) => x !== text)).slice(0, HISTORY_MAX);
    saveHistory(history);
    renderHistory();
  }

  function renderHistory() {
    el.history.textContent = '';
    for (const text of history) {
      const li = document.createElement('li');
      const b = document.createElement('button');
      b.type = 'button';
      b.textContent = text;
      b.title = text;
      b.dataset.prompt = text;
      b.setAttribute('aria-label', 'Apply again: ' + text);
      li.appendChild(b);
      el.history.appendChild(li);
    }
    el.historyEmpty.hidden = history.length > 0;
  }

  // -- status ----------------------------------------------------------------------------------

  function num(v, digits) {
    return typeof v === 'number' && isFinite(v) ? v.toFixed(digits) : '\u2013';
  }

  // States in which frames go out: the others (starting, stopped) have no frame rate or latency.
  const FLOWING = ['warming up', 'streaming', 'paused', 'no signal', 'compiling'];

  function figures(s) {
    const flowing = FLOWING.indexOf(s.state) >= 0;
    el.fps.textContent = flowing ? num(s.fps, 1) : '\u2013';
    let latency = '\u2013';
    if (flowing && typeof s.latency_ms === 'number') latency = Math.round(s.latency_ms) + ' ms';
    else if (s.state === 'streaming') latency = 'measuring\u2026'; // the stream's first frames are on their way
    el.latency.textContent = latency;
  }

  // The remote link (status "link", from the WebRTC stats: remote/link.py) in one line, or '' without one.
  function linkText(l) {
    if (!l || typeof l !== 'object') return '';
    const n = (v, d) => (typeof v === 'number' && isFinite(v) ? v.toFixed(d) : '\u2013');
    return 'Link: ' + (l.type || '\u2013') + ' \u00b7 RTT ' + n(l.rtt_ms, 0) + ' ms \u00b7 loss ' + n(l.loss_pct, 1) +
      '% in, ' + n(l.loss_out_pct, 1) + '% out \u00b7 jitter ' + n(l.jitter_ms, 0) + ' ms \u00b7 ' + n(l.bitrate_kbps, 0) +
      ' kbps out, ' + n(l.bitrate_in_kbps, 0) + ' in \u00b7 ' + (l.codec || '\u2013') +
      (l.redundancy === 'on' ? ' \u00b7 packets sent twice' : '');
  }

  function render(s) {
    status = s;
    el.state.textContent = s.state || '\u2013';
    el.state.dataset.state = s.state || '';
    figures(s);
    el.style.textContent = s.style || '\u2013';
    el.frames.textContent = typeof s.frames_out === 'number' ? String(s.frames_out) : '\u2013';
    el.link.textContent = linkText(s.link) + (s.node ? ' \u00b7 node ' + s.node : '');
    el.link.hidden = !el.link.textContent;
    el.link.dataset.type = (s.link && s.link.type) || '';
    el.lastError.hidden = !s.last_error;
    el.lastError.textContent = s.last_error ? 'Last error: ' + s.last_error : '';
    // OBS connected is not OBS showing the output: its source may exist and read nothing.
    const notPulling = s.obs === 'connected' && s.obs_source === 'not pulling';
    el.obsSource.hidden = !notPulling;
    el.obsSource.textContent = notPulling
      ? 'OBS source not pulling the stream: OBS shows no new frames (the engine is re-opening its Live2Diff source)' : '';

    const blend = Array.isArray(s.prompt_blend) ? s.prompt_blend : null;
    if (blend && blend.length === 2) { // the dock's own kind of blend: its two prompts and the mix
      setField(el.prompt, blend[0].text);
      setField(el.prompt2, blend[1].text);
      if (!dirty.has(el.blend.id) && document.activeElement !== el.blend) {
        el.blend.value = String(blend[1].weight);
        showBlend();
      }
    } else {
      setField(el.prompt, s.prompt);
      if (!blend && !dirty.has(el.blend.id)) setField(el.prompt2, '');
    }
    const going = typeof s.transition === 'number';
    el.transitionProgress.hidden = !going;
    el.transitionProgress.textContent = going ? `Transition ${Math.round(s.transition * 100)}%` : '';
    setField(el.negative, s.negative_prompt);
    setField(el.seed, s.seed);
    setField(el.guidance, s.guidance);
    if (typeof s.strength === 'number' && !dragging && !busy('set_strength')) {
      el.strength.value = String(s.strength);
      el.strengthValue.textContent = s.strength.toFixed(2);
    }
    if (typeof s.steps === 'number' && !busy('set_steps')) {
      el.steps.value = String(s.steps);
    }

    const names = Array.isArray(s.styles) ? s.styles : [];
    const missing = s.styles_missing && typeof s.styles_missing === 'object' ? s.styles_missing : {};
    const key = names.map((n) => n + (n in missing ? '\u2913' : '')).join('\n');
    if (shownStyles === null || key !== shownStyles) {
      shownStyles = key;
      el.styles.textContent = '';
      for (const name of names) {
        const b = document.createElement('button');
        b.type = 'button';
        b.textContent = name;
        b.dataset.style = name;
        b.disabled = !live;
        if (name in missing) {
          b.classList.add('missing');
          b.dataset.missing = 'true';
          b.setAttribute('aria-label', name + ' (not downloaded)');
        }
        styleTitle(b);
        el.styles.appendChild(b);
      }
    }
    // A style loading beside the stream: the one in use goes on until the new one is swapped in.
    const loading = typeof s.style_loading === 'string' && s.style_loading ? s.style_loading : null;
    for (const b of el.styles.children) {
      b.setAttribute('aria-pressed', String(b.dataset.style === s.style));
      const isLoading = b.dataset.style === loading;
      b.classList.toggle('loading', isLoading);
      if (isLoading) b.setAttribute('aria-busy', 'true'); else b.removeAttribute('aria-busy');
    }
    el.styleLoading.hidden = !loading;
    el.styleLoading.textContent = loading
      ? `Loading style ${loading}\u2026 ${s.style || 'the current style'} keeps streaming until it is in` : '';
    renderFetch();
    renderDownload(s.download);
    renderPicture(s);

    const paused = !!s.paused;
    el.pause.textContent = paused ? 'Resume' : 'Pause';
    el.pause.setAttribute('aria-pressed', String(paused));
    el.pause.title = paused ? 'Diffuse again' : 'Send the camera through unchanged';

    const about = [];
    if (s.model) about.push('model ' + s.model);
    if (Array.isArray(s.size)) about.push(s.size.join('\u00d7'));
    if (s.obs && s.obs !== 'off') about.push('OBS ' + s.obs);
    if (s.obs === 'connected' && s.obs_source === 'pulling') about.push('OBS pulls the stream');
    if (s.obs === 'connected' && s.obs_source === 'absent') about.push('no Live2Diff source in OBS');
    if (s.version) about.push('v' + s.version);
    el.about.textContent = about.join(' \u00b7 ');
  }

  // -- the style picture (IP-Adapter) ------------------------------------------------------------

  function pictureAvailable(s) {
    return !!s && typeof s.style_image_scale === 'number';
  }

  function renderPicture(s) {
    const on = pictureAvailable(s);
    el.pictureDrop.setAttribute('aria-disabled', String(!on || !live));
    el.pictureDrop.classList.toggle('busy', uploading || !!s.style_image_loading);
    el.pictureClear.disabled = !live || !on || !s.style_image;
    el.pictureScale.disabled = !live || !on;
    if (on && !busy('set_style_image_scale') && document.activeElement !== el.pictureScale) {
      el.pictureScale.value = String(s.style_image_scale);
      showPictureScale();
    }
    let text;
    if (!on) text = 'This engine has no IP-Adapter loaded: start it with --ip-adapter to take a style picture';
    else if (uploading || s.style_image_loading) text = 'Reading the picture\u2026 the stream goes on meanwhile';
    else if (!s.style_image) text = 'No picture';
    else if (s.style_image === 'upload') text = 'In use: the picture you sent';
    else text = 'In use: ' + s.style_image.replace(/^style /, 'the picture of style ').replace(/^file /, 'the start picture ');
    el.pictureState.textContent = text;
  }

  function showPictureScale() {
    el.pictureScaleValue.textContent = Number(el.pictureScale.value).toFixed(2);
  }

  // The picture's bytes go to POST /api/style-image (never a path); the reply comes once it steers the stream.
  function uploadPicture(file) {
    if (!file) return;
    if (!live || !pictureAvailable(status)) {
      toast(pictureAvailable(status) ? 'Not connected to the engine' : el.pictureState.textContent);
      return;
    }
    if (!PICTURE_TYPES.includes(file.type)) {
      toast(`Style picture: ${file.name} is not a PNG, JPEG or WebP picture`);
      return;
    }
    if (file.size > PICTURE_MAX_BYTES) {
      toast(`Style picture: ${file.name} is too large (${mb(file.size)} MB, at most ${mb(PICTURE_MAX_BYTES)} MB)`);
      return;
    }
    uploading = true;
    renderPicture(status);
    fetch('/api/style-image' + query, { method: 'POST', headers: { 'Content-Type': file.type }, body: file, cache: 'no-store' })
      .then((r) => r.json().catch(() => ({ ok: false, error: `HTTP ${r.status}` })))
      .then((msg) => {
        if (!msg.ok) toast(`Style picture: ${msg.error || 'refused'}`);
        else if (!msg.superseded) toast(`Style picture: ${file.name} is in`, 'ok');
      })
      .catch(() => toast('Style picture: the engine did not answer'))
      .finally(() => {
        uploading = false;
        renderPicture(status);
      });
  }

  function styleTitle(b) {
    const hint = status && status.styles_missing ? status.styles_missing[b.dataset.style] : null;
    const about = descriptions[b.dataset.style] || '';
    b.title = hint ? (about ? about + ' \u2014 ' : '') + 'not downloaded: ' + hint : about;
  }

  // The box that says how to get a missing style (and offers the download where the engine can).
  function renderFetch() {
    const missing = status && status.styles_missing ? status.styles_missing : {};
    if (!fetchStyle || !(fetchStyle in missing)) {
      fetchStyle = null;
      el.fetch.hidden = true;
      return;
    }
    const hint = missing[fetchStyle];
    const isCommand = hint.indexOf('live2diff-engine ') === 0;
    const can = Array.isArray(status.styles_downloadable) && status.styles_downloadable.indexOf(fetchStyle) >= 0;
    const running = status.download && status.download.state === 'downloading';
    el.fetchText.textContent = `Style ${fetchStyle} is not downloaded yet.` + (isCommand ? ' Get it with:' : '');
    el.fetchCommand.textContent = hint;
    el.download.hidden = !can;
    el.download.textContent = 'Download ' + fetchStyle;
    el.download.disabled = !live || running || busy('download_style');
    el.fetchNote.hidden = can || !isCommand;
    el.fetchNote.textContent = 'The engine has no civitai token: set CIVITAI_TOKEN (or [civitai] token in its '
      + 'config.toml) and restart it to download from here, or run the command above.';
    el.fetch.hidden = false;
  }

  function mb(bytes) {
    return (bytes / 1e6).toFixed(1);
  }

  function renderDownload(d) {
    if (!d || typeof d !== 'object') {
      el.dl.hidden = true;
      return;
    }
    const was = lastDownload;
    lastDownload = d;
    el.dl.hidden = false;
    el.dl.dataset.state = d.state || '';
    el.dl.classList.toggle('failed', d.state === 'failed');
    if (d.state === 'downloading') {
      const files = d.files > 1 ? `, file ${(d.file_index || 0) + 1} of ${d.files}` : '';
      const of = typeof d.total === 'number' ? ' of ' + mb(d.total) : '';
      el.dlText.textContent = `Downloading ${d.style}${files}: ${mb(d.bytes || 0)}${of} MB`;
      el.dlProgress.hidden = false;
      if (typeof d.total === 'number' && d.total > 0) {
        el.dlProgress.max = d.total;
        el.dlProgress.value = d.bytes || 0;
      } else {
        el.dlProgress.removeAttribute('value'); // indeterminate
      }
    } else if (d.state === 'done') {
      el.dlText.textContent = `Style ${d.style} downloaded: it is ready to use`;
      el.dlProgress.hidden = true;
      if (was && was.state === 'downloading' && was.style === d.style) toast(`Style ${d.style} downloaded`, 'ok');
    } else {
      el.dlText.textContent = `Download of ${d.style} failed: ${d.error || 'unknown error'}`;
      el.dlProgress.hidden = true;
    }
  }

  // -- wiring ----------------------------------------------------------------------------------

  for (const input of [el.prompt, el.negative, el.seed, el.guidance]) {
    input.addEventListener('input', () => dirty.add(input.id));
    input.addEventListener('keydown', (e) => {
      if (e.key === 'Escape' && status) { // back to the engine's value
        dirty.delete(input.id);
        const key = { prompt: 'prompt', negative: 'negative_prompt', seed: 'seed', guidance: 'guidance' }[input.id];
        if (status[key] !== undefined && status[key] !== null) input.value = String(status[key]);
      }
    });
  }

  el.prompt.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) {
      e.preventDefault();
      applyPrompt();
    }
  });
  el.promptApply.addEventListener('click', applyPrompt);

  function showTransition() {
    el.transitionValue.textContent = `${transitionSeconds()} s`;
  }
  function showBlend() {
    el.blendValue.textContent = `${Math.round(Number(el.blend.value) * 100)}%`;
  }
  el.transition.addEventListener('input', showTransition);
  el.blend.addEventListener('input', () => { dirty.add(el.blend.id); showBlend(); });
  el.prompt2.addEventListener('input', () => dirty.add(el.prompt2.id));
  el.prompt2.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) {
      e.preventDefault();
      applyPrompt();
    }
  });
  showTransition();
  showBlend();

  el.negative.addEventListener('keydown', (e) => {
    if (e.key === 'Enter') {
      e.preventDefault();
      applyNegative();
    }
  });
  el.negativeApply.addEventListener('click', applyNegative);

  el.seed.addEventListener('keydown', (e) => {
    if (e.key === 'Enter') {
      e.preventDefault();
      applySeed();
    }
  });
  el.seedApply.addEventListener('click', applySeed);

  el.guidance.addEventListener('keydown', (e) => {
    if (e.key === 'Enter') {
      e.preventDefault();
      applyGuidance();
    }
  });
  el.guidanceApply.addEventListener('click', applyGuidance);

  el.history.addEventListener('click', (e) => {
    const b = e.target.closest('button[data-prompt]');
    if (!b) return;
    el.prompt.value = b.dataset.prompt;
    dirty.add(el.prompt.id);
    applyPrompt();
  });

  el.styles.addEventListener('click', (e) => {
    const b = e.target.closest('button[data-style]');
    if (!b || b.classList.contains('busy')) return;
    if (b.dataset.missing === 'true') { // nothing to switch to yet: say how to get it
      fetchStyle = b.dataset.style;
      renderFetch();
      return;
    }
    b.classList.add('busy');
    b.setAttribute('aria-busy', 'true');
    const styleArgs = { style: b.dataset.style };
    if (transitionSeconds() > 0) styleArgs.transition_s = transitionSeconds();
    send('set_style', styleArgs, (r) => {
      b.classList.remove('busy');
      b.removeAttribute('aria-busy');
      // What the style changed beside the look (its strength, steps, template): the engine says.
      if (r.ok && !r.superseded && r.note) toast(r.note, 'ok');
    });
  });

  el.download.addEventListener('click', () => {
    if (!fetchStyle) return;
    el.download.disabled = true;
    send('download_style', { style: fetchStyle }, (r) => {
      if (r.status) render(r.status);
      else renderFetch();
    });
  });
  el.fetchClose.addEventListener('click', () => {
    fetchStyle = null;
    renderFetch();
  });

  el.strength.addEventListener('pointerdown', () => { dragging = true; });
  window.addEventListener('pointerup', () => { dragging = false; });
  window.addEventListener('pointercancel', () => { dragging = false; });
  el.strength.addEventListener('input', () => {
    el.strengthValue.textContent = Number(el.strength.value).toFixed(2);
  });
  el.strength.addEventListener('change', () => {
    dragging = false;
    send('set_strength', { strength: Number(el.strength.value) });
  });

  el.steps.addEventListener('change', () => {
    send('set_steps', { steps: Number(el.steps.value) });
  });

  el.pause.addEventListener('click', () => {
    const paused = status ? !!status.paused : el.pause.getAttribute('aria-pressed') === 'true';
    send(paused ? 'resume' : 'pause', {});
  });
  el.reset.addEventListener('click', () => send('reset', {}, (r) => {
    if (r.ok) toast('Reset: the video starts afresh', 'ok');
  }));
  el.toast.addEventListener('click', () => { el.toast.hidden = true; });

  el.pictureDrop.addEventListener('click', () => {
    if (el.pictureDrop.getAttribute('aria-disabled') !== 'true') el.pictureFile.click();
  });
  el.pictureDrop.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' || e.key === ' ') {
      e.preventDefault();
      el.pictureDrop.click();
    }
  });
  el.pictureDrop.addEventListener('dragover', (e) => {
    e.preventDefault(); // (the browser would open the file in the page instead)
    el.pictureDrop.classList.add('over');
  });
  el.pictureDrop.addEventListener('dragleave', () => el.pictureDrop.classList.remove('over'));
  el.pictureDrop.addEventListener('drop', (e) => {
    e.preventDefault();
    el.pictureDrop.classList.remove('over');
    const files = e.dataTransfer && e.dataTransfer.files;
    uploadPicture(files && files[0]);
  });
  el.pictureFile.addEventListener('change', () => {
    uploadPicture(el.pictureFile.files[0]);
    el.pictureFile.value = '';
  });
  el.pictureScale.addEventListener('input', showPictureScale);
  el.pictureScale.addEventListener('change', () => {
    send('set_style_image_scale', { scale: Number(el.pictureScale.value) });
  });
  el.pictureClear.addEventListener('click', () => send('clear_style_image', {}));
  showPictureScale();

  renderHistory();
  setLive(false);
  login().then(connect);
})();
