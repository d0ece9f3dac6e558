#!/usr/bin/env bash
# postfix-peer.sh - run a PRIVATE Postfix instance as a real SMTP peer for tests.
#   postfix-peer.sh install                         # apt-get postfix, system instance off
#   postfix-peer.sh start DIR [key=value ...]       # prints the master PID once port answers
#   postfix-peer.sh stop DIR
# keys: role=server|client port=N cert=PEM key=PEM ca=PEM tls=1.2|1.3|any req_ccert=yes
#   relayhost=[127.0.0.1]:N client_tls=none|may|encrypt|verify|secure sasl_user=U sasl_password=P
#   (client: AUTH to relayhost) auth_user=U auth_password=P (server: offer AUTH PLAIN/LOGIN
#   from a private sasldb and REQUIRE it) main.PARAM=VALUE (main.cf override, postconf -e).
#   In role=client cert/key are also the smtp client certificate (for a req_ccert server).
# role=server: any recipient in any domain -> `virtual` agent -> Maildir DIR/mail: one file
#   (0600 postfix) per recipient in DIR/mail/new; body byte-identical except CRLF->LF; only
#   Return-Path, X-Original-To, Delivered-To, Received are prepended.
# role=client: smtpd on the port, mydestination empty, all mail relayed to relayhost.
# Logs: DIR/log/maillog; start times: DIR/log/peer.log.
#
# FINDINGS (Debian 12, Postfix 3.7.11, as root):
# * Debian's "No configuration" install writes no /etc/postfix/main.cf, so neither the init
#   script nor postfix.service (ConditionPathExists=/etc/postfix/main.cf) starts a system
#   instance; nothing in /etc/postfix is ever written by this script.
# * alternate_config_directories is enforced only for NON-root callers (set-gid postdrop/
#   postqueue). As root `postfix -c DIR/etc start|stop` works, but postfix(1) chdir()s to
#   queue_directory first (fatal "chdir(...): No such file or directory" if absent) and runs
#   post-install create-missing + check-warn (~0.8 s, "not owned by root" noise). We run the
#   daemon directly (20-40 ms):  /usr/lib/postfix/sbin/master -c DIR/etc -w
#   (-w: foreground process exits 0 only after the background master bound its sockets and
#   wrote DIR/queue/pid/master.pid; master setsid()s, exports MAIL_CONFIG to its children).
#   meta_directory stays /etc/postfix (read only: postfix-files, dynamicmaps.cf).
# * Queue tree by hand (= post-install create-missing per postfix-files): queue, pid
#   root:root 755; active bounce corrupt defer deferred flush hold incoming private saved
#   trace postfix:root 700; maildrop postfix:postdrop 730; public postfix:postdrop 2710.
# * master.cf from scratch, chroot=n for EVERY service; smtpd service = 127.0.0.1:PORT.
# * maillog_file=DIR/log/maillog needs the `postlog unix-dgram ... postlogd` service AND
#   maillog_file_prefixes=DIR/log (default "/var, /dev/stdout" rejects other paths).
# * Distinct myhostname per instance, else the client defers "mail for ... loops back to
#   myself" when the relay greets with its own name. DIR and parents must be searchable by
#   user postfix (virtual delivers as postfix): not under /root. compatibility_level=3.6
#   (unset = 0: legacy defaults + warnings). smtpd_peername_lookup=no. Short backoffs.
# * Postfix re-reads a config file every 0.3 s until its mtime is >= 2 s old (dict_load_file
#   "wait until the file hasn't been modified"): a freshly written main.cf makes master -w
#   (and postconf) take ~2 s. We backdate DIR/etc files (touch -d @now-10): start ~0.1 s.
# * tls=1.2: smtpd_tls_protocols = smtpd_tls_mandatory_protocols = >=TLSv1.2, <=TLSv1.2
#   (range syntax since 3.6); by default TLSv1.3 is negotiated.
# * req_ccert=yes: smtpd_tls_security_level=encrypt + ask_ccert + req_ccert + CAfile. The
#   handshake succeeds; the FIRST command after STARTTLS (EHLO, MAIL, NOOP...) gets
#   "421 4.7.1 <myhostname> Error: No client certificate presented" ("... Client certificate
#   not trusted" for a foreign cert); without STARTTLS: "530 5.7.0 Must issue a STARTTLS
#   command first".
# * client_tls=verify to [127.0.0.1]:N needs subjectAltName IP:127.0.0.1 in the relay cert
#   (else "num=64:IP address mismatch", deferred "Server certificate not verified").
# * Server AUTH: Cyrus sasldb (saslpasswd2 from sasl2-bin, libsasl2-modules), smtpd.conf in
#   cyrus_sasl_config_path=DIR/etc/sasl, realm = smtpd_sasl_local_domain = $myhostname, so
#   login "U" and "U@role-port.peer.test" both work.
# * Stop: SIGTERM to master.pid. master signals its children and exits at once, so they
#   linger as zombies until PID 1 reaps them; we wait (bounded) until nothing in the
#   master's session or with cwd in DIR/queue is left, and SIGKILL stragglers of THIS
#   instance only. Several instances coexist on different ports.
set -euo pipefail

