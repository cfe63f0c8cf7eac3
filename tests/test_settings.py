from pathlib import Path

import pytest

from musicgen_service.core.settings import DEFAULT_MODEL, PROJECT_ROOT, Settings, SettingsError


def test_defaults_without_environment():
    s = Settings.from_env({})
    assert s.model == DEFAULT_MODEL == "facebook/musicgen-stereo-melody-large"
    assert s.weights_dir == PROJECT_ROOT / "weights"
    assert (s.device, s.mbd, s.max_duration, s.decoder, s.concurrency) == ("auto", "lazy", 300, "auto", 1)


def test_environment_overrides(tmp_path):
    s = Settings.from_env(
        {
            "MUSICGEN_WEIGHTS": str(tmp_path),
            "MUSICGEN_MODEL": "facebook/musicgen-small",
            "MUSICGEN_DEVICE": "cpu",
            "MUSICGEN_MBD": "EAGER",
            "MUSICGEN_MAX_DURATION": "60",
            "MUSICGEN_DECODER": "Exact",
            "COG_MAX_CONCURRENCY": "4",
        }
    )
    assert (s.weights_dir, s.model, s.device, s.mbd, s.max_duration, s.decoder, s.concurrency) == (
        tmp_path,
        "facebook/musicgen-small",
        "cpu",
        "eager",
        60,
        "exact",
        4,
    )
    assert s.resolved_device() == "cpu"


def test_relative_weights_folder_is_made_absolute():
    assert Settings.from_env({"MUSICGEN_WEIGHTS": "w"}).weights_dir == Path.cwd() / "w"


@pytest.mark.parametrize(
    "env, message",
    [
        ({"MUSICGEN_MBD": "sometimes"}, "MUSICGEN_MBD"),
        ({"MUSICGEN_MAX_DURATION": "long"}, "MUSICGEN_MAX_DURATION"),
        ({"MUSICGEN_MAX_DURATION": "0"}, "MUSICGEN_MAX_DURATION"),
        ({"MUSICGEN_DECODER": "turbo"}, "MUSICGEN_DECODER"),
        ({"COG_MAX_CONCURRENCY": "many"}, "COG_MAX_CONCURRENCY"),
        ({"COG_MAX_CONCURRENCY": "0"}, "COG_MAX_CONCURRENCY"),
        ({"MUSICGEN_PREPARED_MAX_GB": "lots"}, "MUSICGEN_PREPARED_MAX_GB"),
        ({"MUSICGEN_PREPARED_MAX_GB": "0"}, "MUSICGEN_PREPARED_MAX_GB"),
        ({"MUSICGEN_PREPARED_MAX_GB": "nan"}, "MUSICGEN_PREPARED_MAX_GB"),
    ],
)
def test_bad_settings_are_named(env, message):
    with pytest.raises(SettingsError, match=message):
        Settings.from_env(env)
