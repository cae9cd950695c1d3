"""provisioner's command line: `invoke --list` shows every task."""
from invoke import Collection

from provisioner.cli import testbed, vault

ns = Collection()
ns.add_collection(testbed.ns)
ns.add_collection(vault.ns)
