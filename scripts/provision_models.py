"""`python -m scripts.provision_models --roles general coding --force --json` (see README)."""

from serve_app.cli.provision import main

if __name__ == "__main__":
    raise SystemExit(main())
