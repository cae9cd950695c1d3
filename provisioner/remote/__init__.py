"""Code that runs on the server (stdlib only). See agent.py."""
