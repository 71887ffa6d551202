"""The fake obs-websocket server (tests/fake_obs.py) against the real client library, obsws-python.

Every client is given host, port and password explicitly so obsws-python never looks for a config.toml.
"""

import json
import logging
import threading
import time

import obsws_python as obsws
import pytest
import websocket
from fake_obs import CloseCode, EventSubscription, FakeOBS, RequestStatus, auth_string
from obsws_python.error import OBSSDKError, OBSSDKRequestError


@pytest.fixture
def fake():
    with FakeOBS(password="secret") as obs:
        yield obs


@pytest.fixture
def quiet_obsws():
    """obsws-python logs tracebacks (and the password) for failures the tests provoke on purpose."""
    log = logging.getLogger("obsws_python")
    old = log.level
    log.setLevel(logging.CRITICAL)
    yield
    log.setLevel(old)


def req_client(obs, password=None, **kw):
    return obsws.ReqClient(
        host=obs.host, port=obs.port, password=obs.password if password is None else password, timeout=3, **kw
    )


def event_client(obs, **kw):
    return obsws.EventClient(host=obs.host, port=obs.port, password=obs.password, timeout=3, **kw)


def connect_failing(cls, obs, password):
    """Construct an obsws-python client that must fail; returns the exception.

    obsws-python leaves its socket open when __init__ raises, and the half-built client is unreachable
    from the caller, so build it by hand to be able to close that socket."""
    client = cls.__new__(cls)
    with pytest.raises(OBSSDKError) as e:
        client.__init__(host=obs.host, port=obs.port, password=password, timeout=3)
    client.base_client.ws.shutdown()
    return e.value


def shut(*clients):
    """Disconnect obsws-python clients and really close their sockets: once the server has sent a close
    frame, websocket-client's close() (what disconnect() calls) no longer closes the socket."""
    for c in clients:
        c.disconnect()
        c.base_client.ws.shutdown()


def raw_close(ws):
    ws.close()
    ws.shutdown()


def raw_connect(obs, subprotocol=True):
    """A bare websocket-client connection; returns (ws, Hello data)."""
    ws = websocket.WebSocket()
    ws.connect(obs.url, timeout=3, subprotocols=["obswebsocket.json"] if subprotocol else None)
    hello = json.loads(ws.recv())
    assert hello["op"] == 0
    return ws, hello["d"]


def raw_identify(ws, hello, password, **extra):
    d = {"rpcVersion": 1, **extra}
    if "authentication" in hello:
        a = hello["authentication"]
        d["authentication"] = auth_string(password, a["salt"], a["challenge"])
    ws.send(json.dumps({"op": 1, "d": d}))
    return json.loads(ws.recv())


def close_code_of(ws):
    """Read until the server's close frame; returns its code."""
    while True:
        opcode, frame = ws.recv_data_frame(control_frame=True)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            return int.from_bytes(frame.data[:2], "big")


# ---------------------------------------------------------------- handshake and authentication


def test_correct_password_get_version(fake):
    with req_client(fake) as client:
        assert fake.clients == 1
        version = client.get_version()
        assert version.obs_web_socket_version == "5.1.0"
        assert version.rpc_version == 1
        assert "BroadcastCustomEvent" in version.available_requests
        assert "png" in version.supported_image_formats
        stats = client.get_stats()
        assert stats.active_fps > 0 and stats.web_socket_session_incoming_messages >= 2
    assert fake.requests[:2] == [("GetVersion", {}), ("GetStats", {})]
    fake.wait_for(lambda: fake.connections == 0)


def test_hello_and_fresh_challenge_per_connection(fake):
    ws1, hello1 = raw_connect(fake)
    ws2, hello2 = raw_connect(fake, subprotocol=False)  # obsws-python sends no subprotocol: JSON by default
    assert ws1.getsubprotocol() == "obswebsocket.json"
    assert hello1["obsWebSocketVersion"] == "5.1.0" and hello1["rpcVersion"] == 1
    assert hello1["authentication"]["challenge"] != hello2["authentication"]["challenge"]
    assert hello1["authentication"]["salt"] == hello2["authentication"]["salt"]  # per server start, like OBS
    assert raw_identify(ws1, hello1, "secret", eventSubscriptions=0) == {"op": 2, "d": {"negotiatedRpcVersion": 1}}
    raw_close(ws1)
    raw_close(ws2)


