#!/bin/sh
# postfix-entrypoint - start Postfix behind smtpgate from the shipped conf/postfix/
#
# Copies main.cf, master.cf and submission_header_cleanup from
# $SMTPGATE_POSTFIX_CONF (default /etc/smtpgate-postfix, read-only) into
# $POSTFIX_CONFIG_DIR (default /etc/postfix), sets myhostname and mydomain from
# the image's HOSTNAME and DOMAIN (DOMAIN defaults to HOSTNAME, as the image's
# myorigin did), lets DOVECOT and RSPAMD name other hosts than "dovecot" and
# "rspamd", runs `postfix check` and then Postfix in the foreground
# (`postfix start-fg`, logging to standard output: maillog_file = /dev/stdout
# is set here, not in main.cf, where a host's `postfix start` would lose the
# log). Any error stops the start.
set -eu

conf=${SMTPGATE_POSTFIX_CONF:-/etc/smtpgate-postfix}
dir=${POSTFIX_CONFIG_DIR:-/etc/postfix}

for file in main.cf master.cf submission_header_cleanup; do
    cp "$conf/$file" "$dir/$file"
done
# the container's log: standard output, which only `postfix start-fg` has
postconf -c "$dir" -e "myhostname=${HOSTNAME:?HOSTNAME must name this mail server}" \
    "mydomain=${DOMAIN:-$HOSTNAME}" "maillog_file=/dev/stdout"
if [ -n "${DOVECOT:-}" ]; then
    postconf -c "$dir" -e "virtual_transport=lmtp:inet:$DOVECOT:24" \
        "smtpd_sasl_path=inet:$DOVECOT:11330"
fi
if [ -n "${RSPAMD:-}" ]; then
    postconf -c "$dir" -e "smtpd_milters=inet:$RSPAMD:11332"
fi
postfix -c "$dir" check
if [ "${1:-}" = "--check-only" ]; then
    exit 0
fi
exec postfix -c "$dir" start-fg
