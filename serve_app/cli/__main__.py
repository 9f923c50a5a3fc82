"""`python -m serve_app.cli` is `serve-router`."""

from serve_app.cli.main import main

raise SystemExit(main())
