"""The benchmarks' smoke runs (`script/bench --quick`; bench/long.py on the tiny EnCodec): they run
end to end and report every field. Not timed tests: speeds are reported, never asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# whole benchmark runs in subprocesses (tens of seconds each): `script/test --all` and CI run them
pytestmark = pytest.mark.slow


def bench(script: str, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """``python bench/<script> <args>`` from the project folder, its output captured."""
    return subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_quick_benchmark(tmp_path):
    out = tmp_path / "quick"
    proc = subprocess.run(
        [str(ROOT / "script" / "bench"), "--quick", "--out", str(out), "--work", str(tmp_path / "work")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.with_suffix(".json").read_text())
    cold = report["cold_start"][0]
    assert cold["ours"]["total_s"] > 0 and cold["stock"]["total_s"] > 0 and cold["setup_speedup_vs_stock"] > 0
    assert cold["ours"]["peak_rss_mb"] >= cold["ours"]["final_rss_mb"] > 0
    assert cold["ours_full"]["setup_s"] > 0
    gen = report["generation"][0]
    assert report["bandwidth"]["read_GBps"] > 0 and gen["streamed_MB_per_step"] > 0
    for row in gen["rows"]:
        assert row["transformers_s"] > 0 and row["encodec_decode_s"] > 0
        exact = row["modes"]["exact"]
        assert exact["same_tokens_as_stock"] is True  # the exact decoder is stock's arithmetic
        for mode in row["modes"].values():
            assert mode["speedup_vs_audiocraft"] > 0 and mode["speedup_vs_transformers"] > 0
    assert gen["mbd"]["mbd_decode_s"] > 0
    assert gen["profile_stock_top_ops"]
    markdown = out.with_suffix(".md").read_text()
    assert "speedup vs audiocraft" in markdown and "Cold start" in markdown


def test_gpu_check_dry_run(tmp_path):
    """bench/gpu_check.py's whole flow on the CPU at the xsmall scale (--dry), so the one-call GPU
    check cannot rot between GPU loans: every step runs, and its report has the headline fields."""
    out = tmp_path / "gpu.json"
    proc = bench("gpu_check.py", "--dry", "--out", str(out), "--work", str(tmp_path / "work"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["errors"] == {}, report["errors"]
    head = report["headline"]
    for key in (
        "device",
        "default_text_8s_s",
        "default_melody_30s_s",
        "fast_speedup_vs_audiocraft_8s",
        "cuda_graph_failures",
        "seed_reproducible",
        "exact_vs_stock_agreement",
        "fast_vs_exact_kl_mean",
        "setup_s",
        "setup_imports_s",
        "first_request_8s_s",
        "second_request_8s_s",
        "loops_4_vs_1",
    ):
        assert key in head, key
    assert head["cuda_graph_failures"] == 0 and head["seed_reproducible"] is True
    assert head["exact_vs_stock_agreement"] == 1.0  # on the CPU, exact is stock's arithmetic
    steps = report["steps"]
    assert all(isinstance(step, dict) and "result" in step for step in steps.values()), steps
    assert steps["default_fast_1s"]["result"]["decoder"].endswith("static steps")
    assert steps["default_fast_1s"]["result"]["graphs"]["eager_steps"] > 0


def test_long_outputs_benchmark_smoke(tmp_path):
    """bench/long.py end to end on the tiny EnCodec: the seam measurement tells an exact join
    from one without context margins."""
    out = tmp_path / "long"
    proc = bench(
        "long.py", "--codec", "tiny", "--parts", "seams", "--seam-seconds", "5", "--out", str(out), timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.with_suffix(".json").read_text())
    for row in report["seams"]:
        assert row["default"]["seams"] == 2  # 5 s in 2 s chunks
        assert row["default"]["snr_db"] > 100
        assert row["margins"]["0"]["snr_db"] < 60
        assert row["margins"]["0"]["max_err_near_seams"] > 100 * row["default"]["max_err_near_seams"]
    assert "Seams: chunked vs one-shot" in out.with_suffix(".md").read_text()


def test_coldstart_comparison_smoke(tmp_path, tiny_weights):
    """bench/coldstart.py --compare: stock, our first boot and our later boot (a prepared-cache hit)."""
    out = tmp_path / "coldstart"
    proc = bench(
        "coldstart.py",
        "--weights",
        str(tiny_weights),
        "--model",
        "facebook/musicgen-small",
        "--compare",
        "1",
        "--out",
        str(out),
        "--prepared",
        str(tmp_path / "prepared"),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.with_suffix(".json").read_text())
    assert [r["prepared_hit"] for r in report["raw"]["first boot"] + report["raw"]["later boot"]] == [False, True]
    assert report["summary"]["later boot"]["vs_stock"] > 0 and "later boot" in out.with_suffix(".md").read_text()


def test_training_and_streaming_benchmarks_smoke(tmp_path):
    """bench/train.py and bench/stream.py on the tiny set (--dry): every field of their reports."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "train.py"),
            "--dry",
            "--segments",
            "2",
            "--steps",
            "2",
            "--batches",
            "1",
            "--thresholds",
            "0,1048576",
            "--out",
            str(tmp_path / "train"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((tmp_path / "train.json").read_text())
    runs = report["models"][0]["runs"]
    assert [(r["method"], r["threshold"]) for r in runs] == [
        ("lora", 0),
        ("lora", 1048576),
        ("full", 0),
        ("full", 1048576),
    ], runs
    assert all(r["s_per_step"] > 0 for r in runs), runs
    assert "| lora | 1 | glibc default (stock) |" in (tmp_path / "train.md").read_text()
    assert report["models"][0]["tokenize_s_per_audio_minute"] > 0
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "stream.py"), "--dry", "--runs", "1", "--out", str(tmp_path / "stream")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads((tmp_path / "stream.json").read_text())["rows"]
    assert all(0 < r["first_chunk_s"] < r["stream_total_s"] and r["stream_vs_main"] > 0 for r in rows), rows


