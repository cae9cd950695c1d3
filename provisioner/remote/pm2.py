"""pm2 helpers of the scripts that run on servers and ship as one file each (role pm2's status
check, role monitoring_agent's host metrics, `invoke status`'s probe): provisioner.remote's
with_helpers() puts a helper's source ahead of each, so each helper imports what it uses."""


def pm2_jlist(output):
    """pm2's process list from `pm2 jlist`'s stdout: its last line that parses as a JSON list.
    pm2 writes the list as one line (JSON.stringify, no newline after it), and may print lines
    of its own ahead of it, some starting with "[": "[PM2] Spawning PM2 daemon with
    pm2_home=..." and "[PM2] PM2 Successfully daemonized" when the call started its daemon,
    its banner on its first call, ">>>> In-memory PM2 is out-of-date" after an upgrade.
    ValueError when no line is a list (pm2 failed)."""
    import json
    for line in reversed(output.splitlines()):
        try:
            procs = json.loads(line)
        except ValueError:
            continue
        if isinstance(procs, list):
            return procs
    raise ValueError("no process list in pm2 jlist's output")


def pm2_app_procs(procs, name=None):
    """The processes of apps in pm2's process list (of app `name` only, when given): not pm2's
    own modules (pm2-logrotate), which pm2 lists beside the apps with `pmx_module` set in
    their pm2_env; nothing keeps an app from a module's name, and as an app a module would be
    counted, alerted on, reloaded. The one rule of every script that asks pm2; deploy's reload
    (PM2_RELOAD in remote/deploy.py, JavaScript on pm2's API) applies it too."""
    return [p for p in procs if not (p.get("pm2_env") or {}).get("pmx_module")
            and (name is None or p.get("name") == name)]
