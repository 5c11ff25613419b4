"""``worldline-play`` in a real headless Chromium (Debian's chromium + chromium-driver, via
selenium), on a tiny trained action-conditioned model: the page loads, frames arrive, holding
two different keys sends different actions and gives different frames, fps and latency are
shown, and recording downloads an mp4 + actions JSON + first frame. With
WORLDLINE_PLAY_SCREENSHOT=1 it rewrites the README's screenshot (docs/play.png). Chromium is
installed by scripts/ensure_chromium.sh (~60 s)."""
from __future__ import annotations


import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from _play import replay_matches

pytestmark = [pytest.mark.slow, pytest.mark.browser]

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def chromium() -> str:
    """The chromedriver path, installing chromium + chromium-driver when missing."""
    r = subprocess.run(["bash", str(REPO / "scripts" / "ensure_chromium.sh")],
                       capture_output=True, text=True, timeout=900)
    if r.returncode == 3:
        pytest.skip(f"BROWSER TEST SKIPPED: apt-get unavailable, cannot install chromium: "
                    f"{r.stderr.strip()}")
    assert r.returncode == 0, r.stderr[-3000:]
    return "/usr/bin/chromedriver"


@pytest.fixture()
def server(play_model):
    proc = subprocess.Popen(
        [str(BIN / "worldline-play"), str(play_model["pipeline"]), "--shards",
         str(play_model["shards"]), "--port", "0", "--steps", "1", "--window", "4"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = None
        for line in proc.stdout:
            m = re.search(r"at (http://127\.0\.0\.1:\d+/)", line)
            if m:
                url = m.group(1)
                break
        assert url, "worldline-play printed no URL"
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _wait(driver, js: str, timeout: float = 90):
    end = time.time() + timeout
    while time.time() < end:
        v = driver.execute_script(js)
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for: {js}")


def _frame_hash(driver) -> str:
    # The page swaps the <img> src for every frame: while the new one decodes, naturalWidth is
    # 0 and a canvas copy would be the empty "data:," for every key alike (a CI flake), so wait
    # for a decoded image.
    return _wait(driver, """
        const img = document.getElementById('view');
        if (!img.complete || !img.naturalWidth) return null;
        const c = document.createElement('canvas');
        c.width = img.naturalWidth; c.height = img.naturalHeight;
        c.getContext('2d').drawImage(img, 0, 0);
        return c.toDataURL('image/png');""")


def _hold(driver, key: str, frames: int = 4) -> list[str]:
    """Hold ``key`` until ``frames`` frames made with it have been shown; their images."""
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).key_down(key).perform()
    seq = _wait(driver, "return window.worldlinePlay.lastSeqSent")
    _wait(driver, f"const s = window.worldlinePlay; return s.lastSeq >= {seq} && s.latency;")
    shots, last = [], None
    while len(shots) < frames:
        idx = _wait(driver, f"const i = window.worldlinePlay.index; return i !== {json.dumps(last)} && i;")
        last = idx
        shots.append(_frame_hash(driver))
    ActionChains(driver).key_up(key).perform()
    return shots


def test_play_in_chromium(chromium, server, play_model, tmp_path: Path) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1100,760"):
        opts.add_argument(arg)
    opts.binary_location = "/usr/bin/chromium"
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    opts.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                           "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(chromium), options=opts)
    try:
        driver.execute_cdp_cmd("Browser.setDownloadBehavior",
                               {"behavior": "allow", "downloadPath": str(downloads)})
        driver.get(server)
        _wait(driver, "return window.worldlinePlay && window.worldlinePlay.ready")
        assert "W" in driver.find_element("id", "keymap").text
        _wait(driver, "return window.worldlinePlay.frames > 0")
        up = _hold(driver, "w")
        assert driver.execute_script("return window.worldlinePlay.lastActions") == [1, 0, 0]
        right = _hold(driver, "d")
        assert driver.execute_script("return window.worldlinePlay.lastActions") == [4, 0, 0]
        assert set(up).isdisjoint(right)  # different keys, different frames
        fps = float(driver.find_element("id", "fps").text)
        latency = float(driver.find_element("id", "latency").text)
        assert fps > 0 and latency > 0
        # Record 2 frames under "s": the page downloads the files.
        from selenium.webdriver.common.action_chains import ActionChains

        driver.execute_script("document.getElementById('recframes').value = 2")
        ActionChains(driver).key_down("s").perform()
        driver.find_element("id", "record").click()
        _wait(driver, "return window.worldlinePlay.recorded", timeout=120)
        names = {"session.mp4", "actions.json", "first.png"}
        end = time.time() + 30
        while time.time() < end and {p.name for p in downloads.iterdir()} != names:
            time.sleep(0.2)
        assert {p.name for p in downloads.iterdir()} == names
        doc = json.loads((downloads / "actions.json").read_text())
        assert doc["replay"]["frames"] == 2 and len(doc["actions"]) == 1 + 2 * 4
        assert [2, 0, 0] in doc["actions"] and "worldline-sample" in doc["replay"]["command"]
        import decord

        vr = decord.VideoReader(str(downloads / "session.mp4"))
        assert len(vr) == 9 and vr[0].shape == (32, 32, 3)
        # The downloaded recording replays with worldline-sample to the same frames.
        replay_matches(doc, downloads, downloads / "session.mp4", play_model)
        ActionChains(driver).key_up("s").perform()
        _wait(driver, "return window.worldlinePlay.frames > 0")
        # Opt-in (WORLDLINE_PLAY_SCREENSHOT=1): a test run must not dirty the checkout.
        if os.environ.get("WORLDLINE_PLAY_SCREENSHOT") == "1":
            driver.save_screenshot(str(REPO / "docs" / "play.png"))
    finally:
        driver.quit()