def test_audio_fuzz_smoke(tmp_path):
    """bench/fuzz_audio.py on 40 malformed inputs, each decoded by audio_in in a forked child: every
    child is accounted for, the real seed files decode, and no input crashed FFmpeg (a signal) or hung."""
    out = tmp_path / "fuzz"
    proc = bench("fuzz_audio.py", "--quick", "40", "--out", str(out), "--work", str(tmp_path / "work"), timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.with_suffix(".json").read_text())
    for key in (
        "date",
        "command",
        "machine",
        "settings",
        "seeds",
        "total",
        "by_format",
        "by_mutation",
        "refusal_reasons",
        "other_exceptions",
        "findings",
        "slowest",
        "most_memory",
    ):
        assert key in report, key
    assert {"cpu", "cpu_flags", "pyav", "ffmpeg_libraries"} <= set(report["machine"])
    assert set(report["by_format"]) == {"wav", "mp3", "flac", "ogg", "opus", "m4a", "aac", "aiff", "webm"}
    total = report["total"]
    assert total["inputs"] == 40
    assert sum(total[k] for k in ("decoded", "refused", "exception", "crash", "hang")) == 40
    assert total["crash"] == 0 and total["hang"] == 0, report["findings"]
    assert report["seeds"]["decoded"] == report["seeds"]["count"] > 0
    assert total["max_s"] > 0 and total["max_extra_mb"] >= total["p99_extra_mb"] >= 0
    assert "## By format" in out.with_suffix(".md").read_text()


def test_loop_benchmark_smoke(tmp_path):
    """bench/loops.py on the tiny set (--dry): 1 and 4 variations, together and apart, and the
    post-processing on synthetic tracks, every field of its report; bench/beats.py's comparison of
    trackers on two tempi."""
    proc = bench("loops.py", "--dry", "--out", str(tmp_path / "loops"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((tmp_path / "loops.json").read_text())
    assert set(report["rows"]) == {"1 loop", "4, together", "4, one after another"}
    assert len(report["rows"]["4, together"]["generation_rounds_s"]) == 2  # the first loop, then the variations
    assert len(report["rows"]["4, one after another"]["generation_rounds_s"]) == 2
    assert all(v > 0 for v in report["post_processing_s"].values())
    assert "| 4, together |" in (tmp_path / "loops.md").read_text()
    proc = bench("beats.py", "--quick", "--out", str(tmp_path / "beats"), timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    trackers = json.loads((tmp_path / "beats.json").read_text())["results"]
    assert set(trackers) == {"grid fit (ours)", "librosa beat_track", "librosa plp"}
    assert trackers["grid fit (ours)"]["noise_given_a_tempo"] == 0


def test_step_profile_smoke(tmp_path):
    """bench/step_profile.py at the xsmall scale (--dry): every part of the step is timed, the rest is
    what the parts leave of the whole step, and the floor and real-time figures are there."""
    proc = bench(
        "step_profile.py",
        "--dry",
        "--formats",
        "exact,int8",
        "--steps",
        "5",
        "--work",
        str(tmp_path / "work"),
        "--out",
        str(tmp_path / "profile"),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((tmp_path / "profile.json").read_text())
    assert [r["format"] for r in report["rows"]] == ["exact", "int8"]
    for row in report["rows"]:
        parts = row["parts_ms"]
        assert parts["matrix products"] > 0 and any(k.startswith("sampling") for k in parts)
        assert sum(parts.values()) >= row["profiled_step_ms"] * 0.99
        assert row["floor_ms"] > 0 and row["real_time_factor"] > 0
    assert report["read_bandwidth_GBs"] > 0.5
