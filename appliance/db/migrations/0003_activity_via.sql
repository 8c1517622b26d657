-- The API key that acted for the principal (`X-On-Behalf-Of` under `impersonate`): an action a key
-- took as a user is recorded as that user and traceable to the key. NULL when nobody acted for it.
ALTER TABLE api_activity ADD COLUMN via text;
