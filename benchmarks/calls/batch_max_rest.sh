# The quantized caches' batch-max rows that session 61 (b9722f2) did not reach: the 8B shape's ZipCache at 32k
# and KIVI-4 at 8k (each with its batch-1 row for the prediction). ~3 minutes.
source benchmarks/calls/lib.sh
gpu_info
timeout 230 bash -c "source benchmarks/calls/lib.sh; speed HEAD $HEAD_LABEL speed_batch_max_8b.jsonl --row-time-limit-s 90 \
  --time-limit-s 170 --runs llama-3.1-8b:zipcache:0:32768:max llama-3.1-8b:kivi:4:8192:max"