def test_no_password_means_no_authentication():
    with FakeOBS(password=None) as obs:
        ws, hello = raw_connect(obs)
        assert "authentication" not in hello
        assert raw_identify(ws, hello, None)["op"] == 2
        raw_close(ws)
        with obsws.ReqClient(host=obs.host, port=obs.port, password="", timeout=3) as client:
            assert client.get_version().obs_version


def test_wrong_password_fails_with_4009(fake, quiet_obsws):
    error = connect_failing(obsws.ReqClient, fake, "wrong")
    # the close frame (4009) reaches obsws-python as an empty message it fails to parse as JSON
    assert "failed to identify" in str(error)
    fake.wait_for(lambda: CloseCode.AUTHENTICATION_FAILED in fake.close_codes)
    assert fake.closes == [(4009, "Authentication failed.")]
    assert fake.clients == 0
    connect_failing(obsws.EventClient, fake, "wrong")
    assert fake.close_codes == [4009, 4009]
    assert fake.requests == []
    # an empty password fails inside obsws-python, before it sends Identify: the server closes nothing
    assert "no password" in str(connect_failing(obsws.ReqClient, fake, ""))
    assert fake.close_codes == [4009, 4009]


@pytest.mark.parametrize(
    "message, code",
    [
        ("not json", CloseCode.MESSAGE_DECODE_ERROR),
        ("[1, 2]", CloseCode.MESSAGE_DECODE_ERROR),
        ('{"d": {}}', CloseCode.UNKNOWN_OP_CODE),
        ('{"op": 1}', CloseCode.MISSING_DATA_FIELD),
        ('{"op": 6, "d": {"requestType": "GetVersion", "requestId": "1"}}', CloseCode.NOT_IDENTIFIED),
        ('{"op": 1, "d": {"rpcVersion": 1}}', CloseCode.AUTHENTICATION_FAILED),  # authentication missing
        ('{"op": 1, "d": {"rpcVersion": 1, "authentication": 5}}', CloseCode.AUTHENTICATION_FAILED),
        ('{"request-type": "GetVersion", "message-id": "1"}', CloseCode.UNSUPPORTED_RPC_VERSION),  # 4.x client
    ],
)
def test_protocol_violations_close_with_real_codes(fake, message, code):
    ws, _ = raw_connect(fake)
    ws.send(message)
    assert close_code_of(ws) == code
    assert fake.close_codes == [code]
    raw_close(ws)


def test_identify_rpc_version_and_already_identified():
    with FakeOBS(password=None) as obs:
        ws, _ = raw_connect(obs)
        ws.send(json.dumps({"op": 1, "d": {"rpcVersion": 2}}))
        assert close_code_of(ws) == CloseCode.UNSUPPORTED_RPC_VERSION
        raw_close(ws)
        ws, hello = raw_connect(obs)
        assert raw_identify(ws, hello, None)["op"] == 2
        ws.send(json.dumps({"op": 1, "d": {"rpcVersion": 1}}))
        assert close_code_of(ws) == CloseCode.ALREADY_IDENTIFIED
        raw_close(ws)
        ws, hello = raw_connect(obs)
        assert raw_identify(ws, hello, None)["op"] == 2
        ws.send(json.dumps({"op": 42, "d": {}}))
        assert close_code_of(ws) == CloseCode.UNKNOWN_OP_CODE
        raw_close(ws)
        assert obs.closes[-1] == (4006, "Unknown OpCode: 42")


# ---------------------------------------------------------------- events


def test_broadcast_custom_event_reaches_event_client(fake):
    received = []
    got = threading.Event()

    def on_custom_event(data):  # obsws-python dispatches on the function's name
        received.append(data)
        got.set()

    events = event_client(fake)
    try:
        events.callback.register(on_custom_event)
        fake.wait_for(lambda: fake.clients == 1)
        with req_client(fake) as client:
            client.broadcast_custom_event({"eventData": {"type": "styleChanged", "styleName": "anime", "n": 3}})
            assert got.wait(3)
        payload = received[0]
        assert (payload.type, payload.style_name, payload.n) == ("styleChanged", "anime", 3)  # keys snake_cased
        assert fake.custom_events == [{"type": "styleChanged", "styleName": "anime", "n": 3}]
        assert fake.requests_of("BroadcastCustomEvent") == [{"eventData": {"type": "styleChanged", "styleName": "anime", "n": 3}}]
        # the ReqClient (eventSubscriptions 0) was not sent the event; the EventClient was
        assert fake.events[-1][0] == "CustomEvent" and fake.events[-1][3] == 1
    finally:
        events.disconnect()