DAEMON_DIR=/usr/lib/postfix/sbin
die() { echo "postfix-peer: error: $*" >&2; exit 1; }
usage() { sed -n '2,11p' "$0" >&2; exit 2; }

wait_smtp() {  # poll PORT until it sends an SMTP 220 greeting, at most 20 s
  local port=$1 line end=$((SECONDS + 20))
  while ((SECONDS < end)); do
    line=$(timeout 2 bash -c 'exec 3<>/dev/tcp/127.0.0.1/'"$port"' || exit 1
      IFS= read -r l <&3 || exit 1; printf "QUIT\r\n" >&3; printf %s "$l"' 2>/dev/null) || line=
    [[ $line == 220* ]] && return 0
    sleep 0.1
  done
  return 1
}
port_busy() { timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }
master_pid() {  # print the master PID of instance DIR if it runs
  local p; p=$(tr -dc 0-9 2>/dev/null <"$1/queue/pid/master.pid") || return 1
  [[ -n $p ]] && kill -0 "$p" 2>/dev/null && echo "$p"
}
instance_pids() {  # $1=DIR [$2=master pid] [$3=Z: zombies only]: master's session + cwd in queue
  local q=$1/queue p
  [[ -z ${2:-} ]] || ps -o pid=,stat= --sid "$2" | awk -v z="${3:-}" '(z == "Z") == ($2 ~ /Z/) {print $1}'
  [[ -n ${3:-} ]] || find /proc -mindepth 2 -maxdepth 2 -name cwd \( -lname "$q" -o -lname "$q/*" \) \
    2>/dev/null | cut -d/ -f3 | while read -r p; do   # only Postfix programs, not a user's shell
      [[ $(readlink "/proc/$p/exe" 2>/dev/null) == "$DAEMON_DIR"/* ]] && echo "$p"; done
  return 0   # find over /proc "fails" on vanished processes, ps on an empty session
}

cmd_install() {
  [[ $(id -u) == 0 ]] || die "install must run as root"
  local pkgs=() k   # postfix; SASL mechanisms + saslpasswd2 for the AUTH options
  for k in postfix libsasl2-modules sasl2-bin; do
    dpkg-query -W -f='${Status}' "$k" 2>/dev/null | grep -q "ok installed" || pkgs+=("$k"); done
  if [[ ${#pkgs[@]} -gt 0 ]]; then export DEBIAN_FRONTEND=noninteractive
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    apt-get install -y -q "${pkgs[@]}" || { apt-get update -q && apt-get install -y -q "${pkgs[@]}"; } \
      || die "apt-get install ${pkgs[*]} failed"
  fi
  [[ -x /usr/sbin/postfix ]] || die "/usr/sbin/postfix still missing after apt-get"
  local p; p=$(tr -dc 0-9 2>/dev/null </var/spool/postfix/pid/master.pid) || p=
  if [[ -n $p ]] && kill -0 "$p" 2>/dev/null; then
    echo "postfix-peer: stopping the system postfix instance (pid $p)" >&2
    if [[ -d /run/systemd/system ]]; then systemctl stop postfix || true; else
      postfix stop 2>/dev/null || kill -TERM "$p" || true; fi
  fi
  if [[ -d /run/systemd/system ]]; then systemctl disable postfix >/dev/null 2>&1 || true; fi
  if port_busy 25; then echo "postfix-peer: warning: something listens on 127.0.0.1:25" >&2; fi
  echo "postfix $(postconf -d -h mail_version) ready; system instance not running"
}

cmd_start() {
  [[ $# -ge 1 ]] || usage
  [[ $(id -u) == 0 ]] || die "start must run as root"
  [[ -x $DAEMON_DIR/master ]] || die "postfix is not installed (run: $0 install)"
  mkdir -p "$1"; local D; D=$(cd "$1" && pwd -P); shift
  local role=server port=2525 cert='' key='' ca='' tls=any req_ccert=no relayhost='' client_tls=may
  local sasl_user='' sasl_password='' auth_user='' auth_password='' kv k f p extra=() conf=()
  for kv in "$@"; do
    [[ $kv == *=* ]] || die "bad argument '$kv' (expected key=value)"
    k=${kv%%=*}
    case $k in
      role|port|cert|key|ca|tls|req_ccert|relayhost|client_tls|sasl_user|sasl_password|auth_user|auth_password)
        printf -v "$k" %s "${kv#*=}" ;;
      main.?*) extra+=("${k#main.} = ${kv#*=}") ;;
      *) die "unknown key '$k'" ;;
    esac
  done
  [[ $role == server || $role == client ]] || die "role must be server or client"
  [[ $port =~ ^[0-9]+$ ]] || die "port must be a number, got '$port'"
  [[ $tls =~ ^(1\.2|1\.3|any)$ ]] || die "tls must be 1.2, 1.3 or any"
  [[ $client_tls =~ ^(none|may|encrypt|verify|secure)$ ]] || die "bad client_tls '$client_tls'"
  [[ $req_ccert =~ ^(yes|no)$ ]] || die "req_ccert must be yes or no"
  [[ -n $cert && -z $key || -z $cert && -n $key ]] && die "cert= and key= go together"
  for f in cert key ca; do [[ -z ${!f} ]] && continue
    [[ -r ${!f} ]] || die "$f file '${!f}' is not readable"; printf -v "$f" %s "$(realpath "${!f}")"
  done
  [[ $req_ccert == yes && ( -z $cert || -z $ca ) ]] && die "req_ccert=yes needs cert=, key= and ca="
  [[ $role == client && -z $relayhost ]] && die "role=client needs relayhost=[host]:port"
  [[ -n $sasl_user && -z $sasl_password ]] && die "sasl_user= needs sasl_password="
  [[ -n $auth_user && -z $auth_password ]] && die "auth_user= needs auth_password="
  if p=$(master_pid "$D"); then die "instance in $D is already running (pid $p)"; fi
  port_busy "$port" && die "port $port on 127.0.0.1 is already in use"
  su -s /bin/sh -c "test -x '$D'" postfix || die "$D (or a parent) is not searchable by user postfix"

  install -d -o root -g root -m 755 "$D/etc" "$D/queue" "$D/queue/pid" "$D/log"
  for f in active bounce corrupt defer deferred flush hold incoming private saved trace; do
    install -d -o postfix -g root -m 700 "$D/queue/$f"; done
  install -d -o postfix -g postdrop -m 730 "$D/queue/maildrop"
  install -d -o postfix -g postdrop -m 2710 "$D/queue/public"
  install -d -o postfix -g postfix -m 700 "$D/data"
  install -d -o postfix -g postfix -m 755 "$D/mail" "$D/mail/new" "$D/mail/cur" "$D/mail/tmp"

  local proto='!SSLv2, !SSLv3' host="$role-$port.peer.test" nets=127.0.0.0/8 lvl=may
  local relay='permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination'
  [[ $req_ccert == yes ]] && lvl=encrypt
  [[ -n $auth_user ]] && nets='' relay='permit_sasl_authenticated, reject'
  [[ $tls == 1.2 ]] && proto='>=TLSv1.2, <=TLSv1.2'
  [[ $tls == 1.3 ]] && proto='>=TLSv1.3'
  conf=("compatibility_level = 3.6" "queue_directory = $D/queue" "data_directory = $D/data"
    "mail_owner = postfix" "setgid_group = postdrop" "myhostname = $host" "mydomain = peer.test"
    "myorigin = \$myhostname" "inet_interfaces = 127.0.0.1" "inet_protocols = ipv4"
    "mynetworks = $nets" "mydestination =" "relay_domains =" "alias_maps =" "alias_database ="
    "local_recipient_maps =" "local_transport = error:local delivery is disabled"
    "maillog_file = $D/log/maillog" "maillog_file_prefixes = $D/log"
    "smtpd_banner = \$myhostname ESMTP postfix-peer" "smtpd_peername_lookup = no"
    "local_header_rewrite_clients =" "biff = no" "queue_run_delay = 5s"
    "minimal_backoff_time = 5s" "maximal_backoff_time = 20s"
    "smtpd_relay_restrictions = $relay"
    "smtpd_tls_loglevel = 1" "smtpd_tls_received_header = yes"
    "smtpd_tls_protocols = $proto" "smtpd_tls_mandatory_protocols = $proto")
  if [[ -n $cert ]]; then
    conf+=("smtpd_tls_cert_file = $cert" "smtpd_tls_key_file = $key" "smtpd_tls_security_level = $lvl")
    [[ $req_ccert == yes ]] && conf+=("smtpd_tls_req_ccert = yes")
    [[ -n $ca && $role == server ]] && conf+=("smtpd_tls_CAfile = $ca" "smtpd_tls_ask_ccert = yes")
  fi
  if [[ $role == server ]]; then
    conf+=("virtual_mailbox_domains = static:all" "virtual_mailbox_base = $D"
      "virtual_mailbox_maps = static:mail/" "virtual_uid_maps = static:$(id -u postfix)"
      "virtual_gid_maps = static:$(id -g postfix)" "virtual_mailbox_limit = 0")
    if [[ -n $auth_user ]]; then
      install -d -m 755 "$D/etc/sasl"
      printf '%s\n' "pwcheck_method: auxprop" "auxprop_plugin: sasldb" "mech_list: PLAIN LOGIN" \
        "sasldb_path: $D/etc/sasl/sasldb2" >"$D/etc/sasl/smtpd.conf"
      rm -f "$D/etc/sasl/sasldb2"
      printf %s "$auth_password" | saslpasswd2 -p -c -f "$D/etc/sasl/sasldb2" -u "$host" "$auth_user" \
        || die "saslpasswd2 failed (apt-get install sasl2-bin)"
      chown postfix "$D/etc/sasl/sasldb2"; chmod 600 "$D/etc/sasl/sasldb2"
      conf+=("smtpd_sasl_auth_enable = yes" "smtpd_sasl_type = cyrus" "smtpd_sasl_path = smtpd"
        "cyrus_sasl_config_path = $D/etc/sasl" "smtpd_sasl_local_domain = \$myhostname")
    fi
  else
    conf+=("relayhost = $relayhost" "smtp_tls_security_level = $client_tls" "smtp_tls_loglevel = 1"
      "smtp_tls_protocols = $proto" "smtp_tls_mandatory_protocols = $proto")
    [[ -n $ca ]] && conf+=("smtp_tls_CAfile = $ca")
    [[ -n $cert ]] && conf+=("smtp_tls_cert_file = $cert" "smtp_tls_key_file = $key")
    if [[ -n $sasl_user ]]; then
      (umask 077; printf '%s %s:%s\n' "$relayhost" "$sasl_user" "$sasl_password" >"$D/etc/sasl_passwd")
      conf+=("smtp_sasl_auth_enable = yes" "smtp_sasl_password_maps = texthash:$D/etc/sasl_passwd"
        "smtp_sasl_security_options = noanonymous" "smtp_sasl_tls_security_options = noanonymous")
    fi
  fi
  printf '%s\n' "# generated by postfix-peer.sh (role=$role)" "${conf[@]}" >"$D/etc/main.cf"
  touch -d "@$((EPOCHSECONDS - 10))" "$D/etc/main.cf"   # see FINDINGS: fresh main.cf = 2 s wait
  # main.X=... via postconf -e: replaces the line (no "overriding earlier entry" warnings)
  [[ ${#extra[@]} -eq 0 ]] || postconf -c "$D/etc" -e "${extra[@]}" || die "postconf -e failed"

  { cat <<EOF
# service type private unpriv chroot wakeup maxproc command   (chroot=n everywhere)
127.0.0.1:$port inet n - n - - smtpd
pickup    unix  n - n 60 1 pickup
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
tlsmgr    unix  - - n 1000? 1 tlsmgr
flush     unix  n - n 1000? 0 flush
showq     unix  n - n - - showq
virtual   unix  - n n - - virtual
postlog   unix-dgram n - n - 1 postlogd
EOF
    printf '%-9s unix  - - n - 0 bounce\n' bounce defer trace
    printf '%-9s unix  - - n - 1 %s\n' verify verify proxywrite proxymap anvil anvil scache scache
    printf '%-9s unix  - - n - - %s\n' rewrite trivial-rewrite proxymap proxymap smtp smtp \
      relay smtp error error retry error discard discard
  } >"$D/etc/master.cf"
  touch "$D/log/maillog"; find "$D/etc" -type f -exec touch -d "@$((EPOCHSECONDS - 10))" {} +
  local off t0=${EPOCHREALTIME/./} pid ms
  off=$(stat -c %s "$D/log/maillog")
  env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin "$DAEMON_DIR/master" -c "$D/etc" -w \
    </dev/null >"$D/log/master.out" 2>&1 \
    || { cat "$D/log/master.out" >&2; tail -c +$((off + 1)) "$D/log/maillog" >&2
         die "master failed to start (see $D/log/maillog)"; }
  if ! wait_smtp "$port"; then
    tail -c +$((off + 1)) "$D/log/maillog" >&2; cmd_stop "$D" >/dev/null 2>&1 || true
    die "no SMTP greeting on 127.0.0.1:$port within 20 s"
  fi
  pid=$(master_pid "$D") || die "master.pid missing after start"
  if tail -c +$((off + 1)) "$D/log/maillog" | grep -E 'fatal:|panic:|error:|TLS library problem'; then
    cmd_stop "$D" >/dev/null; die "errors in $D/log/maillog (see above); instance stopped"
  fi
  ms=$(( (${EPOCHREALTIME/./} - t0) / 1000 ))
  echo "$(date +%T) $role port=$port pid=$pid started in ${ms} ms" >>"$D/log/peer.log"
  echo "$pid"
}

cmd_stop() {
  [[ $# -eq 1 ]] || usage
  [[ -d $1 ]] || die "no such directory: $1"
  local D i pids pid=''; D=$(cd "$1" && pwd -P)
  if pid=$(master_pid "$D"); then kill -TERM "$pid"
  else pid=''; pids=$(instance_pids "$D"); [[ -z $pids ]] || kill -TERM $pids 2>/dev/null || true; fi
  for ((i = 0; i < 100; i++)); do   # at most 10 s for the processes to exit
    pids=$(instance_pids "$D" "$pid" | sort -u | tr '\n' ' '); [[ -z ${pids// } ]] && break
    sleep 0.1
  done
  if [[ -n ${pids// } ]]; then
    echo "postfix-peer: killing leftover processes: $pids" >&2; kill -KILL $pids 2>/dev/null || true
  fi
  for ((i = 0; i < 50; i++)); do    # give PID 1 up to 5 s to reap the orphaned zombies
    [[ -z $pid || -z $(instance_pids "$D" "$pid" Z) ]] && break; sleep 0.1; done
  rm -f "$D/queue/pid/master.pid"
  echo "stopped $D"
}

case ${1:-} in
  install) shift; cmd_install "$@" ;;
  start) shift; cmd_start "$@" ;;
  stop) shift; cmd_stop "$@" ;;
  *) usage ;;
esac
