"""Filling the weights folder from the hub (``script/download-weights``): only what the configured
model needs (its checkpoint, the conditioners it names, MultiBand Diffusion), through huggingface_hub,
which resumes an interrupted download. Never called at predict time: setup reads the folder offline
(:mod:`.hub`).
"""
from __future__ import annotations

import sys
import typing as tp
from pathlib import Path

from ..core.errors import DownloadError, SettingsError, WeightsMissingError
from .hub import (COMPRESSION_FILE, DOWNLOAD_COMMAND, LM_FILE, HubFile, conditioner_files, is_local_checkpoint,
                  mbd_files, musicgen_folder, read_lm_config)


def download_error(f: HubFile, exc: tp.Union[OSError, ValueError]) -> DownloadError:
    """What went wrong fetching ``f``, and what to do, in one line."""
    from huggingface_hub import constants, errors

    again = "run the command again: fetched files are kept and a partial one resumes"
    if isinstance(exc, errors.LocalEntryNotFoundError) and constants.HF_HUB_OFFLINE:
        return DownloadError(f"HF_HUB_OFFLINE is set, so {f} cannot be fetched: unset it and {again}")
    if isinstance(exc, errors.GatedRepoError):
        return DownloadError(f"{f.repo_id} is gated on the hub: accept its terms there, log in "
                             "(HF_TOKEN or `hf auth login`) and run the command again")
    if isinstance(exc, errors.RepositoryNotFoundError):
        return DownloadError(f"the hub has no model {f.repo_id} (MUSICGEN_MODEL or --model): check the id")
    if isinstance(exc, errors.EntryNotFoundError) and not isinstance(exc, errors.LocalEntryNotFoundError):
        return DownloadError(f"the hub repo {f.repo_id} has no file {f.filename}: "
                             "it is not an audiocraft MusicGen checkpoint")
    if isinstance(exc, errors.HfHubHTTPError) and exc.response is not None:
        return DownloadError(f"the hub answered HTTP {exc.response.status_code} for {f}: {again} later")
    if isinstance(exc, errors.HFValidationError):
        return DownloadError(f"{f.repo_id!r} is not a hub repo id (org/name) nor a local folder: {exc}")
    if not isinstance(exc, OSError) or exc.errno is None:  # requests' errors, the hub's "no connection"
        return DownloadError(f"cannot reach the Hugging Face hub ({constants.ENDPOINT}) for {f}: "
                             f"check the network (or a proxy, HF_ENDPOINT) and {again}")
    return DownloadError(f"cannot write {f} into the weights folder: {exc.strerror} ({exc.filename or exc})")


def download(cache_dir: Path, model: str, with_mbd: bool = True,
             log: tp.Callable[[str], None] = print) -> None:
    """Fetch what ``model`` needs into ``cache_dir``: only those files; interrupted downloads resume.
    A file that cannot be fetched raises :class:`DownloadError`."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HFValidationError

    def fetch(f: HubFile) -> Path:
        log(f"fetching {f}")
        try:
            return Path(hf_hub_download(f.repo_id, f.filename, cache_dir=str(cache_dir)))
        except (OSError, HFValidationError) as exc:  # the hub's HTTP errors are requests' OSErrors
            raise download_error(f, exc) from exc

    if is_local_checkpoint(model):
        folder = musicgen_folder(cache_dir, model)
    else:
        folder = fetch(HubFile(model, LM_FILE)).parent
        fetch(HubFile(model, COMPRESSION_FILE))
    for f in conditioner_files(read_lm_config(folder / LM_FILE)):
        fetch(f)
    if with_mbd:
        for f in mbd_files():
            fetch(f)


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> int:
    """``script/download-weights``: fill the weights folder from the hub. Known failures (no network,
    unknown model, bad setting, full disk, Ctrl-C) end in one line on stderr and a non-zero code."""
    import argparse

    from huggingface_hub.utils import logging as hub_logging

    from ..core.settings import Settings

    def fail(message: str, code: int = 1) -> int:
        print(f"download-weights: {message}", file=sys.stderr)
        return code

    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        return fail(str(exc), 2)
    parser = argparse.ArgumentParser(prog="script/download-weights", description=download.__doc__)
    parser.add_argument("--model", default=settings.model,
                        help=f"hub repo id or local checkpoint folder (default: {settings.model})")
    parser.add_argument("--weights", type=Path, default=settings.weights_dir,
                        help=f"the hub cache to fill (default: {settings.weights_dir})")
    parser.add_argument("--no-mbd", action="store_true", help="skip MultiBand Diffusion")
    args = parser.parse_args(argv)
    hub_logging.set_verbosity_error()  # its retry warnings would bury the one line that matters
    try:
        args.weights.mkdir(parents=True, exist_ok=True)
        download(args.weights, args.model, with_mbd=not args.no_mbd)
    except (DownloadError, WeightsMissingError) as exc:
        return fail(str(exc))
    except OSError as exc:
        return fail(f"cannot write into {args.weights}: {exc.strerror or exc}")
    except KeyboardInterrupt:
        return fail("interrupted: run the command again to resume", 130)
    print(f"weights ready in {args.weights}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
