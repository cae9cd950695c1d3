"""Certificates for the sites of role nginx, and the switch that turns their TLS server on.

Paths shared with role nginx: a site's TLS server reads `/etc/nginx/tls/<site>/fullchain.pem`
and `privkey.pem`. Those are links this role makes, to certbot's lineage
(`/etc/letsencrypt/live/<site>/`, `--cert-name <site>`) or to a self-signed pair
(`/etc/nginx/tls/<site>/selfsigned/`), so switching modes is switching links. The links and
the link that enables `sites-available/<site>-tls.conf` form one file group checked by
`nginx -t`: the TLS server is only ever enabled next to a certificate that exists.

Bootstrap in one run: role nginx serves port 80 with the ACME challenge from /var/www/acme;
here certbot (webroot: nginx keeps serving) gets the certificate, then the file group enables
TLS and nginx reloads. A later run reads the certificate (SANs, notAfter) and leaves a valid
one alone. Renewal is Debian's certbot.timer (its service runs `certbot -q renew
--no-random-sleep-on-renew`), with a deploy hook that reloads nginx after `nginx -t`; the
renewal config certbot writes keeps the ACME server.
"""
from __future__ import annotations

import re
import ssl
import time
from dataclasses import dataclass

from provisioner.api import (Change, Noop, apt, directory_step, file_group, files, handler, links,
                             reject, run_step, systemd)

HANDLER = "reload nginx"
WEBROOT = "/var/www/acme"                  # role nginx serves the challenge from there
TLS_DIR = "/etc/nginx/tls"
LIVE = "/etc/letsencrypt/live"
HOOK = "/etc/letsencrypt/renewal-hooks/deploy/reload-nginx"
HOOK_TEXT = "#!/bin/sh\n# Managed by provisioner (role letsencrypt): a renewed certificate is " \
            "served after nginx -t.\nset -e\nnginx -t -q\nsystemctl reload nginx\n"
MODES = ("acme", "selfsigned")
EMAIL_RE = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\Z")
URL_RE = re.compile(r"https://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[A-Za-z0-9._~/-]*)?\Z")


