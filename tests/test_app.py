"""The web app as users meet it: a real uvicorn server on localhost, its JSON API (also fuzzed by
schemathesis against the app's own OpenAPI schema), and its pages in a real headless Chromium."""

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
from conftest import REPO

from shards.synth.celebdf import photo_paths

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(smoke_checkpoint):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.app", "--checkpoint", str(smoke_checkpoint), "--port", str(port),
                             "--max-upload-mb", "2", "--frames", "6"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()[-2000:]
        time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def post(url, name, data):
    return httpx.post(f"{url}/api/detect", files={"file": (name, data)}, timeout=120)


@pytest.fixture(scope="module")
def video(celebdf_root) -> Path:
    return sorted((celebdf_root / "Celeb-synthesis").glob("*.mp4"))[0]


def test_the_api_scores_a_video_and_an_image(server, video):
    r = post(server, "clip.mp4", video.read_bytes())
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["kind"] == "video" and out["file"] == "clip.mp4" and out["frames_looked_at"] == 6
    assert out["verdict"] in ("fake", "real") and 0 <= out["score"] <= 1
    r = post(server, "grace.jpg", photo_paths()[0].read_bytes())
    assert r.status_code == 200 and r.json()["kind"] == "image" and r.json()["frames_with_face"] == 1


def test_bad_uploads_get_a_clear_4xx(server, tmp_path):
    ok, png = cv2.imencode(".png", np.full((120, 120, 3), 127, np.uint8))
    cases = [
        ("empty.mp4", b"", 400, "empty"),
        ("notes.mp4", b"these are not video bytes", 415, "neither an image nor a video"),
        ("../../etc/passwd", b"%PDF-1.4 fake", 415, "neither an image nor a video"),
        ("grey.png", png.tobytes(), 422, "no face"),
        ("big.mp4", os.urandom(3 << 20), 413, "larger than 2 MB"),
    ]
    for name, data, status, text in cases:
        r = post(server, name, data)
        assert r.status_code == status and text in r.json()["detail"], (name, r.status_code, r.text)
        assert "/tmp/" not in r.text and "deepfake-upload" not in r.text  # no server paths leak
    r = httpx.post(f"{server}/api/detect", data={"other": "x"}, timeout=60)
    assert r.status_code == 400 and "field `file`" in r.json()["detail"]
    assert not list(Path("/tmp").glob("deepfake-upload-*"))  # uploads are deleted after use
    assert Path("/etc/passwd").read_text()  # and the name was never a path


def test_concurrent_requests_do_not_mix_results(server, video):
    image = photo_paths()[0].read_bytes()
    results = {}

    def call(i):
        name, data = ("v.mp4", video.read_bytes()) if i % 2 else ("i.jpg", image)
        results[i] = post(server, name, data).json()

    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, out in results.items():
        assert out["kind"] == ("video" if i % 2 else "image") and out["file"] == ("v.mp4" if i % 2 else "i.jpg")
    assert len({results[i]["score"] for i in (1, 3, 5)}) == 1  # the same video, the same answer


def test_the_api_honours_its_openapi_schema_under_fuzzing(server, tmp_path):
    # schemathesis's own CLI against the running server (its pytest plugin does not run under pytest 9.2).
    # positive_data_acceptance is left out: any bytes are a schema-valid upload, but only a decodable video or
    # image with a face can be accepted, and the schema cannot say so; the documented 4xx answers cover the rest.
    result = subprocess.run([str(Path(sys.executable).parent / "schemathesis"), "run", f"{server}/openapi.json",
                             "--checks", "all", "--exclude-checks", "positive_data_acceptance", "--max-examples", "40",
                             "--request-timeout", "60", "--seed", "1"], cwd=tmp_path,  # it keeps a cache where it runs
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:]
    assert "Tested: 2" in result.stdout


@pytest.fixture(scope="module")
def chromium():
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            pytest.skip("needs Debian's chromium and chromium-driver, and root to install them")
        subprocess.run(["apt-get", "update", "-qq"], check=True, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium", "chromium-driver"],
                       check=True, capture_output=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as ChromeService

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1000,1200"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=ChromeService(executable_path=shutil.which("chromedriver")), options=options)
    yield driver
    driver.quit()


def test_a_person_uploads_a_video_in_chromium_and_sees_the_verdict(server, chromium, video, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    chromium.get(server + "/")
    chromium.find_element(By.ID, "file").send_keys(str(video))
    chromium.find_element(By.ID, "submit").click()
    verdict = WebDriverWait(chromium, 120).until(expected_conditions.presence_of_element_located((By.ID, "verdict")))
    assert verdict.text in ("FAKE", "REAL")
    assert "Mean fake score" in chromium.find_element(By.ID, "score").text
    assert len(chromium.find_elements(By.CSS_SELECTOR, "img.thumb")) == 6
    screenshot = Path(os.environ.get("SCREENSHOT_DIR", tmp_path)) / "app-verdict.png"
    chromium.save_screenshot(str(screenshot))
    assert screenshot.stat().st_size > 10_000

    chromium.get(server + "/")
    notes = tmp_path / "notes.mp4"
    notes.write_bytes(b"not a video")
    chromium.find_element(By.ID, "file").send_keys(str(notes))
    chromium.find_element(By.ID, "submit").click()
    error = WebDriverWait(chromium, 60).until(expected_conditions.presence_of_element_located((By.ID, "error")))
    assert "neither an image nor a video" in error.text
