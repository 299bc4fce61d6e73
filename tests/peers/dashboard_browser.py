"""Load the admin dashboard in headless Chromium and report what a real browser made of it.

Usage: dashboard_browser.py --url http://127.0.0.1:PORT/ --token TOKEN --expect-text STRING
                            --screenshot OUT.png [--timeout 60] [--chromium chromium]
Opens --url (the login page), fills the password input named "token" and submits its form, waits
for the dashboard, then prints one JSON object on stdout:
  login_ok          no login form is left after submitting
  text_found        --expect-text occurs literally in document.body.innerText
  img_elements      number of <img> elements in the dashboard
  dialogs           JavaScript dialogs (alert, confirm, ...) opened; each is dismissed
  console           console API calls
  csp_violations    browser log entries about the Content Security Policy ("Refused to ...")
  exceptions        uncaught JavaScript exceptions
  title             document.title
  transfer_rows     rows in table#transfers tbody
  screenshot_bytes  size of the PNG written to --screenshot
Chromium is driven over the DevTools protocol with websocket-client. Exit 0 when the run
completed, whatever the checks say (the Rust test asserts on the JSON); 2 when Chromium or
websocket-client is missing or Chromium does not start; 1 on a timeout or any other error.
"""
import argparse
import base64
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

SETTLE_SECONDS = 1.0  # late log entries (CSP reports, dialogs) after the dashboard's load event
LOGIN_FORM_JS = (
    """document.querySelector('form[action$="/login"], input[type="password"][name="token"]')"""
)
SUBMIT_JS = """((token) => {
  const input = document.querySelector('form input[name="token"]');
  if (!input) return false;
  input.value = token;
  HTMLFormElement.prototype.submit.call(input.form);  // immune to a control named "submit"
  return true;
})(%s)"""
COLLECT_JS = """(() => ({
  text: document.body ? document.body.innerText : "",
  img_elements: document.querySelectorAll("img").length,
  title: document.title,
  login_form: !!%s,
  transfer_rows: document.querySelectorAll("table#transfers tbody tr").length,
}))()""" % LOGIN_FORM_JS


class PeerError(Exception):
    """The run failed; exit 1."""

    exit_code = 1


class SetupError(PeerError):
    """Chromium or websocket-client is missing, or Chromium did not start; exit 2."""

    exit_code = 2


class Deadline:
    """The overall time budget; every blocking step asks it how long it may wait."""

    def __init__(self, seconds):
        self.end = time.monotonic() + seconds

    def remaining(self, what):
        left = self.end - time.monotonic()
        if left <= 0:
            raise PeerError(f"timed out {what}")
        return left


def load_websocket():
    try:
        import websocket
    except ImportError:
        raise SetupError("websocket-client is not installed (pip install websocket-client)")
    if not hasattr(websocket, "create_connection"):
        raise SetupError("the 'websocket' module is not websocket-client")
    return websocket


