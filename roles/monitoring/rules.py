"""The alert rules, built from the role's thresholds: one group, each rule with a summary and a
runbook line (what to look at first). The figures come from the exporters and from textfile
metrics other jobs write on the servers; those jobs keep to these names:

    provisioner_backup_last_success_timestamp_seconds{backup="<name>"}   unix time
    provisioner_backup_max_age_seconds{backup="<name>"}                  what its schedule allows
    provisioner_restore_drill_ok                                         1 passed, 0 failed
    provisioner_restore_drill_last_success_timestamp_seconds             unix time
    pm2_*, fail2ban_*, nginx_http_*                                      roles/monitoring_agent/host_metrics.py
"""
from __future__ import annotations

# filesystems that are not storage (kernel and runtime mounts)
FS = 'fstype!~"squashfs|ramfs|nsfs|devtmpfs|fuse.lxcfs",mountpoint!~"/(run|dev|sys|proc)($|/.*)"'


def rule(alert: str, expr: str, summary: str, runbook: str, *, severity: str = "critical",
         for_: str | None = None) -> dict:
    out = {"alert": alert, "expr": expr}
    if for_:
        out["for"] = for_
    out["labels"] = {"severity": severity}
    out["annotations"] = {"summary": summary, "runbook": runbook}
    return out


