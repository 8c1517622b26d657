"""Messages: publishing (one Lua script per request) and recent history from the Redis tail."""
