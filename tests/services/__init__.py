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

    ports.free_port (ports from a block this process claimed, never handed
    out twice) and ports.start_on_free_ports (a start retried on new ports
    when one was taken), waiting.wait_until / wait_for_port / no_hang, and
    procs (process start, stop and exit cleanup) are the shared helpers.
    Every service class has pick_ports(). smtp_talk.Talk is the misbehaving
    SMTP client (a context manager), gate_process.GateProcess smtpgate
    itself (stop() asserts a clean exit).
"""
