"""services - real services for integration tests, one module per service

DESCRIPTION
    Each module starts one real program on free loopback ports inside a
    temporary directory and waits for it with a deadline; tests/conftest.py
    wraps them in session-scoped fixtures:

        redis_server    redis_server.RedisServer
        dns_server      dns_server.DnsServer (unbound)
        dovecot_server  dovecot_server.DovecotServer
        rspamd_server   rspamd_server.RspamdServer
        postfix_server  postfix_server.PostfixServer

    ports.free_port, waiting.wait_until / wait_for_port and procs (process
    start, stop and exit cleanup) are the shared helpers.
"""
