# Shared by the example scripts (sourced, not run): needs $BATON and $WORK.

say() { printf '\n== %s\n' "$*"; }

# Redeems a grant, retrying while the node daemon has not yet synced a new
# entry (it refuses locally, before the broker sees the grant).
redeem() {
  for _ in $(seq 1 50); do
    if "$BATON" grant redeem --grant "$1" --spiffe-id "$2" --out "$3" 2>"$WORK/redeem.err"; then
      return 0
    fi
    grep -q "no identity issued" "$WORK/redeem.err" || { cat "$WORK/redeem.err" >&2; return 1; }
    sleep 0.2
  done
  cat "$WORK/redeem.err" >&2
  return 1
}
