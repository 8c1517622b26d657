"""Attachments: presigned uploads, their verification job, downloads, expiry of unfinished ones."""
