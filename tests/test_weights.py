"""The weights folder: hub layout, missing-file errors, local checkpoints."""
from __future__ import annotations

import pytest

from musicgen_service import weights
from musicgen_service.weights import HubFile, WeightsMissingError


def test_written_repo_is_read_by_huggingface_hub(tmp_path):
    from huggingface_hub import scan_cache_dir, try_to_load_from_cache

    src = tmp_path / "src.bin"
    src.write_bytes(b"hello")
    cache = tmp_path / "cache"
    snapshot = weights.write_repo(cache, "org/name", {"a.bin": src})
    found = try_to_load_from_cache("org/name", "a.bin", cache_dir=str(cache))
    assert found == str(snapshot / "a.bin")
    assert (snapshot / "a.bin").is_symlink() and (snapshot / "a.bin").read_bytes() == b"hello"
    info = scan_cache_dir(cache)  # the hub's own validator of the layout
    assert not info.warnings
    assert [r.repo_id for r in info.repos] == ["org/name"]


def test_missing_model_names_the_files_and_the_command(tmp_path):
    with pytest.raises(WeightsMissingError) as info:
        weights.musicgen_folder(tmp_path, "facebook/musicgen-small")
    message = str(info.value)
    assert "facebook/musicgen-small/state_dict.bin" in message
    assert "facebook/musicgen-small/compression_state_dict.bin" in message
    assert "script/download-weights" in message and str(tmp_path) in message


def test_missing_mbd_names_the_file(tmp_path):
    with pytest.raises(WeightsMissingError, match="multiband-diffusion/mbd_musicgen_32khz.th"):
        weights.require(tmp_path, weights.mbd_files(), "multi_band_diffusion")


def test_local_checkpoint_folder_must_hold_both_files(tmp_path):
    (tmp_path / "state_dict.bin").write_bytes(b"")
    with pytest.raises(WeightsMissingError, match="compression_state_dict.bin"):
        weights.musicgen_folder(tmp_path / "unused", str(tmp_path))
    (tmp_path / "compression_state_dict.bin").write_bytes(b"")
    assert weights.musicgen_folder(tmp_path / "unused", str(tmp_path)) == tmp_path


def test_conditioner_files_follow_the_checkpoint_config():
    from omegaconf import OmegaConf

    from musicgen_service import tiny

    text = weights.conditioner_files(OmegaConf.create(tiny.lm_config(1, melody=False)))
    melody = weights.conditioner_files(OmegaConf.create(tiny.lm_config(2, melody=True)))
    assert HubFile("t5-base", "spiece.model") in text
    assert not any(f.repo_id == weights.DEMUCS_REPO for f in text)
    assert HubFile(weights.DEMUCS_REPO, "htdemucs.yaml") in melody


def test_hub_cache_configured_before_import_is_enforced(tmp_path):
    # conftest configured the session's cache before anything imported huggingface_hub;
    # asking for another one now must fail loudly rather than read the wrong folder.
    with pytest.raises(RuntimeError, match="imported before the weights folder was configured"):
        weights.use_hub_cache(tmp_path)
