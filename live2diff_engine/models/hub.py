"""Model manager: every model is a local path or a Hugging Face hub id, resolved to a local folder.

Hub models are cached by huggingface_hub (progress bars; a dropped connection is resumed within
the run, from the last whole 10 MiB piece; a stopped run's partial file is not kept). Offline, or
when a download fails, a missing model is one line: what is missing, where it was looked for,
and the command that fetches it.

Before anything is fetched, every local path is checked from its files (a folder that is no
model, a file that is neither safetensors nor a torch checkpoint: one line at once, no network,
no torch), and an unreachable hub is found by one quick request, remembered for the process:
then all the models that are not downloaded are named together, instead of the hub's retries
(half a minute a model) ending in an error about one of them. The hub's own warnings and retry
lines never reach the terminal (LIVE2DIFF_VERBOSE=1 brings them back).
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ModelLoadError


@dataclass(frozen=True)
class ModelSpec:
    """A model the engine knows by name: its hub repository and the files it needs from it."""

    name: str
    repo_id: str
    what: str
    allow_patterns: tuple[str, ...] = ()
    filename: str | None = None  # a single file inside the repository (the result is that file)
    optional: bool = False  # not needed by the default setup
    extra: dict = field(default_factory=dict)
    size: int | None = None  # about how many bytes the download is (the published files), None: not known


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            "sd15",
            "stable-diffusion-v1-5/stable-diffusion-v1-5",
            "Stable Diffusion 1.5 (UNet, VAE, CLIP text encoder, tokenizer)",
            allow_patterns=(
                "model_index.json",
                "unet/config.json",
                "unet/diffusion_pytorch_model.safetensors",
                "vae/config.json",
                "vae/diffusion_pytorch_model.safetensors",
                "text_encoder/config.json",
                "text_encoder/model.safetensors",
                "tokenizer/*",
                "scheduler/*",
            ),
            size=4_270_000_000,  # UNet 3.44 GB, VAE 335 MB, text encoder 492 MB (float32)
        ),
        ModelSpec("live2diff", "Leoxing/Live2Diff", "Live2Diff motion modules and depth branch", filename="live2diff.ckpt"),
        ModelSpec(
            "midas",
            "Intel/dpt-hybrid-midas",
            "MiDaS DPT-Hybrid 384 depth estimator (what Live2Diff was trained with)",
            allow_patterns=("config.json", "*.safetensors", "preprocessor_config.json"),
            size=490_000_000,
        ),
        ModelSpec(
            "lcm-lora",
            "latent-consistency/lcm-lora-sdv1-5",
            "LCM-LoRA for SD1.5 (few-step denoising)",
            filename="pytorch_lora_weights.safetensors",
            size=135_000_000,
        ),
        ModelSpec(
            "taesd",
            "madebyollin/taesd",
            "TAESD tiny autoencoder (fast VAE option)",
            allow_patterns=("config.json", "diffusion_pytorch_model.safetensors"),
            optional=True,
            size=9_800_000,
        ),
        ModelSpec(
            "depth-anything",
            "depth-anything/Depth-Anything-V2-Small-hf",
            "Depth Anything V2 Small (fast depth option)",
            allow_patterns=("config.json", "model.safetensors", "preprocessor_config.json"),
            optional=True,
            size=99_000_000,
        ),
        ModelSpec(
            "clip",
            "openai/clip-vit-large-patch14",
            "CLIP ViT-L/14 image encoder (for `eval`: CLIP temporal consistency)",
            allow_patterns=("config.json", "model.safetensors", "preprocessor_config.json"),
            optional=True,
            size=1_710_000_000,
        ),
        ModelSpec(
            "ip-adapter",
            "h94/IP-Adapter",
            "IP-Adapter for SD1.5 (a style from a picture: --style-image, the dock's drop zone)",
            filename="models/ip-adapter_sd15.safetensors",
            optional=True,
            size=44_600_000,
        ),
        ModelSpec(
            "image-encoder",
            "h94/IP-Adapter",
            "CLIP ViT-H/14 image encoder of the SD1.5 IP-Adapter (a style picture's embedding)",
            allow_patterns=("models/image_encoder/config.json", "models/image_encoder/model.safetensors"),
            optional=True,
            extra={"subfolder": "models/image_encoder"},
            size=2_530_000_000,
        ),
    )
}

DEFAULT_MODELS = [name for name, spec in MODELS.items() if not spec.optional]

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def is_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def looks_like_hub_id(source: str) -> bool:
    return bool(_HUB_ID.match(source)) and not source.startswith((".", "/", "~"))


def _fetch_command(name: str | None, source: str) -> str:
    return f"live2diff-engine models download {name}" if name else f"live2diff-engine models download {source}"


def resolve(source: str | os.PathLike, *, name: str | None = None, download: bool = True) -> Path:
    """A local path as it is; a known model name or a hub id through the hub cache.

    ``name`` is the model's role (for messages and for the files to fetch when ``source`` is the
    role's default repository)."""
    text = os.fspath(source)
    spec = MODELS.get(text)
    if spec is not None:
        name, text = spec.name, spec.repo_id
    elif name in MODELS and MODELS[name].repo_id == text:
        spec = MODELS[name]
    path = Path(text).expanduser()
    if path.exists():
        return path
    if not looks_like_hub_id(text):
        what = f"{name} model" if name else "model"
        raise ModelLoadError(f"{what} not found: {path} does not exist; pass an existing path or a hub id like owner/name")
    return _from_hub(text, spec, name, download=download)