def _days(var: str, value, example: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 3650:
        reject(var, f"{value!r} is not a number of days from 1 to 3650", f"write e.g. {example}")
    return value


def check(v: dict, ctx) -> dict:
    sites = v.get("nginx_sites")
    if not sites or not isinstance(sites, list):
        reject("nginx_sites", "no site to get a certificate for (role letsencrypt reads the "
               "sites of role nginx)", "give the host role nginx before letsencrypt, with "
               "nginx_sites")
    if v["letsencrypt_mode"] not in MODES:
        reject("letsencrypt_mode", f"{v['letsencrypt_mode']!r} is unknown", "write acme or selfsigned")
    if not isinstance(v["letsencrypt_directory_url"], str) \
            or not URL_RE.match(v["letsencrypt_directory_url"]):
        reject("letsencrypt_directory_url", f"{v['letsencrypt_directory_url']!r} is not an "
               "https URL", "write the ACME directory, e.g. "
               "https://acme-v02.api.letsencrypt.org/directory")
    email = v["letsencrypt_email"]
    if email and (not isinstance(email, str) or not EMAIL_RE.match(email)):
        reject("letsencrypt_email", f"{email!r} is not an email address",
               "write one address like ops@example.com, or \"\" for none")
    return {"mode": v["letsencrypt_mode"], "url": v["letsencrypt_directory_url"], "email": email,
            "renew_days": _days("letsencrypt_renew_days", v["letsencrypt_renew_days"], "30"),
            "days": _days("letsencrypt_selfsigned_days", v["letsencrypt_selfsigned_days"], "365"),
            # role nginx judges the sites themselves (and refuses what is skipped here); here
            # only what names the certificate
            "sites": [{"name": s["name"], "names": list(s["server_names"])} for s in sites
                      if isinstance(s, dict) and isinstance(s.get("name"), str)
                      and isinstance(s.get("server_names"), list)]}


def not_after_seconds(text: str) -> float:
    """The certificate fact's notAfter ("Mar  1 12:00:00 2027 GMT") as a Unix time."""
    return ssl.cert_time_to_seconds(text)


@dataclass(frozen=True)
class Certificate:
    """A site's certificate with exactly its names, valid for more than `renew_days`."""
    site: str
    names: tuple[str, ...]
    path: str                              # the PEM the fact reads
    issue: tuple[dict, ...]                # the steps that make the first one
    reissue: tuple[dict, ...]              # ... and the steps that replace one
    renew_days: int
    now: float

    @property
    def id(self) -> str:
        return f"certificate {self.site}"

    def facts(self) -> dict:
        return {"certs": [self.path]}

    def why_new(self, cert) -> str | None:
        if cert is None:
            return f"no certificate at {self.path}"
        if "error" in cert:
            return cert["error"]
        if sorted(cert["sans"]) != sorted(self.names):
            return f"names {', '.join(sorted(cert['sans']))} != {', '.join(sorted(self.names))}"
        left = (not_after_seconds(cert["not_after"]) - self.now) / 86400
        if left < self.renew_days:
            return f"expires {cert['not_after']}, in {left:.0f} days (< {self.renew_days})"
        return None

    def plan(self, facts) -> list:
        cert = facts.cert(self.path)
        why = self.why_new(cert)
        if why is None:
            return [Noop(self.id, f"valid until {cert['not_after']} for {', '.join(cert['sans'])}")]
        if cert is None:
            return [Change(self.id, "issue", why, self.issue, None, (HANDLER,))]
        return [Change(self.id, "renew", why, self.reissue, None, (HANDLER,))]

    def expect(self, facts) -> dict:
        return {}


def certbot_argv(c: dict, site: dict, renew: bool) -> list[str]:
    argv = ["certbot", "certonly", "--non-interactive", "--agree-tos", "--webroot",
            "--webroot-path", WEBROOT, "--cert-name", site["name"], "--server", c["url"],
            "--key-type", "ecdsa", "--no-random-sleep-on-renew"]
    argv += ["--email", c["email"], "--no-eff-email"] if c["email"] else \
        ["--register-unsafely-without-email"]
    if renew:                              # new names or near expiry: we decided, certbot obeys
        argv += ["--force-renewal", "--expand"]
    for n in site["names"]:
        argv += ["--domain", n]
    return argv


def selfsigned_steps(c: dict, site: dict, directory: str) -> tuple[dict, ...]:
    san = ",".join(f"DNS:{n}" for n in site["names"])
    return (directory_step(directory, "0700", "root", "root"),
            run_step(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                      "ec_paramgen_curve:P-256", "-nodes", "-days", str(c["days"]),
                      "-subj", f"/CN={site['names'][0]}", "-addext", f"subjectAltName={san}",
                      "-keyout", f"{directory}/privkey.pem", "-out", f"{directory}/fullchain.pem"]))


def resources(v, ctx):
    c = check(v, ctx)
    now = time.time()
    acme = c["mode"] == "acme"
    yield apt.packages(["certbot"] if acme else ["openssl"])
    if acme:
        yield files.directory("/etc/letsencrypt/renewal-hooks/deploy")
        yield files.file(HOOK, HOOK_TEXT, mode="0755")
        yield systemd.service("certbot.timer", enabled=True, running=True)
    for s in c["sites"]:
        home = f"{LIVE}/{s['name']}" if acme else f"{TLS_DIR}/{s['name']}/selfsigned"
        pem = f"{home}/fullchain.pem"
        yield files.directory(f"{TLS_DIR}/{s['name']}")
        if acme:
            issue, reissue = ((run_step(certbot_argv(c, s, again), timeout=300),)
                              for again in (False, True))
        else:
            issue = reissue = selfsigned_steps(c, s, home)
        yield Certificate(s["name"], tuple(s["names"]), pem, issue, reissue, c["renew_days"], now)
        yield file_group(f"tls {s['name']}", [
            links.link(f"{TLS_DIR}/{s['name']}/fullchain.pem", pem),
            links.link(f"{TLS_DIR}/{s['name']}/privkey.pem", f"{home}/privkey.pem"),
            links.link(f"/etc/nginx/sites-enabled/{s['name']}-tls.conf",
                       f"/etc/nginx/sites-available/{s['name']}-tls.conf"),
        ], check=["nginx", "-t", "-q"], notify=HANDLER)


def handlers(v, ctx):
    return {HANDLER: handler("reload", "nginx", validate=["nginx", "-t", "-q"])}
