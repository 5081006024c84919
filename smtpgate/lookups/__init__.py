"""lookups - the I/O that gathers facts for the policy: Redis, DNS, DNSBL, Dovecot auth."""