def test_broadcast_custom_event_validation(fake, quiet_obsws):
    with req_client(fake) as client:
        with pytest.raises(OBSSDKRequestError) as e:
            client.broadcast_custom_event({"other": 1})
        assert e.value.code == RequestStatus.MISSING_REQUEST_FIELD  # 300
        with pytest.raises(OBSSDKRequestError) as e:
            client.broadcast_custom_event({})  # obsws-python then sends no requestData at all
        assert e.value.code == RequestStatus.MISSING_REQUEST_DATA  # 301
        with pytest.raises(OBSSDKRequestError) as e:
            client.broadcast_custom_event({"eventData": {}})
        assert e.value.code == RequestStatus.REQUEST_FIELD_EMPTY  # 403, as OBS
        with pytest.raises(OBSSDKRequestError) as e:
            client.broadcast_custom_event({"eventData": "text"})
        assert e.value.code == RequestStatus.INVALID_REQUEST_FIELD_TYPE
    assert fake.custom_events == []
    assert [t for t, _ in fake.requests] == ["BroadcastCustomEvent"] * 4


def test_subscriptions_filter_events_and_reidentify(fake):
    ws, hello = raw_connect(fake)
    raw_identify(ws, hello, "secret", eventSubscriptions=EventSubscription.INPUTS)
    assert fake.emit_event("CustomEvent", {"a": 1}, intent=EventSubscription.GENERAL) == 0
    assert fake.emit_event("InputMuteStateChanged", {"inputName": "Mic/Aux", "inputMuted": True}, intent=8) == 1
    assert json.loads(ws.recv()) == {
        "op": 5,
        "d": {"eventType": "InputMuteStateChanged", "eventIntent": 8, "eventData": {"inputName": "Mic/Aux", "inputMuted": True}},
    }
    ws.send(json.dumps({"op": 3, "d": {"eventSubscriptions": EventSubscription.GENERAL}}))
    assert json.loads(ws.recv()) == {"op": 2, "d": {"negotiatedRpcVersion": 1}}
    assert fake.subscriptions == [1]
    ws.send(json.dumps({"op": 6, "d": {"requestType": "BroadcastCustomEvent", "requestId": "x", "requestData": {"eventData": {"k": "v"}}}}))
    response = json.loads(ws.recv())
    assert response["op"] == 7
    assert response["d"] == {"requestType": "BroadcastCustomEvent", "requestId": "x", "requestStatus": {"result": True, "code": 100}}
    assert json.loads(ws.recv())["d"] == {"eventType": "CustomEvent", "eventIntent": 1, "eventData": {"k": "v"}}  # sender too
    raw_close(ws)


def test_unknown_request_and_batch(fake, quiet_obsws):
    with req_client(fake) as client:
        with pytest.raises(OBSSDKRequestError) as e:
            client.send("NoSuchRequest")
        assert e.value.code == RequestStatus.UNKNOWN_REQUEST_TYPE
    assert fake.requests == [("NoSuchRequest", {})]
    ws, hello = raw_connect(fake)
    raw_identify(ws, hello, "secret", eventSubscriptions=0)
    batch = {"requestId": "b", "haltOnFailure": True, "requests": [
        {"requestType": "GetVersion", "requestId": "1"}, {"requestType": "Nope"}, {"requestType": "GetStats"}]}  # fmt: skip
    ws.send(json.dumps({"op": 8, "d": batch}))
    reply = json.loads(ws.recv())
    assert reply["op"] == 9 and reply["d"]["requestId"] == "b"
    assert [r["requestStatus"]["code"] for r in reply["d"]["results"]] == [100, 204]
    raw_close(ws)


# ---------------------------------------------------------------- OBS state


def test_scenes(fake):
    with req_client(fake) as client:
        scenes = client.get_scene_list()
        assert scenes.current_program_scene_name == "Scene"
        assert scenes.scenes == [{"sceneName": "Scene", "sceneIndex": 0}]
        client.create_scene("Live2Diff")
        client.set_current_program_scene("Live2Diff")
        assert client.get_current_program_scene().current_program_scene_name == "Live2Diff"
        assert fake.current_program_scene == "Live2Diff"
    assert ("CurrentProgramSceneChanged", {"sceneName": "Live2Diff"}, 4, 0) in fake.events