class Chromium:
    """A headless Chromium in its own process group and temporary profile, removed on exit."""

    def __init__(self, binary, deadline):
        self.binary = shutil.which(binary)
        if self.binary is None:
            raise SetupError(f"Chromium not found: {binary}")
        self.deadline = deadline
        self.process = None
        self.tempdir = None

    def __enter__(self):
        self.tempdir = tempfile.mkdtemp(prefix="dashboard-browser-")
        self.profile = os.path.join(self.tempdir, "profile")
        self.stderr_path = os.path.join(self.tempdir, "stderr.log")
        args = [
            self.binary, "--headless", "--no-sandbox", "--disable-gpu",
            "--disable-background-networking", "--no-first-run", "--no-default-browser-check",
            "--remote-debugging-port=0", f"--user-data-dir={self.profile}", "about:blank",
        ]
        with open(self.stderr_path, "wb") as stderr:
            try:
                self.process = subprocess.Popen(
                    args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                    start_new_session=True,
                )
            except OSError as error:
                self.cleanup()
                raise SetupError(f"cannot start Chromium: {error}")
        return self

    def __exit__(self, *exc):
        self.cleanup()

    def cleanup(self):
        if self.process is not None:
            self._signal_group(signal.SIGTERM)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            self._signal_group(signal.SIGKILL)  # also reaps helpers that outlived the browser
            self.process.wait()
            self.process = None
        if self.tempdir is not None:
            for _ in range(3):  # a dying helper may still write into the profile
                shutil.rmtree(self.tempdir, ignore_errors=True)
                if not os.path.exists(self.tempdir):
                    break
                time.sleep(0.2)
            self.tempdir = None

    def _signal_group(self, signum):
        try:
            os.killpg(self.process.pid, signum)
        except ProcessLookupError:
            pass

    def stderr_tail(self):
        try:
            with open(self.stderr_path, encoding="utf-8", errors="replace") as log:
                return log.read()[-2000:].strip()
        except OSError:
            return ""

    def devtools_port(self):
        """The port Chromium chose, from DevToolsActivePort or its 'DevTools listening' line."""
        port_file = os.path.join(self.profile, "DevToolsActivePort")
        while True:
            try:
                with open(port_file, encoding="utf-8") as lines:
                    first = lines.readline().strip()
                if first.isdigit():
                    return int(first)
            except OSError:
                pass
            match = re.search(r"DevTools listening on ws://[^:/]+:(\d+)/", self.stderr_tail())
            if match:
                return int(match.group(1))
            if self.process.poll() is not None:
                raise SetupError(
                    f"Chromium exited with status {self.process.returncode} before DevTools "
                    f"was ready:\n{self.stderr_tail()}"
                )
            if self.deadline.end - time.monotonic() <= 0:
                raise SetupError(f"Chromium did not open DevTools in time:\n{self.stderr_tail()}")
            time.sleep(0.05)

    def page_websocket_url(self):
        port = self.devtools_port()
        url = f"http://127.0.0.1:{port}/json"
        while True:
            wait = self.deadline.remaining("listing DevTools targets")
            with urllib.request.urlopen(url, timeout=wait) as answer:
                targets = json.load(answer)
            for target in targets:
                if target.get("type") == "page" and target.get("webSocketDebuggerUrl"):
                    return target["webSocketDebuggerUrl"]
            self.deadline.remaining("waiting for a page target")
            time.sleep(0.05)


