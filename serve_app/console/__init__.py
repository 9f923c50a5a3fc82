"""The operator console's static files (static/: index.html, app.js, app.css), served by
serve_app/api/console.py."""
