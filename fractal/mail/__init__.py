"""Templated transactional mail: templates shipped in the package, SMTP or SES backends, the admin send API."""
