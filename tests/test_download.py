"""Downloads against a real local HTTP server: style weights (progress, resume, token handling) and a
hub model through huggingface_hub (a cut transfer resumed)."""

import http.server
import threading

import pytest

from live2diff_engine.errors import ModelLoadError
from live2diff_engine.models.download import download_url

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB


class Handler(http.server.BaseHTTPRequestHandler):
    cut_first = True
    seen = []

    def log_message(self, *a):
        pass

    def do_GET(self):
        Handler.seen.append((self.path, self.headers.get("Range")))
        start = 0
        rng = self.headers.get("Range")
        if rng:
            start = int(rng.split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        else:
            self.send_response(200)
        body = PAYLOAD[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if Handler.cut_first and not rng:
            self.wfile.write(body[: len(body) // 3])  # the connection drops a third of the way in
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def server():
    Handler.seen = []
    Handler.cut_first = True
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_an_interrupted_download_resumes_where_it_stopped(server, tmp_path, capsys):
    dest = tmp_path / "style.safetensors"
    with pytest.raises(ModelLoadError, match="run the command again"):
        download_url(f"{server}/api/download/models/1", dest, token="s3cret-token", progress=False)
    part = dest.with_name(dest.name + ".part")
    assert part.is_file() and 0 < part.stat().st_size < len(PAYLOAD) and not dest.exists()
    done = download_url(f"{server}/api/download/models/1", dest, token="s3cret-token", progress=True)
    assert done == dest and dest.read_bytes() == PAYLOAD and not part.exists()
    (path1, range1), (path2, range2) = Handler.seen
    assert "token=s3cret-token" in path1 and range1 is None
    assert range2 == f"bytes={len(PAYLOAD) // 3}-"
    out = capsys.readouterr()
    assert "s3cret-token" not in out.out + out.err


def test_http_errors_are_one_line(server, tmp_path):
    with pytest.raises(ModelLoadError, match="cannot download"):
        download_url("http://127.0.0.1:9/nothing-listens-here", tmp_path / "x.safetensors", progress=False)


def _https_server(tmp_path):
    """A real HTTPS server on 127.0.0.1 whose certificate a CA of the test's own signed: no
    trust store on the machine knows that CA."""
    import shutil
    import ssl
    import subprocess

    if shutil.which("openssl") is None:  # pragma: no cover - the openssl CLI is on every machine here
        pytest.skip("needs the openssl command")
    run = lambda *a: subprocess.run(["openssl", *a], cwd=tmp_path, check=True, capture_output=True)  # noqa: E731
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test root",
        "-keyout", "ca.key", "-out", "ca.pem")
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "srv.key", "-out", "srv.csr")
    (tmp_path / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", "srv.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2",
        "-extfile", "ext.cnf", "-out", "srv.pem")
    Handler.seen, Handler.cut_first = [], False
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / "srv.pem", tmp_path / "srv.key")
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, tmp_path / "ca.pem"


def test_https_downloads_trust_certifis_roots(tmp_path, monkeypatch):
    """python.org's macOS Pythons trust no root until their 'Install Certificates' step: the
    download trusts certifi's bundle as well as the system's. Here certifi's bundle is replaced by
    the test's own CA, which the system does not know: the download succeeds only through it."""
    import certifi

    httpd, ca = _https_server(tmp_path)
    url = f"https://127.0.0.1:{httpd.server_address[1]}/api/download/models/1"
    try:
        with pytest.raises(ModelLoadError, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
            download_url(url, tmp_path / "refused.safetensors", progress=False)  # the real certifi: not trusted
        monkeypatch.setattr(certifi, "where", lambda: str(ca))
        done = download_url(url, tmp_path / "style.safetensors", progress=False)
        assert done.read_bytes() == PAYLOAD
    finally:
        httpd.shutdown()


# -- hub downloads: huggingface_hub against a local stand-in for the hub ------------------------------

HUB_FILE = bytes(range(251)) * 100_000  # 25 MB; 251 so that a resume from the wrong offset shows
# huggingface_hub writes what arrives in 10 MiB pieces (constants.DOWNLOAD_CHUNK_SIZE): a cut loses the
# piece under way, so the resume starts at the last whole piece. The cut comes after one and a half.
HUB_CUT = 15 << 20


class HubHandler(http.server.BaseHTTPRequestHandler):
    """What `hf_hub_download` asks of the hub for one file: HEAD (commit, etag, size), then GET,
    with Range when it resumes. The first GET is cut at HUB_CUT."""

    protocol_version = "HTTP/1.1"
    gets: list = []

    def log_message(self, *a):
        pass

    def _headers(self, status, length, extra=()):
        self.send_response(status)
        self.send_header("Content-Length", str(length))
        self.send_header("X-Repo-Commit", "0123456789abcdef0123456789abcdef01234567")
        self.send_header("ETag", '"5e1f2b0c0ffee"')
        for k, v in extra:
            self.send_header(k, v)

    def do_HEAD(self):
        if self.path.endswith("/resolve/main/live2diff.ckpt"):
            self._headers(200, len(HUB_FILE))
        else:
            self.send_response(200 if self.path == "/" else 404)
            self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self):
        if not self.path.endswith("/resolve/main/live2diff.ckpt"):
            self.send_error(404)
            return
        rng = self.headers.get("Range")
        start = int(rng.split("=")[1].split("-")[0]) if rng else 0
        body = HUB_FILE[start:]
        HubHandler.gets.append((rng, len(body) if HubHandler.gets else HUB_CUT))
        if rng:
            self._headers(206, len(body), [("Content-Range", f"bytes {start}-{len(HUB_FILE) - 1}/{len(HUB_FILE)}")])
        else:
            self._headers(200, len(body))
        self.end_headers()
        if len(HubHandler.gets) == 1:  # the connection drops part of the way in
            self.wfile.write(body[:HUB_CUT])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


def test_a_cut_hub_download_resumes_from_the_bytes_it_has(tmp_path):
    """`models download` through huggingface_hub, HF_ENDPOINT pointed at a local server: after the
    connection drops mid-file the download goes on with a Range request from the bytes it kept,
    and the file in the cache is the whole file, byte for byte."""
    from conftest import run_cli

    HubHandler.gets = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), HubHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        env = {"HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_XET": "1",
               "HF_ENDPOINT": f"http://127.0.0.1:{httpd.server_address[1]}"}
        result = run_cli("models", "download", "live2diff", env=env, timeout=120)
    finally:
        httpd.shutdown()
    assert result.returncode == 0, result.stderr
    path = result.stdout.strip().splitlines()[-1].removeprefix("live2diff: ")
    with open(path, "rb") as f:
        assert f.read() == HUB_FILE
    assert len(HubHandler.gets) == 2 and HubHandler.gets[0] == (None, HUB_CUT), HubHandler.gets
    rng, sent = HubHandler.gets[1]
    assert rng is not None, "the second request starts the file over"
    start = int(rng.removeprefix("bytes=").removesuffix("-"))
    assert 0 < start <= HUB_CUT and sent == len(HUB_FILE) - start, HubHandler.gets
