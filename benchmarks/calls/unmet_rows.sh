# The rows behind issues #16 and #17's unmet targets, re-timed at the copy (last timed in sessions 57-59, before
# several launch defaults changed): Llama-2-7B's MHA shape at 32k (KIVI-2, KIVI-4, dense beside them) and the
# 8B shape's batch-max rows of KIVI-2, KIVI-4, RTN-2 and ZipCache. ~9 minutes; a row cut at its limit is written.
source benchmarks/calls/lib.sh
gpu_info
timeout 570 bash -c "source benchmarks/calls/lib.sh; speed HEAD $HEAD_LABEL speed_unmet.jsonl --row-time-limit-s 150 \
  --time-limit-s 480 --runs llama-2-7b:full:0:32768:4 llama-2-7b:kivi:2:32768:1 llama-2-7b:kivi:2:32768:4 \
  llama-2-7b:kivi:4:32768:4 llama-3.1-8b:kivi:2:8192:64 llama-3.1-8b:rtn:2:32768:64 llama-3.1-8b:kivi:4:32768:42 \
  llama-3.1-8b:zipcache:0:8192:61"
