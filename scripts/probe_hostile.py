"""Send the hostile and broken requests of the hardening review to a running service; print each one's status.

    python scripts/probe_hostile.py --url http://127.0.0.1:8000 --api-key KEY

For a service on this machine only (loopback). Every request is bounded in time; the notes are SYNTHETIC.
The service must run with `--api-keys KEY` (the auth rows need it). Prints a markdown table: finding,
request, status (or what happened to the connection).
"""

from __future__ import annotations

import argparse
import base64
import gzip
import json
import socket
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import httpx

NOTE = "CC: chest pain. BT 38.9, HR 150"
FHIR_SERVER = "https://ehr.example.org/fhir"


def document(text: str = NOTE, subject: dict | None = None, content_type: str = "text/plain") -> dict:
    resource = {
        "resourceType": "DocumentReference",
        "id": "doc-1",
        "status": "current",
        "content": [{"attachment": {"contentType": content_type, "data": base64.b64encode(text.encode()).decode()}}],
    }
    if subject is not None:
        resource["subject"] = subject
    return resource


def hook(prefetched: dict, patient: str = "123") -> dict:
    return {
        "hook": "patient-view",
        "hookInstance": "probe-1",
        "fhirServer": FHIR_SERVER,
        "context": {"userId": "Practitioner/1", "patientId": patient},
        "prefetch": {"triageNote": prefetched},
    }


def nested(depth: int) -> bytes:
    return b'{"resourceType": "DocumentReference", "status": "current", "x": ' + b"[" * depth + b"]" * depth + b"}"


class Probe:
    def __init__(self, url: str, api_key: str) -> None:
        self.url = url
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.auth = {"Authorization": f"Bearer {api_key}"}
        self.client = httpx.Client(base_url=url, timeout=10)
        self.rows: list[tuple[str, str, str]] = []

    def row(self, finding: str, request: str, outcome: Callable[[], str]) -> None:
        try:
            result = outcome()
        except Exception as error:  # a probe reports what happened, whatever it was
            result = f"{type(error).__name__}"
        self.rows.append((finding, request, result))

    def post(self, path: str, body: bytes, headers: dict[str, str], auth: bool = True) -> str:
        response = self.client.post(path, content=body, headers={**(self.auth if auth else {}), **headers})
        return str(response.status_code)

    def post_json(self, path: str, body: object, content_type: str = "application/json") -> str:
        return self.post(path, json.dumps(body).encode(), {"Content-Type": content_type})

    def raw(self, request: bytes, wait_s: float) -> str:
        """Send raw bytes; the status line of the answer, or what the connection did within `wait_s`."""
        started = time.monotonic()
        with socket.create_connection((self.host, self.port), timeout=wait_s) as connection:
            connection.sendall(request)
            try:
                answer = connection.recv(200)
            except TimeoutError:
                return f"no answer within {wait_s:.0f} s (connection still open)"
        if not answer:
            return f"connection closed after {time.monotonic() - started:.1f} s, no answer"
        return answer.split(b"\r\n", 1)[0].decode("latin-1").removeprefix("HTTP/1.1 ")

    def slow_header(self, wait_s: float) -> str:
        """Open a connection and send one header byte a second; when does the server hang up?"""
        started = time.monotonic()
        with socket.create_connection((self.host, self.port), timeout=wait_s) as connection:
            connection.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\n")
            while time.monotonic() - started < wait_s:
                try:
                    connection.sendall(b"X")
                    connection.settimeout(1)
                    if connection.recv(200) == b"":
                        return f"closed after {time.monotonic() - started:.1f} s"
                except TimeoutError:
                    continue
                except OSError:
                    return f"closed after {time.monotonic() - started:.1f} s"
        return f"still open after {wait_s:.0f} s"