def _from_hub(repo_id: str, spec: ModelSpec | None, name: str | None, *, download: bool, command: str | None = None) -> Path:
    """``command``: what the messages say fetches the model (default: ``models download`` of it)."""
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    label = name or repo_id
    offline = is_offline() or not download
    command = command or _fetch_command(name, repo_id)

    def fetch(local_only: bool) -> Path:
        if spec is not None and spec.filename:
            return Path(hf_hub_download(repo_id, spec.filename, local_files_only=local_only))
        patterns = list(spec.allow_patterns) if spec is not None and spec.allow_patterns else None
        folder = Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=local_only))
        sub = spec.extra.get("subfolder") if spec is not None else None
        if sub and not (folder / sub / "config.json").is_file():
            raise FileNotFoundError(folder / sub / "config.json")  # a snapshot without this model's files
        return folder / sub if sub else folder

    try:
        return fetch(local_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        pass
    where = f"the Hugging Face cache {cache_dir()}"
    if offline:
        raise ModelLoadError(
            f"{label} ({repo_id}) is not downloaded and this machine is offline: looked in {where}; "
            f"run `{command}` while online"
        )
    try:
        with quiet_hub():
            return fetch(local_only=False)
    except Exception as exc:  # an HTTP status; or connection refused, DNS, timeouts
        status = _http_status(exc)
        why = _network_reason(exc)
        # huggingface_hub < 1.0 (transformers 4: Intel Macs) raises a network failure as an HfHubHTTPError
        # (LocalEntryNotFoundError) with no status: the failure under it is named instead.
        if status is not None or (why is None and isinstance(exc, HfHubHTTPError)):
            hint = " (log in with `hf auth login` if it is gated)" if status in (401, 403) else ""
            raise ModelLoadError(f"cannot download {label} ({repo_id}): HTTP {status or 'error'}{hint}") from None
        if why is not None:
            _unreachable[_endpoint()] = why  # the next model does not wait for the same failure
        raise ModelLoadError(
            f"cannot download {label} ({repo_id}): {why or _words(_first_line(exc))}; looked in {where}; "
            f"check the network and run `{command}`"
        ) from None


# -- the hub's chatter, and whether it answers at all ------------------------------------------------

_QUIET = ("huggingface_hub", "httpx2", "httpx", "httpcore", "urllib3", "filelock")


class quiet_hub:
    """huggingface_hub's warnings and retry lines ("'...' thrown while requesting HEAD ...",
    "Retrying in 2s [Retry 2/5]") and the HTTP libraries' logs off while it works: the engine says
    what failed in its own line. The hub's download progress bars stay. LIVE2DIFF_VERBOSE=1 keeps
    them all. Levels are set on entry, not once: importing huggingface_hub resets its own."""

    def __enter__(self):
        self._levels = []
        self._warnings = None
        if os.environ.get("LIVE2DIFF_VERBOSE"):
            return self
        import huggingface_hub.utils.logging  # noqa: F401  (it sets its level when first imported)

        for name in _QUIET:
            logger = logging.getLogger(name)
            self._levels.append((logger, logger.level))
            logger.setLevel(logging.ERROR)
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.filterwarnings("ignore", module=r"huggingface_hub(\.|$)")
        return self

    def __exit__(self, *exc):
        for logger, level in self._levels:
            logger.setLevel(level)
        if self._warnings is not None:
            self._warnings.__exit__(*exc)


_unreachable: dict[str, str | None] = {}  # hub address -> why it cannot be reached (None: it answered)


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def hub_unreachable() -> str | None:
    """Why the hub cannot be reached, or None when it answers: one quick request (any HTTP answer
    will do) through the hub's own session (its proxies, its certificates), asked once a process
    per address; a download that failed on the network counts too."""
    endpoint = _endpoint()
    if endpoint in _unreachable:
        return _unreachable[endpoint]
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    timeout = min(10.0, float(getattr(constants, "HF_HUB_ETAG_TIMEOUT", 10) or 10))
    why = None
    try:
        with quiet_hub():
            get_session().head(endpoint, timeout=timeout)
    except Exception as exc:
        why = _network_reason(exc, timeout) or _words(_first_line(exc))
    _unreachable[endpoint] = why
    return why


_NETWORK_MODULES = ("httpx2", "httpx", "httpcore", "requests", "urllib3", "socket", "ssl")


def _chain(exc: BaseException | None) -> list[BaseException]:
    """``exc`` and what it was raised from (or while handling), outermost first."""
    chain: list[BaseException] = []
    while exc is not None and all(exc is not e for e in chain) and len(chain) < 12:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


def _http_status(exc: BaseException) -> int | None:
    """The HTTP status the hub answered with, anywhere under what its client raised."""
    for e in _chain(exc):
        status = getattr(getattr(e, "response", None), "status_code", None)
        if isinstance(status, int):
            return status
    return None


def _network_reason(exc: BaseException, timeout: float | None = None) -> str | None:
    """What a network failure was, in a few words ("connection refused", "name or service not
    known"), from the deepest network error under what the hub raised; None when it was none
    (an HTTP answer is no network failure)."""
    chain = _chain(exc)
    if _http_status(exc) is not None:
        return None
    for e in reversed(chain):
        mro = {c.__name__ for c in type(e).__mro__}
        module = type(e).__module__.split(".")[0]
        network = module in _NETWORK_MODULES or isinstance(e, (ConnectionError, TimeoutError))
        if not network:
            continue
        if isinstance(e, TimeoutError) or any("Timeout" in name for name in mro):
            return f"no answer within {timeout:g} s" if timeout else "no answer (timed out)"
        text = re.sub(r"^<urlopen error (.*)>$", r"\1", _first_line(e))
        text = re.sub(r"^\[Errno -?\d+\]\s*", "", text)
        if text[:1].isupper() and text[1:2].islower():
            text = text[0].lower() + text[1:]
        return _words(text or type(e).__name__)
    return None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0].strip() if lines else type(exc).__name__


