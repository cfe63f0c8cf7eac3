"""``script/prepare``: run setup once, so that the prepared decoder it measures and converts is on disk
before the server's first boot (:mod:`..decoding.prepared`). Setup problems end in one line and a
non-zero exit, as ``script/predict``'s do."""

from __future__ import annotations

import sys
import typing as tp


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> int:
    import argparse

    from ..core.errors import SetupError
    from ..core.settings import Settings

    parser = argparse.ArgumentParser(prog="script/prepare", description=__doc__)
    parser.add_argument("--loop", action="store_true", help="for the loop model (its variations share steps)")
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
        if args.loop:
            from dataclasses import replace

            from ..serving.loops import SLOTS

            settings = replace(settings, requests_per_prediction=SLOTS)
        from ..serving.setup import decoder_cache

        device = settings.resolved_device()
        cache, _ = decoder_cache(settings, device, 2 * settings.slots)
        if cache is None:
            print(
                f"prepare: nothing to prepare for MUSICGEN_DECODER={settings.decoder} on {device} "
                "(only CPU setups with auto or a reduced precision use prepared decoders)"
            )
            return 0
        from ..serving.service import Service

        service = Service(settings)
    except SetupError as exc:
        print(f"prepare: {exc}", file=sys.stderr)
        return 1
    decoder_state = service.generator.decoder
    print(
        f"prepare: {decoder_state.describe()}; later setups with these settings read it "
        f"({settings.slots} request(s) sharing a step, folders {', '.join(map(str, settings.prepared_dirs))})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
