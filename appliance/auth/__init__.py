"""Who is asking: API keys, OIDC bearer JWTs, principals and scopes."""