def _words(text: str, limit: int = 160) -> str:
    """``text`` cut to ``limit`` characters at a word's end, with '...' when cut."""
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0].rstrip(",;:") + " ..."


# -- local paths: judged from their files, before anything is fetched ------------------------------

# The option a role's model is given by (for the messages).
_OPTION = {"sd15": "--base", "live2diff": "--motion", "midas": "--depth", "depth-anything": "--depth", "taesd": "--vae",
           "ip-adapter": "--ip-adapter", "image-encoder": "--image-encoder"}


def weight_file_problem(path: Path) -> str | None:
    """Why ``path`` is not a safetensors file or a torch checkpoint (zip or legacy pickle), judged
    from its first bytes (a safetensors header is read whole: a file cut short is found), or None.
    Nothing is loaded and torch is not needed."""
    try:
        size = path.stat().st_size
        if size == 0:
            return "the file is empty"
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            if 2 <= n <= min(size - 8, 100 << 20):
                try:
                    header = json.loads(f.read(n))
                except ValueError:
                    header = None
                if isinstance(header, dict):
                    try:
                        need = 8 + n + max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
                    except (TypeError, KeyError, IndexError, ValueError):
                        return "its safetensors header is damaged"
                    if need > size:
                        return f"it is cut short: {size:,} of its {need:,} bytes are there, as from an unfinished download"
                    return None
    except OSError as exc:
        return f"it cannot be read: {exc.strerror or type(exc).__name__}"
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                if any(name.endswith("data.pkl") for name in z.namelist()):
                    return None
        except (OSError, zipfile.BadZipFile, RuntimeError):
            return "it is a damaged zip archive"
        return "it is a zip archive without a torch checkpoint in it"
    if head[:1] == b"\x80":  # a pickle: torch's legacy format (read later, tensors only)
        return None
    return "it is neither safetensors nor a torch checkpoint"


