"""provisioner's command line: `invoke --list` shows every task."""
from invoke import Collection

from provisioner.cli import deploy, flags, hostvars, plans, provision, report, testbed, vault

flags.install()

ns = Collection(provision.provision, provision.check, hostvars.show_vars, plans.apply, plans.drift,
                report.report, deploy.rollback, deploy.releases)
ns.add_collection(deploy.ns)
ns.add_collection(deploy.db_ns)
ns.add_collection(provision.hosts_ns)
ns.add_collection(testbed.ns)
ns.add_collection(vault.ns)
