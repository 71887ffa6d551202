"""Live control: one command schema, applied between frames, from OBS (obs-websocket), the local
HTTP/WebSocket API, the dock page, the OBS script and ``live2diff-engine ctl``."""
