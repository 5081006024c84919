"""smtp - the SMTP engine: the protocol per client connection, DATA, PROXY, TLS."""
