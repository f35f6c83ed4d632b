# ZipCache's compile since its flush ranks without a sort (session 59 traced ~37 s of a 73 s compile to the sort):
# four rows, the first with fresh Triton and Inductor caches, KIVI-2 beside them; then the Triton cache's
# entries by finish time. ~7 minutes.
source benchmarks/calls/lib.sh
gpu_info
export TRITON_CACHE_DIR=/tmp/fresh_triton TORCHINDUCTOR_CACHE_DIR=/tmp/fresh_inductor
rm -rf "$TRITON_CACHE_DIR" "$TORCHINDUCTOR_CACHE_DIR"
t0=$(date +%s)
timeout 420 bash -c "source benchmarks/calls/lib.sh; speed HEAD $HEAD_LABEL speed_zipcache_compile.jsonl \
  --row-time-limit-s 150 --time-limit-s 330 --runs llama-3.1-8b:zipcache:0:8192:4 llama-3.1-8b:zipcache:0:32768:4 \
  llama-3.1-8b:zipcache:0:8192:61 llama-3.1-8b:kivi:2:8192:4"
find "$TRITON_CACHE_DIR" -name '*.json' ! -name '__grp__*' -printf '%T@ %p\n' | sort -n \
  | awk -v t0="$t0" '{printf "%7.1f %s\n", $1 - t0, $2}' > "$OUT/triton_cache_entries.txt"
grep -c sort "$OUT/triton_cache_entries.txt"; tail -5 "$OUT/triton_cache_entries.txt"