def local_problem(path: Path, role: str | None) -> str | None:
    """What makes the existing ``path`` unusable as the ``role`` model, judged from its files
    without loading them, with what to pass instead; None when it looks right."""
    option = _OPTION.get(role or "", f"the {role} model" if role else "the model")
    if role == "sd15":
        fix = f"point {option} at a diffusers folder (unet/, vae/, text_encoder/, tokenizer/) or a .safetensors file"
        if path.is_dir():
            if (path / "unet" / "config.json").is_file() or (path / "config.json").is_file():
                return None
            empty = " (the folder is empty)" if not any(path.iterdir()) else ""
            return f"{option} {path} has no model_index.json, unet/ folder or config.json{empty}: it is no Stable Diffusion model; {fix}"
    elif role == "live2diff":
        fix = "give the Live2Diff motion checkpoint (live2diff.ckpt or a .safetensors), or `live2diff-engine models download live2diff`"
        if path.is_dir():
            return f"{option} {path} is a folder; {fix}"
    elif role == "ip-adapter":
        fix = "give the IP-Adapter's .safetensors (or .bin) file, or `live2diff-engine models download ip-adapter`"
        if path.is_dir():
            return f"{option} {path} is a folder; {fix}"
    elif role in ("midas", "depth-anything", "taesd", "clip", "image-encoder"):
        repo = MODELS[role].repo_id
        if not path.is_dir():
            return f"{option} {path} is a file; pass the model's folder (config.json and its weights), such as a download of {repo}"
        if not (path / "config.json").is_file():
            return f"{option} {path} has no config.json; pass the model's folder (config.json and its weights), such as a download of {repo}"
        return None
    elif role == "lcm-lora":
        fix = "download it again (`live2diff-engine models download lcm-lora`)"
        if path.is_dir():
            return None if any(path.glob("*.safetensors")) else f"the LCM-LoRA folder {path} has no .safetensors file; {fix}"
    else:
        return None
    problem = weight_file_problem(path) if path.is_file() else None
    if problem is None:
        return None
    return f"{option} {path} is not a readable safetensors/checkpoint file ({problem}); {fix}"


# -- several models at once ----------------------------------------------------------------------


def download_command(names: list[str]) -> str:
    """One command that fetches every one of ``names`` (model names or hub ids): plain
    ``models download`` when they are all among the models the engine needs by default."""
    if names and all(n in DEFAULT_MODELS for n in names):
        return "live2diff-engine models download"
    return "live2diff-engine models download " + " ".join(names)


def model_requests(base="sd15", motion="live2diff", depth="midas", depth_source=None, vae="full", lcm_lora="lcm-lora"):
    """The ``(source, role)`` of every model :func:`load_components` loads, in its order: base,
    motion, depth, then the LCM-LoRA and TAESD when used."""
    wanted = [(base, "sd15"), (motion, "live2diff"), (depth_source or depth, depth)]
    if lcm_lora:
        wanted.append((lcm_lora, "lcm-lora"))
    if vae != "full":
        wanted.append((vae, "taesd"))
    return wanted


def _survey(wanted: list[tuple[str, str | None]]):
    """(found, problems, to_fetch) without the network: local paths checked from their files,
    hub models looked up in the cache. ``found[i]`` is None for what is not usable here."""
    found: list[Path | None] = []
    problems: list[str] = []  # local paths that do not exist or are no such model (no download can help)
    to_fetch: list[tuple[int, str, ModelSpec | None, str | None]] = []
    for i, (source, role) in enumerate(wanted):
        text = os.fspath(source)
        spec = MODELS.get(text)
        name = role
        if spec is not None:
            name, text = spec.name, spec.repo_id
        elif role in MODELS and MODELS[role].repo_id == text:
            spec = MODELS[role]
        path = Path(text).expanduser()
        found.append(None)
        if path.exists():
            problem = local_problem(path, role)
            if problem is None:
                found[i] = path
            else:
                problems.append(problem)
            continue
        if not looks_like_hub_id(text):
            option = _OPTION.get(role or "", f"the {role} model" if role else "the model")
            problems.append(f"{option} {path} does not exist; pass an existing path or a hub id like owner/name")
            continue
        try:
            found[i] = _from_hub(text, spec, name, download=False)
        except ModelLoadError:
            to_fetch.append((i, text, spec, name))
    return found, problems, to_fetch


def _local_problems_error(problems: list[str], to_fetch) -> ModelLoadError:
    more = f"; also not downloaded: {_names(to_fetch)}" if to_fetch else ""
    return ModelLoadError("; ".join(problems) + more)


