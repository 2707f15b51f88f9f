"""Authentication: user JWTs (RS256), the admin scope, and host secrets."""
