"""The one place where pretrained weights are looked up: a local path, or a Hugging Face Hub name.

Hub names are served from the local cache (HF_HOME) when present; otherwise they are downloaded, after a quick check
that the Hub is reachable, so that an offline machine gets one clear error at once instead of minutes of retries.
"""
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

REPO_ROOT = Path(__file__).resolve().parents[1]
LOCAL_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".json", ".yaml")  # files, never Hub names


def local_path(name: str | os.PathLike) -> Path:
    """`name` as a local path: as given if it exists, else relative to the repository (so the bundled models'
    `ckpts/...` paths work from any directory), else as given."""
    path = Path(os.path.expanduser(str(name)))
    if not path.exists() and not path.is_absolute() and (REPO_ROOT / path).exists():
        return REPO_ROOT / path
    return path


class PretrainedNotFound(RuntimeError):
    """A named pretrained model is neither a local path, in the local cache, nor downloadable."""


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


def resolve_pretrained(name: str | os.PathLike, what: str = "model", allow_patterns: list[str] | None = None,
                       download: bool = True) -> Path:
    """Return a local directory (or file) holding `name`: the path itself if it exists, else the Hub snapshot.

    `allow_patterns` limits a download to the files needed (e.g. ["vae/*"] from a whole pipeline repository);
    `download=False` only looks locally.
    Raises PretrainedNotFound, naming the model and how to provide it, when it cannot be had.
    """
    path = local_path(name)
    if path.exists():
        return path
    name = str(name)
    if name.count("/") != 1 or name.startswith((".", "/", "~")) or Path(name).suffix in LOCAL_SUFFIXES \
            or Path(name).parent.is_dir():  # a local path: "ckpts/lpips_vgg16.safetensors" is not a Hub name
        raise PretrainedNotFound(f"{what} '{name}': no such file or directory (and not a Hub name like 'org/model')")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name, allow_patterns=allow_patterns, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    how = (f"download it where the Hub is reachable (`hf download {name}`) and pass its local directory instead, "
           f"or point HF_HOME at a cache that holds it")
    if not download or not _hub_reachable():
        raise PretrainedNotFound(f"{what} '{name}' is not available offline: {how}") from None
    try:
        return Path(snapshot_download(name, allow_patterns=allow_patterns))
    except Exception as err:  # a wrong name, a gated repository, a broken connection: all need the same advice
        raise PretrainedNotFound(f"{what} '{name}' could not be downloaded ({type(err).__name__}): {how}") from None