def alert_rules(t: dict) -> list[dict]:
    """t: the thresholds check() derived (for, disk_percent, memory_percent, cert_days,
    error_ratio, p99_seconds, drill_max_days)."""
    f = t["for"]
    return [
        rule("HostDown", 'up{job="node"} == 0', "{{ $labels.instance }} does not answer",
             "ping and SSH the host; if it is up, `systemctl status prometheus-node-exporter`; "
             "check ufw lets the monitoring server in", for_=f),
        rule("ExporterDown", 'up{job!="node"} == 0',
             "{{ $labels.job }} on {{ $labels.instance }} does not answer",
             "`systemctl status` the exporter (prometheus-<job>-exporter) or the service itself; "
             "its journal says why", for_=f),
        rule("ServiceDown", "pg_up == 0 or redis_up == 0 or nginx_up == 0",
             "the {{ $labels.job }} service on {{ $labels.instance }} is down",
             "`systemctl status postgresql redis-server nginx`; read its journal", for_=f),
        rule("DiskAlmostFull",
             f"100 * (1 - node_filesystem_avail_bytes{{{FS}}} / node_filesystem_size_bytes{{{FS}}})"
             f" > {t['disk_percent']}",
             "{{ $labels.mountpoint }} on {{ $labels.instance }} is {{ $value | printf \"%.0f\" }}% full",
             "`du -xh --max-depth=2 <mountpoint> | sort -h | tail`; old releases, logs, backups",
             for_=f),
        rule("DiskFillingUp",
             f"predict_linear(node_filesystem_avail_bytes{{{FS}}}[6h], 24 * 3600) < 0",
             "{{ $labels.mountpoint }} on {{ $labels.instance }} fills up within 24 h",
             "find what grows (`du`, `journalctl --disk-usage`); rotate or move it", for_=f,
             severity="warning"),
        rule("MemoryLow",
             "100 * (1 - node_memory_MemAvailable_bytes / node_memory_MemTotal_bytes)"
             f" > {t['memory_percent']}",
             "{{ $labels.instance }} uses {{ $value | printf \"%.0f\" }}% of its memory",
             "`ps aux --sort=-rss | head`; lower pm2 max_memory_restart or add memory", for_=f),
        rule("SystemdUnitFailed", 'node_systemd_unit_state{state="failed"} == 1',
             "{{ $labels.name }} failed on {{ $labels.instance }}",
             "`systemctl status {{ $labels.name }}` and `journalctl -u {{ $labels.name }}`; "
             "`systemctl reset-failed` once fixed", for_=f),
        rule("AppDown", "pm2_app_online_instances == 0 or pm2_daemon_up == 0",
             "app {{ $labels.app }} on {{ $labels.instance }} has no instance online",
             "`invoke logs --app <app>`; as the app user `pm2 status`, `pm2 logs`; "
             "`invoke rollback` if a deploy broke it", for_=f),
        rule("AppRestartLoop", "increase(pm2_restarts_total[15m]) > 3",
             "app {{ $labels.app }} on {{ $labels.instance }} restarted "
             "{{ $value | printf \"%.0f\" }} times in 15 minutes",
             "pm2 logs of the app: a crash at start or max_memory_restart reached", for_=f),
        rule("Nginx5xxRate",
             'sum by (instance) (rate(nginx_http_responses_total{code="5xx"}[5m])) / '
             "sum by (instance) (rate(nginx_http_responses_total[5m]))"
             f" > {t['error_ratio']}",
             "{{ $value | humanizePercentage }} of the answers of {{ $labels.instance }} are 5xx",
             "/var/log/nginx/error.log and the apps' logs: upstream down (502/504) or app errors "
             "(500)", for_=f),
        rule("NginxLatencyP99",
             "histogram_quantile(0.99, sum by (instance, le) "
             f"(rate(nginx_http_request_duration_seconds_bucket[5m]))) > {t['p99_seconds']}",
             "p99 request time on {{ $labels.instance }} is {{ $value | humanizeDuration }}",
             "upstream_time in /var/log/nginx/access.log: slow app, database or a saturated host",
             for_=f, severity="warning"),
        rule("SiteDown", "probe_success == 0",
             "{{ $labels.site }} health check fails through {{ $labels.host }}",
             "fetch the health URL by hand (`curl -v --resolve`); nginx error log, app status",
             for_=f),
        rule("CertificateExpiring",
             f"(probe_ssl_earliest_cert_expiry - time()) / 86400 < {t['cert_days']}",
             "the certificate of {{ $labels.site }} on {{ $labels.host }} expires in "
             "{{ $value | printf \"%.0f\" }} days",
             "`certbot renew` on the load balancer; check its timer and the ACME challenge path",
             for_=f),
        rule("BackupStale",
             "time() - provisioner_backup_last_success_timestamp_seconds "
             "> on (instance, backup) provisioner_backup_max_age_seconds",
             "backup {{ $labels.backup }} on {{ $labels.instance }} is older than its schedule allows",
             "the backup job's journal (`systemctl list-timers`, `journalctl -u <job>`); run "
             "`invoke backup` once fixed", for_=f),
        rule("RestoreDrillFailed", "provisioner_restore_drill_ok == 0",
             "the last restore drill on {{ $labels.instance }} failed",
             "its journal; a backup that does not restore is no backup: fix before anything else",
             for_=f),
        rule("RestoreDrillStale",
             "time() - provisioner_restore_drill_last_success_timestamp_seconds"
             f" > {t['drill_max_days']} * 86400",
             f"no restore drill passed on {{{{ $labels.instance }}}} for {t['drill_max_days']} days",
             "`invoke backup.verify`; check the drill's timer", for_=f),
        rule("PostgresArchiveFailing", "increase(pg_stat_archiver_failed_count[15m]) > 0",
             "WAL archiving fails on {{ $labels.instance }}",
             "PostgreSQL's log (archive_command); the repository host reachable over SSH?",
             for_=f),
        rule("PostgresReplicationLag", "(pg_replication_lag or pg_replication_lag_seconds) > 300",
             "replica {{ $labels.instance }} is {{ $value | humanizeDuration }} behind",
             "pg_stat_replication on the primary; network and disk of the replica", for_=f),
        rule("SSHLoginFailures", 'increase(fail2ban_failed_total{jail="sshd"}[10m]) > 20',
             "{{ $value | printf \"%.0f\" }} failed SSH logins on {{ $labels.instance }} in 10 minutes",
             "`journalctl -u ssh`; `fail2ban-client status sshd`: who, and is a key misconfigured?",
             severity="warning"),
        rule("Fail2banBans", "increase(fail2ban_banned_total[10m]) > 3",
             "fail2ban banned {{ $value | printf \"%.0f\" }} addresses on {{ $labels.instance }} "
             "({{ $labels.jail }}) in 10 minutes",
             "`fail2ban-client status {{ $labels.jail }}`; a trusted peer banned? add it to "
             "harden_trusted_sources", severity="warning"),
        rule("HostMetricsStale",
             "time() - provisioner_host_metrics_last_run_timestamp_seconds > 600 "
             "or provisioner_host_metrics_ok == 0 or node_textfile_scrape_error == 1",
             "the host metrics job on {{ $labels.instance }} stopped or fails",
             "`systemctl status provisioner-host-metrics.service`; its journal", for_=f,
             severity="warning"),
    ]
