"""The long-running programs supervisord starts: worker, flusher, scheduler (api is granian)."""
