"""The model page's public input schema (../shared/seed/model-page.txt), for the tests."""

from pathlib import Path

# The model page's input schema (../shared/seed/model-page.txt): name, type, default, enum.
SEED_INPUTS = [
    ("prompt", str, None, None),
    ("input_audio", Path, None, None),
    ("duration", int, 8, None),
    ("continuation", bool, False, None),
    ("continuation_start", int, 0, None),
    ("continuation_end", int, None, None),
    ("multi_band_diffusion", bool, False, None),
    ("normalization_strategy", str, "loudness", ["loudness", "clip", "peak", "rms"]),
    ("top_k", int, 250, None),
    ("top_p", float, 0.0, None),
    ("temperature", float, 1.0, None),
    ("classifier_free_guidance", int, 3, None),
    ("output_format", str, "wav", ["wav", "mp3"]),
    ("seed", int, None, None),
]
SEED_DESCRIPTIONS = {
    "prompt": "A description of the music you want to generate.",
    "input_audio": "An audio file that will influence the generated music. If `continuation` is `True`, "
    "the generated music will be a continuation of the audio file. Otherwise, the generated "
    "music will mimic the audio file's melody.",
    "duration": "Duration of the generated audio in seconds.",
    "continuation": "If `True`, generated music will continue `melody`. Otherwise, generated music will "
    "mimic `audio_input`'s melody.",
    "continuation_start": "Start time of the audio file to use for continuation.",
    "continuation_end": "End time of the audio file to use for continuation. If -1 or None, will default "
    "to the end of the audio clip.",
    "multi_band_diffusion": "If `True`, the EnCodec tokens will be decoded with MultiBand Diffusion. "
    "Only works with non-stereo models.",
    "normalization_strategy": "Strategy for normalizing audio.",
    "top_k": "Reduces sampling to the k most likely tokens.",
    "top_p": "Reduces sampling to tokens with cumulative probability of p. When set to `0` (default), "
    "top_k sampling is used.",
    "temperature": "Controls the 'conservativeness' of the sampling process. Higher temperature means more diversity.",
    "classifier_free_guidance": "Increases the influence of inputs on the output. Higher values produce "
    "lower-varience outputs that adhere more closely to inputs.",
    "output_format": "Output format for generated audio.",
    "seed": "Seed for random number generator. If None or -1, a random seed will be used.",
}
