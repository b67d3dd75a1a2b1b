"""The REST API over HTTPS with a self-signed certificate: the uvicorn config `gradwire serve` builds
(``rest_server_config``) from ``GRADWIRE_TLS_CERT`` / ``GRADWIRE_TLS_KEY``, served for real on
127.0.0.1, and clients that trust the certificate, do not trust it, or speak plain HTTP."""

from __future__ import annotations

import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gradwire.cli.service import rest_server_config
from gradwire.server.app import create_app
from gradwire.server.settings import Settings
from gradwire.server.store import JobStore
from tests.tls import self_signed
from tests.waiting import free_port, wait_for

pytestmark = pytest.mark.usefixtures("clean_environment")  # tests/conftest.py


@pytest.fixture
def https_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    import uvicorn

    cert, key = self_signed(tmp_path)
    settings = Settings(port=free_port(), tls_cert=str(cert), tls_key=str(key), tokens=["alice:tok-123456"])
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    server = uvicorn.Server(rest_server_config(create_app(settings, store=store), settings))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, 30, "uvicorn with TLS", every=0.1)
        yield f"127.0.0.1:{settings.port}", cert
    finally:
        server.should_exit = True
        thread.join(10)
        store.close()


def test_rest_api_serves_https_only_with_the_configured_certificate(https_server) -> None:
    address, cert = https_server
    trusting = ssl.create_default_context(cafile=str(cert))
    with httpx.Client(verify=trusting, timeout=10) as client:
        assert client.get(f"https://{address}/healthz").status_code == 200
        jobs = client.get(f"https://{address}/v1/jobs", headers={"Authorization": "Bearer tok-123456"})
        assert jobs.status_code == 200, jobs.text
        assert client.get(f"https://{address}/v1/jobs").status_code == 401  # TLS does not replace tokens
    with httpx.Client(timeout=10) as untrusting, pytest.raises(httpx.ConnectError):
        untrusting.get(f"https://{address}/healthz")  # the system CAs do not know a self-signed cert
    with httpx.Client(timeout=10) as plain, pytest.raises(httpx.HTTPError):
        plain.get(f"http://{address}/healthz")  # no plain HTTP beside HTTPS


def test_certificate_and_key_come_in_pairs() -> None:
    with pytest.raises(ValueError, match="GRADWIRE_TLS_CERT and GRADWIRE_TLS_KEY"):
        Settings(tls_cert="/tmp/only-a-cert.pem")
