"""provisioner: hardened Debian servers for Node.js apps, deployed and rolled back safely."""
