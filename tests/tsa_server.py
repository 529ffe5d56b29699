"""A local RFC 3161 timestamp authority for tests: an HTTP server answering with pyHanko's
``DummyTimeStamper`` (a real TSA protocol exchange, signed by a development TSA certificate)."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from asn1crypto import keys, pem, tsp, x509
from pyhanko.sign.timestamps import DummyTimeStamper


def _load(path: Path, cls):
    data = path.read_bytes()
    return cls.load(pem.unarmor(data)[2] if pem.detect(data) else data)


class LocalTSA:
    """``with LocalTSA(key, cert, ca_cert) as url: ...``: serves timestamp requests at ``url``."""

    def __init__(self, key_path: Path, cert_path: Path, ca_cert_path: Path) -> None:
        cert = _load(cert_path, x509.Certificate)
        self.stamper = DummyTimeStamper(tsa_cert=cert, tsa_key=_load(key_path, keys.PrivateKeyInfo),
                                        certs_to_embed=[cert, _load(ca_cert_path, x509.Certificate)])
        self.requests = 0
        tsa = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                response = tsa.stamper.request_tsa_response(tsp.TimeStampReq.load(body)).dump()
                tsa.requests += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/timestamp-reply")
                self.send_header("Content-Length", str(len(response)))
                self.end_headers()
                self.wfile.write(response)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)

    def __enter__(self) -> str:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}/tsa"

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
