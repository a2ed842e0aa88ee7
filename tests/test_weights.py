from pathlib import Path

import pytest

from lcmla import MissingWeightsError, PRESETS
from lcmla.presets import FACEID_REPO, FACEID_WEIGHTS
from lcmla.weights import resolve_files, resolve_preset


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")


def test_missing_files_are_all_listed_with_fetch_commands(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    wdir = tmp_path / "weights"
    _touch(wdir / FACEID_REPO / FACEID_WEIGHTS)  # one of the two FaceID files is present
    with pytest.raises(MissingWeightsError) as info:
        resolve_preset(PRESETS["hyper-sdxl-4step"], variant="fp16", weights_dir=wdir)
    msg = str(info.value)
    assert "ip-adapter-faceid-plusv2_sdxl_lora.safetensors" in msg
    assert f"{FACEID_REPO}/{FACEID_WEIGHTS}" not in info.value.missing
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in msg
    assert "Hyper-SDXL-4steps-lora.safetensors" in msg
    assert f"hf download {FACEID_REPO} ip-adapter-faceid-plusv2_sdxl_lora.safetensors --local-dir {wdir / FACEID_REPO}" in msg
    assert len(info.value.missing) > 10


def test_local_folder_resolves(tmp_path):
    required = {"faceid": (FACEID_REPO, (FACEID_WEIGHTS, "sub/x.json"))}
    for name in required["faceid"][1]:
        _touch(tmp_path / FACEID_REPO / name)
    assert resolve_files(required, weights_dir=tmp_path) == {"faceid": tmp_path / FACEID_REPO}


def test_hf_cache_resolves_without_network(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    repo_dir = cache / ("models--" + FACEID_REPO.replace("/", "--"))  # huggingface_hub's cache layout, written here
    snap = repo_dir / "snapshots" / "abc123"
    for name in (FACEID_WEIGHTS, "sub/x.json"):
        _touch(snap / name)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text("abc123")
    got = resolve_files({"faceid": (FACEID_REPO, (FACEID_WEIGHTS, "sub/x.json"))})
    assert got == {"faceid": snap}


def test_offline_never_downloads(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    import huggingface_hub

    def boom(*a, **k):  # pragma: no cover - must not be called
        raise AssertionError("download attempted while HF_HUB_OFFLINE=1")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", boom)
    with pytest.raises(MissingWeightsError, match="unset HF_HUB_OFFLINE"):
        resolve_files({"faceid": (FACEID_REPO, (FACEID_WEIGHTS,))}, allow_download=True)


def test_hub_offline_reads_the_usual_spellings(monkeypatch):
    from lcmla.weights import hub_offline

    for value, offline in (("1", True), ("true", True), (" YES ", True), ("On", True), ("0", False), ("", False),
                           ("false", False)):
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
        assert hub_offline() is offline, value


def test_a_download_puts_every_file_of_a_role_in_one_snapshot(tmp_path, monkeypatch):
    """The cache holds one file of a role at an older revision; the download fetches the role's
    files at the current one (nested names too) and the role resolves to that snapshot folder,
    which holds them all (not to the old snapshot, which lacks the downloaded file)."""
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    old, new = tmp_path / "snapshots" / "old", tmp_path / "snapshots" / "new"
    files = ("model.safetensors", "sub/config.json")
    _touch(old / files[0])
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache",
                        lambda repo, name: str(old / name) if (old / name).is_file() else None)
    fetched = []

    def download(repo, name):
        fetched.append(name)
        _touch(new / name)
        return str(new / name)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    got = resolve_files({"unet": ("org/model", files)}, allow_download=True)
    assert got == {"unet": new} and all((new / f).is_file() for f in files)
    assert fetched == list(files)


def test_a_preset_adds_taesd_on_request_and_leaves_out_excluded_roles(monkeypatch):
    import lcmla.weights as weights

    seen = {}
    monkeypatch.setattr(weights, "resolve_files", lambda required, **k: seen.setdefault("roles", set(required)))
    preset = PRESETS["hyper-sdxl-4step"]
    roles = set(preset.required_files("fp16"))
    assert "faceid" in roles and "taesd" not in roles
    resolve_preset(preset, variant="fp16", with_taesd=True, exclude=("faceid",))
    assert seen["roles"] == (roles - {"faceid"}) | {"taesd"}
