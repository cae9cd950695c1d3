"""provisioner's command line: `invoke --list` shows every task."""
import atexit
import gc
import sys

from invoke import Collection

# Invoke turns Python's bytecode cache off before it loads this file (its --write-pyc, off by
# default), so every run would compile provisioner's modules again (~60 ms of each start-up):
# back to Python's own setting (which PYTHONDONTWRITEBYTECODE or -B still turn off).
sys.dont_write_bytecode = sys.flags.dont_write_bytecode
# At exit, Python's last garbage collection walks every object the engine and its libraries
# made (~80 ms of a 1 s converged run); frozen, they are freed without being walked. Exit
# handlers still run, and nothing is left unflushed: it only skips the walk.
atexit.register(gc.freeze)

from provisioner.cli import (backup, deploy, flags, hostvars, logs, plans, provision,  # noqa: E402
                             report, status, testbed, vault)

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