def test_input_kinds(quiet_obsws):
    with FakeOBS(password="pw") as obs, req_client(obs) as client:
        kinds = client.get_input_kind_list(False).input_kinds
        assert "browser_source" not in kinds and "v4l2_input" in kinds and "color_source_v3" in kinds
        assert "color_source" in client.get_input_kind_list(True).input_kinds
        with pytest.raises(OBSSDKRequestError) as e:
            client.create_input("Scene", "Web", "browser_source", {"url": "http://x"}, True)
        assert e.value.code == RequestStatus.INVALID_INPUT_KIND
    with FakeOBS(password="pw", browser_source=True) as obs, req_client(obs) as client:
        assert "browser_source" in client.get_input_kind_list(False).input_kinds
        client.create_input("Scene", "Web", "browser_source", {"url": "http://x"}, True)


def test_create_input_then_scene_item_list(fake, quiet_obsws):
    with req_client(fake) as client:
        created = client.create_input(
            "Scene", "Live2Diff Output", "ffmpeg_source", {"input": "udp://127.0.0.1:5000", "is_local_file": False}, True
        )
        assert created.scene_item_id == 1
        assert not hasattr(created, "input_uuid")  # 5.1.0 (OBS 29) answers only sceneItemId
        items = client.get_scene_item_list("Scene").scene_items
        assert [(i["sourceName"], i["sceneItemId"], i["inputKind"], i["sceneItemEnabled"]) for i in items] == [
            ("Live2Diff Output", 1, "ffmpeg_source", True)
        ]
        assert client.get_scene_item_id("Scene", "Live2Diff Output").scene_item_id == 1
        inputs = {i["inputName"]: i["inputKind"] for i in client.get_input_list().inputs}
        assert inputs == {
            "Desktop Audio": "pulse_output_capture",
            "Mic/Aux": "pulse_input_capture",
            "Live2Diff Output": "ffmpeg_source",
        }
        assert client.get_input_settings("Live2Diff Output").input_settings["input"] == "udp://127.0.0.1:5000"
        client.set_input_settings("Live2Diff Output", {"buffering_mb": 1}, True)
        assert fake.inputs["Live2Diff Output"]["inputSettings"] == {
            "input": "udp://127.0.0.1:5000",
            "is_local_file": False,
            "buffering_mb": 1,
        }

        for args, code in [
            (("Scene", "Live2Diff Output", "ffmpeg_source", {}, True), RequestStatus.RESOURCE_ALREADY_EXISTS),
            (("Scene", "Mic/Aux", "color_source_v3", {}, True), RequestStatus.RESOURCE_ALREADY_EXISTS),
            (("No Scene", "New", "ffmpeg_source", {}, True), RequestStatus.RESOURCE_NOT_FOUND),
            (("Mic/Aux", "New", "ffmpeg_source", {}, True), RequestStatus.INVALID_RESOURCE_TYPE),
        ]:
            with pytest.raises(OBSSDKRequestError) as e:
                client.create_input(*args)
            assert e.value.code == code, args
        with pytest.raises(OBSSDKRequestError) as e:
            client.get_scene_item_id("Scene", "Mic/Aux")
        assert e.value.code == RequestStatus.RESOURCE_NOT_FOUND

        client.remove_input("Live2Diff Output")
        assert client.get_scene_item_list("Scene").scene_items == []
        assert "Live2Diff Output" not in fake.inputs
    assert [e[0] for e in fake.events] == ["InputCreated", "SceneItemCreated", "SceneItemRemoved", "InputRemoved"]


def test_audio_sync_offset(fake, quiet_obsws):
    with req_client(fake) as client:
        assert client.get_input_audio_sync_offset("Mic/Aux").input_audio_sync_offset == 0
        client.set_input_audio_sync_offset("Mic/Aux", 350)
        assert client.get_input_audio_sync_offset("Mic/Aux").input_audio_sync_offset == 350
        assert fake.sync_offsets == {"Desktop Audio": 0, "Mic/Aux": 350}
        for name, offset, code in [
            ("Mic/Aux", 20001, RequestStatus.REQUEST_FIELD_OUT_OF_RANGE),
            ("Mic/Aux", -951, RequestStatus.REQUEST_FIELD_OUT_OF_RANGE),
            ("Mic/Aux", "350", RequestStatus.INVALID_REQUEST_FIELD_TYPE),
            ("Nope", 100, RequestStatus.RESOURCE_NOT_FOUND),
            ("Scene", 100, RequestStatus.INVALID_RESOURCE_TYPE),
        ]:
            with pytest.raises(OBSSDKRequestError) as e:
                client.set_input_audio_sync_offset(name, offset)
            assert e.value.code == code, (name, offset)
        client.create_input("Scene", "Camera", "v4l2_input", {}, True)
        with pytest.raises(OBSSDKRequestError) as e:
            client.set_input_audio_sync_offset("Camera", 100)  # a video-only input has no audio
        assert e.value.code == RequestStatus.INVALID_RESOURCE_STATE
        client.set_input_audio_sync_offset("Desktop Audio", -950)
        client.set_input_audio_sync_offset("Desktop Audio", 20000)
    assert fake.sync_offsets == {"Desktop Audio": 20000, "Mic/Aux": 350}
    assert fake.requests_of("SetInputAudioSyncOffset")[0] == {"inputName": "Mic/Aux", "inputAudioSyncOffset": 350}


