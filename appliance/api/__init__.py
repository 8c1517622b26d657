"""The HTTP and WebSocket API (litestar on granian). `app.create_app` is the composition root."""
