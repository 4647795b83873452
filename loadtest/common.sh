# Shared by the load scripts in this folder (sourced, not run).

# write_configs DIR PORT: DIR/strict.toml and DIR/fast.toml, a server on 127.0.0.1:PORT with
# its data in DIR/data and four developers d1..d4 (keys k1-… to k4-…) for the load generator.
write_configs() {
  local devs="" d mode
  for d in 1 2 3 4; do devs="$devs[[developers]]\nid = \"d$d\"\napi_key = \"k$d-0123456789abcdef\"\n"; done
  for mode in strict fast; do
    printf "listen = \"127.0.0.1:$2\"\ndata_dir = \"$1/data\"\ndurability = \"$mode\"\n$devs" >"$1/$mode.toml"
  done
}

# wait_ready PORT: until the server on PORT answers /readyz (10 s at most).
wait_ready() {
  local _
  for _ in $(seq 1 100); do
    curl -sf -o /dev/null "http://127.0.0.1:$1/readyz" && return 0
    sleep 0.1
  done
}
