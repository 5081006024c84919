"""smtpgate - the internet-facing SMTP front end of a Postfix, Redis, rspamd and Dovecot server.

LAYOUT
    The folders follow a message's way through the gate; a module may import
    from its own folder and from the layers below it, never from above
    (tests/test_layout.py holds the code to that):

    service/   listeners, worker processes, reload and drain, /healthz and
               /metrics, the socketmap service, the DANE watch over the
               certificate                                (top: may use all)
    cli/       the `smtpgate` command and its subcommands
    smtp/      the SMTP engine: one asyncio.Protocol per client, DATA
               scanning and spooling, PROXY header, TLS material and
               its DANE decision (the certificate against TLSA records)
    policy/    each stage's checks in order: facts fetched through lookups/,
               decisions from checks/, verdicts out; writes to no socket
    relay/     the next hop (Postfix): XCLIENT, pipelined hand-off, pool
    lookups/   I/O for facts: Redis tables and caches, DNS, DNSBL, the
               screening cache and counters, Dovecot auth, TLSA records
    checks/    pure decisions: plain facts in, a Verdict out, no I/O
    (top)      the shared vocabulary: config, verdict, replies, address,
               dnsbl_sites (grammars and value types, no I/O)
"""

__version__ = "0.1.0"
