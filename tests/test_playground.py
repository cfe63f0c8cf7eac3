"""The playground (script/playground): its relay and history (fast, in-process), and the page in a real
browser, headless Chromium (Debian's package) driven by Playwright, against local Cog servers on the
tiny set (slow): generate, a bad input's message beside its field, streaming audio playing before the
prediction ends, loops, cancel, a training with its loss curve then served, the history.

The browser tests save a screenshot of each tab into docs/playground/ (docs/playground.md shows them).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import time
import typing as tp
import urllib.request
import zipfile
from pathlib import Path

import pytest
from audio_helpers import melody, write
from server_helpers import free_port

from musicgen_service.playground.jobs import Jobs
from musicgen_service.playground.servers import Servers, kind_of

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = ROOT / "docs" / "playground"


def data_uri(raw: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


# -- the relay and the history, in-process ------------------------------------------------------


def test_outputs_written_once_and_served_by_url(tmp_path):
    jobs = Jobs(tmp_path)
    job, sent = jobs.create("stream", "stream", {"prompt": "x", "input_audio": data_uri(b"RIFFmelody", "audio/wav")})
    assert sent["input_audio"].startswith("data:")  # the server gets the page's input as it was
    assert job.input["input_audio"] == f"/files/{job.id}/input-input_audio.wav"
    assert (tmp_path / job.id / "input-input_audio.wav").read_bytes() == b"RIFFmelody"
    first = data_uri(b"RIFFchunk0", "audio/wav")
    jobs.update(job.id, {"status": "processing", "output": [first], "logs": "seed: 42\n"})
    (tmp_path / job.id / "output-0000.wav").write_bytes(b"changed")  # a later webhook does not rewrite it
    jobs.update(job.id, {"status": "processing", "output": [first, data_uri(b"RIFFchunk1", "audio/wav")]})
    view = jobs.get(job.id).view()
    assert view["output"] == [f"/files/{job.id}/output-0000.wav", f"/files/{job.id}/output-0001.wav"]
    assert (tmp_path / job.id / "output-0000.wav").read_bytes() == b"changed"
    assert view["seed"] == 42 and view["first_output_at"] is not None
    safetensors = (8).to_bytes(8, "little") + b'{"a": 1}'
    train, _ = jobs.create("train", "train", {})
    jobs.update(
        train.id,
        {
            "status": "succeeded",
            "output": {
                "weights": data_uri(safetensors, "application/octet-stream"),
                "loss_curve": data_uri(b"\x89PNG", "image/png"),
            },
        },
    )
    out = jobs.get(train.id).output
    assert out["weights"].endswith("/output-weights.safetensors") and out["loss_curve"].endswith(".png")
    assert jobs.path_of(out["weights"]).read_bytes() == safetensors


def test_files_by_checked_names_only(tmp_path):
    jobs = Jobs(tmp_path)
    job, _ = jobs.create("main", "predict", {})
    (tmp_path / "secret.txt").write_text("no")
    for name in ("../secret.txt", "..", ".hidden", "a/b", ""):
        assert jobs.file(job.id, name) is None
    assert jobs.file("../" + job.id, "x") is None and jobs.file("0" * 32, "secret.txt") is None
    assert jobs.path_of("/files/../secret.txt") is None
    assert not jobs.update("f" * 32, {"status": "succeeded"})  # a webhook for no job of ours


def test_history_survives_a_restart(tmp_path):
    jobs = Jobs(tmp_path)
    done, _ = jobs.create("main", "predict", {"prompt": "kept", "seed": 3})
    jobs.update(done.id, {"status": "succeeded", "logs": "seed: 3\n", "output": data_uri(b"RIFF", "audio/wav")})
    jobs.update(done.id, {"status": "failed"})  # a late webhook changes nothing
    running, _ = jobs.create("main", "predict", {"prompt": "cut short"})
    jobs.update(running.id, {"status": "processing"})
    again = Jobs(tmp_path).history()
    assert [(j["input"]["prompt"], j["status"], j["seed"]) for j in again] == [("kept", "succeeded", 3)]


def test_kind_read_from_each_models_schema():
    kinds = {
        path: kind_of(json.loads((ROOT / path).read_text()))
        for path in (".cog/openapi_schema.json", ".cog/stream/openapi_schema.json", ".cog/loop/openapi_schema.json")
    }
    assert list(kinds.values()) == ["predict", "stream", "loop"]
    with pytest.raises(OSError, match="not one of"):
        Servers(Path("/nonexistent")).add_url("learn=http://127.0.0.1:9")


# -- the page in a real browser -----------------------------------------------------------------


def get(url: str) -> tp.Any:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def playground(tiny_weights, tmp_path_factory):
    folder = tmp_path_factory.mktemp("playground")
    port = free_port()
    env = {**os.environ, "MUSICGEN_WEIGHTS": str(tiny_weights), "MUSICGEN_DEVICE": "cpu"}
    log = open(folder / "playground.log", "wb")
    proc = subprocess.Popen(
        [str(ROOT / "script" / "playground"), "--port", str(port), "--folder", str(folder)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            get(f"{url}/api/servers")
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError((folder / "playground.log").read_text()) from None
            time.sleep(0.2)
    yield url, folder
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def page(playground):
    from playwright import sync_api  # requirements-dev.txt

    if not Path(CHROMIUM).exists():
        pytest.fail("no Chromium: apt-get install chromium (.ci/run does)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--autoplay-policy=no-user-gesture-required"]
        )
        pg = browser.new_page(viewport={"width": 1200, "height": 900})
        errors: tp.List[str] = []
        pg.on("pageerror", lambda e: errors.append(str(e)))
        pg.goto(playground[0])
        yield pg
        browser.close()
        assert not errors, errors


def shot(page, name: str) -> None:
    SHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def job_of(page, panel: str) -> dict:
    job_id = page.get_attribute(f"#panel-{panel} .result", "data-job")
    return get(f"{page.url.rstrip('/')}/api/jobs/{job_id}")


def send(page, panel: str, keys: tp.Optional[str] = None) -> None:
    """Submit the panel's form (click, or ``keys``) and wait until its new job's card is there."""
    before = (
        page.get_attribute(f"#panel-{panel} .results > .result:first-child", "data-job")
        if page.query_selector(f"#panel-{panel} .results > .result")
        else ""
    )
    if keys:
        page.keyboard.press(keys)
    else:
        page.click(f"#panel-{panel} button.primary")
    page.wait_for_function(
        f"(document.querySelector('#panel-{panel} .results > .result:first-child') || {{}})"
        f".dataset?.job !== {json.dumps(before)} && document.querySelector('#panel-{panel} "
        ".results > .result:first-child') !== null",
        timeout=30_000,
    )


def wait_done(page, panel: str, timeout: float = 180) -> dict:
    page.wait_for_selector(f"#panel-{panel} .results > .result:first-child .outcome", timeout=timeout * 1000)
    return job_of(page, panel)


def open_tab(page, name: str) -> None:
    page.click(f"#tab-{name}")
    page.wait_for_selector(f"#panel-{name} button.primary", timeout=60_000)
    page.wait_for_function(
        f"document.querySelector('#panel-{name} .status').textContent.includes('READY')", timeout=180_000
    )


@pytest.mark.slow
def test_generate_with_the_keyboard(page):
    page.wait_for_function("performance.getEntriesByName('first-contentful-paint').length > 0")
    paint = page.evaluate("performance.getEntriesByType('paint').map(e => [e.name, e.startTime])")
    first_paint = dict(paint).get("first-contentful-paint")
    assert first_paint is not None and first_paint <= 2000, paint
    open_tab(page, "main")
    schema = json.loads((ROOT / ".cog" / "openapi_schema.json").read_text())["components"]["schemas"]["Input"]
    in_order = sorted(schema["properties"], key=lambda n: schema["properties"][n]["x-order"])
    assert page.eval_on_selector_all("#panel-main [data-field]", "els => els.map(e => e.dataset.field)") == in_order
    assert page.eval_on_selector("#main-output_format", "e => [...e.options].map(o => o.value)") == ["wav", "mp3"]
    page.focus("#main-prompt")
    page.keyboard.type("lo-fi beat")
    page.fill("#main-duration", "2")
    send(page, "main", "Control+Enter")
    job = wait_done(page, "main")
    assert job["status"] == "succeeded", job
    page.wait_for_function("document.querySelector('#panel-main .result audio').readyState >= 2")
    seconds = page.evaluate("document.querySelector('#panel-main .result audio').duration")
    assert seconds >= 1.0
    assert f"seed {job['seed']}" in page.inner_text("#panel-main .result")
    shot(page, "generate")


@pytest.mark.slow
def test_bad_inputs_shown_beside_their_fields(page):
    open_tab(page, "main")
    page.fill("#main-top_p", "5")  # the schema's rule: Cog answers 422
    page.click("#panel-main button.primary")
    page.wait_for_function("document.querySelector('#main-top_p-error').textContent.length > 0")
    assert "1" in page.inner_text("#main-top_p-error")
    page.fill("#main-top_p", "0")
    page.check("#main-continuation")  # a cross-field rule: the prediction fails with it
    page.click("#panel-main button.primary")
    page.wait_for_function("document.querySelector('#main-continuation-error').textContent.length > 0")
    assert "needs input_audio" in page.inner_text("#main-continuation-error")
    assert page.get_attribute("[data-field=continuation]", "class") == "field bad"
    shot(page, "bad-input")
    page.uncheck("#main-continuation")


@pytest.mark.slow
def test_cancel(page):
    open_tab(page, "main")
    page.fill("#main-duration", "300")
    send(page, "main")
    page.wait_for_function(
        "document.querySelector('#panel-main pre.logs').textContent.includes('generated ')", timeout=120_000
    )
    page.keyboard.press("Escape")
    job = wait_done(page, "main")
    assert job["status"] == "canceled", job
    page.fill("#main-duration", "2")


@pytest.mark.slow
def test_stream_plays_before_the_prediction_ends(page):
    open_tab(page, "stream")
    page.fill("#stream-prompt", "ambient pads")
    page.fill("#stream-duration", "12")
    send(page, "stream")
    job = wait_done(page, "stream")
    assert job["status"] == "succeeded", job
    heard = page.evaluate(f"window.playground.firstHeard['{job['id']}']") / 1000
    assert heard == pytest.approx(job["heard_at"], abs=0.01)
    assert heard < job["completed_at"]  # the first chunk played while the rest was being generated
    assert heard - job["first_output_at"] <= 0.3  # the target: first chunk's arrival + 0.3 s
    page.wait_for_function("document.querySelector('#panel-stream .result audio').readyState >= 2")
    assert page.evaluate("document.querySelector('#panel-stream .result audio').duration") >= 11.9
    print(
        f"stream: first chunk at {job['first_output_at'] - job['submitted_at']:.2f} s, heard "
        f"{heard - job['first_output_at']:.3f} s later; done at {job['completed_at'] - job['submitted_at']:.2f} s"
    )
    shot(page, "stream")


@pytest.mark.slow
def test_loops_play_as_loops(page):
    open_tab(page, "loop")
    page.fill("#loop-prompt", "funk drums")
    send(page, "loop")
    job = wait_done(page, "loop", timeout=300)
    assert job["status"] == "succeeded", job
    loops = page.query_selector_all("#panel-loop .result audio")
    assert len(loops) == len(job["output"]) >= 1
    assert all(a.get_attribute("loop") is not None for a in loops)
    shot(page, "loops")


@pytest.mark.slow
def test_training_curve_then_served(page, tmp_path):
    src = tmp_path / "songs"
    src.mkdir()
    write(src / "a.wav", melody([262, 330, 392, 523], 1.5, 32000, 1), 32000)
    (src / "a.txt").write_text("warm piano")
    archive = tmp_path / "music.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for p in sorted(src.iterdir()):
            z.write(p, p.name)
    open_tab(page, "train")
    assert page.eval_on_selector("#train-method", "e => e.tagName") == "SELECT"
    page.set_input_files("#train-dataset-file", str(archive))
    page.wait_for_function("document.querySelector('[data-field=dataset] .name').textContent.includes('music.zip')")
    page.fill("#train-epochs", "3")
    page.fill("#train-batch_size", "1")
    page.fill("#train-seed", "5")
    send(page, "train")
    job = wait_done(page, "train", timeout=400)
    assert job["status"] == "succeeded", job
    points = int(page.get_attribute("#panel-train svg.loss", "data-points"))
    assert points >= 1 and page.query_selector("#panel-train svg.loss polyline") is not None
    assert len(page.query_selector_all("#panel-train .result audio")) == 2  # the samples before and after
    shot(page, "train")
    page.click("#panel-train button:has-text('Serve this result')")
    name = f"trained-{job['id'][:8]}"
    page.wait_for_selector(f"#tab-{name}", timeout=30_000)
    open_tab(page, name)
    page.fill(f"#{name}-prompt", "warm piano")
    page.fill(f"#{name}-duration", "1")
    send(page, name)
    served = wait_done(page, name)
    assert served["status"] == "succeeded", served
    setup_logs = get(f"{page.url.rstrip('/')}/api/servers/{name}/health")["setup"]["logs"]
    assert "trained weights: " in setup_logs and "applied" in setup_logs, setup_logs[-2000:]


@pytest.mark.slow
def test_history_reuse_and_continue(page):
    page.click("#tab-history")
    page.wait_for_selector("#history-list li")
    entries = get(f"{page.url.rstrip('/')}/api/history")["jobs"]
    first = next(j for j in entries if j["server"] == "main" and j["status"] == "succeeded")
    item = f"#history-list li[data-job='{first['id']}']"
    shot(page, "history")
    page.click(f"{item} button:has-text('Reuse seed')")
    page.wait_for_function(f"document.querySelector('#main-seed').value === '{first['seed']}'")
    page.click("#tab-history")
    page.click(f"{item} button:has-text('Continue this')")
    page.wait_for_function("document.querySelector('[data-field=input_audio] .name').textContent.includes('output')")
    assert page.is_checked("#main-continuation"), page.inner_text("#panel-main form")[:500]
    page.fill("#main-duration", "1")
    send(page, "main")
    job = wait_done(page, "main")
    assert job["status"] == "succeeded" and job["input"]["input_audio"].startswith("/files/"), job
    assert "continuation" in job["logs"], job["logs"]
    # the tabs by keyboard: focus one, arrows move
    page.focus("#tab-main")
    page.keyboard.press("ArrowRight")
    page.wait_for_function("document.querySelector('#tab-stream').getAttribute('aria-selected') === 'true'")
