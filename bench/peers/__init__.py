"""The peers benchmark (run.py): the same workloads, on the same kind of testbed server, done by
us, pyinfra, ansible-core and plain Fabric. Import as `peers` with bench/ on sys.path."""
