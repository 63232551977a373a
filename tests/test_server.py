"""The running web server, over HTTP and its sockets, without a browser: what it binds and serves, what it lets a
web client do, and that it keeps answering.

Each test starts `python app.py` (tests/browser_app.py `running_app`) and talks to it as any HTTP client of
the page's API could: gradio_client for the endpoints, raw requests for the Host/Origin/login checks.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import time
import urllib.parse
from pathlib import Path

import pytest
from browser_app import running_app
from conftest import write_images
from gradio_client import Client
from gradio_client.exceptions import AppError
from PIL import Image

SECRET = "SECRET-LINE-42 root:x:0:0"


@pytest.fixture(scope="module")
def app(tmp_path_factory, cache_dir):
    """The app in `srv*/app`, with `srv*/data` (the tests' data folder) allowed by --allow-dir."""
    cwd = tmp_path_factory.mktemp("srv") / "app"
    cwd.mkdir()
    with running_app(cwd, cache_dir, allow_dir=cwd.parent / "data") as running:
        yield running


@pytest.fixture(scope="module")
def client(app):
    c = Client(app.url, verbose=False)
    yield c
    c.close()


@pytest.fixture(scope="module")
def outside(tmp_path_factory) -> Path:
    """A folder outside every folder the app may use, with a file that must never be disclosed."""
    folder = tmp_path_factory.mktemp("outside")
    (folder / "not-a-template.txt").write_text(f"{SECRET}\nsecond line\n", encoding="utf-8")
    write_images(folder / "images", 2)
    return folder


def train_kwargs(client: Client, **settings) -> dict:
    params = client.view_api(print_info=False, return_format="dict")["named_endpoints"]["/start_training"]["parameters"]
    defaults = {p["parameter_name"]: p["parameter_default"] for p in params}
    return {**defaults, "max_steps": 2, "preview_every": 0, "save_every": 0, "template": "style_filewords", **settings}


def refused(client: Client, api_name: str, **kwargs) -> str:
    with pytest.raises(AppError) as info:
        client.predict(**kwargs, api_name=api_name)
    return str(info.value)


def request(app, method: str, path: str, headers: dict | None = None, body: bytes | None = None) -> tuple[int, bytes, dict]:
    """A raw HTTP request with exactly these headers (Host included), as a rebinding page's browser would send."""
    parts = urllib.parse.urlsplit(app.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.putrequest(method, path, skip_host="Host" in (headers or {}), skip_accept_encoding=True)
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        return resp.status, resp.read(), dict(resp.getheaders())
    finally:
        conn.close()


# -- security: paths -------------------------------------------------------------------------------------------
def test_web_settings_are_confined_to_the_app_folders_and_never_disclose_files(app, client, outside):
    client.predict(name="confined", initializer="*", num_vectors=1, overwrite=False, file_format="pt",
                   api_name="/create_embedding")
    allowed_data = app.cwd.parent / "data"  # allowed by --allow-dir
    write_images(allowed_data, 2)
    base = train_kwargs(client, embedding="confined", dataset_dir=str(allowed_data))

    # A template anywhere on the machine: refused before it is read, naming the setting and the flag.
    message = refused(client, "/start_training", **{**base, "template": str(outside / "not-a-template.txt")})
    assert "template" in message and "--allow-dir" in message
    assert "SECRET" not in message and "second line" not in message
    # A bare name that is a file in the working folder is still a file outside the app's folders.
    (app.cwd / "notes.txt").write_text(f"{SECRET}\n", encoding="utf-8")
    message = refused(client, "/start_training", **{**base, "template": "notes.txt"})
    assert "template" in message and "--allow-dir" in message and "SECRET" not in message

    # Dataset folders: outside, through `..`, and through a symlink inside outputs/ that points outside.
    (app.dirs["outputs"] / "link").symlink_to(outside / "images")
    dotdot = "outputs/../" + os.path.relpath(outside / "images", app.cwd)
    for dataset in (str(outside / "images"), dotdot, "outputs/link", "/etc"):
        message = refused(client, "/start_training", **{**base, "dataset_dir": dataset})
        assert "dataset_dir" in message and "--allow-dir" in message, (dataset, message)

    # A log folder outside: refused, and nothing is created there.
    message = refused(client, "/start_training", **{**base, "log_dir": str(outside / "logs")})
    assert "log_dir" in message and "--allow-dir" in message
    assert not (outside / "logs").exists()

    # A model path outside models/ (or the allowed folders).
    with pytest.raises(AppError) as info:
        client.predict(str(outside / "not-a-template.txt"), api_name="/load_model")
    message = str(info.value)
    assert "model" in message and "--allow-dir" in message and "SECRET" not in message

    # Inside the allowed folders the same settings work.
    started = client.predict(**{**base, "log_dir": "outputs/my-logs"}, api_name="/start_training")
    assert started == "Training confined started."
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not list((app.dirs["outputs"] / "my-logs").rglob("settings-*.json")):
        time.sleep(0.2)
    assert list((app.dirs["outputs"] / "my-logs").rglob("settings-*.json"))


# -- security: Host and Origin (DNS rebinding, cross-site requests) ---------------------------------------------
def test_foreign_host_names_and_cross_site_writes_are_refused(app):
    port = urllib.parse.urlsplit(app.url).port
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "localhost"):
        status, _, _ = request(app, "GET", "/", {"Host": host})
        assert status == 200, host
    for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1.evil.example:{port}", f"localhost:{port + 1}"):
        status, body, _ = request(app, "GET", "/", {"Host": host})
        assert status == 403, host
        assert b"not accepted" in body
    status, _, _ = request(app, "GET", "/config", {"Host": f"rebound.example:{port}"})
    assert status == 403

    call = "/gradio_api/call/refresh_embeddings"
    json_body = {"Content-Type": "application/json", "Host": f"127.0.0.1:{port}"}
    for origin in ("http://evil.example", f"http://evil.example:{port}", "null"):
        status, _, _ = request(app, "POST", call, {**json_body, "Origin": origin}, b'{"data": []}')
        assert status == 403, origin
    for origin in (f"http://127.0.0.1:{port}", f"http://localhost:{port}", None):
        headers = {**json_body, **({"Origin": origin} if origin else {})}
        status, body, _ = request(app, "POST", call, headers, b'{"data": []}')
        assert status == 200 and b"event_id" in body, origin


# -- security: login throttling ---------------------------------------------------------------------------------
def test_wrong_logins_are_throttled_and_the_right_one_still_works(tmp_path, cache_dir):
    with running_app(tmp_path, cache_dir, "--auth", "alice:s3cret") as app:
        port = urllib.parse.urlsplit(app.url).port
        form = {"Content-Type": "application/x-www-form-urlencoded", "Host": f"127.0.0.1:{port}"}

        def login(password: str) -> tuple[int, dict]:
            body = urllib.parse.urlencode({"username": "alice", "password": password}).encode()
            status, _, headers = request(app, "POST", "/login", form, body)
            return status, headers

        statuses = [login(f"guess-{i}")[0] for i in range(20)]
        assert statuses[:5] == [400] * 5  # a few typos are answered at once
        assert statuses.count(429) >= 14, statuses  # then the client must wait between tries
        assert 200 not in statuses
        status, headers = login("s3cret")
        assert status == 429  # even the right password waits out the lockout...
        time.sleep(float(headers["retry-after"]) + 0.2)
        assert login("s3cret")[0] == 200  # ...and then works
        assert "wrong logins from" in app.log_text()


# -- never freezes -----------------------------------------------------------------------------------------------
def timed_poll(app) -> tuple[float, str]:
    """Seconds the page's poll of the training job took over HTTP (join, then read the answer), and the answer."""
    t0 = time.monotonic()
    status, body, _ = request(app, "POST", "/gradio_api/call/poll_training", {"Content-Type": "application/json"},
                              b'{"data": []}')
    assert status == 200, body
    event_id = json.loads(body)["event_id"]
    status, answer, _ = request(app, "GET", f"/gradio_api/call/poll_training/{event_id}")
    assert status == 200 and b"event: complete" in answer, answer[:300]
    return time.monotonic() - t0, answer.decode()


def test_the_server_answers_within_a_second_during_heavy_work_and_a_backtracking_regex(app, client):
    client.predict(name="busy", initializer="*", num_vectors=1, overwrite=True, file_format="pt",
                   api_name="/create_embedding")
    data = app.cwd.parent / "data" / "regex"
    write_images(data, 2)
    (data / "000-a red thing number 0.png").rename(data / ("a" * 60 + "!.png"))

    # A catastrophic filename_regex: Start is refused naming the field (pre-flight runs in the request), and polls
    # answer while it reads the file names.
    start = client.submit(**train_kwargs(client, embedding="busy", dataset_dir=str(data), filename_regex="(a|aa)+$"),
                          api_name="/start_training")
    times = []
    while not start.done() and len(times) < 40:
        times.append(timed_poll(app)[0])
        time.sleep(0.05)
    with pytest.raises(AppError, match=re.escape("filename_regex '(a|aa)+$' took over")):
        start.result(timeout=30)
    assert times and max(times) < 1.0, times

    # A long training run, a generation and a rescan at once: polls still answer within a second.
    started = client.predict(**train_kwargs(client, embedding="busy", dataset_dir=str(data), max_steps=100_000),
                             api_name="/start_training")
    assert started == "Training busy started."
    try:
        generate = client.submit(prompt="busy", negative_prompt="", sampler="Euler a", steps=8, cfg_scale=7.0, seed=1,
                                 width=64, height=64, batch_count=2, batch_size=1, clip_skip=1, save=False,
                                 api_name="/generate")
        rescan = client.submit(api_name="/refresh_embeddings")
        times = [timed_poll(app)[0] for _ in range(6)]
        generate.result(timeout=120)
        rescan.result(timeout=60)
        assert max(times) < 1.0, times
    finally:
        client.predict(api_name="/interrupt_training")


# -- named-field messages ----------------------------------------------------------------------------------------
def generate_kwargs(**settings) -> dict:
    return {"prompt": "a cat", "negative_prompt": "", "sampler": "Euler a", "steps": 2, "cfg_scale": 7.0, "seed": 1,
            "width": 64, "height": 64, "batch_count": 1, "batch_size": 1, "clip_skip": 1, "save": False, **settings}


def test_bad_numbers_and_folders_get_messages_naming_the_field(app, client):
    client.predict(name="fields", initializer="*", num_vectors=1, overwrite=True, file_format="pt",
                   api_name="/create_embedding")
    data = app.cwd.parent / "data" / "fields"
    write_images(data, 2)
    base = train_kwargs(client, embedding="fields", dataset_dir=str(data))
    tracebacks = app.log_text().count("Traceback")

    message = refused(client, "/start_training", **{**base, "max_steps": 0})
    assert "Max steps: max_steps is 0; it must be at least 1" in message
    for seed in (2**32, -2):
        message = refused(client, "/start_training", **{**base, "seed": seed})
        assert f"seed is {seed}; use a whole number from 0 to 4294967295, or -1 for a random seed" in message
        message = refused(client, "/generate", **generate_kwargs(seed=seed))
        assert f"seed is {seed}; use a whole number from 0 to 4294967295" in message
    message = refused(client, "/generate", **generate_kwargs(clip_skip=5))
    assert "clip_skip is 5, but the loaded model's text encoder has 2 layers; use 1 to 2" in message
    message = refused(client, "/generate", **generate_kwargs(steps=0))  # a slider: named too
    assert "Sampling steps: steps is 0; it must be at least 1" in message

    (app.dirs["outputs"] / "a-file").write_text("not a folder", encoding="utf-8")
    message = refused(client, "/start_training", **{**base, "log_dir": "outputs/a-file"})
    assert "log_dir 'outputs/a-file' cannot hold the run's logs" in message and "is a file, not a folder" in message
    assert app.log_text().count("Traceback") == tracebacks  # user errors are not logged as crashes


def test_create_refuses_to_overwrite_the_embedding_being_trained(app, client):
    client.predict(name="in-training", initializer="*", num_vectors=1, overwrite=True, file_format="pt",
                   api_name="/create_embedding")
    data = app.cwd.parent / "data" / "in-training"
    write_images(data, 2)
    started = client.predict(**train_kwargs(client, embedding="in-training", dataset_dir=str(data), max_steps=100_000),
                             api_name="/start_training")
    assert started == "Training in-training started."
    try:
        for name in ("in-training", "IN-TRAINING"):
            message = refused(client, "/create_embedding", name=name, initializer="cat", num_vectors=3, overwrite=True,
                              file_format="pt")
            assert "'in-training' is being trained (the run at step " in message and "interrupt that run" in message
        created = client.predict(name="another", initializer="*", num_vectors=1, overwrite=True, file_format="pt",
                                 api_name="/create_embedding")
        assert created.startswith("Created:")
    finally:
        client.predict(api_name="/interrupt_training")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and "interrupted" not in timed_poll(app)[1]:
        time.sleep(0.3)


def listening_addresses(port: int) -> set[str]:
    """Local addresses listening on `port`, read from /proc/net/tcp (Linux), as dotted IPv4."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        addr, hex_port = local.split(":")
        if int(hex_port, 16) == port and state == "0A":  # LISTEN
            found.add(".".join(str(int(addr[i : i + 2], 16)) for i in (6, 4, 2, 0)))
    return found


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's /proc/net/tcp")
def test_binds_loopback_by_default_and_warns_when_exposed(app, tmp_path, cache_dir):
    port = int(app.url.rsplit(":", 1)[1].strip("/"))
    assert listening_addresses(port) == {"127.0.0.1"}
    assert "exposed to" not in app.log_text()
    with running_app(tmp_path, cache_dir, "--host", "0.0.0.0") as exposed:
        assert listening_addresses(int(exposed.url.rsplit(":", 1)[1].strip("/"))) == {"0.0.0.0"}
        log = exposed.log_text()
        assert "WARNING" in log and "exposed to the network (--host 0.0.0.0)" in log
        assert "Add --auth user:pass to require a login." in log


def test_only_the_outputs_folder_is_served(app):
    import urllib.error
    import urllib.request

    inside = app.dirs["outputs"] / "txt2img" / "served.png"
    inside.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8)).save(inside)
    secret = app.dirs["embeddings"] / "secret.pt"
    secret.write_bytes(b"not for the network")
    with urllib.request.urlopen(f"{app.url}gradio_api/file={inside.resolve()}", timeout=10) as r:
        assert r.status == 200 and r.read()[:4] == b"\x89PNG"
    for path in (secret.resolve(), Path("/etc/passwd"), app.dirs["outputs"].resolve() / ".." / "embeddings" / "secret.pt"):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{app.url}gradio_api/file={path}", timeout=10)
        assert err.value.code in (403, 404), path
