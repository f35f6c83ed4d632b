# QuaRot-2 / RTN-2 / QuaRot-4 steps at the copy (2-bit token kernel, reloaded rotated query: both untimed since
# session 59) against dab4f51 (neither) in one call, then QuaRot at the copy with the query kept in registers.
# Needs .gpu/tree_dab4f51.tgz (lib.sh). ~9 minutes.
source benchmarks/calls/lib.sh
gpu_info
ROWS="llama-3.1-8b:rtn:2:8192:64 llama-3.1-8b:quarot:2:8192:64 llama-3.1-8b:quarot:2:32768:4 llama-3.1-8b:quarot:4:32768:4"
t0=$(date +%s)
# each commit its own compile caches (benchmarks/README.md, "speed.py": AOTAutograd keys a graph on Dynamo's graph)
TRITON_CACHE_DIR=/tmp/cache_dab4f51/triton TORCHINDUCTOR_CACHE_DIR=/tmp/cache_dab4f51/inductor \
  timeout 200 bash -c "source benchmarks/calls/lib.sh; speed dab4f51 dab4f51 speed_token_kernel.jsonl --row-time-limit-s 110 --runs $ROWS"
timeout 200 bash -c "source benchmarks/calls/lib.sh; speed HEAD $HEAD_LABEL speed_token_kernel.jsonl --row-time-limit-s 110 --runs $ROWS"
left=$(( 560 - ($(date +%s) - t0) ))
[ $left -gt 60 ] && timeout $left bash -c "source benchmarks/calls/lib.sh; speed HEAD $HEAD_LABEL speed_token_kernel.jsonl \
  --row-time-limit-s 110 --time-limit-s $((left - 50)) --quant-launch reload_rotated_query=0 \
  --runs llama-3.1-8b:quarot:2:8192:64 llama-3.1-8b:quarot:4:32768:4 llama-3.1-8b:quarot:2:32768:4"
echo "== done in $(( $(date +%s) - t0 )) s"
