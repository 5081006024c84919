"""smtpgate - the internet-facing SMTP front end of a Postfix, Redis, rspamd and Dovecot server."""

__version__ = "0.1.0"