def test_newer_obs_websocket_adds_uuid_fields():
    with FakeOBS(password="pw", ws_version="5.5.0") as obs, req_client(obs) as client:
        current = client.get_current_program_scene()
        assert current.scene_name == current.current_program_scene_name == "Scene"
        created = client.create_input("Scene", "Color", "color_source_v3", {"color": 4278190335}, False)
        assert created.input_uuid == obs.inputs["Color"]["inputUuid"]
        item = client.get_scene_item_list("Scene").scene_items[0]
        assert item["sourceUuid"] == created.input_uuid and item["sceneItemEnabled"] is False
        assert client.send("GetInputSettings", {"inputUuid": created.input_uuid}, raw=True)["inputKind"] == "color_source_v3"


def test_trigger_hotkey_and_handler_override(fake, quiet_obsws):
    with req_client(fake) as client:
        client.trigger_hot_key_by_name("OBSBasic.StartStreaming")
        assert fake.hotkeys_triggered == ["OBSBasic.StartStreaming"]
        fake.set_handler("GetStats", lambda data: (_ for _ in ()).throw(FakeOBS.RequestError(207, "not ready")))
        with pytest.raises(OBSSDKRequestError) as e:
            client.get_stats()
        assert e.value.code == RequestStatus.NOT_READY
        fake.set_handler("GetStats", None)
        assert client.get_stats().render_skipped_frames == 0

        def start_stream(data):  # a handler may emit events; they follow the response
            fake.emit_event("StreamStateChanged", {"outputActive": True, "outputState": "OBS_WEBSOCKET_OUTPUT_STARTED"}, 64)
            return None

        fake.set_handler("StartStream", start_stream)
        client.send("StartStream")
        assert "StartStream" in client.get_version().available_requests
        fake.wait_for(lambda: any(e[0] == "StreamStateChanged" for e in fake.events))


# ---------------------------------------------------------------- stop / restart


def test_restart_on_same_port(fake, quiet_obsws):
    port = fake.port
    events = event_client(fake)
    stale = req_client(fake)
    fake.wait_for(lambda: fake.clients == 2)
    stale.base_client.ws.settimeout(2)

    t0 = time.monotonic()
    fake.stop()
    assert time.monotonic() - t0 < 30  # it returns (a busy machine may be slow; a hang is not)
    events.worker.join(timeout=60)  # waiting, not judging: a thread that never ends fails
    assert not events.worker.is_alive()  # the close frame ends obsws-python's event thread
    assert fake.closes == [(1001, "Server stopping."), (1001, "Server stopping.")]
    with pytest.raises((websocket.WebSocketException, OSError, ValueError)):
        stale.get_version()  # not an OBSSDKError: the websocket-client exception comes through
    with pytest.raises(ConnectionRefusedError):
        req_client(fake)

    fake.start()
    assert fake.port == port
    with req_client(fake) as client:
        assert client.get_version().rpc_version == 1
    events2 = event_client(fake)
    fake.wait_for(lambda: fake.clients == 1)
    shut(events2, events, stale)


def test_abrupt_stop_ends_event_thread(fake):
    events = event_client(fake)
    fake.wait_for(lambda: fake.clients == 1)
    fake.stop(abrupt=True)
    events.worker.join(timeout=60)  # waiting, not judging: a thread that never ends fails
    assert not events.worker.is_alive()
    assert fake.closes == []
    fake.start()
    with req_client(fake) as client:
        client.get_version()
    shut(events)


def test_state_survives_restart_and_port_is_kept():
    with FakeOBS(password="pw") as obs:
        port = obs.port
        with req_client(obs) as client:
            client.set_input_audio_sync_offset("Mic/Aux", 120)
        obs.stop()
        obs.stop()  # idempotent
        assert not obs.running
        obs.start()
        assert obs.port == port
        with req_client(obs) as client:
            assert client.get_input_audio_sync_offset("Mic/Aux").input_audio_sync_offset == 120
