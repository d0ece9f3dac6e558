;; partner.wat: the `partner` policy, hand-written in the WebAssembly component text format.
;;
;; This is the WAT edition of the policy specified in policies/partner/README.md (the Rust
;; edition, policies/partner/rust/src/lib.rs, is the reference). It implements the world
;; `postwarden:policy/policy@0.2.0` (policy-sdk/wit/policy.wit) and is loaded by the relay
;; as text: no toolchain produces it, so every canonical-ABI detail below is spelled out.
;; (Its 0.1.0 form is kept as tests/fixtures/policy-0.1/partner.wat, which the relay still
;; loads and adapts.)
;;
;; What it does: domains listed under `verify` get verified TLS, domains listed under
;; `encrypt` get unverified TLS, everyone else is opportunistic (`may`). An entry `name`
;; matches that domain only; an entry `.name` matches every subdomain of `name`.
;;
;; Structure of the component:
;;   1. type-only import `postwarden:policy/types@0.2.0` (the records/variants the exports use;
;;      exported functions may only mention named types, so they come from this import exactly
;;      as wit-component would arrange it);
;;   2. import `postwarden:policy/host@0.2.0`: log, table-put, table-get (nothing else). The
;;      world also imports `postwarden:policy/facts@0.2.0`, but a component imports only the
;;      functions it calls, and this policy reads no facts, so it does not import it;
;;   3. core module $Mem: the linear memory and `cabi_realloc` (a bump allocator). It is a
;;      separate module so that the host functions can be lowered against its memory and
;;      realloc *before* the main module, which imports the lowered functions, is instantiated;
;;   4. core module $Main: the settings parser and the three decisions;
;;   5. the lifted exports configure, plan, on-failure, on-delivered.
;;
;; Settings are parsed as serde_json parses them for the Rust edition: the whole text must be
;; one JSON object (syntax errors anywhere win over setting errors; whitespace anywhere;
;; nesting limited to 127 levels; a repeated key keeps its last value); string escapes
;; (\" \\ \/ \b \f \n \r \t \uXXXX with surrogate pairs) are decoded in full, so keys and
;; entries written with escapes behave as in the Rust edition. Syntax errors read
;; `settings are not a JSON object: <serde_json's text> at line L column C`, with the same
;; text and position as serde_json gives, except in these corner cases:
;;   - numbers are checked against the JSON grammar only: one too large for an f64 (`1e400`),
;;     which serde_json rejects as "number out of range", is accepted here;
;;   - when the settings are not an object at all, a floating-point number is quoted as
;;     written (serde_json prints the parsed f64: `1e5` -> `100000.0`), and in a string only
;;     ASCII control characters are escaped (Rust's Debug form also escapes some non-ASCII).
(component

  ;; ===========================================================================================
  ;; 1. The contract's types, imported from the type-only interface.
  ;;
  ;; Canonical-ABI layouts (size/alignment; offsets from the start of the value):
  ;;   tls-level        enum, 6 cases  -> u8 (none=0 may=1 encrypt=2 dane=3 verify=4 secure=5)
  ;;   tls-version      enum, 2 cases  -> u8 (tls12=0 tls13=1)
  ;;   tls-basis        enum, 3 cases  -> u8 (local=0 sts=1 dane=2)
  ;;   string           ptr:i32 @0, len:i32 @4                         size 8,  align 4
  ;;   requirement      level u8 @0, match-names list<string> @4 (ptr, len),
  ;;                    min-version option<tls-version> @12 (tag u8 @12, value u8 @13),
  ;;                    basis u8 @14, client-identity option<string> @16 (tag u8 @16,
  ;;                    string ptr @20, len @24)                       size 28, align 4
  ;;   decision         tag u8 @0 (abstain=0 require=1), requirement @4  size 32, align 4
  ;;   context          domain @0, mx-host @8, ip @16 (strings), mx-preference u16 @24,
  ;;                    mx-index u32 @28, mx-count u32 @32, attempt u32 @36,
  ;;                    message-age u64 @40, requiretls bool @48, tls-required-no bool @49
  ;;                                                                   size 56, align 8
  ;;   smtp-reply       code u16 @0, text string @4                    size 12, align 4
  ;;   other-failure    class string @0, detail string @8              size 16, align 4
  ;;   failure          tag u8 @0 (starttls-not-offered=0, starttls-refused=1,
  ;;                    handshake-failed=2, ... timeout=9, dnssec-bogus=10,
  ;;                    tlsa-lookup-failed=11, dane-required=12, sts-policy-unavailable=13,
  ;;                    sts-mx-mismatch=14, tlsa-mismatch=15, other=16; 17 cases fit a u8),
  ;;                    payload @4 (smtp-reply, string or other-failure; the largest,
  ;;                    other-failure, sets the size)                  size 20, align 4
  ;;   action           tag u8 @0 (continue-plaintext=0, reconnect-plaintext=1, next-mx=2,
  ;;                    defer=3, bounce=4), payload string @4          size 12, align 4
  ;;   delivery-report  requirement @0, tls-version option<tls-version> @28, cipher string @32,
  ;;                    certificate-verified bool @40                  size 44, align 4
  ;;
  ;; Flattened (core) forms: a string is two i32 (ptr, len); bool, enums, u16 and u32 are one
  ;; i32; u64 is one i64; an option is its tag (i32) followed by the value's slots; a variant
  ;; is its tag (i32) followed by the payload slots joined position by position (as long as
  ;; the longest payload; here every slot is i32, so no slot has to widen).
  ;;   requirement     -> 9 values: level, match-names (ptr, len), min-version (tag, value),
  ;;                      basis, client-identity (tag, ptr, len)
  ;;   decision        -> 10 values (tag, then the requirement's 9)
  ;;   context         -> 13 values: 6 x i32 (3 strings), 4 x i32, i64, 2 x i32
  ;;   failure         -> 5 values (tag, then 4 x i32: smtp-reply is 3, a string 2,
  ;;                      other-failure 4)
  ;;   delivery-report -> 14 values (requirement 9, tls-version 2, cipher 2, the bool 1)
  ;;
  ;; The instance below declares the types the exports reach, in the order wit-component
  ;; 0.258 gives them: the world's `use types.{context, decision, failure, action,
  ;; delivery-report}` in that order, each preceded by the types it uses that are not declared
  ;; yet (decision brings tls-level, tls-version, tls-basis and requirement; failure brings
  ;; smtp-reply and other-failure). wit-component adds the fact types (dnssec-status, sts-mode,
  ;; sts-policy, sts-status, tlsa-record, dane-status) only when the component imports
  ;; `facts`, which this policy does not. The relay accepts either form, in any order: it
  ;; type-checks the exported (and imported) functions against its own, structurally, which
  ;; checks every type they reach (a wrong case in `failure` is refused, naming it), and it
  ;; does not check the instance's other type exports. (wit-component also re-imports the five
  ;; used types at the top level, `(import "context" (type (eq ...)))`; the aliases below do
  ;; the same job.)
  ;; ===========================================================================================
  (import "postwarden:policy/types@0.2.0" (instance $types
    (type $context' (record
      (field "domain" string)
      (field "mx-host" string)
      (field "ip" string)
      (field "mx-preference" u16)
      (field "mx-index" u32)
      (field "mx-count" u32)
      (field "attempt" u32)
      (field "message-age" u64)
      (field "requiretls" bool)
      (field "tls-required-no" bool)))
    (export "context" (type (eq $context')))
    (type $tls-level' (enum "none" "may" "encrypt" "dane" "verify" "secure"))
    (export "tls-level" (type $tls-level (eq $tls-level')))
    (type $tls-version' (enum "tls12" "tls13"))
    (export "tls-version" (type $tls-version (eq $tls-version')))
    (type $tls-basis' (enum "local" "sts" "dane"))
    (export "tls-basis" (type $tls-basis (eq $tls-basis')))
    (type $requirement' (record
      (field "level" $tls-level)
      (field "match-names" (list string))
      (field "min-version" (option $tls-version))
      (field "basis" $tls-basis)
      (field "client-identity" (option string))))
    (export "requirement" (type $requirement (eq $requirement')))
    (type $decision' (variant
      (case "abstain")
      (case "require" $requirement)))
    (export "decision" (type (eq $decision')))
    (type $smtp-reply' (record
      (field "code" u16)
      (field "text" string)))
    (export "smtp-reply" (type $smtp-reply (eq $smtp-reply')))
    (type $other-failure' (record
      (field "class" string)
      (field "detail" string)))
    (export "other-failure" (type $other-failure (eq $other-failure')))
    (type $failure' (variant
      (case "starttls-not-offered")
      (case "starttls-refused" $smtp-reply)
      (case "handshake-failed" string)
      (case "certificate-untrusted" string)
      (case "certificate-expired" string)
      (case "certificate-not-yet-valid" string)
      (case "certificate-name-mismatch" string)
      (case "tls-version-too-old" string)
      (case "connection-lost" string)
      (case "timeout" string)
      (case "dnssec-bogus" string)
      (case "tlsa-lookup-failed" string)
      (case "dane-required" string)
      (case "sts-policy-unavailable" string)
      (case "sts-mx-mismatch" string)
      (case "tlsa-mismatch" string)
      (case "other" $other-failure)))
    (export "failure" (type (eq $failure')))
    (type $action' (variant
      (case "continue-plaintext")
      (case "reconnect-plaintext")
      (case "next-mx")
      (case "defer" string)
      (case "bounce" string)))
    (export "action" (type (eq $action')))
    (type $delivery-report' (record
      (field "requirement" $requirement)
      (field "tls-version" (option $tls-version))
      (field "cipher" string)
      (field "certificate-verified" bool)))
    (export "delivery-report" (type (eq $delivery-report')))
  ))
  (alias export $types "context" (type $context))
  (alias export $types "decision" (type $decision))
  (alias export $types "failure" (type $failure))
  (alias export $types "action" (type $action))
  (alias export $types "delivery-report" (type $delivery-report))

  ;; ===========================================================================================
  ;; 2. The host functions this policy uses.
  ;;
  ;; Lowered (core) signatures, with MAX_FLAT_PARAMS = 16 and MAX_FLAT_RESULTS = 1:
  ;;   log(level, message)   -> (i32 level, i32 ptr, i32 len)                  no result
  ;;   table-put(key, value) -> (i32 kptr, i32 klen, i32 vptr, i32 vlen)        no result
  ;;   table-get(key)        -> (i32 kptr, i32 klen, i32 retptr)                no result
  ;;       option<string> flattens to 3 values (> 1), so the caller passes a return area:
  ;;       tag u8 @0 (none=0, some=1), string ptr @4, len @8 (size 12, align 4). The host
  ;;       copies the string into guest memory through `cabi_realloc`.
  ;; ===========================================================================================
  (import "postwarden:policy/host@0.2.0" (instance $host
    (type $log-level' (enum "trace" "debug" "info" "warn" "error"))
    (export "log-level" (type $log-level (eq $log-level')))
    (export "log" (func (param "level" $log-level) (param "message" string)))
    (export "table-put" (func (param "key" string) (param "value" string)))
    (export "table-get" (func (param "key" string) (result (option string))))
  ))
  (alias export $host "log" (func $log))
  (alias export $host "table-put" (func $table-put))
  (alias export $host "table-get" (func $table-get))

  ;; ===========================================================================================
  ;; 3. Memory and allocator.
  ;;
  ;; cabi_realloc(old_ptr, old_size, align, new_size) -> ptr is a bump allocator: it never
  ;; frees (every decision runs in a fresh instance, and configure once per load), grows the
  ;; memory as needed, and copies the old contents when asked to resize. Two allocations of
  ;; alignment 1 in a row are contiguous; $Main relies on that to build strings piece by piece.
  ;;
  ;; Addresses below 0x1000 belong to $Main's static data (see its memory map); the heap
  ;; starts at 0x1000.
  ;; ===========================================================================================
  (core module $Mem
    (memory (export "memory") 1)
    (global $heap (mut i32) (i32.const 0x1000))
    (func (export "cabi_realloc")
      (param $old_ptr i32) (param $old_size i32) (param $align i32) (param $new_size i32)
      (result i32)
      (local $ptr i32) (local $end i32) (local $pages i32)
      ;; ptr = heap rounded up to `align` (a power of two, at least 1)
      (local.set $ptr
        (i32.and
          (i32.add (global.get $heap) (i32.sub (local.get $align) (i32.const 1)))
          (i32.sub (i32.const 0) (local.get $align))))
      (local.set $end (i32.add (local.get $ptr) (local.get $new_size)))
      (if (i32.lt_u (local.get $end) (local.get $ptr)) (then unreachable))
      ;; grow to cover [ptr, end)
      (local.set $pages (i32.shr_u (i32.add (local.get $end) (i32.const 0xffff)) (i32.const 16)))
      (if (i32.gt_u (local.get $pages) (memory.size))
        (then
          (if (i32.eq (memory.grow (i32.sub (local.get $pages) (memory.size))) (i32.const -1))
            (then unreachable))))
      (global.set $heap (local.get $end))
      (if (local.get $old_ptr)
        (then
          (memory.copy (local.get $ptr) (local.get $old_ptr)
            (select (local.get $old_size) (local.get $new_size)
              (i32.lt_u (local.get $old_size) (local.get $new_size))))))
      (local.get $ptr))
  )
  (core instance $mem (instantiate $Mem))
  (alias core export $mem "memory" (core memory $memory))
  (alias core export $mem "cabi_realloc" (core func $realloc))

  (core func $log-lower
    (canon lower (func $log) (memory $memory) string-encoding=utf8))
  (core func $table-put-lower
    (canon lower (func $table-put) (memory $memory) string-encoding=utf8))
  (core func $table-get-lower
    (canon lower (func $table-get) (memory $memory) (realloc $realloc) string-encoding=utf8))

  ;; ===========================================================================================
  ;; 4. The policy.
  ;;
  ;; Memory map of the static data (below the heap at 0x1000):
  ;;   0x0010  RET: the return area of every export (32 bytes: a decision, the largest;
  ;;           an action or configure's result use the first 12)
  ;;   0x0030  GET: table-get's return area (12 bytes: option<string>)
  ;;   0x0040  DIGITS: scratch for decimal formatting (16 bytes, filled backwards from 0x0050)
  ;;   0x0100  constant strings, NUL-terminated, one per 0x40-byte slot (see the globals $S_*)
  ;; ===========================================================================================
  (core module $Main
    (import "mem" "memory" (memory 1))
    (import "mem" "cabi_realloc" (func $realloc (param i32 i32 i32 i32) (result i32)))
    (import "host" "log" (func $host-log (param i32 i32 i32)))
    (import "host" "table-put" (func $host-table-put (param i32 i32 i32 i32)))
    (import "host" "table-get" (func $host-table-get (param i32 i32 i32)))

    ;; ---- static areas ------------------------------------------------------------------
    (global $RET i32 (i32.const 0x0010))
    (global $GET i32 (i32.const 0x0030))
    (global $DIGITS_END i32 (i32.const 0x0050))

    ;; ---- constant strings (NUL-terminated) ---------------------------------------------
    (global $S_VERIFY i32 (i32.const 0x0100))
    (global $S_ENCRYPT i32 (i32.const 0x0140))
    (global $S_DEFER i32 (i32.const 0x0180))
    (global $S_LOG_1 i32 (i32.const 0x01c0))
    (global $S_LOG_2 i32 (i32.const 0x0200))
    (global $S_LOG_3 i32 (i32.const 0x0240))
    (global $S_UNKNOWN_1 i32 (i32.const 0x0280))
    (global $S_UNKNOWN_2 i32 (i32.const 0x02c0))
    (global $S_BACKTICK i32 (i32.const 0x0300))
    (global $S_NOT_LIST i32 (i32.const 0x0340))
    (global $S_COLON_BACKTICK i32 (i32.const 0x0380))
    (global $S_NOT_DOMAIN i32 (i32.const 0x03c0))
    (global $S_BOTH i32 (i32.const 0x0400))
    (global $S_JSON i32 (i32.const 0x0440))
    (global $S_AT_LINE i32 (i32.const 0x0480))
    (global $S_COLUMN i32 (i32.const 0x04c0))
    (global $S_TRUE i32 (i32.const 0x0500))
    (global $S_FALSE i32 (i32.const 0x0540))
    (global $S_NULL i32 (i32.const 0x0580))
    (global $E_EOF_OBJECT i32 (i32.const 0x05c0))
    (global $E_EOF_LIST i32 (i32.const 0x0600))
    (global $E_EOF_STRING i32 (i32.const 0x0640))
    (global $E_EOF_VALUE i32 (i32.const 0x0680))
    (global $E_COLON i32 (i32.const 0x06c0))
    (global $E_LIST_COMMA_OR_END i32 (i32.const 0x0700))
    (global $E_OBJECT_COMMA_OR_END i32 (i32.const 0x0740))
    (global $E_IDENT i32 (i32.const 0x0780))
    (global $E_VALUE i32 (i32.const 0x07c0))
    (global $E_ESCAPE i32 (i32.const 0x0800))
    (global $E_NUMBER i32 (i32.const 0x0840))
    (global $E_KEY i32 (i32.const 0x0880))
    (global $E_SURROGATE i32 (i32.const 0x08c0))
    (global $E_TRAILING_COMMA i32 (i32.const 0x0900))
    (global $E_TRAILING_CHARACTERS i32 (i32.const 0x0940))
    (global $E_HEX_END i32 (i32.const 0x0980))
    (global $E_RECURSION i32 (i32.const 0x09c0))
    (global $E_CONTROL i32 (i32.const 0x0a00))
    (global $S_INVALID_TYPE i32 (i32.const 0x0a40))
    (global $S_EXPECTED_MAP i32 (i32.const 0x0a80))
    (global $S_SEQUENCE i32 (i32.const 0x0ac0))
    (global $S_BOOLEAN_TRUE i32 (i32.const 0x0b00))
    (global $S_BOOLEAN_FALSE i32 (i32.const 0x0b40))
    (global $S_STRING i32 (i32.const 0x0b80))
    (global $S_INTEGER i32 (i32.const 0x0bc0))
    (global $S_FLOAT i32 (i32.const 0x0c00))
    (global $S_U64_MAX i32 (i32.const 0x0c40))
    (global $S_I64_MIN_DIGITS i32 (i32.const 0x0c80))

    (data (i32.const 0x0100) "verify\00")
    (data (i32.const 0x0140) "encrypt\00")
    (data (i32.const 0x0180) "partner: TLS required for \00")
    (data (i32.const 0x01c0) "partner: \00")
    (data (i32.const 0x0200) " verify, \00")
    (data (i32.const 0x0240) " encrypt\00")
    (data (i32.const 0x0280) "unknown setting `\00")
    (data (i32.const 0x02c0) "` (expected verify, encrypt)\00")
    (data (i32.const 0x0300) "`\00")
    (data (i32.const 0x0340) "` must be a list of domain names\00")
    (data (i32.const 0x0380) ": `\00")
    (data (i32.const 0x03c0) "` is not a domain name\00")
    (data (i32.const 0x0400) "` is listed in both verify and encrypt\00")
    (data (i32.const 0x0440) "settings are not a JSON object: \00")
    (data (i32.const 0x0480) " at line \00")
    (data (i32.const 0x04c0) " column \00")
    (data (i32.const 0x0500) "true\00")
    (data (i32.const 0x0540) "false\00")
    (data (i32.const 0x0580) "null\00")
    (data (i32.const 0x05c0) "EOF while parsing an object\00")
    (data (i32.const 0x0600) "EOF while parsing a list\00")
    (data (i32.const 0x0640) "EOF while parsing a string\00")
    (data (i32.const 0x0680) "EOF while parsing a value\00")
    (data (i32.const 0x06c0) "expected `:`\00")
    (data (i32.const 0x0700) "expected `,` or `]`\00")
    (data (i32.const 0x0740) "expected `,` or `}`\00")
    (data (i32.const 0x0780) "expected ident\00")
    (data (i32.const 0x07c0) "expected value\00")
    (data (i32.const 0x0800) "invalid escape\00")
    (data (i32.const 0x0840) "invalid number\00")
    (data (i32.const 0x0880) "key must be a string\00")
    (data (i32.const 0x08c0) "lone leading surrogate in hex escape\00")
    (data (i32.const 0x0900) "trailing comma\00")
    (data (i32.const 0x0940) "trailing characters\00")
    (data (i32.const 0x0980) "unexpected end of hex escape\00")
    (data (i32.const 0x09c0) "recursion limit exceeded\00")
    (data (i32.const 0x0a00) "control character (\\u0000-\\u001F) found while parsing a string\00")
    (data (i32.const 0x0a40) "invalid type: \00")
    (data (i32.const 0x0a80) ", expected a map\00")
    (data (i32.const 0x0ac0) "sequence\00")
    (data (i32.const 0x0b00) "boolean `true`\00")
    (data (i32.const 0x0b40) "boolean `false`\00")
    (data (i32.const 0x0b80) "string \00")
    (data (i32.const 0x0bc0) "integer `\00")
    (data (i32.const 0x0c00) "floating point `\00")
    (data (i32.const 0x0c40) "18446744073709551615\00")
    (data (i32.const 0x0c80) "9223372036854775808\00")

    ;; ---- parser state ------------------------------------------------------------------
    (global $src (mut i32) (i32.const 0))        ;; the settings text: [src, end)
    (global $end (mut i32) (i32.const 0))
    (global $pos (mut i32) (i32.const 0))        ;; the next byte to read
    (global $str-ptr (mut i32) (i32.const 0))    ;; the string parse-string decoded last
    (global $str-len (mut i32) (i32.const 0))
    (global $err-ptr (mut i32) (i32.const 0))    ;; the error configure returns
    (global $err-len (mut i32) (i32.const 0))
    (global $verify-at (mut i32) (i32.const 0))  ;; where the value of `verify` starts (0: absent)
    (global $encrypt-at (mut i32) (i32.const 0)) ;; where the value of `encrypt` starts (0: absent)
    (global $has-unknown (mut i32) (i32.const 0));; an unknown key was seen; the smallest one:
    (global $unknown-ptr (mut i32) (i32.const 0))
    (global $unknown-len (mut i32) (i32.const 0))
    (global $set-ptr (mut i32) (i32.const 0))    ;; hash set of the verify names
    (global $set-cap (mut i32) (i32.const 0))    ;; its slot count (a power of two; 0: none)

    ;; ==== small helpers ==================================================================

    (func $alloc (param $align i32) (param $size i32) (result i32)
      (call $realloc (i32.const 0) (i32.const 0) (local.get $align) (local.get $size)))

    ;; String building: `$here` is where the next byte-aligned allocation starts, and every
    ;; `$put*` appends at the heap's end, so `start = $here(); $put...; len = $here() - start`
    ;; builds one contiguous string (nothing else may allocate in between).
    (func $here (result i32)
      (call $alloc (i32.const 1) (i32.const 0)))

    (func $put (param $p i32) (param $n i32)
      (memory.copy (call $alloc (i32.const 1) (local.get $n)) (local.get $p) (local.get $n)))

    (func $put-byte (param $b i32)
      (i32.store8 (call $alloc (i32.const 1) (i32.const 1)) (local.get $b)))

    (func $zlen (param $p i32) (result i32)
      (local $n i32)
      (block $done
        (loop $scan
          (br_if $done (i32.eqz (i32.load8_u (i32.add (local.get $p) (local.get $n)))))
          (local.set $n (i32.add (local.get $n) (i32.const 1)))
          (br $scan)))
      (local.get $n))

    (func $put-z (param $z i32)
      (call $put (local.get $z) (call $zlen (local.get $z))))

    ;; Appends `n` in decimal.
    (func $put-u32 (param $n i32)
      (local $i i32)
      (local.set $i (global.get $DIGITS_END))
      (loop $digit
        (local.set $i (i32.sub (local.get $i) (i32.const 1)))
        (i32.store8 (local.get $i)
          (i32.add (i32.const 48) (i32.rem_u (local.get $n) (i32.const 10))))
        (local.set $n (i32.div_u (local.get $n) (i32.const 10)))
        (br_if $digit (local.get $n)))
      (call $put (local.get $i) (i32.sub (global.get $DIGITS_END) (local.get $i))))

    ;; Appends code point `cp` in UTF-8.
    (func $put-utf8 (param $cp i32)
      (if (i32.lt_u (local.get $cp) (i32.const 0x80))
        (then (call $put-byte (local.get $cp)) (return)))
      (if (i32.lt_u (local.get $cp) (i32.const 0x800))
        (then
          (call $put-byte (i32.or (i32.const 0xc0) (i32.shr_u (local.get $cp) (i32.const 6))))
          (call $put-byte (i32.or (i32.const 0x80) (i32.and (local.get $cp) (i32.const 0x3f))))
          (return)))
      (if (i32.lt_u (local.get $cp) (i32.const 0x10000))
        (then
          (call $put-byte (i32.or (i32.const 0xe0) (i32.shr_u (local.get $cp) (i32.const 12))))
          (call $put-byte (i32.or (i32.const 0x80)
            (i32.and (i32.shr_u (local.get $cp) (i32.const 6)) (i32.const 0x3f))))
          (call $put-byte (i32.or (i32.const 0x80) (i32.and (local.get $cp) (i32.const 0x3f))))
          (return)))
      (call $put-byte (i32.or (i32.const 0xf0) (i32.shr_u (local.get $cp) (i32.const 18))))
      (call $put-byte (i32.or (i32.const 0x80)
        (i32.and (i32.shr_u (local.get $cp) (i32.const 12)) (i32.const 0x3f))))
      (call $put-byte (i32.or (i32.const 0x80)
        (i32.and (i32.shr_u (local.get $cp) (i32.const 6)) (i32.const 0x3f))))
      (call $put-byte (i32.or (i32.const 0x80) (i32.and (local.get $cp) (i32.const 0x3f)))))

    ;; Byte-wise equality of two strings.
    (func $eq (param $a i32) (param $an i32) (param $b i32) (param $bn i32) (result i32)
      (local $i i32)
      (if (i32.ne (local.get $an) (local.get $bn)) (then (return (i32.const 0))))
      (block $done
        (loop $byte
          (br_if $done (i32.ge_u (local.get $i) (local.get $an)))
          (if (i32.ne (i32.load8_u (i32.add (local.get $a) (local.get $i)))
                      (i32.load8_u (i32.add (local.get $b) (local.get $i))))
            (then (return (i32.const 0))))
          (local.set $i (i32.add (local.get $i) (i32.const 1)))
          (br $byte)))
      (i32.const 1))

    (func $eq-z (param $a i32) (param $an i32) (param $z i32) (result i32)
      (call $eq (local.get $a) (local.get $an) (local.get $z) (call $zlen (local.get $z))))

    ;; a < b, byte-wise (Rust's order on String, hence serde_json's BTreeMap key order).
    (func $less (param $a i32) (param $an i32) (param $b i32) (param $bn i32) (result i32)
      (local $i i32) (local $x i32) (local $y i32)
      (loop $byte
        (if (i32.or (i32.ge_u (local.get $i) (local.get $an)) (i32.ge_u (local.get $i) (local.get $bn)))
          (then (return (i32.lt_u (local.get $an) (local.get $bn)))))
        (local.set $x (i32.load8_u (i32.add (local.get $a) (local.get $i))))
        (local.set $y (i32.load8_u (i32.add (local.get $b) (local.get $i))))
        (if (i32.ne (local.get $x) (local.get $y))
          (then (return (i32.lt_u (local.get $x) (local.get $y)))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $byte))
      unreachable)

    ;; Whether the UTF-8 text contains a character with Unicode's White_Space property
    ;; (Rust's char::is_whitespace): U+0009..U+000D, U+0020, U+0085, U+00A0, U+1680,
    ;; U+2000..U+200A, U+2028, U+2029, U+202F, U+205F, U+3000.
    (func $has-whitespace (param $p i32) (param $n i32) (result i32)
      (local $i i32) (local $b i32) (local $b1 i32) (local $b2 i32)
      (block $done
        (loop $byte
          (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
          (local.set $b (i32.load8_u (i32.add (local.get $p) (local.get $i))))
          ;; the (up to) two bytes after it; 0 past the end, which matches no pattern below
          (local.set $b1 (i32.const 0))
          (local.set $b2 (i32.const 0))
          (if (i32.lt_u (i32.add (local.get $i) (i32.const 1)) (local.get $n))
            (then (local.set $b1 (i32.load8_u (i32.add (i32.add (local.get $p) (local.get $i)) (i32.const 1))))))
          (if (i32.lt_u (i32.add (local.get $i) (i32.const 2)) (local.get $n))
            (then (local.set $b2 (i32.load8_u (i32.add (i32.add (local.get $p) (local.get $i)) (i32.const 2))))))
          ;; ASCII: space, \t \n \v \f \r
          (if (i32.eq (local.get $b) (i32.const 0x20)) (then (return (i32.const 1))))
          (if (i32.lt_u (i32.sub (local.get $b) (i32.const 0x09)) (i32.const 5))
            (then (return (i32.const 1))))
          ;; U+0085 = C2 85, U+00A0 = C2 A0
          (if (i32.and (i32.eq (local.get $b) (i32.const 0xc2))
                       (i32.or (i32.eq (local.get $b1) (i32.const 0x85))
                               (i32.eq (local.get $b1) (i32.const 0xa0))))
            (then (return (i32.const 1))))
          ;; U+1680 = E1 9A 80
          (if (i32.and (i32.eq (local.get $b) (i32.const 0xe1))
                       (i32.and (i32.eq (local.get $b1) (i32.const 0x9a))
                                (i32.eq (local.get $b2) (i32.const 0x80))))
            (then (return (i32.const 1))))
          ;; U+2000..U+200A = E2 80 80..8A, U+2028 = E2 80 A8, U+2029 = E2 80 A9,
          ;; U+202F = E2 80 AF
          (if (i32.and (i32.eq (local.get $b) (i32.const 0xe2)) (i32.eq (local.get $b1) (i32.const 0x80)))
            (then
              (if (i32.or
                    (i32.lt_u (i32.sub (local.get $b2) (i32.const 0x80)) (i32.const 0x0b))
                    (i32.or (i32.or (i32.eq (local.get $b2) (i32.const 0xa8))
                                    (i32.eq (local.get $b2) (i32.const 0xa9)))
                            (i32.eq (local.get $b2) (i32.const 0xaf))))
                (then (return (i32.const 1))))))
          ;; U+205F = E2 81 9F
          (if (i32.and (i32.eq (local.get $b) (i32.const 0xe2))
                       (i32.and (i32.eq (local.get $b1) (i32.const 0x81))
                                (i32.eq (local.get $b2) (i32.const 0x9f))))
            (then (return (i32.const 1))))
          ;; U+3000 = E3 80 80
          (if (i32.and (i32.eq (local.get $b) (i32.const 0xe3))
                       (i32.and (i32.eq (local.get $b1) (i32.const 0x80))
                                (i32.eq (local.get $b2) (i32.const 0x80))))
            (then (return (i32.const 1))))
          (local.set $i (i32.add (local.get $i) (i32.const 1)))
          (br $byte)))
      (i32.const 0))

    (func $is-digit (param $c i32) (result i32)
      (i32.lt_u (i32.sub (local.get $c) (i32.const 48)) (i32.const 10)))

    ;; ==== errors =========================================================================
    ;; Error paths build the message on the heap, store it in $err-ptr/$err-len and return
    ;; 0 (or -1 where a count is returned); configure turns that into `err(message)`.

    ;; Ends the message started at `start`.
    (func $set-error (param $start i32)
      (global.set $err-ptr (local.get $start))
      (global.set $err-len (i32.sub (call $here) (local.get $start))))

    ;; `settings are not a JSON object: <reason> at line L column C`, the position being
    ;; that of the byte at $pos (serde_json's convention: the column counts bytes from the
    ;; start of the line up to and including it).
    (func $json-error (param $reason i32) (result i32)
      (call $json-error-text (local.get $reason) (call $zlen (local.get $reason))))

    (func $json-error-text (param $reason i32) (param $reason-len i32) (result i32)
      (local $start i32) (local $q i32) (local $i i32) (local $line i32) (local $line-start i32)
      (local.set $q (i32.add (global.get $pos) (i32.const 1)))
      (if (i32.gt_u (local.get $q) (global.get $end)) (then (local.set $q (global.get $end))))
      (local.set $line (i32.const 1))
      (local.set $line-start (global.get $src))
      (local.set $i (global.get $src))
      (block $done
        (loop $byte
          (br_if $done (i32.ge_u (local.get $i) (local.get $q)))
          (if (i32.eq (i32.load8_u (local.get $i)) (i32.const 10))
            (then
              (local.set $line (i32.add (local.get $line) (i32.const 1)))
              (local.set $line-start (i32.add (local.get $i) (i32.const 1)))))
          (local.set $i (i32.add (local.get $i) (i32.const 1)))
          (br $byte)))
      (local.set $start (call $here))
      (call $put-z (global.get $S_JSON))
      (call $put (local.get $reason) (local.get $reason-len))
      (call $put-z (global.get $S_AT_LINE))
      (call $put-u32 (local.get $line))
      (call $put-z (global.get $S_COLUMN))
      (call $put-u32 (i32.sub (local.get $q) (local.get $line-start)))
      (call $set-error (local.get $start))
      (i32.const 0))

    ;; ==== JSON syntax (phase 1: the whole document is checked, as serde_json does) ========

    ;; The next byte, or -1 at the end of the text.
    (func $peek (result i32)
      (if (result i32) (i32.ge_u (global.get $pos) (global.get $end))
        (then (i32.const -1))
        (else (i32.load8_u (global.get $pos)))))

    (func $advance
      (global.set $pos (i32.add (global.get $pos) (i32.const 1))))

    ;; Skips JSON whitespace: space, \t, \n, \r.
    (func $skip-whitespace
      (local $c i32)
      (block $done
        (loop $byte
          (local.set $c (call $peek))
          (br_if $done
            (i32.eqz
              (i32.or
                (i32.or (i32.eq (local.get $c) (i32.const 32)) (i32.eq (local.get $c) (i32.const 9)))
                (i32.or (i32.eq (local.get $c) (i32.const 10)) (i32.eq (local.get $c) (i32.const 13))))))
          (call $advance)
          (br $byte))))

    ;; Four hex digits of a \u escape; -1 on error. As in serde_json, fewer than four bytes
    ;; left is an EOF error, and a bad digit is reported at the fourth byte.
    (func $hex4 (result i32)
      (local $i i32) (local $c i32) (local $v i32)
      (if (i32.gt_u (i32.add (global.get $pos) (i32.const 4)) (global.get $end))
        (then
          (global.set $pos (global.get $end))
          (drop (call $json-error (global.get $E_EOF_STRING)))
          (return (i32.const -1))))
      (loop $digit
        (local.set $c (i32.load8_u (global.get $pos)))
        (block $ok
          (if (call $is-digit (local.get $c))
            (then (local.set $c (i32.sub (local.get $c) (i32.const 48))) (br $ok)))
          (local.set $c (i32.or (local.get $c) (i32.const 0x20)))   ;; lower-case a letter
          (if (i32.lt_u (i32.sub (local.get $c) (i32.const 97)) (i32.const 6))
            (then (local.set $c (i32.sub (local.get $c) (i32.const 87))) (br $ok)))
          (global.set $pos (i32.add (global.get $pos) (i32.sub (i32.const 3) (local.get $i))))
          (drop (call $json-error (global.get $E_ESCAPE)))
          (return (i32.const -1)))
        (local.set $v (i32.or (i32.shl (local.get $v) (i32.const 4)) (local.get $c)))
        (call $advance)
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br_if $digit (i32.lt_u (local.get $i) (i32.const 4))))
      (local.get $v))

    ;; Parses the string whose opening quote is at $pos and decodes it onto the heap:
    ;; afterwards $str-ptr/$str-len hold the UTF-8 text and $pos is past the closing quote.
    ;; Raw control characters (below 0x20) are errors, as in serde_json.
    (func $parse-string (result i32)
      (local $c i32) (local $run i32) (local $n i32) (local $n2 i32)
      (call $advance)
      (global.set $str-ptr (call $here))
      (loop $next
        ;; copy a run of ordinary bytes in one go
        (local.set $run (global.get $pos))
        (block $run-end
          (loop $scan
            (br_if $run-end (i32.ge_u (global.get $pos) (global.get $end)))
            (local.set $c (i32.load8_u (global.get $pos)))
            (br_if $run-end (i32.eq (local.get $c) (i32.const 34)))    ;; "
            (br_if $run-end (i32.eq (local.get $c) (i32.const 92)))    ;; \
            (br_if $run-end (i32.lt_u (local.get $c) (i32.const 32)))  ;; control character
            (call $advance)
            (br $scan)))
        (call $put (local.get $run) (i32.sub (global.get $pos) (local.get $run)))
        (if (i32.ge_u (global.get $pos) (global.get $end))
          (then (return (call $json-error (global.get $E_EOF_STRING)))))
        (local.set $c (i32.load8_u (global.get $pos)))
        (if (i32.eq (local.get $c) (i32.const 34))
          (then
            (call $advance)
            (global.set $str-len (i32.sub (call $here) (global.get $str-ptr)))
            (return (i32.const 1))))
        (if (i32.lt_u (local.get $c) (i32.const 32))
          (then (return (call $json-error (global.get $E_CONTROL)))))
        ;; a backslash: the escaped character follows
        (call $advance)
        (local.set $c (call $peek))
        (if (i32.eq (local.get $c) (i32.const -1))
          (then (return (call $json-error (global.get $E_EOF_STRING)))))
        (local.set $n (i32.const -1))
        (if (i32.eq (local.get $c) (i32.const 34)) (then (local.set $n (i32.const 34))))   ;; \"
        (if (i32.eq (local.get $c) (i32.const 92)) (then (local.set $n (i32.const 92))))   ;; \\
        (if (i32.eq (local.get $c) (i32.const 47)) (then (local.set $n (i32.const 47))))   ;; \/
        (if (i32.eq (local.get $c) (i32.const 98)) (then (local.set $n (i32.const 8))))    ;; \b
        (if (i32.eq (local.get $c) (i32.const 102)) (then (local.set $n (i32.const 12))))  ;; \f
        (if (i32.eq (local.get $c) (i32.const 110)) (then (local.set $n (i32.const 10))))  ;; \n
        (if (i32.eq (local.get $c) (i32.const 114)) (then (local.set $n (i32.const 13))))  ;; \r
        (if (i32.eq (local.get $c) (i32.const 116)) (then (local.set $n (i32.const 9))))   ;; \t
        (if (i32.ge_s (local.get $n) (i32.const 0))
          (then (call $advance) (call $put-byte (local.get $n)) (br $next)))
        (if (i32.ne (local.get $c) (i32.const 117))                                        ;; \u
          (then (return (call $json-error (global.get $E_ESCAPE)))))
        (call $advance)
        (local.set $n (call $hex4))
        (if (i32.lt_s (local.get $n) (i32.const 0)) (then (return (i32.const 0))))
        ;; a trailing surrogate on its own (reported at the last hex digit, as serde_json does)
        (if (i32.lt_u (i32.sub (local.get $n) (i32.const 0xdc00)) (i32.const 0x400))
          (then
            (global.set $pos (i32.sub (global.get $pos) (i32.const 1)))
            (return (call $json-error (global.get $E_SURROGATE)))))
        ;; a leading surrogate must be followed by \u and a trailing one
        (if (i32.lt_u (i32.sub (local.get $n) (i32.const 0xd800)) (i32.const 0x400))
          (then
            (local.set $c (call $peek))
            (if (i32.eq (local.get $c) (i32.const -1))
              (then (return (call $json-error (global.get $E_EOF_STRING)))))
            (if (i32.ne (local.get $c) (i32.const 92))
              (then (return (call $json-error (global.get $E_HEX_END)))))
            (call $advance)
            (local.set $c (call $peek))
            (if (i32.eq (local.get $c) (i32.const -1))
              (then (return (call $json-error (global.get $E_EOF_STRING)))))
            (if (i32.ne (local.get $c) (i32.const 117))
              (then (return (call $json-error (global.get $E_HEX_END)))))
            (call $advance)
            (local.set $n2 (call $hex4))
            (if (i32.lt_s (local.get $n2) (i32.const 0)) (then (return (i32.const 0))))
            (if (i32.ge_u (i32.sub (local.get $n2) (i32.const 0xdc00)) (i32.const 0x400))
              (then
                (global.set $pos (i32.sub (global.get $pos) (i32.const 1)))
                (return (call $json-error (global.get $E_SURROGATE)))))
            (local.set $n
              (i32.add
                (i32.or
                  (i32.shl (i32.sub (local.get $n) (i32.const 0xd800)) (i32.const 10))
                  (i32.sub (local.get $n2) (i32.const 0xdc00)))
                (i32.const 0x10000)))))
        (call $put-utf8 (local.get $n))
        (br $next))
      unreachable)

    ;; Skips a string already known to be valid (phase 2).
    (func $skip-string
      (local $c i32)
      (call $advance)
      (loop $byte
        (local.set $c (i32.load8_u (global.get $pos)))
        (call $advance)
        (if (i32.eq (local.get $c) (i32.const 92)) (then (call $advance) (br $byte)))
        (br_if $byte (i32.ne (local.get $c) (i32.const 34)))))

    ;; true / false / null: `word` is the expected text.
    (func $parse-literal (param $word i32) (result i32)
      (local $w i32) (local $c i32)
      (loop $byte
        (local.set $w (i32.load8_u (local.get $word)))
        (if (i32.eqz (local.get $w)) (then (return (i32.const 1))))
        (local.set $c (call $peek))
        (if (i32.eq (local.get $c) (i32.const -1))
          (then (return (call $json-error (global.get $E_EOF_VALUE)))))
        (if (i32.ne (local.get $c) (local.get $w))
          (then (return (call $json-error (global.get $E_IDENT)))))
        (call $advance)
        (local.set $word (i32.add (local.get $word) (i32.const 1)))
        (br $byte))
      unreachable)

    ;; One or more digits (after `.`, `e`, `e+`, `e-`).
    (func $parse-digits (result i32)
      (local $c i32)
      (local.set $c (call $peek))
      (if (i32.eq (local.get $c) (i32.const -1))
        (then (return (call $json-error (global.get $E_EOF_VALUE)))))
      (if (i32.eqz (call $is-digit (local.get $c)))
        (then (return (call $json-error (global.get $E_NUMBER)))))
      (block $done
        (loop $digit
          (br_if $done (i32.eqz (call $is-digit (call $peek))))
          (call $advance)
          (br $digit)))
      (i32.const 1))

    ;; -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?
    (func $parse-number (result i32)
      (local $c i32)
      (if (i32.eq (call $peek) (i32.const 45)) (then (call $advance)))       ;; -
      (local.set $c (call $peek))
      (if (i32.eq (local.get $c) (i32.const 48))                               ;; 0
        (then
          (call $advance)
          (if (call $is-digit (call $peek))
            (then (return (call $json-error (global.get $E_NUMBER))))))
        (else
          (if (i32.eqz (call $parse-digits)) (then (return (i32.const 0))))))
      (if (i32.eq (call $peek) (i32.const 46))                                 ;; .
        (then
          (call $advance)
          (if (i32.eqz (call $parse-digits)) (then (return (i32.const 0))))))
      (if (i32.eq (i32.or (call $peek) (i32.const 0x20)) (i32.const 101))      ;; e E
        (then
          (call $advance)
          (local.set $c (call $peek))
          (if (i32.or (i32.eq (local.get $c) (i32.const 43)) (i32.eq (local.get $c) (i32.const 45)))
            (then (call $advance)))                                            ;; + -
          (if (i32.eqz (call $parse-digits)) (then (return (i32.const 0))))))
      (i32.const 1))

    ;; Any JSON value at $pos (whitespace before it already skipped). `depth` is the number of
    ;; arrays and objects around it; like serde_json, 128 nested ones are too many.
    (func $parse-value (param $depth i32) (result i32)
      (local $c i32)
      (local.set $c (call $peek))
      (if (i32.eq (local.get $c) (i32.const -1))
        (then (return (call $json-error (global.get $E_EOF_VALUE)))))
      (if (i32.eq (local.get $c) (i32.const 34))                       ;; "
        (then (return (call $parse-string))))
      (if (i32.eq (local.get $c) (i32.const 123))                      ;; {
        (then (return (call $parse-object (i32.add (local.get $depth) (i32.const 1)) (i32.const 0)))))
      (if (i32.eq (local.get $c) (i32.const 91))                       ;; [
        (then (return (call $parse-array (i32.add (local.get $depth) (i32.const 1))))))
      (if (i32.eq (local.get $c) (i32.const 116))                      ;; t
        (then (return (call $parse-literal (global.get $S_TRUE)))))
      (if (i32.eq (local.get $c) (i32.const 102))                      ;; f
        (then (return (call $parse-literal (global.get $S_FALSE)))))
      (if (i32.eq (local.get $c) (i32.const 110))                      ;; n
        (then (return (call $parse-literal (global.get $S_NULL)))))
      (if (i32.or (i32.eq (local.get $c) (i32.const 45)) (call $is-digit (local.get $c)))
        (then (return (call $parse-number))))
      (call $json-error (global.get $E_VALUE)))

    ;; The array whose `[` is at $pos; `depth` counts it.
    (func $parse-array (param $depth i32) (result i32)
      (local $c i32)
      (if (i32.ge_u (local.get $depth) (i32.const 128))
        (then (return (call $json-error (global.get $E_RECURSION)))))
      (call $advance)
      (call $skip-whitespace)
      (local.set $c (call $peek))
      (if (i32.eq (local.get $c) (i32.const 93)) (then (call $advance) (return (i32.const 1))))
      (if (i32.eq (local.get $c) (i32.const -1))
        (then (return (call $json-error (global.get $E_EOF_LIST)))))
      (loop $element
        (if (i32.eqz (call $parse-value (local.get $depth))) (then (return (i32.const 0))))
        (call $skip-whitespace)
        (local.set $c (call $peek))
        (if (i32.eq (local.get $c) (i32.const 44))                     ;; ,
          (then
            (call $advance)
            (call $skip-whitespace)
            (if (i32.eq (call $peek) (i32.const 93))
              (then (return (call $json-error (global.get $E_TRAILING_COMMA)))))
            (br $element)))
        (if (i32.eq (local.get $c) (i32.const 93)) (then (call $advance) (return (i32.const 1))))
        (if (i32.eq (local.get $c) (i32.const -1))
          (then (return (call $json-error (global.get $E_EOF_LIST)))))
        (return (call $json-error (global.get $E_LIST_COMMA_OR_END))))
      unreachable)

    ;; The object whose `{` is at $pos; `depth` counts it. For the settings object itself
    ;; (`top`), every key goes through $note-key.
    (func $parse-object (param $depth i32) (param $top i32) (result i32)
      (local $c i32)
      (if (i32.ge_u (local.get $depth) (i32.const 128))
        (then (return (call $json-error (global.get $E_RECURSION)))))
      (call $advance)
      (call $skip-whitespace)
      (if (i32.eq (call $peek) (i32.const 125)) (then (call $advance) (return (i32.const 1))))
      (loop $member
        (local.set $c (call $peek))
        (if (i32.eq (local.get $c) (i32.const -1))
          (then (return (call $json-error (global.get $E_EOF_OBJECT)))))
        (if (i32.ne (local.get $c) (i32.const 34))
          (then (return (call $json-error (global.get $E_KEY)))))
        (if (i32.eqz (call $parse-string)) (then (return (i32.const 0))))
        (call $skip-whitespace)
        (local.set $c (call $peek))
        (if (i32.eq (local.get $c) (i32.const -1))
          (then (return (call $json-error (global.get $E_EOF_OBJECT)))))
        (if (i32.ne (local.get $c) (i32.const 58))                     ;; :
          (then (return (call $json-error (global.get $E_COLON)))))
        (call $advance)
        (call $skip-whitespace)
        (if (local.get $top) (then (call $note-key)))
        (if (i32.eqz (call $parse-value (local.get $depth))) (then (return (i32.const 0))))
        (call $skip-whitespace)
        (local.set $c (call $peek))
        (if (i32.eq (local.get $c) (i32.const 44))                     ;; ,
          (then
            (call $advance)
            (call $skip-whitespace)
            (if (i32.eq (call $peek) (i32.const 125))
              (then (return (call $json-error (global.get $E_TRAILING_COMMA)))))
            (br $member)))
        (if (i32.eq (local.get $c) (i32.const 125)) (then (call $advance) (return (i32.const 1))))
        (if (i32.eq (local.get $c) (i32.const -1))
          (then (return (call $json-error (global.get $E_EOF_OBJECT)))))
        (return (call $json-error (global.get $E_OBJECT_COMMA_OR_END))))
      unreachable)

    ;; A key of the settings object was just decoded ($str-ptr/$str-len) and its value starts
    ;; at $pos. A repeated key keeps its last value (as serde_json's map does); of the unknown
    ;; keys, the smallest in byte order is remembered, since the Rust edition reports the
    ;; first unknown key of a BTreeMap.
    (func $note-key
      (if (call $eq-z (global.get $str-ptr) (global.get $str-len) (global.get $S_VERIFY))
        (then (global.set $verify-at (global.get $pos)) (return)))
      (if (call $eq-z (global.get $str-ptr) (global.get $str-len) (global.get $S_ENCRYPT))
        (then (global.set $encrypt-at (global.get $pos)) (return)))
      (if (i32.or (i32.eqz (global.get $has-unknown))
                  (call $less (global.get $str-ptr) (global.get $str-len)
                              (global.get $unknown-ptr) (global.get $unknown-len)))
        (then
          (global.set $has-unknown (i32.const 1))
          (global.set $unknown-ptr (global.get $str-ptr))
          (global.set $unknown-len (global.get $str-len)))))

    ;; The whole settings text: one object, whitespace around it, nothing else.
    (func $parse-settings (result i32)
      (local $c i32) (local $at i32) (local $start i32)
      (call $skip-whitespace)
      (local.set $c (call $peek))
      (if (i32.eq (local.get $c) (i32.const 123))
        (then
          (if (i32.eqz (call $parse-object (i32.const 1) (i32.const 1))) (then (return (i32.const 0))))
          (call $skip-whitespace)
          (if (i32.ne (global.get $pos) (global.get $end))
            (then (return (call $json-error (global.get $E_TRAILING_CHARACTERS)))))
          (return (i32.const 1))))
      ;; Not an object: "invalid type: <what>, expected a map", worded as serde_json does.
      ;; It does not look inside an array (reported at the `[`); any other value is parsed
      ;; first (its syntax errors win) and reported just after its end.
      (if (i32.eq (local.get $c) (i32.const 91))
        (then
          (local.set $start (call $here))
          (call $put-z (global.get $S_INVALID_TYPE))
          (call $put-z (global.get $S_SEQUENCE))
          (call $put-z (global.get $S_EXPECTED_MAP))
          (global.set $pos (i32.sub (global.get $pos) (i32.const 1)))
          (return (call $json-error-text (local.get $start) (i32.sub (call $here) (local.get $start))))))
      (local.set $at (global.get $pos))
      (if (i32.eqz (call $parse-value (i32.const 0))) (then (return (i32.const 0))))
      (local.set $start (call $here))
      (call $put-z (global.get $S_INVALID_TYPE))
      (call $put-unexpected (local.get $at))
      (call $put-z (global.get $S_EXPECTED_MAP))
      (global.set $pos (i32.sub (global.get $pos) (i32.const 1)))
      (call $json-error-text (local.get $start) (i32.sub (call $here) (local.get $start))))

    ;; serde_json's description of the scalar value at [at, $pos) (already parsed; a string's
    ;; text is in $str-ptr/$str-len): `boolean `true``, `null`, `string "..."`,
    ;; `integer `N`` (an integer that fits u64, or i64 when negative), otherwise
    ;; `floating point `...``. Approximations: a float is shown as written (serde_json
    ;; prints the parsed f64), and only ASCII is escaped in a string (see $put-debug).
    (func $put-unexpected (param $at i32)
      (local $c i32) (local $n i32) (local $i i32) (local $integer i32)
      (local $digits i32) (local $digits-len i32) (local $limit i32) (local $limit-len i32)
      (local.set $c (i32.load8_u (local.get $at)))
      (if (i32.eq (local.get $c) (i32.const 116))
        (then (call $put-z (global.get $S_BOOLEAN_TRUE)) (return)))
      (if (i32.eq (local.get $c) (i32.const 102))
        (then (call $put-z (global.get $S_BOOLEAN_FALSE)) (return)))
      (if (i32.eq (local.get $c) (i32.const 110))
        (then (call $put-z (global.get $S_NULL)) (return)))
      (if (i32.eq (local.get $c) (i32.const 34))
        (then
          (call $put-z (global.get $S_STRING))
          (call $put-debug (global.get $str-ptr) (global.get $str-len))
          (return)))
      ;; a number
      (local.set $n (i32.sub (global.get $pos) (local.get $at)))
      (local.set $integer (i32.const 1))
      (block $scanned
        (loop $byte
          (br_if $scanned (i32.ge_u (local.get $i) (local.get $n)))
          (local.set $c (i32.or (i32.load8_u (i32.add (local.get $at) (local.get $i))) (i32.const 0x20)))
          (if (i32.or (i32.eq (local.get $c) (i32.const 46)) (i32.eq (local.get $c) (i32.const 101)))
            (then (local.set $integer (i32.const 0))))                         ;; . e E
          (local.set $i (i32.add (local.get $i) (i32.const 1)))
          (br $byte)))
      (local.set $digits (local.get $at))
      (local.set $digits-len (local.get $n))
      (local.set $limit (global.get $S_U64_MAX))
      (if (i32.eq (i32.load8_u (local.get $at)) (i32.const 45))                ;; -
        (then
          (local.set $digits (i32.add (local.get $at) (i32.const 1)))
          (local.set $digits-len (i32.sub (local.get $n) (i32.const 1)))
          (local.set $limit (global.get $S_I64_MIN_DIGITS))
          ;; serde_json reads -0 as the float -0.0
          (if (i32.eq (i32.load8_u (local.get $digits)) (i32.const 48))
            (then (local.set $integer (i32.const 0))))))
      (local.set $limit-len (call $zlen (local.get $limit)))
      ;; too many digits, or as many and larger (same length: byte order is numeric order)
      (if (i32.or
            (i32.gt_u (local.get $digits-len) (local.get $limit-len))
            (i32.and
              (i32.eq (local.get $digits-len) (local.get $limit-len))
              (call $less (local.get $limit) (local.get $limit-len)
                          (local.get $digits) (local.get $digits-len))))
        (then (local.set $integer (i32.const 0))))
      (call $put-z (select (global.get $S_INTEGER) (global.get $S_FLOAT) (local.get $integer)))
      (call $put (local.get $at) (local.get $n))
      (call $put-z (global.get $S_BACKTICK)))

    ;; A string in Rust's Debug form: in double quotes; `"` and `\` preceded by a backslash;
    ;; NUL, tab, LF, CR as \0 \t \n \r; other ASCII control characters as \u{hex}. (Rust
    ;; also escapes non-printable non-ASCII characters; those are copied unchanged here.)
    (func $put-debug (param $p i32) (param $n i32)
      (local $i i32) (local $c i32)
      (call $put-byte (i32.const 34))
      (block $done
        (loop $byte
          (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
          (local.set $c (i32.load8_u (i32.add (local.get $p) (local.get $i))))
          (block $next
            (if (i32.or (i32.eq (local.get $c) (i32.const 34)) (i32.eq (local.get $c) (i32.const 92)))
              (then (call $put-byte (i32.const 92)) (call $put-byte (local.get $c)) (br $next)))
            (if (i32.eqz (local.get $c))
              (then (call $put-byte (i32.const 92)) (call $put-byte (i32.const 48)) (br $next)))
            (if (i32.eq (local.get $c) (i32.const 9))
              (then (call $put-byte (i32.const 92)) (call $put-byte (i32.const 116)) (br $next)))
            (if (i32.eq (local.get $c) (i32.const 10))
              (then (call $put-byte (i32.const 92)) (call $put-byte (i32.const 110)) (br $next)))
            (if (i32.eq (local.get $c) (i32.const 13))
              (then (call $put-byte (i32.const 92)) (call $put-byte (i32.const 114)) (br $next)))
            (if (i32.or (i32.lt_u (local.get $c) (i32.const 32)) (i32.eq (local.get $c) (i32.const 127)))
              (then
                (call $put-byte (i32.const 92))                                ;; \u{
                (call $put-byte (i32.const 117))
                (call $put-byte (i32.const 123))
                (if (i32.ge_u (local.get $c) (i32.const 16))
                  (then (call $put-hex-digit (i32.shr_u (local.get $c) (i32.const 4)))))
                (call $put-hex-digit (i32.and (local.get $c) (i32.const 15)))
                (call $put-byte (i32.const 125))                               ;; }
                (br $next)))
            (call $put-byte (local.get $c)))
          (local.set $i (i32.add (local.get $i) (i32.const 1)))
          (br $byte)))
      (call $put-byte (i32.const 34)))

    (func $put-hex-digit (param $d i32)
      (call $put-byte
        (i32.add (local.get $d) (select (i32.const 48) (i32.const 87) (i32.lt_u (local.get $d) (i32.const 10))))))

    ;; ==== the lists (phase 2: the document is known to be valid JSON) ====================

    ;; Counts the entries of the list `list` (a $S_* name) whose value starts at `at`, or
    ;; fails with "`list` must be a list of domain names" (-1) unless it is an array of
    ;; strings only. Like the Rust edition, this is checked before any entry is looked at.
    (func $count-list (param $list i32) (param $at i32) (result i32)
      (local $n i32) (local $start i32)
      (global.set $pos (local.get $at))
      (block $not-a-list
        (br_if $not-a-list (i32.ne (call $peek) (i32.const 91)))        ;; [
        (call $advance)
        (call $skip-whitespace)
        (if (i32.eq (call $peek) (i32.const 93)) (then (return (i32.const 0))))
        (loop $element
          (br_if $not-a-list (i32.ne (call $peek) (i32.const 34)))      ;; "
          (call $skip-string)
          (local.set $n (i32.add (local.get $n) (i32.const 1)))
          (call $skip-whitespace)
          (if (i32.eq (call $peek) (i32.const 44))                       ;; ,
            (then (call $advance) (call $skip-whitespace) (br $element))))
        (return (local.get $n)))
      (local.set $start (call $here))
      (call $put-z (global.get $S_BACKTICK))
      (call $put-z (local.get $list))
      (call $put-z (global.get $S_NOT_LIST))
      (call $set-error (local.get $start))
      (i32.const -1))

    ;; ---- the set of verify names, to detect a name listed in both lists ----------------
    ;; Open addressing with linear probing; a slot is (ptr: i32, len: i32), ptr 0 = empty.
    ;; It has at least twice as many slots as there are verify entries, so it never fills.

    (func $set-init (param $entries i32)
      (local $cap i32)
      (local.set $cap (i32.const 16))
      (block $done
        (loop $double
          (br_if $done (i32.ge_u (local.get $cap) (i32.shl (local.get $entries) (i32.const 1))))
          (local.set $cap (i32.shl (local.get $cap) (i32.const 1)))
          (br $double)))
      (global.set $set-cap (local.get $cap))
      (global.set $set-ptr (call $alloc (i32.const 4) (i32.shl (local.get $cap) (i32.const 3))))
      (memory.fill (global.get $set-ptr) (i32.const 0) (i32.shl (local.get $cap) (i32.const 3))))

    ;; FNV-1a.
    (func $hash (param $p i32) (param $n i32) (result i32)
      (local $h i32) (local $i i32)
      (local.set $h (i32.const 0x811c9dc5))
      (block $done
        (loop $byte
          (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
          (local.set $h
            (i32.mul
              (i32.xor (local.get $h) (i32.load8_u (i32.add (local.get $p) (local.get $i))))
              (i32.const 0x01000193)))
          (local.set $i (i32.add (local.get $i) (i32.const 1)))
          (br $byte)))
      (local.get $h))

    ;; The slot holding the name, or the empty slot where it belongs.
    (func $set-slot (param $p i32) (param $n i32) (result i32)
      (local $mask i32) (local $i i32) (local $slot i32)
      (local.set $mask (i32.sub (global.get $set-cap) (i32.const 1)))
      (local.set $i (i32.and (call $hash (local.get $p) (local.get $n)) (local.get $mask)))
      (loop $probe
        (local.set $slot (i32.add (global.get $set-ptr) (i32.shl (local.get $i) (i32.const 3))))
        (if (i32.eqz (i32.load (local.get $slot))) (then (return (local.get $slot))))
        (if (call $eq (i32.load (local.get $slot)) (i32.load offset=4 (local.get $slot))
                      (local.get $p) (local.get $n))
          (then (return (local.get $slot))))
        (local.set $i (i32.and (i32.add (local.get $i) (i32.const 1)) (local.get $mask)))
        (br $probe))
      unreachable)

    (func $set-insert (param $p i32) (param $n i32)
      (local $slot i32)
      (local.set $slot (call $set-slot (local.get $p) (local.get $n)))
      (i32.store (local.get $slot) (local.get $p))
      (i32.store offset=4 (local.get $slot) (local.get $n)))

    (func $set-contains (param $p i32) (param $n i32) (result i32)
      (if (i32.eqz (global.get $set-cap)) (then (return (i32.const 0))))
      (i32.ne (i32.load (call $set-slot (local.get $p) (local.get $n))) (i32.const 0)))

    ;; Normalises, checks and stores every entry of the list `list` ($S_VERIFY or
    ;; $S_ENCRYPT) whose value (an array of strings) starts at `at`:
    ;; table-put(name, "verify" | "encrypt").
    (func $store-list (param $list i32) (param $at i32) (result i32)
      (local $entry i32) (local $entry-len i32) (local $name i32) (local $name-len i32)
      (local $i i32) (local $c i32) (local $start i32)
      (global.set $pos (i32.add (local.get $at) (i32.const 1)))         ;; past [
      (call $skip-whitespace)
      (block $done
        (loop $element
          (br_if $done (i32.ne (call $peek) (i32.const 34)))            ;; ] ends the list
          (drop (call $parse-string))                                  ;; valid: phase 1 said so
          (local.set $entry (global.get $str-ptr))
          (local.set $entry-len (global.get $str-len))
          ;; normalise: drop trailing dots, then ASCII lower-case a copy
          (local.set $name-len (local.get $entry-len))
          (block $trimmed
            (loop $trim
              (br_if $trimmed (i32.eqz (local.get $name-len)))
              (br_if $trimmed
                (i32.ne (i32.load8_u (i32.add (local.get $entry) (i32.sub (local.get $name-len) (i32.const 1))))
                        (i32.const 46)))
              (local.set $name-len (i32.sub (local.get $name-len) (i32.const 1)))
              (br $trim)))
          (local.set $name (call $here))
          (call $put (local.get $entry) (local.get $name-len))
          (local.set $i (i32.const 0))
          (block $lowered
            (loop $lower
              (br_if $lowered (i32.ge_u (local.get $i) (local.get $name-len)))
              (local.set $c (i32.load8_u (i32.add (local.get $name) (local.get $i))))
              (if (i32.lt_u (i32.sub (local.get $c) (i32.const 65)) (i32.const 26))  ;; A-Z
                (then (i32.store8 (i32.add (local.get $name) (local.get $i))
                                  (i32.add (local.get $c) (i32.const 32)))))
              (local.set $i (i32.add (local.get $i) (i32.const 1)))
              (br $lower)))
          ;; "<list>: `<entry>` is not a domain name" (the entry as written)
          (if (i32.or (i32.eqz (local.get $name-len))
                      (call $has-whitespace (local.get $name) (local.get $name-len)))
            (then
              (local.set $start (call $here))
              (call $put-z (local.get $list))
              (call $put-z (global.get $S_COLON_BACKTICK))
              (call $put (local.get $entry) (local.get $entry-len))
              (call $put-z (global.get $S_NOT_DOMAIN))
              (call $set-error (local.get $start))
              (return (i32.const 0))))
          (if (i32.eq (local.get $list) (global.get $S_VERIFY))
            (then (call $set-insert (local.get $name) (local.get $name-len)))
            (else
              ;; "`<name>` is listed in both verify and encrypt" (the normalised name)
              (if (call $set-contains (local.get $name) (local.get $name-len))
                (then
                  (local.set $start (call $here))
                  (call $put-z (global.get $S_BACKTICK))
                  (call $put (local.get $name) (local.get $name-len))
                  (call $put-z (global.get $S_BOTH))
                  (call $set-error (local.get $start))
                  (return (i32.const 0))))))
          (call $host-table-put (local.get $name) (local.get $name-len)
                                (local.get $list) (call $zlen (local.get $list)))
          (call $skip-whitespace)
          (if (i32.eq (call $peek) (i32.const 44))                       ;; ,
            (then (call $advance) (call $skip-whitespace)))
          (br $element)))
      (i32.const 1))

    ;; ==== export: configure ==============================================================
    ;; configure: func(settings: string) -> result<_, string>
    ;;   params:  (i32 ptr, i32 len): the settings, copied in by the host via cabi_realloc
    ;;   result:  result<_, string> flattens to 3 values (> 1), so we return a pointer to
    ;;            RET: tag u8 @0 (ok=0, err=1), error string ptr @4, len @8 (size 12, align 4)
    (func (export "configure") (param $ptr i32) (param $len i32) (result i32)
      (local $verify-count i32) (local $encrypt-count i32) (local $start i32)
      (global.set $src (local.get $ptr))
      (global.set $pos (local.get $ptr))
      (global.set $end (i32.add (local.get $ptr) (local.get $len)))
      (block $error
        (br_if $error (i32.eqz (call $parse-settings)))
        ;; "unknown setting `<key>` (expected verify, encrypt)"
        (if (global.get $has-unknown)
          (then
            (local.set $start (call $here))
            (call $put-z (global.get $S_UNKNOWN_1))
            (call $put (global.get $unknown-ptr) (global.get $unknown-len))
            (call $put-z (global.get $S_UNKNOWN_2))
            (call $set-error (local.get $start))
            (br $error)))
        ;; verify first, then encrypt, whatever their order in the text
        (if (global.get $verify-at)
          (then
            (local.set $verify-count (call $count-list (global.get $S_VERIFY) (global.get $verify-at)))
            (br_if $error (i32.lt_s (local.get $verify-count) (i32.const 0)))
            (call $set-init (local.get $verify-count))
            (br_if $error (i32.eqz (call $store-list (global.get $S_VERIFY) (global.get $verify-at))))))
        (if (global.get $encrypt-at)
          (then
            (local.set $encrypt-count (call $count-list (global.get $S_ENCRYPT) (global.get $encrypt-at)))
            (br_if $error (i32.lt_s (local.get $encrypt-count) (i32.const 0)))
            (br_if $error (i32.eqz (call $store-list (global.get $S_ENCRYPT) (global.get $encrypt-at))))))
        ;; log(info, "partner: N verify, M encrypt"); info is case 2 of log-level
        (local.set $start (call $here))
        (call $put-z (global.get $S_LOG_1))
        (call $put-u32 (local.get $verify-count))
        (call $put-z (global.get $S_LOG_2))
        (call $put-u32 (local.get $encrypt-count))
        (call $put-z (global.get $S_LOG_3))
        (call $host-log (i32.const 2) (local.get $start) (i32.sub (call $here) (local.get $start)))
        (i32.store8 (global.get $RET) (i32.const 0))
        (return (global.get $RET)))
      (i32.store8 (global.get $RET) (i32.const 1))
      (i32.store offset=4 (global.get $RET) (global.get $err-ptr))
      (i32.store offset=8 (global.get $RET) (global.get $err-len))
      (global.get $RET))

    ;; ==== the lookup shared by plan and on-failure =======================================

    ;; table-get(key), as a tls-level: 4 = "verify", 2 = "encrypt", 1 = another value (may),
    ;; -1 = no entry.
    ;; The option<string> comes back in GET: tag @0, ptr @4, len @8.
    (func $probe (param $key i32) (param $key-len i32) (result i32)
      (local $value i32) (local $value-len i32)
      (call $host-table-get (local.get $key) (local.get $key-len) (global.get $GET))
      (if (i32.eqz (i32.load8_u (global.get $GET))) (then (return (i32.const -1))))
      (local.set $value (i32.load offset=4 (global.get $GET)))
      (local.set $value-len (i32.load offset=8 (global.get $GET)))
      (if (call $eq-z (local.get $value) (local.get $value-len) (global.get $S_VERIFY))
        (then (return (i32.const 4))))
      (if (call $eq-z (local.get $value) (local.get $value-len) (global.get $S_ENCRYPT))
        (then (return (i32.const 2))))
      (i32.const 1))

    ;; The tls-level for `domain`: the first table hit of `domain` (trailing dots removed),
    ;; then `.parent` for every parent (a.b.example: a.b.example, .b.example, .example).
    ;; No hit: may (1).
    (func $level (param $domain i32) (param $len i32) (result i32)
      (local $i i32) (local $hit i32)
      (block $trimmed
        (loop $trim
          (br_if $trimmed (i32.eqz (local.get $len)))
          (br_if $trimmed
            (i32.ne (i32.load8_u (i32.add (local.get $domain) (i32.sub (local.get $len) (i32.const 1))))
                    (i32.const 46)))
          (local.set $len (i32.sub (local.get $len) (i32.const 1)))
          (br $trim)))
      (local.set $hit (call $probe (local.get $domain) (local.get $len)))
      (if (i32.ge_s (local.get $hit) (i32.const 0)) (then (return (local.get $hit))))
      (block $done
        (loop $dot
          (br_if $done (i32.ge_u (local.get $i) (local.get $len)))
          (if (i32.eq (i32.load8_u (i32.add (local.get $domain) (local.get $i))) (i32.const 46))
            (then
              (local.set $hit (call $probe (i32.add (local.get $domain) (local.get $i))
                                           (i32.sub (local.get $len) (local.get $i))))
              (if (i32.ge_s (local.get $hit) (i32.const 0)) (then (return (local.get $hit))))))
          (local.set $i (i32.add (local.get $i) (i32.const 1)))
          (br $dot)))
      (i32.const 1))

    ;; ==== export: plan ===================================================================
    ;; plan: func(ctx: context) -> decision
    ;;   params:  context flattens to 13 values (<= 16), passed directly:
    ;;            domain (ptr, len), mx-host (ptr, len), ip (ptr, len), mx-preference,
    ;;            mx-index, mx-count, attempt (i32 each), message-age (i64), requiretls,
    ;;            tls-required-no (i32 each)
    ;;   result:  decision flattens to 10 values (> 1): a pointer to RET, laid out as
    ;;            tag u8 @0 = 1 (require), then the requirement @4: level u8 @4,
    ;;            match-names ptr @8 = 0, len @12 = 0, min-version tag u8 @16 = 0 (none),
    ;;            basis u8 @18 = 0 (local), client-identity tag u8 @20 = 0 (none; its
    ;;            ptr @24 and len @28 are not read)
    (func (export "plan")
      (param $domain i32) (param $domain-len i32)
      (param $mx-host i32) (param $mx-host-len i32)
      (param $ip i32) (param $ip-len i32)
      (param $mx-preference i32) (param $mx-index i32) (param $mx-count i32) (param $attempt i32)
      (param $message-age i64) (param $requiretls i32) (param $tls-required-no i32)
      (result i32)
      (i32.store8 (global.get $RET) (i32.const 1))
      (i32.store8 offset=4 (global.get $RET) (call $level (local.get $domain) (local.get $domain-len)))
      (i32.store offset=8 (global.get $RET) (i32.const 0))
      (i32.store offset=12 (global.get $RET) (i32.const 0))
      (i32.store8 offset=16 (global.get $RET) (i32.const 0))
      (i32.store8 offset=18 (global.get $RET) (i32.const 0))
      (i32.store8 offset=20 (global.get $RET) (i32.const 0))
      (global.get $RET))

    ;; ==== export: on-failure =============================================================
    ;; on-failure: func(ctx: context, failure: failure) -> action
    ;;   params:  13 + 5 = 18 flat values (> 16), so the host stores the tuple
    ;;            (context, failure) in memory it allocates with cabi_realloc and passes one
    ;;            pointer. Tuple layout (size 80, align 8): context @0 (56 bytes; domain
    ;;            ptr @0, len @4, mx-index @28, mx-count @32), failure @56 (20 bytes;
    ;;            tag u8 @56, payload @60).
    ;;   result:  action flattens to 3 values (> 1): a pointer to RET, laid out as
    ;;            tag u8 @0, defer/bounce string ptr @4, len @8
    (func (export "on-failure") (param $args i32) (result i32)
      (local $domain i32) (local $domain-len i32) (local $start i32)
      (local.set $domain (i32.load offset=0 (local.get $args)))
      (local.set $domain-len (i32.load offset=4 (local.get $args)))
      (if (i32.ge_u (call $level (local.get $domain) (local.get $domain-len)) (i32.const 2))
        (then
          ;; forced (encrypt or verify): another MX if there is one, else defer
          (if (i32.lt_u (i32.add (i32.load offset=28 (local.get $args)) (i32.const 1))
                        (i32.load offset=32 (local.get $args)))
            (then (i32.store8 (global.get $RET) (i32.const 2)))                   ;; next-mx
            (else
              (local.set $start (call $here))
              (call $put-z (global.get $S_DEFER))
              (call $put (local.get $domain) (local.get $domain-len))
              (i32.store8 (global.get $RET) (i32.const 3))                        ;; defer
              (i32.store offset=4 (global.get $RET) (local.get $start))
              (i32.store offset=8 (global.get $RET) (i32.sub (call $here) (local.get $start))))))
        (else
          ;; opportunistic: starttls-not-offered (0) and starttls-refused (1) may go on in
          ;; plaintext on the same connection; every other failure reconnects in plaintext
          (if (i32.le_u (i32.load8_u offset=56 (local.get $args)) (i32.const 1))
            (then (i32.store8 (global.get $RET) (i32.const 0)))                   ;; continue-plaintext
            (else (i32.store8 (global.get $RET) (i32.const 1))))))                ;; reconnect-plaintext
      (global.get $RET))

    ;; ==== export: on-delivered ===========================================================
    ;; on-delivered: func(ctx: context, report: delivery-report)
    ;;   params:  13 + 14 = 27 flat values (> 16): one pointer to the tuple
    ;;            (context @0, delivery-report @56; size 104, align 8). No result.
    ;;   This policy learns nothing from deliveries.
    (func (export "on-delivered") (param $args i32))
  )

  (core instance $main (instantiate $Main
    (with "mem" (instance $mem))
    (with "host" (instance
      (export "log" (func $log-lower))
      (export "table-put" (func $table-put-lower))
      (export "table-get" (func $table-get-lower))))))

  ;; ===========================================================================================
  ;; 5. The exports. Lifting uses $Mem's memory and cabi_realloc (through which the host
  ;;    copies strings and spilled parameter tuples in), with UTF-8 strings.
  ;; ===========================================================================================
  (type $configure-type (func (param "settings" string) (result (result (error string)))))
  (type $plan-type (func (param "ctx" $context) (result $decision)))
  (type $on-failure-type (func (param "ctx" $context) (param "failure" $failure) (result $action)))
  (type $on-delivered-type (func (param "ctx" $context) (param "report" $delivery-report)))

  (func $configure (type $configure-type)
    (canon lift (core func $main "configure") (memory $memory) (realloc $realloc)
      string-encoding=utf8))
  (func $plan (type $plan-type)
    (canon lift (core func $main "plan") (memory $memory) (realloc $realloc)
      string-encoding=utf8))
  (func $on-failure (type $on-failure-type)
    (canon lift (core func $main "on-failure") (memory $memory) (realloc $realloc)
      string-encoding=utf8))
  (func $on-delivered (type $on-delivered-type)
    (canon lift (core func $main "on-delivered") (memory $memory) (realloc $realloc)
      string-encoding=utf8))

  (export "configure" (func $configure))
  (export "plan" (func $plan))
  (export "on-failure" (func $on-failure))
  (export "on-delivered" (func $on-delivered))
)
