#!/usr/bin/env bash
# Configures this machine's Postfix as the relay the `relay_throughput` bench drives, so that
# Postfix and Postwarden are measured on the same work: same injector, same STARTTLS sink,
# same messages, same disk. Used by the bench when PW_POSTFIX is set; not part of the tests.
#
#   scripts/bench-postfix.sh start LISTEN_PORT SINK_PORT REUSE   # REUSE: yes | no
#   scripts/bench-postfix.sh stop
#
# Needs root and Debian's postfix package (`apt-get install postfix`). It rewrites
# /etc/postfix/main.cf and master.cf (backups: *.pw-bench-orig); run it on a scratch machine.
set -euo pipefail

case "${1:-}" in
start)
    listen=$2 sink=$3 reuse=$4
    for f in main.cf master.cf; do
        [ -e "/etc/postfix/$f.pw-bench-orig" ] || cp "/etc/postfix/$f" "/etc/postfix/$f.pw-bench-orig"
        cp "/etc/postfix/$f.pw-bench-orig" "/etc/postfix/$f"
    done
    postconf -e \
        "inet_interfaces = loopback-only" \
        "inet_protocols = ipv4" \
        "mydestination =" \
        "mynetworks = 127.0.0.0/8" \
        "smtpd_relay_restrictions = permit_mynetworks, reject" \
        "transport_maps = inline:{bench.example=smtp:[127.0.0.1]:$sink}" \
        "smtp_tls_security_level = may" \
        "smtp_tls_connection_reuse = $reuse" \
        "smtp_tls_session_cache_database = btree:\${data_directory}/smtp_scache" \
        "maillog_file = /var/log/postfix-bench.log" \
        "smtpd_tls_security_level = none"
    # Our own listener on LISTEN_PORT instead of port 25; no chroot (nothing copied into it).
    postconf -MX smtp/inet
    postconf -M "127.0.0.1:$listen/inet=127.0.0.1:$listen inet n - n - - smtpd"
    # smtp_tls_connection_reuse hands TLS to tlsproxy, which Debian's master.cf does not list.
    postconf -M "tlsproxy/unix=tlsproxy unix - - n - 0 tlsproxy"
    postconf -F '*/*/chroot = n'
    # Nothing left over from an earlier run.
    postsuper -d ALL >/dev/null 2>&1 || true
    postfix check
    postfix start 2>/dev/null || postfix reload
    ;;
stop)
    postfix stop 2>/dev/null || true
    for f in main.cf master.cf; do
        [ -e "/etc/postfix/$f.pw-bench-orig" ] && cp "/etc/postfix/$f.pw-bench-orig" "/etc/postfix/$f"
    done
    ;;
*)
    echo "usage: $0 start LISTEN_PORT SINK_PORT yes|no | stop" >&2
    exit 2
    ;;
esac
