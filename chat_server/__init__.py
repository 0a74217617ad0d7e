"""compose-chat server: WebSocket chat with durable SQLite history."""
