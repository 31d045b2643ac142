"""DICOM TLS with certificates the test makes: dcmtk storescu +tls to the node (mutual),
plain and certificate-less associations refused, and the node's SCU to storescp +tls."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from node import synth
from tests.integration.dbview import IndexView
from tests.support import TCP_ENV, free_port, storescu, wait_for, wait_port

pytestmark = pytest.mark.integration


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
             "ca.crt", "-days", "2", "-subj", "/CN=pacsnode test CA", cwd=d)
    ext = d / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
                 f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile",
                 str(ext), cwd=d)
    return d


def test_tls_association_from_storescu_and_plain_refused(
        dcmtk: None, node_factory: Any, pki: Path, tmp_path: Path) -> None:
    node = node_factory(node={"tls": {"cert_file": str(pki / "server.crt"),
                                      "key_file": str(pki / "server.key"),
                                      "ca_file": str(pki / "ca.crt")}}).start()
    study = synth.make_study(synth.SeriesSpec(slices=5, rows=32, columns=32), seed=91)
    files = synth.write_study(study, tmp_path / "ct")
    secure = storescu(node.port, files, extra=[
        "+tls", str(pki / "client.key"), str(pki / "client.crt"), "+cf", str(pki / "ca.crt")])
    assert secure.returncode == 0, secure.stderr
    index = IndexView(node.config.parent / "index.db")
    assert index.counts() == (1, 1, 5)
    other = synth.make_study(synth.SeriesSpec(slices=3, rows=32, columns=32), seed=92)
    other_files = synth.write_study(other, tmp_path / "ct2")
    assert storescu(node.port, other_files).returncode != 0                  # plain TCP
    anonymous = storescu(node.port, other_files, extra=["+tla", "+cf", str(pki / "ca.crt")])
    assert anonymous.returncode != 0                                          # no client cert
    assert index.counts()[2] == 5
    assert node.proc is not None and node.proc.poll() is None
    assert storescu(node.port, other_files, extra=[
        "+tls", str(pki / "client.key"), str(pki / "client.crt"),
        "+cf", str(pki / "ca.crt")]).returncode == 0                          # still serving


def test_forwarding_to_a_tls_destination(dcmtk: None, node_factory: Any, pki: Path,
                                         tmp_path: Path) -> None:
    port = free_port()
    out = tmp_path / "received"
    out.mkdir()
    scp = subprocess.Popen(["storescp", "+tls", str(pki / "server.key"), str(pki / "server.crt"),
                            "+cf", str(pki / "ca.crt"), "-od", str(out), str(port)],
                           env=TCP_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, proc=scp)
        node = node_factory(
            destinations=[{"name": "secure", "kind": "dimse", "ae_title": "STORESCP",
                           "host": "127.0.0.1", "port": port, "tls": True,
                           "ca_file": str(pki / "ca.crt"), "cert_file": str(pki / "client.crt"),
                           "key_file": str(pki / "client.key")}],
            routes=[{"name": "all", "destinations": ["secure"]}]).start()
        study = synth.make_study(synth.SeriesSpec(slices=4, rows=32, columns=32), seed=93)
        assert storescu(node.port, synth.write_study(study, tmp_path / "ct")).returncode == 0
        index = IndexView(node.config.parent / "index.db")
        wait_for(lambda: [j for j in index.jobs() if j["state"] == "done"], timeout=30)
        assert len(list(out.iterdir())) == 4
    finally:
        scp.terminate()
        scp.wait(10)


def test_dicomweb_over_https_verifies_the_certificate(
        node_factory: Any, pki: Path) -> None:
    """Debian's Orthanc 1.10.1 dies on its first HTTPS handshake here (SslEnabled), so the
    HTTPS peer is a stdlib server answering QIDO-RS with an empty result: what is under
    test is the node's certificate verification, not DICOMweb."""
    import http.server
    import ssl
    import sys
    import threading

    from tests.support import ROOT

    class Qido(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", "application/dicom+json")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"[]")

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Qido)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(pki / "server.crt"), str(pki / "server.key"))
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = {"kind": "dicomweb", "url": f"https://127.0.0.1:{server.server_address[1]}"}
        node = node_factory(destinations=[{**base, "name": "trusted",
                                           "ca_file": str(pki / "ca.crt")},
                                          {**base, "name": "untrusted"}])

        def echo(name: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "node.cli", "echo", name, "-c",
                                   str(node.config)], capture_output=True, text=True,
                                  cwd=ROOT, check=False, timeout=60)
        trusted = echo("trusted")
        assert trusted.returncode == 0, trusted.stderr
        refused = echo("untrusted")
        assert refused.returncode == 1 and "CERTIFICATE_VERIFY_FAILED" in refused.stderr
    finally:
        server.shutdown()


def test_a_dimse_source_queries_over_mutual_tls_and_verifies_the_pacs(pki: Path) -> None:
    from pydicom.dataset import Dataset
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # generated names
        StudyRootQueryRetrieveInformationModelFind,
    )

    from adapters.dimse import server_tls
    from adapters.dimse_source import DimseSource
    from node.errors import SourceError
    from node.settings import SourceSettings, TlsSettings

    def on_find(event: Any) -> Any:
        ds = Dataset()
        ds.QueryRetrieveLevel = "SERIES"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3", "1.2.3.4"
        yield 0xFF00, ds

    ae = AE(ae_title="TLSPACS")
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_FIND, on_find)],
                             ssl_context=server_tls(TlsSettings(
                                 cert_file=pki / "server.crt", key_file=pki / "server.key",
                                 ca_file=pki / "ca.crt")))
    try:
        source = SourceSettings(name="pacs", kind="dimse", ae_title="TLSPACS",
                                host="127.0.0.1", port=port, tls=True, timeout_seconds=5,
                                ca_file=pki / "ca.crt", cert_file=pki / "client.crt",
                                key_file=pki / "client.key")
        found = DimseSource().find_series(source, since=None)
        assert [r.series_instance_uid for r in found] == ["1.2.3.4"]
        # a PACS whose certificate the configured CA did not sign is refused
        wrong_ca = source.model_copy(update={"ca_file": pki / "client.crt"})
        with pytest.raises(SourceError, match="TLS handshake failed"):
            DimseSource().find_series(wrong_ca, since=None)
    finally:
        server.shutdown()
