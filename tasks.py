"""provisioner's command line: `invoke --list` shows every task."""
from invoke import Collection

from provisioner.cli import flags, provision, testbed, vault

flags.install()

ns = Collection(provision.provision, provision.check)
ns.add_collection(provision.hosts_ns)
ns.add_collection(testbed.ns)
ns.add_collection(vault.ns)
