"""`/studio` over TLS with a token (README, step 3 of the remote setup): a real `serve --tls-cert
--tls-key` (tiny model, 127.0.0.1) with a self-signed certificate made here, and the real
Chromium (told to take that certificate). The page trades the token from its link for a cookie
that is Secure (HTTPS only) as well as HttpOnly and SameSite=Strict, and the stream runs: frames
come back. Plain HTTP to the HTTPS port gets no page.

Needs Debian's chromium and chromedriver for the browser part (it skips without them, except
under CI=true where it fails).
"""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import ssl

import pytest

from test_dock import by_id, wait_for
from test_remote import WAIT, Server
from test_studio import studio_browser

TOKEN = "tls-studio-token-9c2e7a"


def self_signed(tmp_path):
    """A certificate for 127.0.0.1 and its key, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    cert, key = self_signed(tmp_path_factory.mktemp("tls"))
    s = Server("--tls-cert", str(cert), "--tls-key", str(key), env={"LIVE2DIFF_API_TOKEN": TOKEN})
    s.cert = cert
    yield s
    s.stop()


def test_the_api_answers_over_tls_and_asks_for_the_token(tls_server):
    assert tls_server.url.startswith("https://127.0.0.1:"), tls_server.log()
    port = int(tls_server.url.rsplit(":", 1)[1])
    context = ssl.create_default_context(cafile=str(tls_server.cert))  # the certificate is checked, not waved through
    for token, status in ((None, 401), ("wrong", 401), (TOKEN, 200)):
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=WAIT, context=context)
        try:
            conn.request("GET", "/api/status", headers={"Authorization": f"Bearer {token}"} if token else {})
            assert conn.getresponse().status == status, token
        finally:
            conn.close()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)  # plain HTTP to the HTTPS port
    try:
        conn.request("GET", "/studio")
        assert conn.getresponse().status != 200
    except (ConnectionError, http.client.HTTPException):
        pass
    finally:
        conn.close()


@pytest.mark.browser
def test_studio_over_tls_trades_the_token_for_a_secure_cookie_and_streams(tls_server, tmp_path_factory):
    d = studio_browser(tmp_path_factory, extra_args=("--ignore-certificate-errors",))
    try:
        d.get(f"{tls_server.url}/studio?w=160&h=120#token={TOKEN}")
        wait_for(lambda: any(c["name"].startswith("live2diff_auth_") for c in d.get_cookies()), WAIT, "the cookie")
        cookie = next(c for c in d.get_cookies() if c["name"].startswith("live2diff_auth_"))
        assert cookie["secure"] is True, cookie
        assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict", cookie
        assert TOKEN not in cookie["value"] and TOKEN not in d.execute_script("return location.href")
        by_id(d, "start").click()
        wait_for(lambda: by_id(d, "conn").get_attribute("data-state") == "connected", WAIT, "the page to connect")
        wait_for(lambda: d.execute_script("return document.getElementById('remote').videoWidth") > 0, WAIT,
                 "frames back")
        by_id(d, "stop").click()
        wait_for(lambda: any(" ended: ended by the client" in l for l in tls_server.lines), WAIT, "the session to end")
    finally:
        d.quit()
