"""chat-bench: load generator and figures for compose-chat against a bare relay baseline."""
