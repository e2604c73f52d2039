"""The live-captions page end to end, in a real headless Chromium.

Chromium plays a WAV that the tests synthesized as its microphone
(`--use-file-for-fake-audio-capture`). The page, served by a real server on the real
bundled model, streams it over /v1/stream, and the tests read what a user would see:
the caption lines, the provisional text, the messages, and the downloaded files.

Needs the Debian packages `chromium` and `chromium-driver` and the Python package
`playwright` (no `playwright install`: the system Chromium is used). Without them the
tests skip with the reason, except in CI (`CI` set), where they fail.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
from conftest import THREE_SENTENCES
from harness import running_server
from speech import CACHE, Utterance, read_pcm, synthesize, wer

from server.config import Settings
from streaming.engine import Engine

CHROMIUM = Path(os.environ.get("WHISPERSTREAM_CHROMIUM", "/usr/bin/chromium"))
SCREENSHOTS = CACHE / "screenshots"
DOCS_SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "browser.png"
MAX_WER = 0.15
TAIL_SILENCE_S = 30.0  # after the speech, in case Chromium loops the file after all
VIEWPORT = {"width": 1100, "height": 660}
CHROMIUM_ARGS = [
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--autoplay-policy=no-user-gesture-required",
]

# Installed before the page's own scripts: records, in order, every time provisional
# text is shown and every final caption line added, as a user would have seen them.
CAPTION_LOG_SCRIPT = """
window.__captionLog = [];
document.addEventListener("DOMContentLoaded", () => {
  const log = (kind, text) => window.__captionLog.push({kind, text, t: performance.now()});
  const provisional = document.getElementById("provisional");
  new MutationObserver(() => {
    if (!provisional.hidden && provisional.textContent.trim()) {
      log("partial", provisional.textContent);
    }
  }).observe(provisional, {subtree: true, childList: true, characterData: true,
                           attributes: true});
  new MutationObserver((records) => {
    for (const r of records) for (const n of r.addedNodes) log("final", n.textContent);
  }).observe(document.getElementById("finals"), {childList: true});
});
"""


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so this is a failure, not a skip)")
    pytest.skip(reason)


def _sync_playwright() -> Any:
    if not CHROMIUM.is_file():
        _unavailable(f"{CHROMIUM} is missing: apt-get install -y chromium chromium-driver")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright package is missing: pip install -e '.[test]'")
    return sync_playwright


@pytest.fixture(scope="module")
def speech() -> Utterance:
    return synthesize(THREE_SENTENCES)


@pytest.fixture(scope="module")
def microphone_wav(speech: Utterance) -> Path:
    """The speech followed by a long silence: what Chromium's fake microphone plays."""
    path = CACHE / f"browser-mic-{speech.path.stem}.wav"
    if not path.exists():
        pcm, rate = read_pcm(speech.path)
        padded = np.concatenate([pcm, np.zeros(int(TAIL_SILENCE_S * rate), np.int16)])
        tmp = path.with_suffix(".tmp")
        with wave.open(str(tmp), "wb") as out:
            out.setnchannels(1)
            out.setsampwidth(2)
            out.setframerate(rate)
            out.writeframes(padded.tobytes())
        tmp.rename(path)
    return path


@pytest.fixture(scope="module")
def playwright() -> Iterator[Any]:
    with _sync_playwright()() as pw:
        yield pw


