"""The roles of this repository, one package each: `import roles.harden`. The runner loads them
through provisioner/roles.py, by folder (a folder with a defaults.yml is a role)."""
