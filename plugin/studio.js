// Live2Diff studio: the webcam (getUserMedia) goes to the engine over WebRTC (WHIP, POST /whip),
// the stylised video comes back on the same peer connection, and the data channel "control"
// carries the engine's command schema (the dock's controls) and its status.
'use strict';
(() => {
  // The token never stays in a URL: one given in the link (?token= or, better, #token=, which no
  // server or proxy sees) is taken out of the address bar and this history entry at once, then
  // traded for an HttpOnly, SameSite=Strict cookie (POST /api/login) that every later request of
  // this page carries by itself. Without one in the link, the page asks for it when the engine
  // wants one. The script keeps the token no longer than that one request.
  const params = new URLSearchParams(location.search);
  const hash = new URLSearchParams(location.hash.replace(/^#/, ''));
  let linkToken = params.get('token') || hash.get('token') || '';
  if (params.has('token') || hash.has('token')) {
    params.delete('token');
    hash.delete('token');
    const q = params.toString(), h = hash.toString();
    history.replaceState(history.state, '', location.pathname + (q ? '?' + q : '') + (h ? '#' + h : ''));
  }
  const camW = parseInt(params.get('w') || '640', 10), camH = parseInt(params.get('h') || '480', 10);
  const $ = (id) => document.getElementById(id);
  const el = {
    conn: $('conn'), local: $('local'), remote: $('remote'), start: $('start'), stop: $('stop'),
    controls: $('controls'), toast: $('toast'), prompt: $('prompt'), promptApply: $('prompt-apply'),
    style: $('style'), strength: $('strength'), strengthValue: $('strength-value'), steps: $('steps'),
    pause: $('pause'), reset: $('reset'), login: $('login'), tokenInput: $('token'), loginNote: $('login-note'),
    fState: $('f-state'), fFps: $('f-fps'), fLatency: $('f-latency'), fStyle: $('f-style'), fFrames: $('f-frames'),
    link: $('link'), pictureFile: $('picture-file'), pictureScale: $('picture-scale'),
    pictureScaleValue: $('picture-scale-value'), pictureClear: $('picture-clear'), pictureState: $('picture-state'),
  };
  const PICTURE_TYPES = ['image/png', 'image/jpeg', 'image/webp'];
  const PICTURE_MAX_BYTES = 8 * 1024 * 1024; // the engine's cap
  const PICTURE_CHUNK = 64 * 1024; // a data-channel message every peer takes (remote/picture.py)
  let sendingPicture = false;
  let pc = null, channel = null, camera = null, location_ = null, nextId = 1, status = null;
  let retryTimer = null; // a start again after a 503's Retry-After (every stream slot or GPU in use)
  const editing = new Set();  // controls being edited: status updates leave them alone

  function setConn(state, text) {
    el.conn.className = 'conn conn-' + state;
    el.conn.textContent = text;
    el.conn.dataset.state = state;
  }
  function toast(text) {
    el.toast.textContent = text;
    el.toast.hidden = !text;
  }
  function headers(type) {  // the cookie carries the token, where the engine wants one
    return type ? { 'Content-Type': type } : {};
  }

  // -- the token: once, for a cookie ------------------------------------------------------------
  let authorised = false;
  function showLogin(note) {
    el.login.hidden = false;
    el.loginNote.textContent = note || '';
    el.tokenInput.focus();
  }
  async function login(token) {
    const resp = await fetch('/api/login', { method: 'POST', headers: { Authorization: 'Bearer ' + token }, cache: 'no-store' });
    authorised = resp.status === 204;
    if (authorised) {
      el.login.hidden = true;
      el.loginNote.textContent = '';
    } else {
      showLogin(resp.status === 401 || resp.status === 429 ? 'wrong token' : 'the engine answered HTTP ' + resp.status);
    }
    return authorised;
  }
  async function checkAccess() {
    if (linkToken) {
      const token = linkToken;
      linkToken = '';
      await login(token);
      return;
    }
    const resp = await fetch('/api/status', { cache: 'no-store' });
    authorised = resp.status !== 401;
    if (!authorised) showLogin('');
  }
  const accessChecked = checkAccess().catch((e) => toast(String(e.message || e)));
  el.login.addEventListener('submit', async (e) => {
    e.preventDefault();
    const token = el.tokenInput.value;
    el.tokenInput.value = '';
    if (token) await login(token);
  });

  function send(cmd, fields) {
    if (!channel || channel.readyState !== 'open') { toast('not connected'); return; }
    channel.send(JSON.stringify(Object.assign({ app: 'live2diff', v: 1, kind: 'command', cmd, id: String(nextId++) }, fields || {})));
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

  function showStatus(s) {
    status = s;
    el.fState.textContent = s.state || '–';
    el.fState.dataset.state = s.state || '';
    el.fFps.textContent = typeof s.fps === 'number' ? s.fps.toFixed(1) : '–';
    el.fLatency.textContent = typeof s.latency_ms === 'number' ? Math.round(s.latency_ms) + ' ms' : '–';
    el.fStyle.textContent = s.style || '–';
    el.fFrames.textContent = s.frames_out != null ? String(s.frames_out) : '–';
    el.link.textContent = linkText(s.link);  // the engine's view of this page's connection
    el.link.hidden = !el.link.textContent;
    el.link.dataset.type = (s.link && s.link.type) || '';
    if (!editing.has('prompt') && document.activeElement !== el.prompt) el.prompt.value = s.prompt || '';
    const names = Array.isArray(s.styles) ? s.styles : [];
    if ([...el.style.options].map((o) => o.value).join('\n') !== names.join('\n')) {
      el.style.replaceChildren(...names.map((n) => { const o = document.createElement('option'); o.value = o.textContent = n; return o; }));
    }
    if (!editing.has('style')) el.style.value = s.style || '';
    if (!editing.has('strength') && typeof s.strength === 'number') { el.strength.value = s.strength; el.strengthValue.textContent = s.strength.toFixed(2); }
    if (!editing.has('steps') && s.steps) el.steps.value = String(s.steps);
    el.pause.textContent = s.paused ? 'Resume' : 'Pause';
    showPicture(s);
  }

  // -- the style picture (IP-Adapter): its bytes over the data channel ---------------------------
  function showPicture(s) {
    const on = !!s && typeof s.style_image_scale === 'number';
    el.pictureFile.disabled = el.pictureScale.disabled = !on;
    el.pictureClear.disabled = !on || !s.style_image;
    if (on && !editing.has('picture-scale')) {
      el.pictureScale.value = String(s.style_image_scale);
      el.pictureScaleValue.textContent = s.style_image_scale.toFixed(2);
    }
    let text;
    if (!on) text = 'This engine has no IP-Adapter loaded: start it with --ip-adapter to take a style picture';
    else if (sendingPicture || s.style_image_loading) text = 'Reading the picture\u2026 the stream goes on meanwhile';
    else if (!s.style_image) text = 'No picture';
    else if (s.style_image === 'upload') text = 'In use: the picture you sent';
    else text = 'In use: ' + s.style_image;
    el.pictureState.textContent = text;
  }

  // The announce, then the bytes in pieces (the channel keeps them in order); the engine's reply
  // (a toast on refusal) comes once the picture steers the stream.
  async function sendPicture(file) {
    if (!file) return;
    if (!channel || channel.readyState !== 'open') { toast('not connected'); return; }
    if (!PICTURE_TYPES.includes(file.type)) { toast(`Style picture: ${file.name} is not a PNG, JPEG or WebP picture`); return; }
    if (file.size > PICTURE_MAX_BYTES) { toast(`Style picture: ${file.name} is larger than 8 MB`); return; }
    const bytes = await file.arrayBuffer();
    const ch = channel;
    sendingPicture = true;
    showPicture(status);
    try {
      ch.send(JSON.stringify({ cmd: 'style_image', id: 'picture-' + String(nextId++), size: bytes.byteLength }));
      for (let at = 0; at < bytes.byteLength; at += PICTURE_CHUNK) {
        while (ch.bufferedAmount > 1024 * 1024) await new Promise((r) => setTimeout(r, 20)); // keep the send buffer short
        if (ch.readyState !== 'open') throw new Error('the connection closed while the picture was sent');
        ch.send(bytes.slice(at, at + PICTURE_CHUNK));
      }
    } catch (e) {
      sendingPicture = false;
      toast('Style picture: ' + String(e.message || e));
    }
    el.pictureFile.value = '';
  }

  function onMessage(ev) {
    let msg;
    try { msg = JSON.parse(ev.data); } catch (e) { return; }
    if (msg.kind === 'status') showStatus(msg);
    else if (msg.kind === 'reply') {
      if (String(msg.id || '').startsWith('picture-')) { sendingPicture = false; if (status) showPicture(status); }
      toast(msg.ok ? '' : (String(msg.id || '').startsWith('picture-') ? 'Style picture: ' : '') + (msg.error || 'refused'));
    }
  }

  function waitForIce(conn) {
    if (conn.iceGatheringState === 'complete') return Promise.resolve();
    return new Promise((resolve) => {
      const done = () => { if (conn.iceGatheringState === 'complete') { conn.removeEventListener('icegatheringstatechange', done); resolve(); } };
      conn.addEventListener('icegatheringstatechange', done);
      setTimeout(resolve, 3000);  // enough candidates by now
    });
  }

  async function start() {
    if (retryTimer !== null) { clearTimeout(retryTimer); retryTimer = null; }
    el.start.disabled = true;
    toast('');
    await accessChecked;
    if (!authorised) {
      showLogin('enter the engine token first');
      el.start.disabled = false;
      return;
    }
    try {
      camera = await navigator.mediaDevices.getUserMedia({ video: { width: { ideal: camW }, height: { ideal: camH } }, audio: false });
      el.local.srcObject = camera;
      setConn('connecting', 'connecting');
      pc = new RTCPeerConnection({ iceServers: [] });
      const [track] = camera.getVideoTracks();
      pc.addTransceiver(track, { direction: 'sendrecv', streams: [camera] });
      channel = pc.createDataChannel('control');
      channel.onmessage = onMessage;
      channel.onopen = () => { el.controls.disabled = false; };
      channel.onclose = () => { el.controls.disabled = true; };
      pc.ontrack = (ev) => {
        if (ev.track.kind === 'video') el.remote.srcObject = ev.streams[0] || new MediaStream([ev.track]);
      };
      pc.onconnectionstatechange = () => {
        const s = pc && pc.connectionState;
        if (s === 'connected') setConn('connected', 'connected');
        else if (s === 'failed' || s === 'disconnected') setConn('disconnected', s);
      };
      await pc.setLocalDescription(await pc.createOffer());
      await waitForIce(pc);
      const resp = await fetch('/whip', { method: 'POST', headers: headers('application/sdp'), body: pc.localDescription.sdp });
      const text = await resp.text();
      if (resp.status === 401) { authorised = false; showLogin('the engine wants its token again'); }
      if (resp.status === 503) { // busy: try again when the engine says a slot may free (at most 2 minutes)
        const wait = Math.min(120, Math.max(1, parseInt(resp.headers.get('Retry-After'), 10) || 5));
        await stop();
        // a fleet front's "starting": an engine is loading for this stream (its cookie names it for the next
        // offer); "queued": waiting for a GPU (--queue-s; its cookie keeps the wait going across offers)
        const what = text.startsWith('starting:') ? 'starting an engine' : text.startsWith('queued:') ? 'queued for a GPU' : 'busy';
        setConn('busy', what + ', retrying in ' + wait + ' s');
        toast((text.trim().split('\n')[0] || 'busy') + ' (retrying in ' + wait + ' s)');
        el.stop.disabled = false; // Stop cancels the retry
        retryTimer = setTimeout(() => { retryTimer = null; start(); }, wait * 1000);
        return;
      }
      if (resp.status !== 201) throw new Error(text.trim() || 'HTTP ' + resp.status);
      location_ = resp.headers.get('Location');
      await pc.setRemoteDescription({ type: 'answer', sdp: text });
      el.stop.disabled = false;
    } catch (e) {
      toast(String(e.message || e));
      await stop();
    }
  }

  async function stop() {
    if (retryTimer !== null) { clearTimeout(retryTimer); retryTimer = null; }
    el.stop.disabled = true;
    el.controls.disabled = true;
    if (location_) {
      try { await fetch(location_, { method: 'DELETE', headers: headers(), keepalive: true }); } catch (e) { /* gone already */ }
      location_ = null;
    }
    if (pc) { pc.close(); pc = null; }
    channel = null;
    if (camera) { camera.getTracks().forEach((t) => t.stop()); camera = null; }
    el.local.srcObject = null;
    el.remote.srcObject = null;
    setConn('disconnected', 'not connected');
    el.start.disabled = false;
  }

  function applyPrompt() { editing.delete('prompt'); send('set_prompt', { prompt: el.prompt.value }); }
  el.start.addEventListener('click', start);
  el.stop.addEventListener('click', stop);
  el.promptApply.addEventListener('click', applyPrompt);
  el.prompt.addEventListener('input', () => editing.add('prompt'));
  el.prompt.addEventListener('keydown', (e) => { if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) { e.preventDefault(); applyPrompt(); } });
  el.style.addEventListener('change', () => send('set_style', { style: el.style.value }));
  el.strength.addEventListener('input', () => { editing.add('strength'); el.strengthValue.textContent = Number(el.strength.value).toFixed(2); });
  el.strength.addEventListener('change', () => { editing.delete('strength'); send('set_strength', { strength: Number(el.strength.value) }); });
  el.steps.addEventListener('change', () => send('set_steps', { steps: Number(el.steps.value) }));
  el.pause.addEventListener('click', () => send(status && status.paused ? 'resume' : 'pause'));
  el.reset.addEventListener('click', () => send('reset'));
  el.pictureFile.addEventListener('change', () => sendPicture(el.pictureFile.files[0]));
  el.pictureScale.addEventListener('input', () => { editing.add('picture-scale'); el.pictureScaleValue.textContent = Number(el.pictureScale.value).toFixed(2); });
  el.pictureScale.addEventListener('change', () => { editing.delete('picture-scale'); send('set_style_image_scale', { scale: Number(el.pictureScale.value) }); });
  el.pictureClear.addEventListener('click', () => send('clear_style_image'));
  window.addEventListener('pagehide', () => {
    if (location_) fetch(location_, { method: 'DELETE', headers: headers(), keepalive: true });
  });
})();