@pytest.fixture(scope="module")
def browser(playwright: Any, microphone_wav: Path) -> Iterator[Any]:
    # `%noloop`: play the file once, then silence (Chromium loops it by default).
    args = [*CHROMIUM_ARGS, f"--use-file-for-fake-audio-capture={microphone_wav}%noloop"]
    browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=args)
    yield browser
    browser.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport=VIEWPORT, accept_downloads=True)
    context.add_init_script(CAPTION_LOG_SCRIPT)
    page = context.new_page()
    page.set_default_timeout(30_000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


def _http(ws_url: str) -> str:
    return ws_url.replace("ws://", "http://", 1) + "/"


def _state(page: Any) -> str:
    return str(page.evaluate("document.body.dataset.state"))


def _wait_state(page: Any, state: str, timeout_s: float = 30) -> None:
    page.wait_for_function(f"document.body.dataset.state === {state!r}", timeout=timeout_s * 1000)


def _finals(page: Any) -> list[str]:
    return [t.strip() for t in page.locator("#finals li .text").all_inner_texts()]


def _times(page: Any) -> list[tuple[float, float]]:
    spans = page.locator("#finals li .times").all_inner_texts()
    out = []
    for span in spans:
        a, b = (_clock(x) for x in span.split("→"))
        out.append((a, b))
    return out


def _clock(text: str) -> float:
    minutes, seconds = text.strip().split(":")
    return int(minutes) * 60 + float(seconds)


def _srt_seconds(stamp: str) -> float:
    h, m, rest = stamp.split(":")
    s, ms = rest.split(",")
    return int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000


def parse_srt(text: str) -> list[tuple[float, float, str]]:
    """Strict enough to catch a malformed file: numbered cues, well-formed timings."""
    cues = []
    blocks = [b for b in re.split(r"\n\s*\n", text.replace("\r\n", "\n").strip()) if b]
    for number, block in enumerate(blocks, 1):
        lines = block.split("\n")
        assert lines[0] == str(number), f"cue {number} is numbered {lines[0]!r}"
        m = re.fullmatch(r"(\d\d:\d\d:\d\d,\d{3}) --> (\d\d:\d\d:\d\d,\d{3})", lines[1])
        assert m, f"cue {number}: bad timing line {lines[1]!r}"
        start, end = _srt_seconds(m[1]), _srt_seconds(m[2])
        assert start <= end, f"cue {number} ends before it starts: {lines[1]}"
        body = " ".join(lines[2:]).strip()
        assert body, f"cue {number} has no text"
        cues.append((start, end, body))
    return cues


def _download(page: Any, button: str) -> str:
    with page.expect_download() as info:
        page.click(button)
    path = info.value.path()
    return Path(path).read_text(encoding="utf-8")


def _wait_for_finals(page: Any, count: int, timeout_s: float) -> None:
    # On a timeout the caller's assertions say what is missing.
    with contextlib.suppress(Exception):
        page.wait_for_function(
            f"Number(document.body.dataset.finals) >= {count}", timeout=timeout_s * 1000
        )


def _screenshot(page: Any, name: str, height: int | None = None) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / name
    clip = {"x": 0, "y": 0, "width": VIEWPORT["width"], "height": height} if height else None
    page.screenshot(path=str(path), clip=clip)
    return path


def test_page_captions_speech_from_the_microphone(
    engine: Engine, page: Any, speech: Utterance, record_property: Any
) -> None:
    with running_server(engine) as url:
        page.goto(_http(url))
        page.wait_for_function("document.documentElement.dataset.ready === 'true'")
        assert _state(page) == "idle"
        # Keyboard operable: Start is a button that Enter activates.
        page.focus("#start")
        page.keyboard.press("Enter")
        _wait_state(page, "live")
        assert "whisper" in page.inner_text("#status-text")

        # A screenshot while captions are live: finals above, provisional words below.
        with contextlib.suppress(Exception):  # otherwise: whatever is on the page
            page.wait_for_function(
                "Number(document.body.dataset.finals) >= 2 && "
                "document.querySelector('#provisional .stable').textContent"
                ".split(' ').length >= 3",
                timeout=(speech.duration_s + 20) * 1000,
            )
        live_shot = _screenshot(page, "browser-live.png", height=300)
        if not DOCS_SCREENSHOT.exists() or os.environ.get("WHISPERSTREAM_UPDATE_SCREENSHOT"):
            DOCS_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(live_shot, DOCS_SCREENSHOT)

        _wait_for_finals(page, len(speech.sentences), speech.duration_s + 30)
        page.click("#stop")
        _wait_state(page, "stopped")

        finals = _finals(page)
        measured = wer(speech.text, " ".join(finals))
        record_property("wer", round(measured, 4))
        print(f"\nbrowser WER {measured:.3f} over {len(finals)} caption lines: {finals}")
        assert measured <= MAX_WER, f"WER {measured:.2f} > {MAX_WER}: {finals}"
        assert len(finals) == len(speech.sentences), finals

        # Provisional words were shown, and before the first final line.
        log = page.evaluate("window.__captionLog")
        kinds = [entry["kind"] for entry in log]
        assert "partial" in kinds, "no provisional text was ever shown"
        assert kinds.index("partial") < kinds.index("final"), kinds[:10]
        assert page.locator("#provisional").is_hidden(), "provisional text left after Stop"

        # Caption lines carry times, in order, within the audio.
        times = _times(page)
        for (s0, e0), (s1, _) in itertools.pairwise(times):
            assert s0 <= e0 <= s1 + 0.01, times
        assert times[-1][1] <= speech.duration_s + 3, times

        # Downloads: SRT parses and says the same as the page; text and WebVTT too.
        srt = parse_srt(_download(page, "#download-srt"))
        assert [c[2] for c in srt] == finals
        assert [(round(a, 1), round(b, 1)) for a, b, _ in srt] == [
            (round(a, 1), round(b, 1)) for a, b in times
        ]
        txt = _download(page, "#download-txt")
        assert txt.splitlines() == finals
        vtt = _download(page, "#download-vtt")
        assert vtt.startswith("WEBVTT\n")
        assert len(
            re.findall(r"^\d\d:\d\d:\d\d\.\d{3} --> \d\d:\d\d:\d\d\.\d{3}$", vtt, re.M)
        ) == len(finals)

        # The captions are an aria-live region; the large view toggles by keyboard.
        assert page.get_attribute("#finals", "aria-live") == "polite"
        page.focus("#large")
        page.keyboard.press("Enter")
        assert page.get_attribute("#large", "aria-pressed") == "true"
        _screenshot(page, "browser-large.png")
        page.keyboard.press("Escape")
        assert page.get_attribute("#large", "aria-pressed") == "false"
        _screenshot(page, "browser-stopped.png")

        # Clear empties the captions and disables the downloads.
        page.click("#clear")
        assert _finals(page) == []
        assert page.locator("#download-srt").is_disabled()


def test_page_says_when_the_server_is_down(engine: Engine, page: Any) -> None:
    with running_server(engine) as url:
        page.goto(_http(url))
        page.wait_for_function("document.documentElement.dataset.ready === 'true'")
    # The server is gone now; the page that it served is still open.
    page.click("#start")
    message = page.locator("#message")
    message.wait_for(state="visible")
    page.wait_for_function("document.getElementById('message').textContent.includes('down')")
    text = message.inner_text()
    assert "Cannot reach the server" in text and "down" in text, text
    assert _state(page) == "reconnecting"  # it keeps trying
    _screenshot(page, "browser-server-down.png")
    page.click("#stop")
    _wait_state(page, "stopped")


def test_page_says_when_the_key_is_refused(engine: Engine, page: Any) -> None:
    if "api_keys" not in type(Settings().auth).model_fields:
        pytest.skip("the server has no API keys (settings auth.api_keys) to refuse with yet")
    with running_server(engine, Settings(auth={"api_keys": ["k1"]})) as url:
        page.goto(_http(url))
        page.wait_for_function("document.documentElement.dataset.ready === 'true'")
        page.click("#settings summary")
        page.fill("#api-key", "wrong-key")
        page.click("#start")
        _wait_state(page, "error")
        text = page.inner_text("#message")
        assert "refused the API key" in text, text
        assert page.evaluate("document.activeElement.id") == "api-key"
        _screenshot(page, "browser-refused-key.png")
        # The key lives in this tab's session storage only.
        assert page.evaluate("sessionStorage.getItem('whisperstream.apiKey')") == "wrong-key"
        assert page.evaluate("localStorage.length") == 0

        # The right key, sent as ?token=, is accepted.
        page.fill("#api-key", "k1")
        page.click("#start")
        _wait_state(page, "live")
        assert page.locator("#message").is_hidden()
        page.click("#stop")
        _wait_state(page, "stopped")


def test_page_keeps_captions_across_a_dropped_connection(
    engine: Engine, page: Any, speech: Utterance
) -> None:
    """The network drops the WebSocket after the first caption: the page reconnects,
    keeps the caption it showed, and, by the resume rule of docs/protocol.md, sends the
    audio since that caption again with offset_s and first_segment: nothing is lost, and
    the server's times go on where they were."""
    sockets: list[Any] = []

    def through(route: Any) -> None:  # forward everything, keep a handle to drop it
        server = route.connect_to_server()
        sockets.append((route, server))

    page.route_web_socket(re.compile(r"/v1/stream"), through)
    with running_server(engine) as url:
        page.goto(_http(url))
        page.wait_for_function("document.documentElement.dataset.ready === 'true'")
        page.click("#start")
        _wait_state(page, "live")
        _wait_for_finals(page, 1, speech.duration_s)
        first = _finals(page)
        assert len(first) == 1, first

        to_page, to_server = sockets[0]
        to_page.close(code=1001, reason="network dropped (test)")
        to_server.close()
        page.wait_for_function(
            "document.getElementById('message').textContent"
            ".includes('connection to the server was lost')",
            timeout=5000,
        )
        _wait_state(page, "live", timeout_s=15)
        assert len(sockets) == 2, "the page did not reconnect once"
        assert _finals(page)[: len(first)] == first, "captions shown before the drop were lost"

        _wait_for_finals(page, len(speech.sentences), speech.duration_s + 30)
        page.click("#stop")
        _wait_state(page, "stopped")
        finals = _finals(page)
        assert finals[0] == first[0]
        assert len(finals) >= len(speech.sentences), finals
        measured = wer(speech.text, " ".join(finals))
        assert measured <= MAX_WER, f"WER {measured:.2f} across the reconnection: {finals}"
        assert page.locator("#finals li.interrupted").count() == 0, "words shown twice"
        times = _times(page)
        starts = [s for s, _ in times]
        assert starts == sorted(starts), f"times not continuous across the reconnection: {times}"
        assert times[-1][0] > 5.0, f"the new session's times restarted from zero: {times}"
        query = parse_qs(urlsplit(sockets[1][0].url).query)
        assert query["first_segment"] == ["1"], query
        # The resent audio starts where the first caption ends (the page shows 2 decimals).
        assert abs(float(query["offset_s"][0]) - times[0][1]) < 0.011, (query, times)


def test_page_says_when_the_microphone_is_denied(
    engine: Engine, playwright: Any, microphone_wav: Path
) -> None:
    args = [a for a in CHROMIUM_ARGS if a != "--use-fake-ui-for-media-stream"]
    browser = playwright.chromium.launch(
        executable_path=str(CHROMIUM), args=[*args, "--deny-permission-prompts"]
    )
    try:
        page = browser.new_context(viewport=VIEWPORT).new_page()
        with running_server(engine) as url:
            page.goto(_http(url))
            page.wait_for_function("document.documentElement.dataset.ready === 'true'")
            page.click("#start")
            _wait_state(page, "error", timeout_s=15)
            text = page.inner_text("#message")
            assert "Microphone access was denied" in text, text
            assert page.locator("#start").is_enabled()
    finally:
        browser.close()
