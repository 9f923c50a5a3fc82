"""The `serve-router` command: run the router, check its files, provision models, manage
client keys and read the router's status (cli/main.py has the whole list)."""
