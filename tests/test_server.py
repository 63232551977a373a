"""The server `python app.py` starts, checked over HTTP and its sockets (no browser needed).

Rows of docs/reliability.md: the default bind, the warning when exposed, and which files are served.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from browser_app import running_app


@pytest.fixture(scope="module")
def app(tmp_path_factory, cache_dir):
    with running_app(tmp_path_factory.mktemp("app"), cache_dir) as running:
        yield running


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
