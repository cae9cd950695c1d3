"""Fact kinds: declared once (provisioner/facts.py KINDS), each with its collector in the agent
and its accessor; the kinds the next roles need, gathered by the agent on this machine."""
from __future__ import annotations

import datetime
import hashlib
import http.server
import os
import threading

import pytest

from provisioner.facts import KINDS, FactError, Facts, merge_requests
from provisioner.remote import agent as remote
from test_agent import facts_of          # the agent run on this machine


def test_every_kind_has_its_collector_and_its_accessor_and_nothing_else_exists():
    assert set(remote.FACTS) == set(KINDS)
    for kind, (_lists, accessor) in KINDS.items():
        assert callable(getattr(Facts, accessor, None)), f"{kind}: no Facts.{accessor}"
    with pytest.raises(ValueError, match="unknown fact kind"):
        merge_requests([{"nonsense": ["x"]}])


def test_dirs_list_entries_with_type_link_target_and_mtime(tmp_path):
    rel = tmp_path / "releases"
    (rel / "20261201-abc").mkdir(parents=True)
    (rel / "notes.txt").write_text("x")
    os.symlink("20261201-abc", rel / "current")
    os.utime(rel / "notes.txt", (1_700_000_000, 1_700_000_000))
    f = Facts(facts_of({"dirs": [str(rel), str(tmp_path / "none")]}))
    entries = f.dir(str(rel))
    assert entries["current"]["type"] == "link" and entries["current"]["target"] == "20261201-abc"
    assert entries["20261201-abc"]["type"] == "dir" and entries["notes.txt"]["type"] == "file"
    assert entries["notes.txt"]["mtime"] == 1_700_000_000
    assert f.dir(str(tmp_path / "none")) is None


def test_hashes_of_many_files_of_any_size(tmp_path):
    big = tmp_path / "big.tar"
    big.write_bytes(os.urandom(300 * 1024))               # above the 256 KiB content limit
    small = tmp_path / "small"
    small.write_text("abc")
    f = Facts(facts_of({"hashes": [str(big), str(small), str(tmp_path), str(tmp_path / "no")]}))
    assert f.sha256(str(big)) == hashlib.sha256(big.read_bytes()).hexdigest()
    assert f.sha256(str(small)) == hashlib.sha256(b"abc").hexdigest()
    assert f.sha256(str(tmp_path)) is None and f.sha256(str(tmp_path / "no")) is None


def _cert(path, days=30):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "shop.example")])
    now = datetime.datetime(2026, 12, 1, tzinfo=datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(0x1234ABCD)
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("shop.example"),
                                                        x509.DNSName("www.shop.example")]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def test_certs_give_subject_sans_serial_and_not_after(tmp_path):
    _cert(tmp_path / "fullchain.pem")
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    f = Facts(facts_of({"certs": [str(tmp_path / "fullchain.pem"), str(tmp_path / "junk.pem"),
                                  str(tmp_path / "none.pem")]}))
    c = f.cert(str(tmp_path / "fullchain.pem"))
    assert c["subject"] == {"commonName": "shop.example"}
    assert c["sans"] == ["shop.example", "www.shop.example"]
    assert c["serial"] == "1234ABCD" and c["not_after"] == "Dec 31 00:00:00 2026 GMT"
    assert f.cert(str(tmp_path / "none.pem")) is None
    with pytest.raises(FactError, match="not a PEM certificate"):
        f.cert(str(tmp_path / "junk.pem"))


FAKE_SYSTEMCTL = """#!/bin/sh
# what systemd prints for: systemctl show --property=... -- UNITS
case "$*" in
  *backup.timer*) printf 'Id=backup.timer\\nLoadState=loaded\\nActiveState=active\\nUnit=backup.service\\nLastTriggerUSec=Tue 2026-12-01 03:00:01 UTC\\nNextElapseUSecRealtime=Wed 2026-12-02 03:00:00 UTC\\nResult=success\\n\\nId=gone.timer\\nLoadState=not-found\\nActiveState=inactive\\nUnit=\\nLastTriggerUSec=\\nNextElapseUSecRealtime=\\nResult=success\\n' ;;
  *backup.service*) printf 'Id=backup.service\\nResult=exit-code\\nExecMainStatus=3\\nActiveState=failed\\n' ;;
esac
"""


def test_timers_give_last_and_next_trigger_and_the_service_result(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "systemctl").write_text(FAKE_SYSTEMCTL)
    (bin_dir / "systemctl").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    f = Facts(facts_of({"timers": ["backup", "gone"]}))
    assert f.timer("backup") == {"active": "active", "unit": "backup.service",
                                 "last": "Tue 2026-12-01 03:00:01 UTC",
                                 "next": "Wed 2026-12-02 03:00:00 UTC",
                                 "result": "exit-code", "exit_status": 3}
    assert f.timer("gone") is None


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(503 if self.path == "/down" else 200)
        self.send_header("X-Release", "20261201-abc")
        self.end_headers()
        self.wfile.write(b"ok " + b"x" * 5000)

    def log_message(self, *a):
        pass


def test_http_get_on_the_loopback_for_health_gates():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        f = Facts(facts_of({"http": [f"{base}/health", f"{base}/down",
                                     "http://192.0.2.1/health", "http://127.0.0.1:1/"]}))
    finally:
        server.shutdown()
    ok = f.http(f"{base}/health")
    assert ok["status"] == 200 and ok["headers"]["x-release"] == "20261201-abc"
    assert ok["body"].startswith("ok x") and len(ok["body"]) == 1024
    assert f.http(f"{base}/down")["status"] == 503
    assert "only http:// on the loopback" in f.http("http://192.0.2.1/health")["error"]
    assert "ConnectionRefusedError" in f.http("http://127.0.0.1:1/")["error"]


def test_the_new_kinds_on_a_real_server(testbed):
    """The same collectors against a real Debian with systemd (the agent run inside db1)."""
    import subprocess

    from provisioner import agent
    req = {"timers": ["apt-daily", "no-such-thing"], "dirs": ["/etc/apt"],
           "hashes": ["/etc/hostname"], "http": ["http://127.0.0.1:1/"]}
    p = subprocess.run(testbed.shell_argv("db1", agent.command()), capture_output=True,
                       input=agent.payload("facts", req), timeout=120)
    f = Facts(agent.parse(p.stdout, p.stderr, p.returncode)["facts"])
    timer = f.timer("apt-daily")
    assert timer["unit"] == "apt-daily.service", timer
    assert timer["next"] or timer["active"] != "active", timer      # an active one has a next
    assert f.timer("no-such-thing") is None
    assert f.dir("/etc/apt")["sources.list.d"]["type"] == "dir"
    assert f.sha256("/etc/hostname") == hashlib.sha256(b"db1\n").hexdigest()
    assert "error" in f.http("http://127.0.0.1:1/")


def test_last_lines_read_a_long_log_from_its_end(tmp_path):
    log = tmp_path / "audit.log"
    log.write_text("".join(f'{{"n": {i}}}\n' for i in range(100_000)) + "\n")   # ~1 MiB, blank end
    (tmp_path / "empty").write_text("")
    f = Facts(facts_of({"last_lines": [str(log), str(tmp_path / "empty"), str(tmp_path / "no")]}))
    assert f.last_line(str(log)) == '{"n": 99999}'
    assert f.last_line(str(tmp_path / "empty")) is None and f.last_line(str(tmp_path / "no")) is None
