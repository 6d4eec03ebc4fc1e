"""Headless Chromium (Debian's `chromium` package) for the report tests: a screenshot, the console log, the DOM
after scripts ran. No network, no GPU, a fresh profile per call."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from PIL import Image, ImageStat

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# --enable-logging=stderr prints every console message (console.* calls, uncaught exceptions, CSP and load
# errors) as one INFO line: "[...:INFO:CONSOLE:12] "message", source: file:///... (12)" (older: "CONSOLE(12)]")
_CONSOLE = re.compile(r":CONSOLE(?::\d+|\(\d+\))\] (.*)$", re.MULTILINE)


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _run(browser: str, url: str, profile: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([browser, *FLAGS, f"--user-data-dir={profile}", *extra, url], capture_output=True,
                          text=True, timeout=90)


def render_page(browser: str, page: Path, work: Path, size: str = "1280,2000") -> tuple[Path, str, str]:
    """(screenshot PNG, Chromium's log of loading it, the DOM after its scripts ran)."""
    shot = work / f"{page.stem}.png"
    url = page.resolve().as_uri()
    loaded = _run(browser, url, work / f"profile-{page.stem}-1", "--enable-logging=stderr", "--v=0",
                  f"--window-size={size}", f"--screenshot={shot}")
    assert loaded.returncode == 0 and shot.exists(), loaded.stderr[-2000:]
    dom = _run(browser, url, work / f"profile-{page.stem}-2", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    return shot, loaded.stderr, dom.stdout


def console_messages(log: str) -> list[str]:
    """Every message the page wrote to the console (the report writes none: any one is a failure)."""
    return _CONSOLE.findall(log)


def screenshot_is_blank(png: Path) -> bool:
    img = Image.open(png).convert("RGB")
    colors = img.getcolors(maxcolors=1 << 16)
    return max(ImageStat.Stat(img).stddev) < 5 or (colors is not None and len(colors) < 32)