def run(probe: Probe, wait_s: float) -> None:
    cds, fhir = "/cds-services/triage-note", "/fhir/RiskAssessment/$classify"
    fhir_json = "application/fhir+json"
    as_json, as_fhir = {"Content-Type": "application/json"}, {"Content-Type": fhir_json}
    gzipped = {**as_json, "Content-Encoding": "gzip"}
    note = json.dumps({"text": NOTE}).encode()
    token = probe.auth["Authorization"].split()[1].encode()
    subjects = {
        "subject.identifier only (another MRN)": {"identifier": {"system": "urn:mrn", "value": "999"}},
        "subject.display only": {"display": "Someone"},
        "absolute reference on another server": {"reference": "https://other.example.org/fhir/Patient/123"},
        "no subject": None,
        "relative Patient/123 (the context patient)": {"reference": "Patient/123"},
        "absolute on the EHR's own fhirServer": {"reference": f"{FHIR_SERVER}/Patient/123"},
    }
    for name, subject in subjects.items():
        probe.row("1 wrong patient (CDS)", name, lambda s=subject: probe.post_json(cds, hook(document(subject=s))))
    other_patient = document(subject={"reference": "Patient/999"})
    probe.row(
        "1 wrong patient (FHIR)",
        "?subject=Patient/123, note about Patient/999",
        lambda: probe.post_json(f"{fhir}?subject=Patient/123", other_patient, fhir_json),
    )
    probe.row("2 server error", "FHIR body nested 10,000 deep", lambda: probe.post(fhir, nested(10_000), as_fhir))
    huge_number = b'{"resourceType": "DocumentReference", "x": ' + b"9" * 5000 + b"}"
    probe.row("2 server error", "5,000-digit integer", lambda: probe.post(fhir, huge_number, as_fhir))
    subject = {"reference": "Patient/123"}
    for charset in ("undefined", "utf-7", "unicode_escape"):
        body = document("+2D8-" if charset == "utf-7" else "\\ud800", subject, f"text/plain; charset={charset}")
        probe.row("2 server error", f"FHIR charset={charset}", lambda b=body: probe.post_json(fhir, b, fhir_json))
        probe.row("2 server error", f"CDS prefetch charset={charset}", lambda b=body: probe.post_json(cds, hook(b)))
    surrogate = b'{"text": "CC: \\ud800 pain"}'
    probe.row("2 server error", '/classify text "\\ud800"', lambda: probe.post("/classify", surrogate, as_json))
    short_body = (
        b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n"
        b"Authorization: Bearer " + token + b'\r\n\r\n{"text": "'
    )
    probe.row("3 slow client", "Content-Length: 100, 10 bytes sent", lambda: probe.raw(short_body, wait_s))
    probe.row("3 slow client", "headers one byte a second", lambda: probe.slow_header(wait_s))
    big_header = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 1_000_000 + b"\r\n\r\n"
    probe.row("3 huge headers", "one 1 MB header", lambda: probe.raw(big_header, wait_s))
    fields = b"".join(b"X-H%d: v\r\n" % i for i in range(5000))
    many_headers = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n"
    probe.row("3 huge headers", "5,000 headers", lambda: probe.raw(many_headers, wait_s))
    for name, path in (("/classify", "/classify"), ("CDS", cds)):
        probe.row(
            "4 parse before auth",
            f"no token, malformed JSON to {name}",
            lambda p=path: probe.post(p, b"{not json", as_json, auth=False),
        )
    invisible = {"text": "\u200b\u200b\u200d"}
    probe.row("5 invisible note", "text \\u200b\\u200b\\u200d", lambda: probe.post_json("/classify", invisible))
    probe.row("6 content type", "JSON without Content-Type", lambda: probe.post("/classify", note, {}))
    as_text = {"Content-Type": "text/plain"}
    probe.row("6 content type", "JSON as text/plain", lambda: probe.post("/classify", note, as_text))
    compressed = gzip.compress(note)
    probe.row("6 content encoding", "gzip body, gzip", lambda: probe.post("/classify", compressed, gzipped))
    probe.row("6 content encoding", "plain body labelled gzip", lambda: probe.post("/classify", note, gzipped))
    brotli = {**as_json, "Content-Encoding": "br"}
    probe.row("6 content encoding", "Content-Encoding: br", lambda: probe.post("/classify", note, brotli))
    bad_chunk = (
        b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
        b"Authorization: Bearer " + token + b"\r\n\r\nzz\r\n{}\r\n0\r\n\r\n"
    )
    probe.row("6 bad chunk size", "chunk size 'zz' (see the access log)", lambda: probe.raw(bad_chunk, wait_s))
    probe.row(
        "7 docs offline",
        "GET /docs: references a CDN?",
        lambda: "yes" if "cdn." in probe.client.get("/docs").text else "no",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--wait", type=float, default=15, help="seconds to wait on a slow-client probe")
    args = parser.parse_args()
    probe = Probe(args.url, args.api_key)
    run(probe, args.wait)
    print("| finding | request | status |\n| --- | --- | --- |")
    for finding, request, result in probe.rows:
        print(f"| {finding} | {request} | {result} |")


if __name__ == "__main__":
    main()
