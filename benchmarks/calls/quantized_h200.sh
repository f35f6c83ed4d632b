# Issue #17's rows with dense in the same call, meant for an H200 (last timed there at cf20039). ~9 minutes.
source benchmarks/calls/lib.sh
gpu_info
timeout 560 bash -c "source benchmarks/calls/lib.sh; speed HEAD $HEAD_LABEL speed_quantized.jsonl --row-time-limit-s 150 \
  --time-limit-s 470 --runs llama-3.1-8b:full:0:32768:4 llama-3.1-8b:kivi:2:32768:4 llama-3.1-8b:kivi:4:32768:4 \
  llama-3.1-8b:quarot:4:32768:4 llama-3.1-8b:rtn:4:32768:4 llama-3.1-8b:zipcache:0:32768:4 \
  llama-3.1-8b:full:0:131072:1 llama-3.1-8b:kivi:2:131072:1 llama-3.1-8b:rtn:4:131072:1"
