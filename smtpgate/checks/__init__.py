"""checks - the smtpd restrictions, one pure decide() per module.

DESCRIPTION
    Each module is one check; the smtpd restrictions among them:
    helo            reject_invalid/non_fqdn/unknown_helo_hostname, HLO: access
    client_fcrdns   reject_unknown_client_hostname, REV: access
    destination     reject_non_fqdn_recipient, reject_unknown_recipient_domain,
                    reject_unauth_destination, routing tricks
    recipient       RECIP: access, reject_unlisted_recipient
    sender          reject_non_fqdn_sender

    Each decide() takes plain facts (lookup results fetched by the caller)
    and returns a smtpgate.verdict.Verdict; none of them does I/O.
"""
