"""provisioner's command line: `invoke --list` shows every task."""
from invoke import Collection

from provisioner.cli import (backup, deploy, flags, hostvars, logs, plans, provision, report, status,
                             testbed, vault)

flags.install()

ns = Collection(provision.provision, provision.check, hostvars.show_vars, plans.apply, plans.drift,
                report.report, status.status, logs.logs, deploy.rollback, deploy.releases)
ns.add_collection(deploy.ns)
ns.add_collection(deploy.db_ns)
ns.add_collection(provision.hosts_ns)
ns.add_collection(testbed.ns)
ns.add_collection(vault.ns)
ns.add_collection(backup.backup_ns)
ns.add_collection(backup.restore_ns)