def _missing_error(to_fetch, why_offline: str) -> ModelLoadError:
    command = download_command([_label(spec, repo_id) for _, repo_id, spec, _ in to_fetch])
    return ModelLoadError(
        f"{_count(to_fetch)} not downloaded: {_names(to_fetch)}; {why_offline} (looked in the Hugging Face cache {cache_dir()}); "
        f"run `{command}` while online to fetch {'it' if len(to_fetch) == 1 else 'them all'}"
    )


def _unreachable_error(to_fetch, why: str) -> ModelLoadError:
    command = download_command([_label(spec, repo_id) for _, repo_id, spec, _ in to_fetch])
    return ModelLoadError(
        f"cannot reach the Hugging Face hub at {_endpoint()} ({why}), and {_count(to_fetch)} not downloaded: "
        f"{_names(to_fetch)} (looked in the Hugging Face cache {cache_dir()}); check the network (a proxy goes in "
        f"HTTPS_PROXY) and run `{command}`"
    )


def check_all(wanted: list[tuple[str, str | None]], say) -> None:
    """What :func:`resolve_all` would find, found without downloading and before anything opens:
    local paths that are wrong, and models that are not downloaded while offline or with the hub
    unreachable, are one :class:`ModelLoadError`; models that will be downloaded are one line
    through ``say``, with their sizes where known."""
    _, problems, to_fetch = _survey(wanted)
    if problems:
        raise _local_problems_error(problems, to_fetch)
    if not to_fetch:
        return
    if is_offline():
        raise _missing_error(to_fetch, "this machine is offline")
    why = hub_unreachable()
    if why is not None:
        raise _unreachable_error(to_fetch, why)
    sizes = [spec.size if spec is not None else None for _, _, spec, _ in to_fetch]
    total = f"; about {_bytes(sum(sizes))} in all" if len(sizes) > 1 and None not in sizes else ""
    items = ", ".join(
        f"{_label(spec, repo_id)} ({repo_id}{', about ' + _bytes(spec.size) if spec is not None and spec.size else ''})"
        for _, repo_id, spec, _ in to_fetch
    )
    say(f"{_count(to_fetch)} not downloaded yet and will be downloaded before the stream starts: {items}{total}")


def _bytes(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{max(1, round(n / 1e6))} MB"


def resolve_all(wanted: list[tuple[str, str | None]], *, download: bool = True, progress=None) -> list[Path]:
    """Resolve several models at once: ``wanted`` is ``(source, role)`` pairs as for :func:`resolve`.

    Local paths (checked from their files) and models already in the hub cache come first; those
    not downloaded are then fetched (unless offline, ``download`` is false, or the hub does not
    answer one quick request). Whatever is wrong or still missing is named in one
    :class:`ModelLoadError`, all of them together, with one command that fetches them all: a run
    never stops on the first missing model only to stop on the next one the time after."""
    say = progress or (lambda text: None)
    found, problems, to_fetch = _survey(wanted)
    if problems:
        raise _local_problems_error(problems, to_fetch)
    if not to_fetch:
        return found  # type: ignore[return-value]
    if is_offline() or not download:
        raise _missing_error(to_fetch, "this machine is offline" if is_offline() else "downloads are off")
    why = hub_unreachable()
    if why is not None:
        raise _unreachable_error(to_fetch, why)
    command = download_command([_label(spec, repo_id) for _, repo_id, spec, _ in to_fetch])
    for k, (i, repo_id, spec, name) in enumerate(to_fetch):
        say(f"downloading {_label(spec, repo_id)} ({repo_id})")
        try:
            found[i] = _from_hub(repo_id, spec, name, download=True, command=command)
        except ModelLoadError as exc:
            rest = to_fetch[k + 1:]
            if not rest:
                raise
            raise ModelLoadError(f"{exc}; not downloaded yet either: {_names(rest)}") from None
    return found  # type: ignore[return-value]


def _label(spec: ModelSpec | None, repo_id: str) -> str:
    return spec.name if spec is not None else repo_id


def _names(items) -> str:
    return ", ".join(f"{spec.name} ({repo_id})" if spec is not None else repo_id for _, repo_id, spec, _ in items)


def _count(items) -> str:
    return "1 model is" if len(items) == 1 else f"{len(items)} models are"


def status(spec: ModelSpec) -> tuple[bool, str]:
    """(present, where) for a known model, without touching the network."""
    try:
        path = _from_hub(spec.repo_id, spec, spec.name, download=False)
        return True, str(path)
    except ModelLoadError:
        return False, f"not downloaded (hub: {spec.repo_id})"
