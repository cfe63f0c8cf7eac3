"""The benchmark's smoke run (`script/bench --quick`): it runs end to end and reports every field.
Not a timed test: speeds are reported, never asserted."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_benchmark(tmp_path):
    out = tmp_path / "quick"
    proc = subprocess.run([str(ROOT / "script" / "bench"), "--quick", "--out", str(out), "--work", str(tmp_path / "work")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.with_suffix(".json").read_text())
    cold = report["cold_start"][0]
    assert cold["ours"]["setup_s"] > 0 and cold["stock"]["setup_s"] > 0 and cold["setup_speedup_vs_stock"] > 0
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
