"""Backups: pg_dump of the appliance's database streamed to S3, the newest `keep` kept."""