class Cdp:
    """A DevTools protocol session on one page that records what the page reports."""

    def __init__(self, websocket, url, deadline):
        self.deadline = deadline
        self.ws = websocket.create_connection(
            url, timeout=deadline.remaining("connecting to DevTools"), suppress_origin=True
        )
        self.timeout_error = websocket.WebSocketTimeoutException
        self.next_id = 0
        self.events = []  # method names in arrival order, for wait_event
        self.dialogs, self.console, self.exceptions, self.log = [], [], [], []

    def close(self):
        self.ws.close()

    def _send(self, method, params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        return self.next_id

    def _receive(self, wait):
        """Handle one message; return it, or None if nothing came within wait seconds."""
        self.ws.settimeout(max(wait, 0.01))
        try:
            message = json.loads(self.ws.recv())
        except self.timeout_error:
            return None
        if "method" in message:
            self._on_event(message["method"], message.get("params", {}))
        return message

    def call(self, method, **params):
        wanted = self._send(method, params)
        while True:
            message = self._receive(self.deadline.remaining(f"waiting for {method}"))
            if message is not None and message.get("id") == wanted:
                if "error" in message:
                    raise PeerError(f"{method} failed: {message['error']}")
                return message.get("result", {})

    def mark(self):
        return len(self.events)

    def wait_event(self, method, since):
        """Wait until method has arrived as an event since mark() returned since."""
        while method not in self.events[since:]:
            self._receive(self.deadline.remaining(f"waiting for {method}"))

    def drain(self, seconds):
        end = time.monotonic() + min(seconds, self.deadline.remaining("settling"))
        while time.monotonic() < end:
            self._receive(end - time.monotonic())

    def evaluate(self, expression):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            details = describe_exception(result["exceptionDetails"])
            raise PeerError(f"evaluating in the page failed: {details}")
        return result["result"].get("value")

    def _on_event(self, method, params):
        self.events.append(method)
        if method == "Page.javascriptDialogOpening":
            self.dialogs.append({"type": params.get("type"), "message": params.get("message"),
                                 "url": params.get("url")})
            self._send("Page.handleJavaScriptDialog", {"accept": False})  # reply is ignored
        elif method == "Runtime.consoleAPICalled":
            text = " ".join(describe_value(arg) for arg in params.get("args", []))
            self.console.append({"type": params.get("type"), "text": text})
        elif method == "Runtime.exceptionThrown":
            self.exceptions.append(describe_exception(params.get("exceptionDetails", {})))
        elif method == "Log.entryAdded":
            entry = params.get("entry", {})
            self.log.append({key: entry.get(key) for key in ("source", "level", "text", "url")})


def describe_value(remote_object):
    if "value" in remote_object:
        value = remote_object["value"]
        return value if isinstance(value, str) else json.dumps(value)
    return remote_object.get("description") or remote_object.get("type", "")


def describe_exception(details):
    exception = details.get("exception") or {}
    return exception.get("description") or details.get("text", "exception")


def is_csp_violation(entry):
    """Older Chromium says "Refused to ...", newer "... violates the following Content Security
    Policy directive ... The action has been blocked."."""
    text = entry.get("text") or ""
    return any(marker in text for marker in ("Content Security Policy", "Content-Security-Policy",
                                              "Refused to"))


def navigate(cdp, url):
    since = cdp.mark()
    result = cdp.call("Page.navigate", url=url)
    if result.get("errorText"):
        raise PeerError(f"cannot load {url}: {result['errorText']}")
    cdp.wait_event("Page.loadEventFired", since)


def log_in(cdp, token):
    since = cdp.mark()
    if not cdp.evaluate(SUBMIT_JS % json.dumps(token)):
        raise PeerError("the page has no form with an input named token")
    cdp.wait_event("Page.loadEventFired", since)


def screenshot(cdp, path):
    """A PNG of the whole page, written to path; returns its size in bytes."""
    metrics = cdp.call("Page.getLayoutMetrics")
    size = metrics.get("cssContentSize") or metrics.get("contentSize")
    params = {"format": "png"}
    if size:
        params["captureBeyondViewport"] = True
        params["clip"] = {"x": 0, "y": 0, "scale": 1, "width": max(1, math.ceil(size["width"])),
                          "height": max(1, min(math.ceil(size["height"]), 16000))}
    png = base64.b64decode(cdp.call("Page.captureScreenshot", **params)["data"])
    with open(path, "wb") as out:
        out.write(png)
    return len(png)


def run(args, deadline):
    websocket = load_websocket()
    with Chromium(args.chromium, deadline) as browser:
        cdp = Cdp(websocket, browser.page_websocket_url(), deadline)
        try:
            for domain in ("Page", "Runtime", "Log", "Network"):
                cdp.call(f"{domain}.enable")
            navigate(cdp, args.url)
            log_in(cdp, args.token)
            cdp.drain(SETTLE_SECONDS)
            page = cdp.evaluate(COLLECT_JS)
            screenshot_bytes = screenshot(cdp, args.screenshot)
        finally:
            cdp.close()
    return {
        "login_ok": not page["login_form"],
        "text_found": args.expect_text in page["text"],
        "img_elements": page["img_elements"],
        "dialogs": cdp.dialogs,
        "console": cdp.console,
        "csp_violations": [entry for entry in cdp.log if is_csp_violation(entry)],
        "exceptions": cdp.exceptions,
        "title": page["title"],
        "transfer_rows": page["transfer_rows"],
        "screenshot_bytes": screenshot_bytes,
    }


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="the login page")
    parser.add_argument("--token", required=True)
    parser.add_argument("--expect-text", required=True,
                        help="must appear literally in the page text")
    parser.add_argument("--screenshot", required=True, help="PNG file to write")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds for the whole run")
    parser.add_argument("--chromium", default="chromium", help="Chromium binary name or path")
    return parser.parse_args()


def on_terminate(signum, frame):
    raise PeerError(f"terminated by signal {signum}")  # unwinds through the cleanup


def main():
    args = parse_args()
    signal.signal(signal.SIGTERM, on_terminate)
    started = time.monotonic()
    try:
        report = run(args, Deadline(args.timeout))
    except PeerError as error:
        print(f"dashboard_browser: {error}", file=sys.stderr)
        return error.exit_code
    except Exception as error:  # websocket, HTTP and OS errors alike
        print(f"dashboard_browser: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    print(json.dumps(report))
    print(f"dashboard_browser: finished in {time.monotonic() - started:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
