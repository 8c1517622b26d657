"""PostgreSQL plumbing: the pool factory and migrations."""
