"""ICE servers reach the peer connections that `connect` and `serve` make, and none is contacted
unless given (README, "Network notes"). A UDP socket on 127.0.0.1 poses as a STUN server: it
answers binding requests (so gathering does not wait on it) and counts them. The client's peer
connection is connect's own (RemotePipeline, in this process) against a real `serve` (tiny model):
the STUN server its ICE agent was given is read from the connection itself. Without one, aiortc
falls back to a public STUN server (stun.l.google.com): that fallback must never be taken."""

from __future__ import annotations

import socket
import threading

import pytest

from test_remote import Server


class StunServer:
    """Answers STUN binding requests on 127.0.0.1 with the sender's address; counts them."""

    def __init__(self):
        from aioice import stun

        self.requests = 0
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]

        def serve():
            while True:
                try:
                    data, addr = self.sock.recvfrom(2048)
                except OSError:
                    return
                try:
                    request = stun.parse_message(data)
                except ValueError:
                    continue
                if request.message_method == stun.Method.BINDING and request.message_class == stun.Class.REQUEST:
                    self.requests += 1
                    response = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.RESPONSE,
                                            transaction_id=request.transaction_id)
                    response.attributes["XOR-MAPPED-ADDRESS"] = addr
                    self.sock.sendto(bytes(response), addr)

        threading.Thread(target=serve, daemon=True).start()

    def close(self):
        self.sock.close()


@pytest.fixture
def stun_server():
    s = StunServer()
    yield s
    s.close()


def ice_agent(pipeline):
    """The ICE agent (aioice Connection) of the pipeline's current peer connection."""
    transceiver = pipeline._pc.getTransceivers()[0]
    return transceiver.sender.transport.transport.iceGatherer._connection


def connected(url, **kwargs):
    from live2diff_engine.remote.client import RemotePipeline

    said: list[str] = []
    pipeline = RemotePipeline(url, say=said.append, **kwargs)
    pipeline.emit = lambda ready: None
    pipeline.stop_requested = lambda: False
    pipeline.start()  # returns once the offer is answered: the candidates are gathered
    assert pipeline._pc is not None, said
    return pipeline


def test_connect_uses_the_ice_server_given_and_none_by_default(stun_server, monkeypatch):
    monkeypatch.delenv("LIVE2DIFF_ICE_SERVERS", raising=False)
    server = Server()
    try:
        given = connected(server.url, ice_servers=[{"urls": f"stun:127.0.0.1:{stun_server.port}"}])
        try:
            agent = ice_agent(given)
            assert agent.stun_server == ("127.0.0.1", stun_server.port) and agent.turn_server is None
            assert stun_server.requests >= 1, "the STUN server given got no binding request"
        finally:
            given.stop()
        before = stun_server.requests
        default = connected(server.url)
        try:
            agent = ice_agent(default)
            assert agent.stun_server is None and agent.turn_server is None, (agent.stun_server, agent.turn_server)
        finally:
            default.stop()
        assert stun_server.requests == before
    finally:
        server.stop()


def test_serve_uses_the_ice_server_given(stun_server, monkeypatch):
    monkeypatch.delenv("LIVE2DIFF_ICE_SERVERS", raising=False)
    server = Server("--ice-server", f"stun:127.0.0.1:{stun_server.port}")
    try:
        client = connected(server.url)  # the client itself has none: what comes is serve's
        try:
            assert stun_server.requests >= 1, "serve's peer connection sent no binding request\n" + server.log()
        finally:
            client.stop()
    finally:
        server.stop()
