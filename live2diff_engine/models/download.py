"""Resumable HTTP download with a progress bar (for style weights hosted outside the HF hub).

The file grows as ``NAME.part`` next to its destination and is renamed when complete; a later run
asks the server for the rest (HTTP Range). A token is sent as a query parameter (civitai's way)
and never printed.
"""

from __future__ import annotations

import shutil
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from ..errors import ModelLoadError

CHUNK = 1 << 20


def _with_token(url: str, token: str | None) -> str:
    if not token:
        return url
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qsl(parts.query) + [("token", token)]
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


def tls_context():
    """The system's trusted certificates plus certifi's. The Pythons from python.org on macOS
    trust nothing until the user runs their "Install Certificates" step, so every HTTPS download
    would fail with CERTIFICATE_VERIFY_FAILED; a company's own root in the system store stays
    trusted too."""
    import ssl

    context = ssl.create_default_context()
    try:
        import certifi

        context.load_verify_locations(cafile=certifi.where())
    except (ImportError, OSError):  # certifi absent or unreadable: the system's store alone
        pass
    return context


def download_url(url: str, dest: Path, token: str | None = None, progress: bool = True, timeout: float = 30.0,
                 on_progress=None) -> Path:
    """``on_progress(done_bytes, total_bytes_or_None)``, when given, is called as the file grows."""
    from tqdm.auto import tqdm

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(_with_token(url, token), headers={"User-Agent": "live2diff-engine"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        https = urllib.parse.urlsplit(request.full_url).scheme == "https"
        response = urllib.request.urlopen(request, timeout=timeout, context=tls_context() if https else None)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # the .part is already complete
            shutil.move(part, dest)
            return dest
        hint = " (check the token)" if exc.code in (401, 403) else ""
        raise ModelLoadError(f"cannot download {url}: HTTP {exc.code}{hint}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ModelLoadError(f"cannot download {url}: {reason}; check the network and run the command again (it resumes)") from None
    with response:
        resumed = response.status == 206
        if not resumed:
            have = 0
        total = response.headers.get("Content-Length")
        total = int(total) + have if total is not None else None
        if on_progress is not None:
            on_progress(have, total)
        with open(part, "ab" if resumed else "wb") as out, tqdm(
            total=total, initial=have, unit="B", unit_scale=True, desc=dest.name, disable=not progress
        ) as bar:
            try:
                while True:
                    chunk = response.read(CHUNK)
                    if not chunk:
                        break
                    out.write(chunk)
                    bar.update(len(chunk))
                    have += len(chunk)
                    if on_progress is not None:
                        on_progress(have, total)
            except OSError as exc:
                raise ModelLoadError(f"download of {dest.name} was interrupted ({exc}); run the command again to resume") from None
    if total is not None and part.stat().st_size < total:
        raise ModelLoadError(f"download of {dest.name} stopped early; run the command again to resume")
    shutil.move(part, dest)
    return dest
