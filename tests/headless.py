"""Headless Chromium driven over its DevTools pipe: open a page at a screen width, measure it, screenshot it."""

from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--hide-scrollbars", "--remote-debugging-pipe")


def chromium() -> str | None:
    """Debian's chromium (apt-get install chromium), or another Chromium-based browser on PATH."""
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)),
                None)


class Browser:
    """One headless browser; DevTools messages are JSON terminated by a NUL byte, on file descriptors 3 and 4."""

    def __init__(self, executable: str, timeout_s: float = 60.0):
        self.timeout_s, self.next_id, self.events = timeout_s, 0, []
        self.profile = tempfile.mkdtemp(prefix="hv-chromium-")
        to_child, self.commands = os.pipe()
        self.replies, from_child = os.pipe()

        def use_pipes():  # in the child, before exec: DevTools reads fd 3 and writes fd 4
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_child, from_child)]  # may be 3 or 4 now
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        self.log = open(Path(self.profile) / "stderr.log", "w+b")  # never a pipe: chromium would block on it
        self.proc = subprocess.Popen([executable, *FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
                                     preexec_fn=use_pipes, close_fds=False,  # Python's own fds close on exec
                                     stdout=subprocess.DEVNULL, stderr=self.log)
        os.close(to_child)
        os.close(from_child)
        self.buffer = b""

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (OSError, TimeoutError, RuntimeError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self.commands)
        os.close(self.replies)
        self.log.close()
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def send(self, method: str, session: str | None = None, **params) -> dict:
        """Send one command and wait for its result; events that come meanwhile are kept."""
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self.commands, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._receive()
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, event: str, session: str) -> dict:
        for i, message in enumerate(self.events):
            if message.get("method") == event and message.get("sessionId") == session:
                return self.events.pop(i)
        while True:
            message = self._receive()
            if message.get("method") == event and message.get("sessionId") == session:
                return message
            self.events.append(message)

    def _receive(self) -> dict:
        deadline = time.monotonic() + self.timeout_s
        while b"\0" not in self.buffer:
            if time.monotonic() > deadline:
                raise TimeoutError("no answer from chromium")
            chunk = os.read(self.replies, 1 << 20)
            if not chunk:
                self.log.seek(0)
                raise RuntimeError(f"chromium ended: {self.log.read().decode(errors='replace')[-2000:]}")
            self.buffer += chunk
        data, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(data)

    def open(self, url: str, width: int, height: int = 900) -> str:
        """A new tab showing `url` on a screen `width` CSS pixels wide (a phone's up to 480 px); its session."""
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.send("Emulation.setDeviceMetricsOverride", session, width=width, height=height, deviceScaleFactor=1,
                  mobile=width <= 480)
        self.send("Page.enable", session)
        self.send("Page.navigate", session, url=url)
        self.wait_for("Page.loadEventFired", session)
        return session

    def evaluate(self, session: str, expression: str):
        result = self.send("Runtime.evaluate", session, expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self, session: str, path: Path) -> Path:
        data = self.send("Page.captureScreenshot", session, format="png", captureBeyondViewport=True)["data"]
        path.write_bytes(base64.b64decode(data))
        return path


# Everything on the page that reaches past the screen's edge, or hides part of its content, as text.
CLIPPED = """(() => {
  const screen = document.documentElement.clientWidth, found = [];
  const name = el => el.tagName.toLowerCase() + (el.id ? '#' + el.id : '') + (el.className && el.className.baseVal === undefined && el.className ? '.' + el.className : '');
  if (document.documentElement.scrollWidth > screen) found.push('page is ' + document.documentElement.scrollWidth + ' px wide');
  for (const el of document.body.querySelectorAll('*')) {
    const box = el.getBoundingClientRect(), style = getComputedStyle(el);
    if (box.width > 0 && (box.right > screen + 0.5 || box.left < -0.5)) found.push(name(el) + ' reaches ' + Math.round(box.left) + '..' + Math.round(box.right));
    if (style.overflowX !== 'visible' && el.scrollWidth > el.clientWidth + 1) found.push(name(el) + ' hides part of its content');
  }
  return {screen: screen, layout: window.innerWidth, clipped: found.slice(0, 20)};
})()"""
