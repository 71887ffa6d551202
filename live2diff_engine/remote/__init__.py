"""The engine on one machine, the camera on another, over WebRTC.

`server` (serve's side: the WHIP/WHEP endpoints on the local API, one session per stream, each an
ordinary Engine on its own model slot), `idle` (what the API talks to while no stream runs),
`client` (connect's side: RemotePipeline, a pipeline whose model is on the other end, and the
controller that forwards `ctl` there), `media` (frames to and from WebRTC tracks, their pts
bookkeeping; used by both ends) and `ice` (STUN/TURN servers, for both ends).

None of it is local io or local control: `io/` holds the sources and sinks of one machine and
`control/` never touches frames, while a WebRTC session is both at once and exists only for the
two remote commands.
"""
